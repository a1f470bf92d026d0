"""ncc: a compiler for neural-network compression.

Frontends lower models to one IR (onnx-ir plus ncc's text form, verifier and
node ids), a pass manager runs passes over it, and backends emit artefacts.
Importing ``ncc`` is cheap: heavy modules are imported by the submodules that
need them.
"""

__version__ = "0.1.0"


def _alias_torch_api() -> None:
    """``import ncc.torch`` gives :mod:`ncc.tools.torch_api` (loaded on that import, not here): no file may
    be called ``torch.py`` at the package root, where it would shadow torch itself for code run from the
    repository (see the module's docstring). ``import ncc.torch.train`` gives :mod:`ncc.train` (so the
    alias gets an empty ``__path__``: a submodule can only be imported from a package). The finder and
    loader follow the import protocols without the ``importlib.abc`` base classes, whose import (8 ms,
    through ``importlib.resources``) every ``ncc`` command would pay."""
    import importlib
    import importlib.machinery
    import sys

    aliases = {"ncc.torch": "ncc.tools.torch_api", "ncc.torch.train": "ncc.train"}

    class Loader:
        def create_module(self, spec):
            module = importlib.import_module(aliases[spec.name])
            if spec.name == "ncc.torch" and not hasattr(module, "__path__"):
                module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    class Finder:
        def find_spec(self, fullname, path=None, target=None):
            if fullname not in aliases:
                return None
            return importlib.machinery.ModuleSpec(fullname, Loader())

    sys.meta_path.append(Finder())


_alias_torch_api()


def __getattr__(name: str):
    if name == "torch":
        import importlib

        return importlib.import_module("ncc.torch")
    raise AttributeError(f"module 'ncc' has no attribute {name!r}")
