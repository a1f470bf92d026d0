"""The ``ncc`` command line.

Start-up is kept cheap: only click is imported at module level; onnx, onnx-ir,
onnxruntime and the passes are imported inside the commands that need them.

Every error a user can cause is an :class:`ncc.errors.NccError` and is shown as
one sentence with exit code 2; outputs are written all-or-nothing. Ctrl-C (exit
130) and SIGTERM (exit 143) remove the temporary files as a failure does; a
closed or full standard output is an error, a pipe closed by its reader (``|
head``) ends the command quietly (exit 141, as if SIGPIPE had ended it).
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import click
from ncc import __version__
from ncc.errors import NccError

_IN = click.Path(path_type=Path, dir_okay=True, exists=False)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that outputs are cleaned up as on Ctrl-C."""


class _ClosedPipe(Exception):
    """Standard output is a pipe its reader closed (``ncc passes | head -1``)."""


_EXIT_SIGPIPE, _EXIT_SIGINT, _EXIT_SIGTERM = 128 + 13, 128 + 2, 128 + 15


class _Group(click.Group):
    """Turns NccError into one line and exit code 2; interrupts and closed pipes into their exit codes.
    ``bench`` (many options, its own imports) is imported when it is asked for or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "bench"})

    def get_command(self, ctx: click.Context, name: str):
        if name == "bench" and name not in self.commands:
            from ncc.tools.bench import bench

            self.add_command(bench)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NccError as err:
            click.echo(f"ncc: error: {err}", err=True)
            sys.exit(err.exit_code)
        except _ClosedPipe:
            sys.exit(_EXIT_SIGPIPE)
        except KeyboardInterrupt as err:
            terminated = isinstance(err, _Terminated)
            click.echo(f"ncc: {'terminated' if terminated else 'interrupted'}; no output written.", err=True)
            sys.exit(_EXIT_SIGTERM if terminated else _EXIT_SIGINT)


def _out(text: str, nl: bool = True) -> None:
    """Write ``text`` to standard output, now (flushed), so that a failure is reported where it happens."""
    if sys.stdout is None:
        raise NccError("cannot write to standard output: it is closed.")
    try:
        click.echo(text, nl=nl)
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        raise _ClosedPipe from None
    except OSError as err:
        _discard_stdout()
        raise NccError(f"cannot write to standard output: {err.strerror or err}.") from None


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null: what stdout still buffers is flushed there at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ncc")
def cli() -> None:
    """ncc: a compiler for neural-network compression.

    \b
    ncc compile model.onnx --pass optimize -o model.opt.onnx
    ncc dump model.onnx                       # read the IR
    ncc passes                                # what passes and pipelines exist
    """


def _pipeline_options(fn):  # noqa: C901 - a list of decorators
    options = [
        click.option(
            "--pass", "pass_name", metavar="NAME", help="Run one pass or named pipeline (see `ncc passes`)."
        ),
        click.option(
            "--passes", "spec", metavar="SPEC", help='Pipeline spec, e.g. "fold-constants,cse,dce".'
        ),
        click.option(
            "--plugin", "plugins", multiple=True, type=_IN, metavar="FILE.py", help="Load passes from a file."
        ),
        click.option(
            "--dump-pipeline", is_flag=True, help="Print the pipeline spec that will run, then run it."
        ),
        click.option("--no-verify", is_flag=True, help="Do not run the IR verifier after every pass."),
        click.option(
            "--print-ir-before", multiple=True, metavar="NAME", help="Print the IR before pass NAME."
        ),
        click.option("--print-ir-after", multiple=True, metavar="NAME", help="Print the IR after pass NAME."),
        click.option("--print-ir-after-all", is_flag=True, help="Print the IR after every pass."),
        click.option(
            "--print-ir-after-change", is_flag=True, help="Print the IR after passes that changed it."
        ),
        click.option("--print-ir-after-failure", is_flag=True, help="Print the IR after a pass that failed."),
        click.option(
            "--dump-ir-dir",
            type=click.Path(path_type=Path, file_okay=False),
            help="Write the IR after every pass to DIR.",
        ),
        click.option(
            "--print-ir-full",
            is_flag=True,
            help="Print every constant in IR dumps (default: elide large ones).",
        ),
        click.option("--time-passes", is_flag=True, help="Print wall time per pass."),
        click.option("--pass-statistics", is_flag=True, help="Print per-pass statistics."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _quant_options(fn):
    options = [
        click.option(
            "--calib",
            metavar="DATA",
            help="Calibration data: a .npz, a folder of .npz, or module.py:function.",
        ),
        click.option("--calib-samples", type=int, metavar="N", help="Use at most N calibration samples."),
        click.option(
            "--calib-method",
            type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
            help="How activation ranges are chosen from the statistics.",
        ),
        click.option(
            "--percentile", type=float, metavar="P", help="Percentile kept by --calib-method percentile."
        ),
        click.option(
            "--per-tensor",
            is_flag=True,
            default=None,
            help="One scale per weight tensor (default: per channel).",
        ),
        click.option(
            "--activations", type=click.Choice(["u8", "s8"]), help="Activation integer type (default u8)."
        ),
        click.option(
            "--symmetric", is_flag=True, default=None, help="Symmetric activations (default asymmetric)."
        ),
        click.option(
            "--reduce-range", is_flag=True, default=None, help="7-bit quantization (costs accuracy)."
        ),
        click.option(
            "--op-types", metavar="A,B", help="Op types to quantize (default: the target profile's)."
        ),
        click.option(
            "--include",
            multiple=True,
            metavar="REGEX",
            help="Only quantize nodes whose name matches (regex searched in the name; repeatable).",
        ),
        click.option(
            "--exclude",
            multiple=True,
            metavar="REGEX",
            help="Keep nodes whose name matches in float (regex searched in the name; repeatable).",
        ),
        click.option(
            "--target",
            metavar="NAME",
            help="Target profile: host (default), x86-vnni, x86-avx2, openvino, or best (compile for each "
            "runtime here, keep the fastest); for .pt2 output inductor (default) or aoti; tf (-o FOLDER: a "
            "SavedModel running int8 in TensorFlow) or tflite (-o model.tflite).",
        ),
        click.option(
            "--min-cosine",
            type=float,
            metavar="C",
            help="Keep the most sensitive nodes in float until outputs reach cosine C on calibration data.",
        ),
        click.option(
            "--algo",
            type=click.Choice(["rtn", "gptq", "awq"]),
            help="Weight-only algorithm (w4/w8): rtn (default), gptq or awq (both need --calib).",
        ),
        click.option("--bits", type=click.Choice(["4", "8"]), help="Weight-only bits (w4: 4, w8: 8)."),
        click.option(
            "--group-size",
            type=int,
            metavar="G",
            help="Weight-only: input channels per scale (default 128; 0 = per output channel).",
        ),
        click.option(
            "--partial-groups",
            is_flag=True,
            default=None,
            help="Weight-only: allow a shorter last group when G does not divide a layer's K.",
        ),
        click.option(
            "--pattern",
            metavar="P[,P]",
            help="Pruning pattern (sparse): channel, neuron, head, 2:4, 4x1, unstructured; a list prunes each.",
        ),
        click.option(
            "--sparsity",
            metavar="S[,S]",
            help="Pruning: fraction removed (0.5), one per --pattern or one for all.",
        ),
        click.option(
            "--accuracy-level",
            type=click.IntRange(0, 4),
            metavar="0-4",
            help="MatMulNBits compute type (4: int8 activations, fastest on CPU).",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


#: CLI flag -> alternatives (pass option, value); a flag applies to every pass taking one of them.
_FLAG_OPTIONS = {
    "calib_samples": lambda v: [("samples", str(v))],
    "calib_method": lambda v: [("method", v)],
    "percentile": lambda v: [("percentile", repr(v))],
    "per_tensor": lambda v: [("weights", "per-tensor"), ("per_channel", "false")],
    "activations": lambda v: [("activations", v)],
    "symmetric": lambda v: [("scheme", "sym")],
    "reduce_range": lambda v: [("reduce_range", "true")],
    "op_types": lambda v: [("op_types", tuple(t.strip() for t in v.split(",") if t.strip()))],
    "include": lambda v: [("include", tuple(v))],
    "exclude": lambda v: [("exclude", tuple(v))],
    "target": lambda v: [("target", v)],
    "min_cosine": lambda v: [("min_cosine", repr(v))],
    "bits": lambda v: [("bits", v)],
    "group_size": lambda v: [("group_size", str(v))],
    "partial_groups": lambda v: [("partial_groups", "true")],
    "accuracy_level": lambda v: [("accuracy_level", str(v))],
}


def _apply_flags(passes, opts: dict):
    from ncc.passes.spec import format_pipeline, with_options

    fields = {f.name for p in passes for f in p.options()}
    updates: dict = {}
    for flag, alternatives in _FLAG_OPTIONS.items():
        value = opts.get(flag)
        if value is None or value == ():
            continue
        chosen = [(k, v) for k, v in alternatives(value) if k in fields]
        if not chosen:
            raise NccError(
                f"--{flag.replace('_', '-')} does not apply to the pipeline {format_pipeline(passes)}."
            )
        updates.update(chosen)
    target = opts.get("target")
    if target and target != "best":  # the forms the target's kernels take, unless a flag said otherwise
        from ncc.targets import get_target

        profile = get_target(target)
        if profile.activation_scheme != "asym" and "scheme" in fields and not opts.get("symmetric"):
            updates["scheme"] = profile.activation_scheme
        if profile.quantize_graph_outputs and "quantize_graph_outputs" in fields:
            updates["quantize_graph_outputs"] = "true"
        if not profile.float_fallback and "min_cosine" in fields:
            if opts.get("min_cosine"):
                raise NccError(
                    f"--min-cosine keeps layers float, which --target {target} cannot: its converter "
                    "quantizes every layer between quantized tensors."
                )
            updates["min_cosine"] = "0"
    return with_options(passes, updates) if updates else passes


def _apply_pruning(passes, pattern: str | None, sparsity: str | None):
    """``--pattern a,b --sparsity x,y``: the pipeline's prune pass, once per pattern with its sparsity."""
    if pattern is None and sparsity is None:
        return passes
    from ncc.errors import PassSpecError
    from ncc.passes.spec import format_pipeline

    at = [i for i, p in enumerate(passes) if p.name == "prune"]
    flag = "--pattern" if pattern is not None else "--sparsity"
    if len(at) != 1:
        raise NccError(
            f"{flag} applies to a pipeline with one prune pass (sparse), not {format_pipeline(passes)}."
        )
    prune = passes[at[0]]
    patterns = [p.strip() for p in pattern.split(",")] if pattern is not None else [prune.pattern]
    try:
        amounts = [float(s) for s in sparsity.split(",")] if sparsity is not None else [prune.sparsity]
    except ValueError:
        raise NccError(f"--sparsity takes numbers such as 0.5 or 0.5,0.33, got {sparsity!r}.") from None
    if len(amounts) == 1:
        amounts = amounts * len(patterns)
    if len(amounts) != len(patterns):
        raise NccError(
            f"--sparsity gives {len(amounts)} values for {len(patterns)} patterns; give one or one each."
        )
    try:
        pruned = [
            type(prune)(**{**_fields(prune), "pattern": p, "sparsity": s}) for p, s in zip(patterns, amounts)
        ]
    except PassSpecError as err:
        raise NccError(str(err)) from None
    return [*passes[: at[0]], *pruned, *passes[at[0] + 1 :]]


def _prunes(opts: dict) -> bool:
    spec = f"{opts.get('pass_name') or ''},{opts.get('spec') or ''}"
    return any(word in spec for word in ("sparse", "prune", "slim"))


def _fields(p) -> dict:
    return {f.name: getattr(p, f.name) for f in p.options()}


def _choose_algo(passes, algo: str | None):
    """``--algo X``: the pipeline's weight-only quantizer becomes ``woq-X``, keeping the options they share."""
    if not algo:
        return passes
    from ncc.passes.registry import get_pass
    from ncc.passes.spec import format_pipeline

    if not any(p.name.startswith("woq-") for p in passes):
        raise NccError(f"--algo applies to weight-only pipelines (w4, w8), not {format_pipeline(passes)}.")
    cls = get_pass(f"woq-{algo}")
    shared = {f.name for f in cls.options()}
    out = []
    for p in passes:
        if p.name.startswith("woq-"):
            p = cls(**{f.name: getattr(p, f.name) for f in p.options() if f.name in shared})
        out.append(p)
    return out


def _apply_format(passes, fmt: str | None):
    """``--format``: ``qoperator`` appends the ``legalize-qoperator`` lowering; for weight-only pipelines it
    is pack-int4's ``format`` (matmulnbits or qdq); matmulnbits means nothing elsewhere."""
    from ncc.passes.registry import get_pass
    from ncc.passes.spec import format_pipeline, with_options

    packs = any(p.name == "pack-int4" for p in passes)
    if not packs:
        if fmt == "matmulnbits":
            raise NccError(
                f"--format matmulnbits is for weight-only pipelines (w4, w8), not {format_pipeline(passes)}."
            )
        if fmt == "qoperator" and not any(p.name == "legalize-qoperator" for p in passes):
            return [*passes, get_pass("legalize-qoperator")()]
        return passes
    if fmt in (None, "matmulnbits", "qdq"):
        return with_options(passes, {"format": fmt}) if fmt else passes
    raise NccError(f"--format {fmt} does not apply to weight-only pipelines; use matmulnbits or qdq.")


def _run_pipeline(model, opts: dict, *, source: str | None, default: str | None, ctx=None, adjust=None):
    from ncc.passes import registry
    from ncc.passes.base import PassContext
    from ncc.passes.manager import Instruments, PassManager
    from ncc.passes.spec import format_pipeline, parse_pipeline

    for plugin in opts["plugins"]:
        registry.load_plugin(plugin)
    if opts["pass_name"] is not None and opts["spec"] is not None:
        raise NccError("give either --pass or --passes, not both.")
    flag, spec = ("--passes", opts["spec"]) if opts["spec"] is not None else ("--pass", opts["pass_name"])
    spec = default if spec is None else spec
    samples = opts.get("calib_samples")
    if samples is not None and samples < 1:
        raise NccError(f"--calib-samples must be at least 1, got {samples}.")
    passes = parse_pipeline(spec) if spec is not None else []
    if spec is not None and not passes:
        raise NccError(f"the pipeline is empty: {flag} {spec!r} names no pass.")
    passes = _apply_pruning(passes, opts.get("pattern"), opts.get("sparsity"))
    passes = _apply_flags(_apply_format(_choose_algo(passes, opts.get("algo")), opts.get("fmt")), opts)
    if not passes:
        return None
    if adjust is not None:  # --eval: the tuner's choice of configuration
        passes = adjust(passes)
    ctx = ctx or PassContext(source=source)
    if opts.get("calib"):
        # a tuned weight-only pipeline may settle on RTN while its search screened calibrated algorithms
        if adjust is None and not any(getattr(p, "uses_calibration", False) for p in passes):
            raise NccError(f"--calib given, but the pipeline {format_pipeline(passes)} does not calibrate.")
        from ncc.passes.quant.calib_data import load_calibration_data

        ctx.data["calibration_data"] = load_calibration_data(opts["calib"])
    if opts["dump_pipeline"]:
        click.echo(f"// pipeline: {format_pipeline(passes)}", err=True)
    instruments = Instruments(
        print_ir_before=tuple(opts["print_ir_before"]),
        print_ir_after=tuple(opts["print_ir_after"]),
        print_ir_after_all=opts["print_ir_after_all"],
        print_ir_after_change=opts["print_ir_after_change"],
        print_ir_after_failure=opts["print_ir_after_failure"],
        print_ir_full=opts["print_ir_full"],
        dump_ir_dir=opts["dump_ir_dir"],
        time_passes=opts["time_passes"],
        pass_statistics=opts["pass_statistics"],
    )
    return PassManager(passes, verify=not opts["no_verify"], instruments=instruments).run(model, ctx)


def _tf_options(fn):
    """How a TensorFlow input is read (SavedModel signature; a frozen GraphDef's tensors)."""
    options = [
        click.option(
            "--signature", metavar="NAME", help="A SavedModel's signature (default: serving_default)."
        ),
        click.option(
            "--tf-inputs",
            metavar="NAMES",
            help="A frozen GraphDef's input tensors, comma-separated (name or name:0).",
        ),
        click.option(
            "--tf-outputs", metavar="NAMES", help="A frozen GraphDef's output tensors, comma-separated."
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _load_input(input: Path, opts: dict):
    """``load_model`` with the TensorFlow reading options taken out of ``opts``."""
    from ncc.tools.modelio import load_model

    def names(text):
        return [n.strip() for n in text.split(",") if n.strip()] if text else None

    signature, inputs, outputs = (
        opts.pop("signature", None),
        opts.pop("tf_inputs", None),
        opts.pop("tf_outputs", None),
    )
    if signature is None and inputs is None and outputs is None:
        return load_model(input)
    return load_model(input, signature=signature, inputs=names(inputs), outputs=names(outputs))


def _tune_options(fn):
    options = [
        click.option(
            "--eval",
            "evaluate",
            metavar="FILE.py:FUNCTION",
            help="Tune int8 with your metric: FUNCTION(path of a candidate .onnx) -> number (higher is better).",
        ),
        click.option(
            "--max-loss",
            metavar="LOSS",
            help="With --eval: largest metric loss vs FP32, relative (1%, the default) or absolute (0.005).",
        ),
        click.option(
            "--lower-is-better", is_flag=True, default=None, help="With --eval: the metric is a loss."
        ),
        click.option(
            "--strategy",
            type=click.Choice(["ranked", "basic"]),
            help="With --eval: ranked (default: screening, bisection over ranked nodes) or basic (one node "
            "at a time, as Intel Neural Compressor).",
        ),
        click.option(
            "--resume", is_flag=True, default=None, help="With --eval: reuse the tuning log's trials."
        ),
        click.option("--max-trials", type=int, metavar="N", help="With --eval: evaluate at most N times."),
        click.option("--timeout", metavar="DURATION", help="With --eval: stop searching after 90s, 10m, 1h."),
        click.option("--workers", type=int, metavar="N", help="With --eval: evaluate N trials in parallel."),
        click.option("--ray", metavar="ADDRESS", help="With --eval: run trials on a Ray cluster ('local')."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


_TUNE_FLAGS = ("max_loss", "lower_is_better", "strategy", "resume", "max_trials", "timeout", "workers", "ray")


def _tune_request(opts: dict, output: Path):
    """The tuning options of ``opts`` (popped), checked; None without --eval."""
    flags = {k: opts.pop(k) for k in ("evaluate", *_TUNE_FLAGS)}
    evaluate = flags.pop("evaluate")
    if evaluate is None:
        if given := [k for k, v in flags.items() if v is not None]:
            raise NccError(
                f"--{given[0].replace('_', '-')} tunes with a metric: it needs --eval FILE.py:FUNCTION."
            )
        return None
    from ncc.tune.run import TuneOptions, check

    if opts.get("min_cosine") is not None:
        raise NccError("--min-cosine and --eval both choose the nodes kept in float: give one of them.")
    if output.suffix.lower() == ".pt2":
        raise NccError("--eval scores ONNX candidates; tune to a .onnx output, then compile that to .pt2.")
    options = TuneOptions(evaluate, **{k: v for k, v in flags.items() if v is not None})
    check(options)
    return options


@cli.command()
@click.argument("input", type=_IN)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Output .onnx, .ncc, .pt2, .xml (OpenVINO IR) or .tflite file, or a SavedModel folder (--target tf).",
)
@click.option("--external-data", metavar="NAME", help="Write weights to NAME beside the output .onnx.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["qdq", "qoperator", "integerops", "matmulnbits"]),
    help="ONNX form of a quantized model: qdq (default for int8), qoperator, integerops; weight-only: "
    "matmulnbits (default) or qdq (blocked DequantizeLinear).",
)
@click.option(
    "--layer-report",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE.tsv",
    help="Weight-only: write the per-layer table (error, bits, group, bytes) to FILE.tsv.",
)
@click.option(
    "--no-check", is_flag=True, help="Do not load the result in onnxruntime to see what runs in integer."
)
@click.option(
    "--value-info",
    is_flag=True,
    help="Keep intermediate values' shapes in an INT8 .onnx output (left out by default: with them "
    "onnxruntime fuses Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is slower "
    "than the two ops it replaces in INT8 transformers).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where calibration statistics are cached (default $NCC_CACHE or ~/.cache/ncc).",
)
@_tune_options
@_quant_options
@_pipeline_options
@_tf_options
def compile(
    input: Path,
    output: Path,
    external_data: str | None,
    fmt: str | None,
    layer_report: Path | None,
    no_check: bool,
    value_info: bool,
    cache_dir: Path | None,
    **opts,
) -> None:
    """Compile INPUT (.onnx, .ncc, a torch.export .pt2, or a TensorFlow SavedModel folder, .keras, .h5, frozen
    .pb or .tflite) through a pipeline into OUTPUT (.onnx, .ncc, or
    .pt2: a torch.export program Inductor runs as int8, its target defaults to 'inductor'; with --target
    aoti an AOTInductor package; .tflite: a full-integer TensorFlow Lite file; with --target tf a
    SavedModel folder whose graph runs int8 in TensorFlow)."""
    from ncc.files import deferred_commit
    from ncc.passes.base import PassContext
    from ncc.targets import TF_TARGETS, TORCH_TARGETS
    from ncc.tools.modelio import (
        FORMATS,
        FileUse,
        calibration_files,
        check_distinct,
        input_files,
        is_tf_input,
        output_files,
        save_model,
        save_saved_model,
        saved_model_files,
    )
    from ncc.tools.report import (
        files_size,
        format_report,
        quantization_summary,
        sparsity_summary,
        written_fidelity,
    )

    tuning = _tune_request(opts, output)
    inputs = input_files(input)
    reads = [
        *inputs,
        *calibration_files(opts.get("calib")),
        *(tuning.files() if tuning is not None else []),
        *(FileUse("a --plugin file", p, model=False) for p in opts["plugins"]),
    ]
    tf_out = opts.get("target") in TF_TARGETS and output.suffix.lower() != ".ncc"
    if tf_out:
        if output.suffix.lower() in FORMATS or is_tf_input(output) and output.suffix:
            raise NccError(
                f"--target {opts['target']} writes a SavedModel folder: give -o a folder name, not {output.name} "
                "(or a .ncc file for the IR)."
            )
        if fmt not in (None, "qoperator"):
            raise NccError(
                f"--format {fmt} is an ONNX form; --target {opts['target']} lowers QOperator form."
            )
        fmt = "qoperator"  # one integer node per layer: what the oneDNN ops take
        if external_data:
            raise NccError("--external-data applies to .onnx output, not a SavedModel.")
    writes = saved_model_files(output) if tf_out else output_files(output, external_data=external_data)
    if layer_report is not None:
        writes.append(FileUse("the --layer-report file", layer_report, model=False))
    check_distinct(reads, writes)
    torch_out = output.suffix.lower() == ".pt2"
    openvino_out = output.suffix.lower() == ".xml"
    tflite_out = output.suffix.lower() == ".tflite"
    if tflite_out:
        opts["target"] = opts.get("target") or "tflite"
        if opts["target"] != "tflite":
            raise NccError(f"a .tflite output runs in LiteRT: --target tflite, not {opts['target']}.")
        if fmt:
            raise NccError(f"--format {fmt} is an ONNX form; a .tflite output is TensorFlow Lite's own.")
    elif opts.get("target") == "tflite":
        raise NccError("--target tflite writes a .tflite file: give -o model.tflite.")
    if openvino_out and not opts.get("target"):
        opts["target"] = "openvino"
    if openvino_out and opts["target"] != "openvino":
        raise NccError(f"a .xml output is OpenVINO IR: --target openvino, not {opts['target']}.")
    if openvino_out and fmt and fmt != "qdq":
        raise NccError(f"OpenVINO reads the QDQ form; --format {fmt} cannot be written as OpenVINO IR.")
    if torch_out and fmt:
        raise NccError(f"--format {fmt} is an ONNX form; a .pt2 output takes the torch backend's own.")
    if torch_out and not opts.get("target"):
        opts["target"] = "inductor"
    if opts.get("target") == "best":
        if torch_out or openvino_out:
            raise NccError("--target best chooses among ONNX runtimes: give a .onnx output.")
        if tuning is not None:
            raise NccError("--target best and --eval both search: tune for one --target.")
        if not opts.get("calib"):
            raise NccError("--target best times candidates on calibration data: give --calib DATA.")
    aoti = opts.get("target") == "aoti"
    if aoti and not torch_out:
        raise NccError("--target aoti writes an AOTInductor package: give a .pt2 output.")
    if torch_out and opts["target"] not in TORCH_TARGETS:
        raise NccError(f"a .pt2 output runs in torch: --target inductor or aoti, not {opts['target']}.")
    model = _load_input(input, opts)
    size_before = files_size([use.path for use in inputs])
    cache = cache_dir or Path(os.environ.get("NCC_CACHE", Path.home() / ".cache" / "ncc"))
    ctx = PassContext(source=str(input), cache_dir=str(cache))
    ctx.data["progress"] = sys.stderr.isatty()
    float_model = model.clone() if opts.get("calib") else None  # what the report's fidelity compares with
    # what the report's parameter and speed figures compare with, when the pipeline prunes
    original = float_model or (model.clone() if _prunes(opts) else None)
    adjust, outcome = None, []
    if tuning is not None:
        adjust = _tuner(tuning, input, inputs, opts, cache, value_info, outcome)
    best = None
    if opts.get("target") == "best":
        model, run, ctx, best = _best_target(model, float_model, opts, fmt, value_info, input, cache)
    else:
        run = _run_pipeline(
            model, {**opts, "fmt": fmt}, source=str(input), default=None, ctx=ctx, adjust=adjust
        )
    quantization = quantization_summary(model)
    int8 = any(n.metadata_props.get("ncc.quant", "").startswith("int8") for n in model.graph)
    _check_format(model, fmt)
    # a tf-target IR holds oneDNN's forms (u8 in, s8 out) onnxruntime cannot run, and a SavedModel or a
    # .tflite computes otherwise than the IR in onnxruntime: their fidelity is measured on the artefact
    tf_ir = opts.get("target") in TF_TARGETS or tflite_out
    fidelity = written_fidelity(model, float_model, run, ctx) if run is not None and not tf_ir else None
    sparsity = sparsity_summary(model, float_model or original, run, ctx) if run is not None else []
    layers = ctx.data.get("woq_layers")
    if layer_report is not None and not layers:
        raise NccError("--layer-report needs a weight-only pipeline (w4, w8, woq-*).")
    check = None
    with deferred_commit() as staged:  # the outputs are renamed into place once the check passed
        if tf_out:
            written = save_saved_model(model, output)
        else:
            written = save_model(
                model, output, external_data=external_data, value_info=value_info or not int8, aoti=aoti
            )
        if layer_report is not None:
            from ncc.tools.report import write_layer_report

            write_layer_report(layer_report, layers)
        if (
            not no_check
            and output.suffix in (".onnx", ".xml")
            and (
                any("ncc.quant" in n.metadata_props for n in model.graph)
                or model.metadata_props.get("ncc.precision") == "bf16"
            )
        ):
            if opts.get("target") == "openvino":
                from ncc.backends.openvino.check import check_on_openvino

                check = check_on_openvino(staged(output), model, shown=output)
            else:
                from ncc.backends.onnx.check import check_on_onnxruntime

                check = check_on_onnxruntime(staged(output), model, shown=output)
        if (tf_out or tflite_out) and run is not None:  # checked and measured in the artefact's runtime
            from ncc.backends.tensorflow.graph import argument_names
            from ncc.frontends.tensorflow import quiet
            from ncc.tools.runtimes import open_tf_runner, run_feeds

            artefact = staged(output)
            with quiet():  # TensorFlow's and LiteRT's notices on stderr
                if int8 and not no_check:
                    if tf_out:
                        from ncc.backends.tensorflow.savedmodel import check_on_tensorflow

                        check = check_on_tensorflow(artefact, model)
                    else:
                        from ncc.backends.tensorflow.tflite import check_tflite

                        check = check_tflite(artefact)
                inputs = [v.name for v in model.graph.inputs if not v.is_initializer()]
                arguments = dict(zip(inputs, argument_names(model)))

                def run_written(feeds, names):
                    runner = open_tf_runner("saved_model" if tf_out else "tflite", artefact, None)
                    try:
                        return run_feeds(runner, feeds, names, arguments)
                    finally:
                        runner.close()

                fidelity = written_fidelity(model, float_model, run, ctx, run_written=run_written)
        if not no_check and torch_out and any("ncc.quant" in n.metadata_props for n in model.graph):
            check = (_aoti_check if aoti else _inductor_check)(staged(output), model)
    if outcome:
        click.echo(outcome[0], err=True)
    if best:
        click.echo("\n".join(f"ncc: {line}" for line in best.splitlines()), err=True)
    if run is not None:
        spec = ",".join(r.spec for r in run.records)
        click.echo(
            format_report(
                spec=spec,
                quantization=quantization,
                run=run,
                ctx=ctx,
                size_before=size_before,
                size_after=files_size(written),
                check=check,
                fidelity=fidelity,
                extra=sparsity,
            ),
            err=True,
        )
    click.echo(f"ncc: wrote {', '.join(map(str, written))}", err=True)


def _best_target(model, float_model, opts: dict, fmt, value_info: bool, input: Path, cache: Path):
    """``--target best``: the pipeline compiled for each runtime here, the fastest kept (ncc.tools.best);
    returns (model, pipeline report, context, the report's table)."""
    from ncc.passes.base import PassContext
    from ncc.tools.best import Candidate, candidate_targets, choose

    candidates = []
    for target, runtime in candidate_targets():
        candidate = model.clone()
        ctx = PassContext(source=str(input), cache_dir=str(cache))
        ctx.data["progress"] = sys.stderr.isatty()
        run = _run_pipeline(
            candidate, {**opts, "fmt": fmt, "target": target}, source=str(input), default=None, ctx=ctx
        )
        if run is None or not any("ncc.quant" in n.metadata_props for n in candidate.graph):
            raise NccError(
                "--target best compares quantized artefacts: give a quantizing pipeline (--pass int8)."
            )
        candidates.append(Candidate(target, runtime, candidate, run, ctx))
    int8 = any(n.metadata_props.get("ncc.quant", "").startswith("int8") for n in model.graph)
    chosen, table = choose(
        candidates, float_model, candidates[0].ctx.data.get("calibration_data"), value_info or not int8
    )
    opts["target"] = chosen.target
    return chosen.model, chosen.run, chosen.ctx, table


def _tuner(tuning, input: Path, inputs, opts: dict, cache: Path, value_info: bool, report: list):
    """The ``adjust`` hook of :func:`_run_pipeline` that runs the search on the flag-applied passes; the
    tuning report lands in ``report``."""

    def adjust(passes):
        import shlex

        from ncc.passes.spec import format_pipeline
        from ncc.tune.report import format_outcome
        from ncc.tune.run import tune

        chosen, outcome = tune(
            passes,
            tuning,
            model_path=input,
            model_files=[use.path for use in inputs],
            calib=opts.get("calib"),
            cache_dir=cache,
            value_info=value_info,
            plugins=tuple(str(p) for p in opts["plugins"]),
            progress=lambda text: click.echo(f"ncc: tune: {text}", err=True),
        )
        calib = f" --calib {shlex.quote(opts['calib'])}" if opts.get("calib") else ""
        rebuild = (
            f"ncc compile {shlex.quote(str(input))}{calib} --passes {shlex.quote(format_pipeline(chosen))}"
        )
        report.append(format_outcome(outcome, strategy=tuning.strategy, rebuild=rebuild))
        return chosen

    return adjust


def _inductor_check(path: Path, model):
    """What Inductor runs as int8 in the written .pt2 (loaded back, compiled here on zero inputs)."""
    from ncc.backends.torch.check import inductor_check
    from ncc.backends.torch.save import example_inputs
    from ncc.frontends.torch import load_program
    from ncc.tools.torch_api import inductor

    module = load_program(path).module()
    check, _ = inductor_check(inductor(module), example_inputs(model), model, module)
    return check


def _aoti_check(path: Path, model):
    """What the AOTInductor compile that wrote ``path`` lowered to int8 (its counters), once the package has
    loaded back and run on zero inputs."""
    import torch
    from ncc.backends.torch.check import counted_check
    from ncc.backends.torch.save import example_inputs

    check = counted_check(model, None, runtime="AOTInductor")
    try:
        runner = torch._inductor.aoti_load_package(str(path))
        with torch.no_grad():
            runner(*example_inputs(model))
    except Exception as err:  # a package that does not load or run is ncc's failure, said in one sentence
        raise NccError(f"the AOTInductor package does not run: {str(err).splitlines()[0]}") from None
    return check


def _check_format(model, fmt: str | None) -> None:
    """``--format integerops`` names what ``int8-dynamic`` produces: refuse it for a model without IntegerOps."""
    ops = {n.op_type for n in model.graph}
    if fmt == "integerops" and not ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}:
        raise NccError(
            "--format integerops is what --pass int8-dynamic produces; this model has no IntegerOps."
        )


@cli.command()
@click.argument("input", type=_IN)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output .ncc file (default: stdout).")
@click.option(
    "--full",
    is_flag=True,
    help="Carry every value (large ones in OUTPUT.data) so the text rebuilds the model.",
)
@click.option("--calib", metavar="DATA", help="Calibration data for passes that need it (see compile).")
@_pipeline_options
@_tf_options
def opt(input: Path, output: Path | None, full: bool, **opts) -> None:
    """Run passes on an .ncc (or .onnx) file and print the resulting IR text."""
    from ncc.tools.modelio import FileUse, check_distinct, input_files, output_files

    plugins = [FileUse("a --plugin file", p, model=False) for p in opts["plugins"]]
    inputs = input_files(input) if output else [FileUse("the input", input)]
    check_distinct(inputs + plugins, output_files(output, full=full) if output else [])
    model = _load_input(input, opts)
    _run_pipeline(model, opts, source=str(input), default=None)
    _emit_text(model, output, full)


@cli.command()
@click.argument("input", type=_IN)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Write to FILE (.ncc) instead of stdout."
)
@click.option(
    "--full",
    is_flag=True,
    help="Carry every value (large ones in OUTPUT.data) so the text rebuilds the model.",
)
@_tf_options
def dump(input: Path, output: Path | None, full: bool, **tf) -> None:
    """Print the IR of INPUT (.onnx, .ncc, .pt2, or a TensorFlow model) as ncc text."""
    from ncc.tools.modelio import FileUse, check_distinct, input_files, output_files

    if output is None:  # nothing is written: only the input's name is checked
        check_distinct([FileUse("the input", input)])
    else:
        check_distinct(input_files(input), output_files(output, full=full))
    _emit_text(_load_input(input, tf), output, full)


def _emit_text(model, output: Path | None, full: bool) -> None:
    from ncc.ir.printer import print_model
    from ncc.tools.modelio import save_model

    if output is None:
        _out(print_model(model, full=full), nl=False)
    else:
        save_model(model, output, full=full)


@cli.command("diff")
@click.argument("float_model", type=_IN, metavar="FLOAT")
@click.argument("quant_model", type=_IN, metavar="QUANT")
@click.option("--data", required=True, help="Inputs to compare on: .npz, folder of .npz, or module:function.")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="Samples compared.")
@click.option("--top", type=click.IntRange(min=1), help="Show only the N nodes adding the most error.")
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Also write every row as JSON here."
)
@click.option(
    "--plot", "plot_path", type=click.Path(path_type=Path), help="Also plot SQNR along the graph (PNG)."
)
@click.option(
    "--fast", is_flag=True, help="Skip the one-run-per-node fallback gains; rank by the error added."
)
def diff_command(
    float_model: Path, quant_model: Path, data: str, samples: int, top, json_path, plot_path, fast: bool
) -> None:
    """Which quantized node of QUANT costs how much fidelity against FLOAT: per node, how much QUANT's
    output gains with it alone in float (the ranking), the SQNR it adds alone and the SQNR its output
    carries; above the table, QUANT's output SQNR with only its weights and with only its activations
    quantized."""
    import json

    from ncc.files import atomic_outputs, deferred_commit
    from ncc.passes.quant.calib_data import load_calibration_data, validate
    from ncc.passes.quant.calibration import model_inputs
    from ncc.passes.quant.fallback import samples as first_samples
    from ncc.tools.diff import as_json, diff, format_table, plot
    from ncc.tools.modelio import FileUse, calibration_files, check_distinct, input_files, load_model

    writes = [
        FileUse(f"the {flag} file", path, model=False)
        for flag, path in (("--json", json_path), ("--plot", plot_path))
        if path
    ]
    check_distinct([*input_files(float_model), *input_files(quant_model), *calibration_files(data)], writes)
    reference, quantized = load_model(float_model), load_model(quant_model)
    source = load_calibration_data(data)
    validate(source, model_inputs(reference))
    result = diff(reference, quantized, first_samples(source, samples), gains=not fast)
    with deferred_commit():  # both files or neither
        if json_path:
            with atomic_outputs(json_path) as (temp,):
                temp.write_text(json.dumps(as_json(result), indent=1) + "\n")
        if plot_path:
            with atomic_outputs(plot_path) as (temp,):
                plot(result, temp)
    _out(format_table(result, top))


@cli.command("passes")
@click.option(
    "--plugin", "plugins", multiple=True, type=_IN, metavar="FILE.py", help="Also load passes from a file."
)
def list_passes(plugins: tuple[Path, ...]) -> None:
    """List passes (with their options) and named pipelines."""
    from ncc.passes import registry
    from ncc.passes.pipelines import PIPELINES
    from ncc.passes.spec import describe_pass

    for plugin in plugins:
        registry.load_plugin(plugin)
    lines = ["Passes:"]
    for cls in registry.all_passes().values():
        first, *rest = describe_pass(cls).splitlines()
        origin = "" if cls.origin == "builtin" else f"  [plugin: {cls.origin}]"
        lines.append(textwrap.indent("\n".join([first + origin, *rest]), "  "))
    lines.append("\nPipelines:")
    lines += [f"  {name:<22} {spec}" for name, spec in sorted(PIPELINES.items())]
    _out("\n".join(lines))


def main() -> None:
    """The ``ncc`` command: sympy (imported by onnx-ir, unused by ncc) loads only if something uses it
    (:mod:`ncc._imports`); SIGTERM cleans up like Ctrl-C; a closed or full stdout is one sentence."""
    from ncc._imports import defer_sympy

    defer_sympy()
    _no_huge_page_hint()
    signal.signal(signal.SIGTERM, _on_sigterm)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:  # started with the descriptor closed (`>&-`): Python leaves it
            _hold_closed(fd)  # so that no file ncc opens becomes descriptor 1 or 2
    try:
        cli(prog_name="ncc")
    finally:
        _flush_stdout()


def console_main() -> None:
    """The ``ncc`` console script: :func:`main`, then the process ends without tearing the interpreter
    down. A compile leaves a large heap (the IR, weights, onnxruntime sessions) that Python's exit would
    free object by object and sweep with a last garbage collection: 0.05 s after the MNIST CNN, 0.2 s
    after EfficientNet-Lite0, for nothing the process still needs. The exit handlers run (temporary
    folders are removed) and both streams are flushed first; code calling :func:`main` keeps the normal
    exit."""
    import atexit

    try:
        main()
        code: int | str | None = 0
    except SystemExit as exit:
        code = exit.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _no_huge_page_hint() -> None:
    """numpy asks the kernel for transparent huge pages on every large array (``madvise``); where the kernel
    then compacts memory in the page fault (THP ``defrag=madvise``, a common server setting), the first
    touches of fresh arrays stall: a third of EfficientNet-Lite0's ``round-weights`` went to system time.
    The ``ncc`` process gives the hint up, unless ``NUMPY_MADVISE_HUGEPAGE`` says otherwise; a program
    using ncc as a library keeps numpy's setting."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"  # read when numpy is imported (by a command, later)
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # imported already (a sitecustomize): numpy's own switch
        numpy._core.multiarray._set_madvise_hugepage(False)


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _hold_closed(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


def _flush_stdout() -> None:
    """What a command (``bench``) left buffered on stdout, written at exit: failures as in :func:`_out`."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        raise SystemExit(_EXIT_SIGPIPE) from None
    except OSError as err:
        _discard_stdout()
        click.echo(f"ncc: error: cannot write to standard output: {err.strerror or err}.", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    console_main()
