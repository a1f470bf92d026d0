"""The tuning report: the trials, what each float node buys, and how to rebuild the choice."""

from __future__ import annotations

from ncc.tune.search import Outcome
from ncc.tune.space import FINE_GROUP


def format_outcome(outcome: Outcome, *, strategy: str, rebuild: str) -> str:
    bound, base = outcome.bound, outcome.baseline
    lines = [f"tuning ({strategy}): FP32 metric {base:.6g}; bound: {bound.describe(base)}"]
    start = outcome.start
    if outcome.screens:
        lines.append("  screening (output SQNR on calibration samples, no evaluation):")
        for screen in outcome.screens:
            mark = "  <- kept" if screen.chosen and screen.dimension != "start" else ""
            what = (
                "start: " + start.describe() if screen.dimension == "start" else screen.config.describe(start)
            )
            lines.append(f"    {what}: {screen.sqnr_db:.2f} dB{mark}")
    lines.append("  trial  phase       metric      loss      MB        configuration")
    for t in outcome.trials:
        loss = "-" if t.config is None else _loss(outcome, t.metric)
        what = "FP32 input" if t.config is None else t.config.describe(start)
        from_log = "  (from the log)" if t.reused else ""
        size = f"{t.size / 1e6:.2f}" if t.size is not None else "-"
        lines.append(
            f"  {t.number:5d}  {t.phase:<10}  {t.metric:<10.6g}  {loss:<8}  {size:<8}  {what}{from_log}"
        )
    where = outcome.promoted_to
    if outcome.gains:
        what = "nodes" if hasattr(outcome.choice, "keep_float") else "layers"
        lines.append(
            f"  {what} {where} (what each buys: how much better the metric is with it than without, measured):"
        )
        for keys, gain, kept in outcome.gains:
            name = " + ".join(outcome.labels.get(key, f"#{key}") for key in keys)
            state = f"kept {where}" if kept else "given back"
            if gain is None:
                lines.append(f"    {name}: not measured ({state}: ranked above a node that is needed)")
            else:
                lines.append(f"    {name}: {gain:+.6g} ({state})")
    choice = outcome.trial_of(outcome.choice)
    reused = sum(t.reused for t in outcome.trials)
    lines.append(
        f"tuned: metric {choice.metric:.6g} (loss {_loss(outcome, choice.metric)}) with "
        f"{_promoted(outcome.choice)}; {outcome.evaluations} evaluations"
        f"{f' ({reused} from the log)' if reused else ''} in {outcome.seconds:.0f} s"
        + (f"; stopped early: {outcome.stopped}" if outcome.stopped else "")
    )
    lines.append(f"  log: {outcome.log_path}")
    lines.append(f"  rebuild: {rebuild}")
    return "\n".join(lines)


def _promoted(choice) -> str:
    """The nodes ``choice`` raises above the pipeline's setting, counted by where they went."""

    def count(n: int, where: str) -> str:
        return f"{n} node{'s' if n != 1 else ''} {where}"

    if hasattr(choice, "keep_float"):
        return count(len(choice.keep_float), "in float")
    fine = choice.refined
    parts = [count(len(fine), f"in groups of {FINE_GROUP}")] if fine else []
    if choice.wide or not fine:
        parts.append(count(len(choice.wide), "at 8 bits"))
    return " and ".join(parts)


def _loss(outcome: Outcome, metric: float) -> str:
    loss = outcome.bound.loss(outcome.baseline, metric)
    return f"{100 * loss:.3g}%" if outcome.bound.relative else f"{loss:.4g}"
