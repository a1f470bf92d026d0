"""ncc keeps sympy (imported by onnx-ir, unused by ncc) out of its start-up, and the deferred module
still works in full for whoever does use it."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import ncc.passes.base, onnx_ir as ir
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


def test_sympy_loads_on_first_use():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
