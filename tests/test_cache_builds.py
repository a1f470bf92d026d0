"""The real-model cache under parallel test workers: an artefact two processes want at once is built once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BUILDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import realmodels

def build(tmp):
    with open({count!r}, "a") as f:
        f.write("built\\n")
    time.sleep(1.0)  # long enough for the other process to ask for the same entry meanwhile
    (tmp / "model.onnx").write_bytes(b"artefact")

print(realmodels._cached("entry", build).read_bytes().decode())
"""


def test_two_workers_wanting_one_artefact_build_it_once(tmp_path):
    count = tmp_path / "builds.txt"
    code = BUILDER.format(tests=str(Path(__file__).resolve().parent), count=str(count))
    env = {**os.environ, "NCC_CACHE": str(tmp_path / "cache")}
    workers = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=60)[0].strip() for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    assert outputs == ["artefact", "artefact"]
    assert count.read_text() == "built\n"  # the second worker waited for the first one's build


def test_a_stale_entry_without_its_file_is_rebuilt(tmp_path, monkeypatch):
    import realmodels

    monkeypatch.setattr(realmodels, "CACHE", tmp_path)
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "left-over").write_text("from an older layout")
    path = realmodels._cached("entry", lambda tmp: (tmp / "model.onnx").write_bytes(b"artefact"))
    assert path.read_bytes() == b"artefact"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["entry"]
    assert not (tmp_path / "entry" / "left-over").exists()
