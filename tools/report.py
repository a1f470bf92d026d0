"""The report printed after every compile: what was quantized, what was not and why, sizes, time."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir


def files_size(paths: list[Path]) -> int:
    """Bytes in ``paths``; a folder (a SavedModel) counts the files in it."""
    files = [f for p in paths for f in ([p] if not p.is_dir() else p.rglob("*"))]
    return sum(f.stat().st_size for f in files if f.is_file())


def quantization_summary(model: ir.Model) -> list[str]:
    quantized, skipped = Counter(), Counter()
    for node in model.graph:
        mode = node.metadata_props.get("ncc.quant")
        if mode:
            quantized[(mode, node.op_type)] += 1
        elif reason := node.metadata_props.get("ncc.quant.skip"):
            skipped[(node.op_type, _short(reason))] += 1
    if not quantized and not skipped:
        return []
    lines = []
    for mode in sorted({m for m, _ in quantized}):
        ops = ", ".join(f"{op} {n}" for (m, op), n in sorted(quantized.items()) if m == mode)
        lines.append(f"quantized ({mode}): {ops}")
    for (op, reason), n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"kept float: {op} x{n}: {reason}")
    return lines


def _short(reason: str) -> str:
    """Group reasons that differ only by the tensor they name."""
    for marker in (" in ", " for "):
        if marker in reason and reason.split(marker)[0] in {"masking sentinels", "no calibration statistics"}:
            return reason.split(marker)[0]
    return reason


def _reported(pass_name: str, note: str) -> bool:
    """Pass notes the report repeats: the weight-only, embedding-table and lowering passes', min-cosine's
    fallback steps, opset changes, what the compiling CPU changed, and warnings."""
    return (
        pass_name.startswith("woq-")
        or pass_name
        in (
            "pack-int4",
            "legalize-qoperator",
            "raise-qoperator",
            "bf16-precision",
            "prune",
            "slim",
            "quantize-embeddings",
        )
        or note.startswith(("fallback:", "warning:", "opset:", "cpu:"))
    )


def sparsity_summary(model: ir.Model, float_model: ir.Model, run, ctx) -> list[str]:
    """For a pipeline that pruned: parameters, multiply-adds per sample and, with calibration data, the
    measured onnxruntime latency on a calibration batch of 8, before and after. Empty otherwise."""
    if not any(r.name in ("prune", "slim") for r in run.records):
        return []
    lines = [f"parameters: {_params(float_model) / 1e6:.3f} M -> {_params(model) / 1e6:.3f} M"]
    data = ctx.data.get("calibration_data")
    if data is None:
        return lines
    from ncc.passes.quant import fallback
    from ncc.runtime import open_session
    from ncc.tools.timing import time_blocks

    one = fallback.samples(data, 1)
    before, after = _macs(float_model, one), _macs(model, one)
    lines.append(
        f"multiply-adds per sample: {before / 1e6:.1f} M -> {after / 1e6:.1f} M ({before / max(after, 1):.2f}x fewer)"
    )
    batch = fallback.samples(data, 8)[0]
    sessions = [open_session(m) for m in (float_model, model)]
    timing = time_blocks([s.ort for s in sessions], batch, runs=10, rounds=5, min_block_s=0.2)
    ratio = timing.ratio(1, 0)
    n = next(iter(batch.values())).shape[0]
    lines.append(
        f"onnxruntime latency, batch {n}: {timing.median(0) * 1e3:.1f} ms -> {timing.median(1) * 1e3:.1f} ms "
        f"({ratio['median']:.2f}x faster, quartiles {ratio['q25']:.2f}-{ratio['q75']:.2f}, median of "
        f"{ratio['rounds']} rounds)"
    )
    return lines


def _params(model: ir.Model) -> int:
    return sum(
        int(np.prod(v.shape.numpy())) if v.shape is not None else 0
        for v in model.graph.initializers.values()
        if v.type is not None and v.type.dtype.is_floating_point()
    )


def _macs(model: ir.Model, feeds) -> int:
    """Multiply-adds of the MatMul, Gemm and Conv nodes for one sample (measured output sizes)."""
    from ncc.passes.quant import fallback

    layers = [
        n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv") and n.domain in ("", "ai.onnx")
    ]
    names = [n.outputs[0].name for n in layers] + [n.inputs[0].name for n in layers]
    outs = fallback.run(model, feeds, list(dict.fromkeys(names)))
    total = 0
    for node in layers:
        size = outs[node.outputs[0].name][0].size
        if node.op_type == "Conv":
            w = node.inputs[1].shape
            total += size * int(np.prod([int(d) for d in list(w)[1:]]))
            continue
        a = outs.get(node.inputs[0].name)
        trans_a = (
            node.op_type == "Gemm"
            and node.attributes.get("transA") is not None
            and node.attributes["transA"].value
        )
        if a is None or a[0].ndim < 1:
            continue
        total += size * int(a[0].shape[-2] if trans_a else a[0].shape[-1])
    return total


def written_fidelity(model: ir.Model, float_model: ir.Model | None, run, ctx, run_written=None) -> str | None:
    """The output cosine of ``model`` as it is written against ``float_model`` (the input, before the
    pipeline), on the calibration samples min-cosine used (or the first 8): passes after ``insert-qdq``
    (``correct-bias``) change the model its own figure was measured on. None unless the pipeline ran
    ``insert-qdq`` with calibration data. ``run_written(feeds, output names)`` runs the written artefact
    where onnxruntime cannot (a SavedModel); by default the model runs in onnxruntime."""
    data = ctx.data.get("calibration_data")
    measured = ("insert-qdq", "prune", "slim")
    if float_model is None or data is None or not any(r.name in measured for r in run.records):
        return None
    from ncc.metrics import token_masks, worst_output_cosine
    from ncc.passes.quant import fallback

    outputs = [v.name for v in model.graph.outputs]
    kept = ctx.data.get("float_reference")
    if kept is not None and set(outputs) <= set(kept.outputs):
        feeds, reference = kept.feeds, kept.outputs
    else:
        feeds = fallback.samples(data, 8)
        reference = fallback.run(float_model, feeds, outputs)
    written = (run_written or (lambda f, names: fallback.run(model, f, names)))(feeds, outputs)
    score = worst_output_cosine(reference, written, outputs, token_masks(feeds))
    count = sum(next(iter(feed.values())).shape[0] for feed in feeds)
    return (
        f"fidelity: output cosine {score:.5f} on {count} calibration samples "
        "(the written model against the float)"
    )


def format_report(
    *,
    spec: str,
    quantization: list[str],
    run,
    ctx,
    size_before: int,
    size_after: int,
    check=None,
    fidelity: str | None = None,
    extra: list[str] = (),
) -> str:
    lines = [f"pipeline: {spec}"]
    calibrated = [r for r in run.records if r.name == "calibrate"]
    if calibrated:
        from ncc.passes.spec import parse_pipeline

        (calibrate,) = parse_pipeline(calibrated[-1].spec)
        data = ctx.data.get("calibration_data")
        how = calibrate.method + (f" (p={calibrate.percentile})" if calibrate.method == "percentile" else "")
        lines.append(f"calibration: {how} on {data.spec if data else '?'}")
    lines += quantization
    lines += [note for r in run.records for note in r.notes if _reported(r.name, note)]
    if fidelity:
        lines.append(fidelity)
    lines += extra
    lines.append(
        f"size: {size_before / 1e6:.2f} MB -> {size_after / 1e6:.2f} MB ({_size_change(size_before, size_after)})"
    )
    slowest = sorted(run.records, key=lambda r: -r.seconds)[:5]
    lines.append(
        f"time: {run.total_seconds:.2f} s (" + ", ".join(f"{r.name} {r.seconds:.2f} s" for r in slowest) + ")"
    )
    if check is not None:
        lines += check.summary().splitlines()
    return "\n".join("ncc: " + line for line in lines)


def write_layer_report(path: Path, layers) -> None:
    """The weight-only per-layer table as tab-separated text (header first), written atomically."""
    from ncc.files import atomic_outputs, cannot_write

    columns = layers[0].COLUMNS
    text = "\t".join(columns) + "\n" + "".join("\t".join(layer.row()) + "\n" for layer in layers)
    with atomic_outputs(path) as (tmp,):
        try:
            Path(tmp).write_text(text)
        except OSError as err:
            raise cannot_write(path, err) from None


def _size_change(before: int, after: int) -> str:
    """``3.71x smaller``, ``0.2% larger`` (a bf16 IR keeps float32 weights and adds its XML), or ``unchanged``."""
    if after == before:
        return "unchanged"
    if after < before:
        return f"{before / after:.2f}x smaller" if after else "empty"
    return f"{(after / before - 1) * 100:.1f}% larger" if before else "larger"
