"""The tuning log: every evaluated configuration, one JSON line each, beside the cache.

The file is named by a hash of what decides a configuration's metric: the input model's files, the
calibration data, the base pipeline (the user's options) and the evaluation function (its reference and,
for a file, its bytes). The bound and the strategy are not in it, so a run with another ``--max-loss``
reuses what was measured. Without ``--resume`` a run starts a new log; with it, configurations already in
the log are not evaluated again, so an interrupted run continues where it stopped and spends, in all, the
evaluations an uninterrupted run would. A line cut short by a crash is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def log_key(model_files: list[Path], calib_digest: str, base_spec: str, eval_ref: str) -> str:
    h = hashlib.sha256()
    for path in model_files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(calib_digest.encode() + b"\0" + base_spec.encode() + b"\0" + eval_ref.encode() + b"\0")
    module = eval_ref.rpartition(":")[0]
    if module.endswith(".py") and Path(module).is_file():
        h.update(Path(module).read_bytes())
    return h.hexdigest()[:20]


class TuningLog:
    """Metrics by configuration key, read from and appended to ``path``."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.resumed = False
        if resume and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["config"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line an interrupted write cut short
            self.resumed = bool(self.entries)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def add(self, key: str, metric: float, seconds: float, spec: str | None, size: int | None = None) -> None:
        entry = {"config": key, "metric": metric, "seconds": round(seconds, 3), "spec": spec, "size": size}
        self.entries[key] = entry
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
