"""The ``ncc`` command keeps sympy (imported by onnx-ir, unused by ncc) out of its start-up, the deferred
module still works in full for whoever does use it, and importing ncc as a library leaves
``sys.modules`` alone; TensorFlow, tf2onnx and Keras load only when a TensorFlow model is read."""

from __future__ import annotations

import subprocess
import sys

COMMAND = """
import sys
sys.argv = ["ncc", "passes"]  # a command that imports onnx-ir and every pass
from ncc.tools.cli import main
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
import onnx_ir as ir
assert type(sys.modules["sympy"]).__name__ == "_Deferred", type(sys.modules["sympy"])
assert "sympy.core" not in sys.modules
dim = ir.SymbolicDim("N")
assert str(dim + 1) == "N + 1"  # onnx-ir's symbolic arithmetic loads the real sympy
import sympy
assert type(sys.modules["sympy"]).__name__ == "module" and "sympy.core" in sys.modules
x = sympy.Symbol("x")
assert sympy.expand((x + 1) ** 2) == x**2 + 2 * x + 1
print("ok")
"""

LIBRARY = """
import sys
import ncc.passes.base, onnx_ir
assert all(type(m).__name__ != "_Deferred" for m in list(sys.modules.values())), "ncc deferred a module"
print("ok")
"""


IR_WITHOUT_ONNXRUNTIME = """
import importlib, pkgutil, sys
import ncc.ir, ncc.ir.verifier, ncc.ir.parser, ncc.ir.printer, ncc.ir.rewrite
assert "onnxruntime" not in sys.modules
for module in pkgutil.iter_modules(ncc.ir.__path__):
    importlib.import_module(f"ncc.ir.{module.name}")
assert "onnxruntime" not in sys.modules, "a module of ncc.ir imports onnxruntime"
print("ok")
"""


TENSORFLOW_ON_DEMAND = """
import sys
sys.argv = ["ncc", "--help"]
from ncc.tools.cli import main
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
import ncc.frontends.tensorflow, ncc.tools.modelio
loaded = sorted({"tensorflow", "tf2onnx", "keras"} & set(sys.modules))
assert not loaded, f"imported at start-up: {loaded}"
print("ok")
"""


def _run(script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ok"


def test_the_command_loads_sympy_on_first_use():
    _run(COMMAND)


def test_importing_ncc_leaves_sys_modules_alone():
    _run(LIBRARY)


def test_the_ir_does_not_import_onnxruntime():
    _run(IR_WITHOUT_ONNXRUNTIME)


def test_the_tensorflow_frontend_imports_tensorflow_only_when_used():
    _run(TENSORFLOW_ON_DEMAND)
