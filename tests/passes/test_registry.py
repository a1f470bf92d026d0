"""The pass registry: built-ins, duplicates, plugin files and entry points."""

from __future__ import annotations

import importlib.metadata
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest
from ncc.errors import NccError, PassSpecError
from ncc.passes import Pass, registry
from ncc.passes.registry import all_passes, get_pass, load_entry_points, load_plugin


@pytest.fixture(autouse=True)
def restore_registry():
    all_passes()  # built-ins loaded before the snapshot
    saved = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


PLUGIN = """\
from dataclasses import dataclass
from typing import ClassVar

from ncc.passes import Pass, PassResult, option


@dataclass(frozen=True)
class {cls}(Pass):
    \"\"\"A plugin pass.\"\"\"

    name: ClassVar[str] = "{name}"
    times: int = option(1, "how often")

    def run(self, model, ctx):
        return PassResult(modified=False)
"""


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# -- built-ins and registration ---------------------------------------------------


def test_builtins_are_discovered():
    passes = all_passes()
    for name in ("shape-inference", "fold-constants", "dce", "cse", "eliminate-identity", "toposort"):
        assert name in passes, name
        assert passes[name].origin == "builtin"
    assert list(passes) == sorted(passes)
    assert get_pass("dce") is passes["dce"]


LAZY = """
import sys
from ncc.passes.spec import parse_pipeline
parse_pipeline("int8")
loaded = sorted(m for m in sys.modules if m.startswith(("ncc.passes.woq.", "ncc.passes.sparsity.")))
assert not loaded, loaded
from ncc.passes.registry import all_passes, get_pass
for name, cls in all_passes().items():
    assert get_pass(name) is cls
print("ok")
"""


def test_a_pipeline_imports_only_the_passes_it_names():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_every_builtin_is_found_by_its_name_alone():
    """Each built-in pass name leads to its module by spelling (the lazy path), in a fresh process."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from ncc.passes import registry\n"
        "names = sys.argv[1:]\n"
        "for name in names:\n"
        "    registry._load_named(name)\n"
        "missing = [n for n in names if n not in registry._registry]\n"
        "assert not missing, missing\n"
        "assert not registry._builtins_loaded\n"
        "print('ok')\n"
    )
    names = [n for n, cls in all_passes().items() if cls.__module__.startswith("ncc.passes.")]
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_defining_a_subclass_registers_it():
    @dataclass(frozen=True)
    class Fresh(Pass):
        name: ClassVar[str] = "test-registry-fresh"

    assert get_pass("test-registry-fresh") is Fresh


def test_duplicate_name_names_both_origins():
    with pytest.raises(NccError) as info:

        class Clash(Pass):
            name: ClassVar[str] = "dce"

    message = str(info.value)
    assert message.startswith("pass 'dce' is defined twice: by ncc.passes.cleanup.dce.")
    assert "and by test_registry.test_duplicate_name_names_both_origins.<locals>.Clash (" in message
    assert message.endswith("test_registry.py).")


def test_redefining_the_same_class_replaces_it():
    def define():
        class Again(Pass):
            name: ClassVar[str] = "test-registry-again"

        return Again

    first, second = define(), define()
    assert first is not second
    assert get_pass("test-registry-again") is second


def test_invalid_name_is_refused():
    with pytest.raises(NccError, match=r"invalid name 'Not_Kebab'"):

        class Bad(Pass):
            name: ClassVar[str] = "Not_Kebab"


def test_pipeline_names_are_reserved():
    with pytest.raises(NccError, match=r"^pass name 'cleanup' \(.*\) is already the name of a pipeline\.$"):

        class Shadow(Pass):
            name: ClassVar[str] = "cleanup"


def test_unknown_pass_is_a_spec_error():
    with pytest.raises(PassSpecError, match=r"^unknown pass 'cse2'; did you mean 'cse'\? Valid passes: "):
        get_pass("cse2")


# -- plugin files -----------------------------------------------------------------


def test_load_plugin_file(tmp_path):
    path = write(tmp_path / "my_plugin.py", PLUGIN.format(cls="MyPass", name="test-plugin-file"))
    (cls,) = load_plugin(path)
    assert cls.name == "test-plugin-file"
    assert cls.origin == str(path)
    assert get_pass("test-plugin-file") is cls
    assert cls(times=2).spec() == "test-plugin-file{times=2}"
    # Loading the same file again is not a duplicate.
    (again,) = load_plugin(path)
    assert get_pass("test-plugin-file") is again


def test_plugin_missing_file(tmp_path):
    path = tmp_path / "nope.py"
    with pytest.raises(NccError) as info:
        load_plugin(path)
    assert str(info.value) == f"{path}: no such plugin file."


def test_plugin_syntax_error(tmp_path):
    path = write(tmp_path / "broken.py", "x = 1\ndef f(:\n    pass\n")
    with pytest.raises(NccError) as info:
        load_plugin(path)
    assert str(info.value).startswith(f"{path}:2:")
    assert ": syntax error in plugin: " in str(info.value)
    assert "\n" not in str(info.value)


def test_plugin_that_raises_while_importing(tmp_path):
    path = write(tmp_path / "raises.py", "import os\n\nraise RuntimeError('boom')\n")
    with pytest.raises(NccError) as info:
        load_plugin(path)
    assert str(info.value) == f"{path}:3: plugin failed to import: RuntimeError: boom."


def test_plugin_defining_no_pass(tmp_path):
    path = write(tmp_path / "empty.py", "X = 1\n")
    with pytest.raises(NccError) as info:
        load_plugin(path)
    assert str(info.value) == f"{path}: plugin defines no pass (a subclass of ncc.passes.Pass with a 'name')."


def test_plugin_redefining_a_builtin(tmp_path):
    path = write(tmp_path / "clash.py", PLUGIN.format(cls="Clash", name="cse"))
    with pytest.raises(NccError) as info:
        load_plugin(path)
    message = str(info.value)
    assert message.startswith(f"{path}: pass 'cse' is defined twice: by ncc.passes.cleanup.cse.")
    assert message.endswith(f"Clash ({path}).")
    assert get_pass("cse").__module__ == "ncc.passes.cleanup.cse"


def test_failed_plugin_leaves_no_pass_behind(tmp_path):
    text = PLUGIN.format(cls="Half", name="test-plugin-half") + "\nraise ValueError('late')\n"
    path = write(tmp_path / "half.py", text)
    with pytest.raises(NccError, match="plugin failed to import: ValueError: late"):
        load_plugin(path)
    with pytest.raises(PassSpecError):
        get_pass("test-plugin-half")


# -- entry points ---------------------------------------------------------------------


@pytest.fixture
def entry_points(monkeypatch, tmp_path):
    """Install fake ``ncc.passes`` entry points; returns a function taking (name, value) pairs."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(*pairs):
        eps = [importlib.metadata.EntryPoint(name, value, "ncc.passes") for name, value in pairs]

        def fake(**kwargs):
            assert kwargs == {"group": "ncc.passes"}
            return eps

        monkeypatch.setattr(importlib.metadata, "entry_points", fake)
        monkeypatch.setattr(registry, "_entry_points_loaded", False)

    return install


def test_entry_point_module(entry_points, tmp_path):
    write(tmp_path / "ncc_ep_module.py", PLUGIN.format(cls="EpPass", name="test-ep-module"))
    entry_points(("mine", "ncc_ep_module"))
    cls = get_pass("test-ep-module")  # loaded lazily on lookup
    assert cls.origin == "entry point mine (ncc_ep_module)"


def test_entry_point_class(entry_points, tmp_path):
    write(tmp_path / "ncc_ep_class.py", PLUGIN.format(cls="EpClass", name="test-ep-class"))
    entry_points(("cls", "ncc_ep_class:EpClass"))
    (cls,) = load_entry_points()
    assert cls.__name__ == "EpClass"
    assert get_pass("test-ep-class") is cls
    assert cls.origin == "entry point cls (ncc_ep_class:EpClass)"


def test_entry_point_that_fails_to_load(entry_points):
    entry_points(("broken", "ncc_no_such_module_xyz"))
    with pytest.raises(NccError) as info:
        get_pass("dce")  # a known name needs no plugin loading ...
        all_passes()  # ... listing all passes does
    assert str(info.value) == (
        "cannot load pass plugin entry point 'broken = ncc_no_such_module_xyz' (group ncc.passes): "
        "ModuleNotFoundError: No module named 'ncc_no_such_module_xyz'."
    )


def test_entry_point_that_is_not_a_pass(entry_points, tmp_path):
    write(tmp_path / "ncc_ep_other.py", "VALUE = 3\n")
    entry_points(("other", "ncc_ep_other:VALUE"))
    with pytest.raises(NccError, match=r"loaded 3, which is neither a module nor a Pass class\.$"):
        load_entry_points()
