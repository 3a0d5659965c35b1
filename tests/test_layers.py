"""The package's layers: each module imports only from its own package or a layer below it, no
module-level import cycle, every module importable alone, and the model's state attribute read
only through `hf_moe_accel.state` (docs/ARCHITECTURE.md draws the layers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe_accel"

# Lowest first. A module may import its own package (the first part after hf_moe_accel) and any
# package of an earlier row; `state` is the one module every stage may read.
LAYERS: list[tuple[str, ...]] = [
    ("state",),
    ("kernels",),
    ("costmodel",),
    ("patches",),
    ("graphs",),
    ("quality",),
    ("offload",),
    ("parallel",),
    ("api", "__init__"),
    ("bench",),
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(module: str) -> str:
    """The layer unit of a module: its top-level package or module under hf_moe_accel."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (annotations only, never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    lines.add(child.lineno)
    return lines


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported hf_moe_accel module, line, at module level) for every import that runs."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if node.lineno in skipped if isinstance(node, (ast.Import, ast.ImportFrom)) else True:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from pkg import submodule` imports the submodule
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            if target.split(".")[0] == "hf_moe_accel":
                found.append((target, node.lineno, id(node) in top_level))
    return found


def test_every_module_sits_in_a_layer():
    units = {_unit(m) for m in MODULES}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS"


def test_modules_import_only_downward():
    upward = []
    for module, path in MODULES.items():
        for target, line, _ in _imports(module, path):
            here, there = _unit(module), _unit(target)
            if here != there and RANK[there] > RANK[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_no_module_level_import_cycle():
    graph = {m: {t for t, _, top in _imports(m, p) if top and t in MODULES and t != m} for m, p in MODULES.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    graph = {m: {t for t in deps if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")} for m, deps in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(module: str, stack: list[str]) -> None:
        visiting.add(module)
        for dep in sorted(graph[module]):
            if dep in visiting:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, stack + [dep])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_each_module_imports_alone():
    """Each module imported first in a clean hf_moe_accel (one process, the package's modules
    dropped between imports): a module that only works when another was imported first fails here."""
    script = (
        "import importlib, sys\n"
        f"names = {sorted(m for m in MODULES if not m.endswith('__main__'))!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'hf_moe_accel' or m.startswith('hf_moe_accel.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed.append(f'{name}: {type(error).__name__}: {error}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_state_attribute_is_read_only_through_state():
    """Our attributes on a user's model and modules are named in one place each: the model's state
    object (`state.py`), the swapped modules' state (`patches/swap.py`), the stop-check wrapper's
    mark (`graphs/stop_check.py`)."""
    owners = {"state.py", "swap.py", "stop_check.py"}
    readers = sorted(str(p.relative_to(PACKAGE.parent)) for p in MODULES.values()
                     if "_hf_moe_accel" in p.read_text() and p.name not in owners)
    assert not readers, f"read the model's state through hf_moe_accel.state, not by attribute name: {readers}"
