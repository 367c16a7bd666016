"""Import rules, checked on the source (every import statement, lazy ones inside functions too):

* a module of fluid_ops imports only from its own layer or the layers below it (LAYERS);
* a test module imports no other test module (shared helpers live in tests/helpers.py and
  tests/conftest.py).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fluid_ops"

# Bottom up; a module's layer is that of the first name after `fluid_ops.` ("" is the package root).
LAYERS = [
    ("_compiled", "_C", "_C_cuda", "_version"),  # the compiled boundary; the version string
    ("checkpoint",),  # atomic, verified checkpoint files (torch only)
    ("reference",),  # plain-torch definitions of every op
    ("triton",),  # Triton kernels
    ("backend",),  # backend registry and selection
    ("ops",),  # the public ops: checks, backend choice, torch.library
    ("nn",),  # modules on the ops
    # the sampling loop drives nn.DenoiserMLP's fast path (isinstance + .sampler), so it sits above
    # nn; nothing in nn samples
    ("sampling",),
    ("nn.diffloss",),  # MAR's DiffLoss: the head's training loss and its sampling loop together
    ("distributed",),  # DDP / FSDP2 wrapping of nn modules, sharded checkpoints
    ("models",),
    ("training", "generate", "eval", "data", "accelerate", "prepare", "viz"),
    # entry points, and the root that re-exports everything; study drives training, eval and plots
    # and records bench.machine_info(), so it sits with them
    ("cli", "bench", "study", "__main__", ""),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# (importing module, imported module) pairs allowed against the table, each with why. None now.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists() or \
        any((ROOT / rel.parent).glob(rel.name + ".*.so"))


def _imports(path: Path, source: str | None = None):
    """(line, imported module) for every import in `path`: statements at any depth, and
    importlib.import_module / __import__ with a literal name. `from pkg import name` counts as
    pkg.name when that is a module, else as pkg."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                yield node.lineno, f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}") else mod
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def _layer(module: str) -> str:
    """The longest key of LAYERS that names `module` or a package above it ("" for the root)."""
    parts = module.split(".")[1:]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return parts[0] if parts else ""


def _rank(module: str) -> int | None:
    """A package whose submodules sit in several layers (nn, nn.diffloss) ranks, as a whole, with
    the highest of them: its __init__ re-exports them all."""
    key = _layer(module)
    ranks = [r for k, r in RANK.items() if k.startswith(key + ".")] if module == "fluid_ops." + key else []
    return max(ranks + [RANK[key]]) if key in RANK else None


def _package_violations():
    out = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        mine = _rank(me)
        assert mine is not None, f"{me} is in no layer of LAYERS: add it"
        for line, mod in _imports(path):
            if mod != "fluid_ops" and not mod.startswith("fluid_ops."):
                continue
            theirs = _rank(mod)
            assert theirs is not None, f"{me}:{line} imports {mod}, which is in no layer of LAYERS"
            if theirs > mine and (me, mod) not in EXCEPTIONS:
                out.append(f"{path.relative_to(ROOT)}:{line}: {me} (layer {_layer(me) or 'root'!r}) imports "
                           f"{mod} (layer {_layer(mod) or 'root'!r}, higher)")
    return out


def test_no_module_imports_from_a_higher_layer():
    bad = _package_violations()
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


def test_exceptions_are_still_real_imports():
    """An exception whose import is gone is removed from the table, so the table stays the truth."""
    seen = {(_module_name(p), mod) for p in PKG.rglob("*.py") for _, mod in _imports(p)}
    assert set(EXCEPTIONS) <= seen, sorted(set(EXCEPTIONS) - seen)


def test_no_test_module_imports_another_test_module():
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line, mod in _imports(path):
            last = mod.rsplit(".", 1)[-1]
            if last.startswith("test_") and (mod.startswith("tests.") or mod == last):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "test modules importing test modules (move shared helpers to tests/helpers.py):\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("src,want", [
    ("from fluid_ops import backend", "fluid_ops.backend"),
    ("from fluid_ops import attention", "fluid_ops"),
    ("def f():\n    import fluid_ops.nn.denoiser", "fluid_ops.nn.denoiser"),
    ("from . import _util", "fluid_ops.triton._util"),
    ("importlib.import_module('fluid_ops.ops.attention')", "fluid_ops.ops.attention"),
])
def test_import_scanner_sees_each_form(src, want):
    assert [m for _, m in _imports(PKG / "triton" / "probe.py", src)] == [want]
