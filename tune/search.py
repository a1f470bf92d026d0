"""The search: the fastest int8 configuration whose loss against FP32 stays within the bound.

``ranked`` (the default) spends evaluations of the user's metric only where nothing cheaper can decide:

1. FP32 is evaluated once: the baseline the bound is measured from.
2. The user's configuration, all int8, is evaluated; if it meets the bound the search ends.
3. *Screening*, no evaluation: the cost-free dimensions (calibration method, smooth-quant alpha, bias
   correction, weight granularity: none of them moves a node out of int8; for w4, the algorithm,
   with --calib) are walked one at a time,
   each alternative compiled and scored by its output SQNR against FP32 on calibration samples; the
   best along a dimension is kept when it beats the current one by more than 0.1 dB.
4. The screened configuration is evaluated if screening changed anything; the search ends if it meets
   the bound, else it goes on from whichever of the two scored better.
5. *Ranking*, no evaluation (w4: see below): ``ncc diff``'s fallback gain (how much the output SQNR rises with one node
   alone in float) orders the quantized compute nodes, most useful in float first. Nodes whose fallback
   alone gains nothing (on EfficientNet-Lite0 a third of them: their error partly cancels others') come
   last, ordered by the error each adds on float inputs, which is what they cost once most of the model
   is float.
6. *Bisection* over that order: prefixes of 1, 2, 4, ... nodes in float until one meets the bound, then
   bisection between the last prefix that failed and the first that met: about 2 log2(k) evaluations
   for the k nodes needed.
7. *Give-back*: the float nodes but the last one needed (the prefix without it failed) are tried back
   in int8, least useful first, in groups: half of them at once, the group halved when the bound fails;
   a group that keeps the bound stays int8. It ends when a single node cannot be given back (the nodes
   ranked above it are taken to be needed too). Each trial measures what its nodes buy; the report
   prints it.

For ``w4`` a layer is promoted not to float but to finer groups (:data:`ncc.tune.space.FINE_GROUP`, where
the pipeline's are coarser) or to 8 bits. With calibration data each layer's two moves are measured on
the outputs (how much the divergence from FP32 falls, :mod:`ncc.tune.promotion`) and ranked by that gain
per byte they add; every layer in finer groups is evaluated first, and the bisection runs over the
refining moves if that meets the bound, else from there over the 8-bit moves, give-back returning the
moves that buy least per byte (finer groups too). Without calibration data the layers go in the order of
the error 4 bits give each alone, to finer groups if all of them there meet the bound, else to 8 bits.

``basic`` is the baseline Intel Neural Compressor's basic strategy stands for: the default configuration,
then every quantized node alone in float in graph order, then the nodes accumulated in the order of what
each bought alone, until the bound is met.

With several workers a step also evaluates the configurations the search may need next (the following
prefixes, both halves' midpoints, the next give-backs); decisions read only the configuration the
serial search would evaluate, so the choice is the serial search's.

``--max-trials``, ``--timeout`` and Ctrl-C stop the search; the choice is then the last configuration
the search found within the bound, if any.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ncc.errors import NccError
from ncc.tune.log import TuningLog
from ncc.tune.space import ALPHAS, METHODS, Config, WoqConfig, config_of
from ncc.tune.trials import Job, compile_spec

if TYPE_CHECKING:
    import onnx_ir as ir

SCREEN_MARGIN_DB = 0.1  # an alternative must beat the current configuration's SQNR by this much
SCREEN_SAMPLES = 32
WOQ_SCREEN_SAMPLES = 4  # a language model's logits are large: [samples, tokens, vocabulary]
RANK_SAMPLES = 8
FINE_MARK = "@fine"  # a w4 move to finer groups, after the layer's name (a bare name: its 8-bit move)


@dataclass(frozen=True)
class Bound:
    """``--max-loss``: a fraction of the FP32 metric (``1%``) or an absolute amount (``0.005``)."""

    amount: float
    relative: bool
    lower_is_better: bool = False

    @classmethod
    def parse(cls, text: str, lower_is_better: bool = False) -> Bound:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*", text)
        if not match:
            raise NccError(f"--max-loss takes a percentage (1%) or an absolute amount (0.005), got {text!r}.")
        amount = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
        return cls(amount, bool(match.group(2)), lower_is_better)

    def loss(self, baseline: float, metric: float) -> float:
        """How much worse ``metric`` is than ``baseline`` (negative: better), as the bound counts it."""
        worse = metric - baseline if self.lower_is_better else baseline - metric
        if not self.relative:
            return worse
        if baseline == 0:
            raise NccError(
                "--max-loss as a percentage needs a non-zero FP32 metric; give an absolute amount."
            )
        return worse / abs(baseline)

    def met(self, baseline: float, metric: float) -> bool:
        return self.loss(baseline, metric) <= self.amount + 1e-12

    def limit(self, baseline: float) -> float:
        """The worst metric within the bound."""
        step = self.amount * abs(baseline) if self.relative else self.amount
        return baseline + step if self.lower_is_better else baseline - step

    def describe(self, baseline: float) -> str:
        amount = f"{100 * self.amount:.4g}%" if self.relative else f"{self.amount:.4g} (absolute)"
        sign = "<=" if self.lower_is_better else ">="
        return f"loss <= {amount} (metric {sign} {self.limit(baseline):.6g})"


@dataclass
class Trial:
    number: int
    config: Config | None  # None: the FP32 input
    spec: str | None
    metric: float
    seconds: float
    reused: bool  # read from the tuning log (--resume)
    phase: str
    size: int | None = None  # bytes of the candidate's files


@dataclass
class Screen:
    dimension: str
    config: Config
    sqnr_db: float
    chosen: bool = False


@dataclass
class Outcome:
    bound: Bound
    baseline: float | None = None
    trials: list[Trial] = field(default_factory=list)
    screens: list[Screen] = field(default_factory=list)
    start: Config | None = None  # the user's pipeline as a configuration
    choice: Config | None = None  # the configuration the search settled on (within the bound)
    #: (node ids, how much better the metric is with them in float (None: not measured), whether they stay
    #: in float)
    gains: list[tuple[tuple[str, ...], float | None, bool]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # node id -> name
    #: where the search's promoted nodes go ("in float"; w4: "at 8 bits" or "in groups of 32")
    promoted_to: str = "in float"
    stopped: str | None = None  # why the search ended before it finished
    seconds: float = 0.0
    log_path: str = ""

    @property
    def evaluations(self) -> int:
        return len(self.trials)

    def trial_of(self, config: Config) -> Trial | None:
        return next((t for t in self.trials if t.config == config), None)

    def closest(self) -> Trial | None:
        """The int8 trial with the least loss."""
        int8 = [t for t in self.trials if t.config is not None]
        return min(int8, key=lambda t: self.bound.loss(self.baseline, t.metric)) if int8 else None


class _Stop(Exception):
    """The search ran out of trials or time."""


class Tuner:
    def __init__(
        self,
        job: Job,
        base_passes: list,
        bound: Bound,
        runner,
        log: TuningLog,
        *,
        strategy: str = "ranked",
        max_trials: int | None = None,
        timeout: float | None = None,
        progress=None,
    ):
        self.job, self.base_passes, self.runner, self.log = job, base_passes, runner, log
        self.strategy, self.max_trials = strategy, max_trials
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.progress = progress or (lambda text: None)
        self.out = Outcome(bound, log_path=str(log.path))

    # -- driving --------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        from ncc.passes.spec import format_pipeline

        start = time.monotonic()
        base = self.start = self.out.start = config_of(self.base_passes)
        if isinstance(base, WoqConfig) and self.strategy != "ranked":
            raise NccError("--strategy basic tunes int8 pipelines; weight-only ones take the ranked search.")
        self.spec_of = lambda config: format_pipeline(config.apply(self.base_passes))
        if self.log.get(self._key(base)) is None:
            # the user's configuration must compile (a group size that divides no K, an op the pipeline
            # refuses) before any evaluation is spent
            compile_spec(self.job, self.spec_of(base))
        try:
            self.out.baseline = self._metric(None, "fp32")
            self.progress(
                f"FP32 metric {self.out.baseline:.6g}; bound: {self.out.bound.describe(self.out.baseline)}"
            )
            (self._ranked if self.strategy == "ranked" else self._basic)(base)
        except _Stop as stop:
            self.out.stopped = str(stop)
        except KeyboardInterrupt:
            self.out.stopped = "interrupted"
        finally:
            self.runner.close()
            self.out.seconds = time.monotonic() - start
        return self.out

    def _met(self, metric: float) -> bool:
        return self.out.bound.met(self.out.baseline, metric)

    def _metric(self, config: Config | None, phase: str, ahead: list[Config] = ()) -> float:
        """The metric of ``config`` (evaluated, or from the log), evaluating configurations from ``ahead``
        alongside while workers are free."""
        if self._known(config) is None:
            self._check_budget()
            batch = [config] + [c for c in dict.fromkeys(ahead) if c != config and self._known(c) is None]
            batch = batch[: self.runner.workers]
            if self.max_trials is not None:
                batch = batch[: max(1, self.max_trials - len(self.out.trials))]
            specs = [None if c is None else self.spec_of(c) for c in batch]
            for c, spec, (metric, seconds, size) in zip(batch, specs, self.runner.map(specs)):
                self.log.add(self._key(c), metric, seconds, spec, size)
                self._record(c, spec, metric, seconds, False, phase, size)
        trial = next((t for t in self.out.trials if t.config == config), None)
        if trial is None:  # in the log from an earlier run: counted as that run spent it
            entry = self._known(config)
            trial = self._record(
                config, entry["spec"], entry["metric"], entry["seconds"], True, phase, entry.get("size")
            )
        return trial.metric

    def _known(self, config: Config | None) -> dict | None:
        if any(t.config == config for t in self.out.trials):
            return {}
        return self.log.get(self._key(config))

    def _key(self, config: Config | None) -> str:
        return "fp32" if config is None else config.key()

    def _record(self, config, spec, metric, seconds, reused, phase, size=None) -> Trial:
        trial = Trial(len(self.out.trials) + 1, config, spec, metric, seconds, reused, phase, size)
        self.out.trials.append(trial)
        if config is not None:
            loss = self.out.bound.loss(self.out.baseline, metric)
            verdict = "meets the bound" if self._met(metric) else "outside the bound"
            self.progress(
                f"trial {trial.number} ({phase}): {config.describe(self.start)}: metric {metric:.6g}, loss "
                f"{self._format_loss(loss)}, {verdict}{' (from the log)' if reused else ''}"
            )
        return trial

    def _format_loss(self, loss: float) -> str:
        return f"{100 * loss:.3g}%" if self.out.bound.relative else f"{loss:.4g}"

    def _check_budget(self) -> None:
        if self.max_trials is not None and len(self.out.trials) >= self.max_trials:
            raise _Stop(f"--max-trials {self.max_trials} reached")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _Stop("--timeout reached")

    # -- ranked ---------------------------------------------------------------------------------------
    def _ranked(self, base) -> None:
        if self._met(self._metric(base, "default")):
            self.out.choice = base
            return
        if isinstance(base, WoqConfig):
            self.out.promoted_to = "at 8 bits"
            if not self.job.calib:  # nothing to screen or measure on: the layer table's order
                self._woq_ladder(base)
                return
            screened, model, feeds, float_model = self._screen(base)
            del model
            start = self._start(base, screened)
            if start is not None:
                self._woq_moves(start, float_model, feeds)
            return
        screened, model, feeds, float_model = self._screen(base)
        start = self._start(base, screened)
        if start is None:
            return
        if start is not screened:  # the screened model is not the one to rank on
            model = compile_spec(self.job, self.spec_of(base))
        ranking = self._rank(float_model, model, feeds)
        del model
        self._bisect(start, ranking)

    def _start(self, base, screened):
        """Evaluate ``screened`` if screening changed anything; None when it meets the bound (the search is
        over), else the configuration the search goes on from: whichever of the two scored better."""
        if screened == base:
            return screened
        if self._met(self._metric(screened, "screened")):
            self.out.choice = screened
            return None
        better = self._better(self.out.trial_of(screened).metric, self.out.trial_of(base).metric) > 0
        return screened if better else base

    def _screen(self, base: Config):
        """Walk the cost-free dimensions on calibration data (see the module docstring)."""
        from ncc.metrics import relative_l2_error, token_masks
        from ncc.passes.quant import fallback
        from ncc.passes.quant.calib_data import load_calibration_data
        from ncc.tools.modelio import load_model

        float_model = load_model(self.job.model)
        samples = WOQ_SCREEN_SAMPLES if isinstance(base, WoqConfig) else SCREEN_SAMPLES
        feeds = fallback.samples(load_calibration_data(self.job.calib), samples)
        outputs = [v.name for v in float_model.graph.outputs]
        reference = fallback.run(float_model, feeds, outputs)
        masks = token_masks(feeds)

        records: list = []

        def score(config: Config):
            self._check_budget()
            model = compile_spec(self.job, self.spec_of(config), records)
            got = fallback.run(model, feeds, outputs)
            error = max(relative_l2_error(reference[n], got[n], masks) for n in outputs)
            return (math.inf if error == 0 else -20.0 * math.log10(error)), model

        current = base
        best, model = score(base)
        self.out.screens.append(Screen("start", base, best, True))
        smoothed = any(r.name == "smooth-quant" and r.modified for r in records)
        for dimension, values in _dimensions(current, smoothed):
            chosen = None
            for value in values:
                config = dataclasses.replace(current, **{dimension: value})
                if config == current:
                    continue
                sqnr, candidate = score(config)
                screen = Screen(dimension, config, sqnr)
                self.out.screens.append(screen)
                self.progress(f"screen {config.describe(base)}: output SQNR {sqnr:.2f} dB (calibration data)")
                if sqnr > best + SCREEN_MARGIN_DB:
                    best, model, chosen = sqnr, candidate, screen
                del candidate
            if chosen is not None:
                chosen.chosen = True
                current = chosen.config
        return current, model, feeds[:RANK_SAMPLES] if len(feeds) > RANK_SAMPLES else feeds, float_model

    def _rank(self, float_model, model, feeds) -> list[str]:
        """Quantized compute nodes by ``ncc diff``'s fallback gain, largest first; those with no gain by
        the error they add alone, largest first."""
        from ncc.ir.ids import ID_KEY
        from ncc.passes.quant import fallback
        from ncc.tools.diff import diff

        candidates = {fallback.node_key(n) for n in fallback.candidates(model)}
        nodes = list(model.graph)
        self.out.labels.update(fallback.labels(model))
        rows = [r for r in diff(float_model, model, feeds, budget=False).rows if r.gain_db is not None]
        # nodes whose fallback alone gains nothing (their error partly cancels others') last, by the error
        # each adds on float inputs: what they cost once most of the model runs in float
        useful = [r for r in rows if r.gain_db > 0]
        rest = sorted(
            (r for r in rows if r.gain_db <= 0), key=lambda r: (r.added_sqnr_db is None, r.added_sqnr_db)
        )
        ranked = [nodes[r.index].metadata_props.get(ID_KEY) for r in useful + rest]
        ranked = [key for key in ranked if key in candidates]
        self.progress(
            "ranked by fallback gain: "
            + ", ".join(f"{self.out.labels.get(k, k)}" for k in ranked[:5])
            + (" ..." if len(ranked) > 5 else "")
        )
        return list(dict.fromkeys(ranked))

    def _finer(self, start: WoqConfig) -> tuple[WoqConfig, ir.Model] | None:
        """``start`` with every layer in groups of :data:`FINE_GROUP` and the model its unpacked pipeline
        compiles to, where that is coarser and compiles; else None."""
        finer = start.finer()
        if finer is None:
            return None
        try:
            return finer, self._compiled(self._unpacked(finer))
        except NccError as err:  # a K the finer group size does not divide: no refining step
            self.progress(f"groups of {finer.group_size} do not compile ({err}); raising to 8 bits only")
            return None

    def _woq_ladder(self, start: WoqConfig) -> None:
        """The w4 search without calibration data, from ``start``: where its groups are coarser than
        :data:`FINE_GROUP`, the layers refined to groups of that size (a fraction of a bit per weight
        each) if refining all of them meets the bound; else, from all of them refined (when that scored
        better), layers raised to 8 bits. Layers go in the order of the error 4 bits give them."""
        found = self._finer(start)
        finer = None if found is None else found[0]
        del found  # its compiled model only showed that the finer groups compile
        if finer is not None:
            metric = self._metric(finer, "finer")
            if self._met(metric):
                self.out.promoted_to = f"in groups of {finer.group_size}"
                self._bisect(start, self._rank_layers_alone(start), start.refine, whole=finer)
                return
            if self._better(metric, self.out.trial_of(start).metric) > 0:
                start = finer
        self._bisect(start, self._rank_layers_alone(start))

    def _woq_moves(self, start: WoqConfig, float_model, feeds) -> None:
        """The w4 search with calibration data, from ``start``: each layer may move to groups of
        :data:`FINE_GROUP` (where ``start``'s are coarser) or to 8 bits. What each move buys is measured on
        the outputs (:mod:`ncc.tune.promotion`) and what it costs is its added bytes.

        Finer groups come first, as one block: each layer's alone buys little, but together they buy much
        for a few percent more bytes, so ranked one by one against 8-bit moves they come too late. Every
        layer refined is evaluated first; if it meets the bound the search bisects over the refining moves
        alone (by gain per byte), else it goes on from there over the 8-bit moves, ranked by what 8 bits buy
        per byte with every other layer in finer groups (measured from there: from the coarser groups the
        two moves' gains do not subtract), and give-back then returns the moves that buy least per byte,
        finer groups included: layers go back to the pipeline's coarser groups where the bound allows."""
        found = self._finer(start)
        if found is None:
            self.out.promoted_to = "at 8 bits"
            self._bisect(start, self._rank_layers(start, float_model, feeds))
            return
        from ncc.tune.promotion import dequantized_weights

        finer, fine_weights = found[0], dequantized_weights(found[1])
        del found
        self.out.promoted_to = "raised"
        unpacked = self._unpacked(start)
        low = self._dequantized(unpacked)
        _, fine = self._layer_gains(float_model, feeds, low, fine_weights, f"groups of {finer.group_size}")
        rates: dict[str, float] = {}  # move -> measured gain per added byte
        costs: dict[str, float] = {}  # layer -> bytes 8 bits add to its finer groups
        for name in sorted(fine):
            k, n = low[name].shape
            cost_fine = _bytes(k, n, 4, finer.group_size) - _bytes(k, n, 4, start.group_size)
            costs[name] = _bytes(k, n, 8, start.group_size) - _bytes(k, n, 4, finer.group_size)
            rates[f"{name}{FINE_MARK}"] = fine[name] / cost_fine
            self.out.labels[f"{name}{FINE_MARK}"] = f"{name} (groups of {finer.group_size})"
            self.out.labels[name] = f"{name} (8 bits)"

        def by_rate(moves) -> list[str]:
            return sorted(moves, key=lambda m: (-rates[m], m))

        refining = by_rate(rates)

        def promote(chosen) -> WoqConfig:
            wide = [m for m in chosen if not m.endswith(FINE_MARK)]
            refined = [m.removesuffix(FINE_MARK) for m in chosen if m.endswith(FINE_MARK)]
            return start.refine([m for m in refined if m not in wide]).promote(wide)

        def back(kept: list[str]) -> list[str]:
            """Give-back order: least gain per byte first; a layer's finer groups stay while it is at 8 bits
            (giving them back would change nothing)."""
            moves = [m for m in kept[:-1] if m.removesuffix(FINE_MARK) not in kept]
            return sorted(moves, key=lambda m: (rates[m], m))

        self.progress(
            f"ranked {len(refining)} moves to groups of {finer.group_size} by measured gain per byte: "
            f"{', '.join(self.out.labels[m] for m in refining[:3])}{' ...' if len(refining) > 3 else ''}"
        )
        whole = promote(refining)
        if self._met(self._metric(whole, "finer")):
            self.out.promoted_to = f"in groups of {finer.group_size}"
            self._bisect(start, refining, promote, whole=whole, back=back)
        else:  # from every layer in finer groups, layers to 8 bits, by what 8 bits buy there
            eight = self._dequantized(start.at_8_bits(unpacked))
            _, beyond = self._layer_gains(float_model, feeds, fine_weights, eight, "8 bits beyond them")
            rates.update((name, beyond[name] / max(costs[name], 1e-12)) for name in costs if name in beyond)
            raising = by_rate(m for m in rates if not m.endswith(FINE_MARK))
            self.progress(
                f"every layer in groups of {finer.group_size} misses the bound; ranked {len(raising)} moves to "
                f"8 bits by measured gain per byte: {', '.join(self.out.labels[m] for m in raising[:3])}"
                f"{' ...' if len(raising) > 3 else ''}"
            )
            self._bisect(start, refining + raising, promote, back=back, known=len(refining))
        # a layer at 8 bits has no finer groups to report
        wide = set(self.out.choice.wide) if isinstance(self.out.choice, WoqConfig) else set()
        moot = {f"{name}{FINE_MARK}" for name in wide}
        self.out.gains = [g for g in self.out.gains if not (len(g[0]) == 1 and g[0][0] in moot)]

    def _unpacked(self, config: WoqConfig) -> list:
        """The pipeline of ``config`` without its packing pass: weights as DequantizeLinear of constants."""
        return [p for p in config.apply(self.base_passes) if not p.name.startswith("pack-")]

    def _compiled(self, passes: list) -> ir.Model:
        from ncc.passes.spec import format_pipeline

        self._check_budget()
        return compile_spec(self.job, format_pipeline(passes))

    def _dequantized(self, passes: list) -> dict:
        from ncc.tune.promotion import dequantized_weights

        return dequantized_weights(self._compiled(passes))

    def _layer_gains(
        self, float_model, feeds, low: dict, higher, what: str
    ) -> tuple[float, dict[str, float]]:
        """The outputs' divergence from FP32 with every layer at ``low`` (dequantized weights), and per layer
        how much it falls with that layer's weights from ``higher`` (a pipeline, or its dequantized weights)
        (:mod:`ncc.tune.promotion`)."""
        from ncc.tune.promotion import promotion_gains

        high = higher if isinstance(higher, dict) else self._dequantized(higher)
        self.progress(f"measuring what {what} buy in each of {len(set(low) & set(high))} layers")
        return promotion_gains(float_model, low, high, feeds, self.progress)

    def _rank_layers(self, base: WoqConfig, float_model, feeds) -> list[str]:
        """Weight-only layers by what 8 bits instead of 4 buy on the outputs (:mod:`ncc.tune.promotion`) on
        the calibration samples ``feeds``, largest first."""
        unpacked = self._unpacked(base)
        low = self._dequantized(unpacked)
        divergence, gains = self._layer_gains(float_model, feeds, low, base.at_8_bits(unpacked), "8 bits")
        names = sorted(gains, key=lambda name: (-gains[name], name))
        self.out.labels.update({name: name for name in names})
        self.progress(
            f"ranked by measured gain (output KL divergence {divergence:.4g} all at 4 bits): "
            f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        )
        return names

    def _rank_layers_alone(self, base: WoqConfig) -> list[str]:
        """Weight-only layers by the output error 4 bits give them (the pass's layer table), largest first:
        the order without calibration data."""
        from ncc.passes.woq.base import LAYERS_KEY

        contexts: list = []
        compile_spec(self.job, self.spec_of(base), contexts=contexts)
        layers = [
            r for r in contexts[0].data.get(LAYERS_KEY, []) if r.algo != "rtn" or r.weight_error is not None
        ]
        layers = [r for r in layers if not r.weight.endswith(".embed") and r.k > 0]
        ranked = sorted(
            layers, key=lambda r: -(r.output_error if r.output_error is not None else r.weight_error)
        )
        names = list(dict.fromkeys(r.layer for r in ranked))
        self.out.labels.update({name: name for name in names})
        self.progress(
            f"ranked by 4-bit output error: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        )
        return names

    def _bisect(self, start, ranking: list[str], promote=None, whole=None, back=None, known: int = 0) -> None:
        """Bisection and give-back over ``ranking`` from ``start`` (see the module docstring); ``promote``
        makes the configuration with given nodes promoted (``start.promote``), ``whole`` is the one with all
        of them promoted when that is a configuration of its own that met the bound (w4 refined groups).
        ``known``: the prefix the search starts from, already evaluated outside the bound (0: ``start``);
        the prefixes tried grow from it by 1, 2, 4, ... ``back`` orders the give-back candidates (default:
        the promoted nodes but the last, least useful first)."""
        promote = promote or start.promote
        # one node at least stays as it was: with none, int8 would be the FP32 model
        n = len(ranking) - (0 if whole is not None else 1)
        if n < 1:
            self.out.stopped = "the model has one quantized compute node: nothing to keep in float but all"
            return

        def prefix(k: int) -> Config:
            return whole if k == len(ranking) and whole is not None else promote(ranking[:k])

        start_config = start if known == 0 else prefix(known)
        lo, step, metrics = known, 1, {known: self.out.trial_of(start_config).metric}
        while True:
            k = min(known + step, n)
            ahead = [prefix(min(known + step * 2**i, n)) for i in range(1, 4)]
            metrics[k] = self._metric(prefix(k), "bisect", ahead)
            if self._met(metrics[k]):
                hi = k
                break
            lo = k
            if k == n:
                self.out.stopped = (
                    f"the bound is not met even with {n} of the {n + 1} quantized nodes in float"
                )
                return
            step *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ahead = [prefix((lo + mid) // 2), prefix((mid + hi) // 2)]
            metrics[mid] = self._metric(prefix(mid), "bisect", ahead)
            if self._met(metrics[mid]):
                hi = mid
            else:
                lo = mid
        kept = list(ranking[:hi])
        self.out.choice = prefix(hi)
        current = metrics[hi]
        bought = {(kept[-1],): self._better(current, metrics[lo])}
        # give back, least useful first, in groups: half of the candidates at once, halving the group
        # when the bound fails, down to single nodes; the last node is needed (the prefix without it failed)
        candidates = back(kept) if back is not None else list(reversed(kept[:-1]))
        size = max(1, len(candidates) // 2)
        while candidates:
            group = tuple(candidates[:size])
            trial = promote([k for k in kept if k not in group])
            smaller = tuple(candidates[: max(1, size // 2)])
            ahead = [promote([k for k in kept if k not in smaller])] if size > 1 else []
            metric = self._metric(trial, "give back", ahead)
            if self._met(metric):
                kept = [k for k in kept if k not in group]
                self.out.gains.append((group, self._better(current, metric), False))
                self.out.choice, current = trial, metric
                candidates = candidates[size:]
                size = min(size, max(1, len(candidates)))
            elif size > 1:
                size //= 2
            else:  # the least useful node left is needed: the more useful ones are taken to be too
                bought[group] = self._better(current, metric)
                break
        untried = [k for k in kept if (k,) not in bought]
        self.out.gains[:0] = [((k,), None, True) for k in untried]
        self.out.gains[:0] = [(group, gain, True) for group, gain in bought.items()]

    def _better(self, metric: float, other: float) -> float:
        """How much better ``metric`` is than ``other`` in the metric's own direction."""
        return other - metric if self.out.bound.lower_is_better else metric - other

    # -- basic ----------------------------------------------------------------------------------------
    def _basic(self, base: Config) -> None:
        from ncc.passes.quant import fallback

        if self._met(self._metric(base, "default")):
            self.out.choice = base
            return
        model = compile_spec(self.job, self.spec_of(base))
        self.out.labels.update(fallback.labels(model))
        nodes = [fallback.node_key(n) for n in fallback.candidates(model)]
        del model
        alone = {}
        for i, key in enumerate(nodes):
            ahead = [base.with_float([k]) for k in nodes[i + 1 : i + 4]]
            alone[key] = self._metric(base.with_float([key]), "one node", ahead)
            if self._met(alone[key]):
                self.out.choice = base.with_float([key])
                self.out.gains.append(
                    ((key,), self._better(alone[key], self.out.trial_of(base).metric), True)
                )
                return
        order = sorted(nodes, key=lambda k: -self._better(alone[k], 0.0))[:-1]  # one node stays int8
        for count in range(2, len(order) + 1):
            ahead = [base.with_float(order[: count + i]) for i in range(1, 3) if count + i <= len(order)]
            metric = self._metric(base.with_float(order[:count]), "accumulate", ahead)
            if self._met(metric):
                self.out.choice = base.with_float(order[:count])
                return
        self.out.stopped = (
            f"the bound is not met even with {len(order)} of the {len(nodes)} quantized nodes in float"
        )


def _bytes(k: int, n: int, bits: int, group: int) -> float:
    """Bytes of a ``[k, n]`` weight at ``bits`` in groups of ``group`` along k (0: one group): the packed
    codes, a float32 scale and a ``bits``-wide zero point per group."""
    groups = n * -(-k // (group or k))
    return (k * n * bits + groups * (32 + bits)) / 8


def _dimensions(config, smoothed: bool):
    """The cost-free dimensions and their values, in the order screening walks them (alpha only where
    smooth-quant found something to smooth; for weight-only pipelines the algorithm)."""
    if isinstance(config, WoqConfig):
        yield "algo", ("rtn", "gptq", "awq")
        return
    yield "method", METHODS
    if config.alpha is not None and smoothed:
        yield "alpha", ALPHAS
    if config.bias is not None:
        yield "bias", (True, False)
    yield "weights", ("per-channel", "per-tensor")
