"""User code named on the command line: ``module.py:function`` or ``package.module:function``.

``--calib data.py:load`` and ``--eval eval.py:evaluate`` name a function the same way; a file that
does not exist, a module that does not import, a missing or non-callable name is one sentence.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ncc.errors import NccError


def resolve_function(spec: str, role: str, flag: str) -> Callable[..., Any]:
    """The function ``spec`` names; ``role`` (``calibration``, ``evaluation``) and ``flag`` (``--calib``)
    say in errors what it was for."""
    module_part, _, function_name = spec.rpartition(":")
    if not module_part or not function_name:
        raise NccError(f"{flag} {spec} does not name a function: give module.py:function.")
    if module_part.endswith(".py"):
        file = Path(module_part)
        if not file.is_file():
            raise NccError(f"{role} module file {module_part} does not exist (from {flag} {spec}).")
        module_name = f"_ncc_{role}_{file.stem}_{abs(hash(str(file.resolve())))}"
        if module_name in sys.modules:
            module = sys.modules[module_name]
        else:
            try:
                loader_spec = importlib.util.spec_from_file_location(module_name, file)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[module_name] = module
                loader_spec.loader.exec_module(module)
            except Exception as err:  # noqa: BLE001 - the user's module failed to import
                sys.modules.pop(module_name, None)
                raise NccError(
                    f"cannot import {role} module {module_part}: {type(err).__name__}: {err}."
                ) from None
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as err:
            raise NccError(f"cannot import {role} module {module_part!r}: {err}.") from None
        except Exception as err:  # noqa: BLE001
            raise NccError(
                f"cannot import {role} module {module_part!r}: {type(err).__name__}: {err}."
            ) from None
    if not hasattr(module, function_name):
        raise NccError(f"{role} module {module_part} has no function {function_name!r}.")
    function = getattr(module, function_name)
    if not callable(function):
        raise NccError(
            f"{flag} {spec} names {type(function).__name__} {function_name!r}, which is not callable."
        )
    return function
