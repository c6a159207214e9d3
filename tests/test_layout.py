"""The package's shape: imports only flow down the layers, and no module grows past what one reader holds.

Layers, lowest first: errors → data → modeling (+ forward paths, scoring) → losses/objectives/optim →
config/outputs/callbacks → features (recipe, audit, eval, ...) → cli. A module may import its own layer or
lower ones, never a higher one (a function-local import counts too; an `if TYPE_CHECKING:` import, which never
runs, does not), so e.g. training never drags in the CLI and the data layer never depends on a model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "preftune"
LAYERS = [
    ("preftune.errors", "preftune.version", "preftune.options"),
    ("preftune.data",),
    ("preftune.modeling", "preftune.logprobs", "preftune.packing", "preftune.device", "preftune.scoring"),
    ("preftune.losses", "preftune.objectives", "preftune.optim"),
    ("preftune.config", "preftune.command_options", "preftune.outputs", "preftune.callbacks"),
    None,  # every other module: a feature (recipe, audit, evaluation, generation, hub, ...)
    ("preftune.cli", "preftune.__main__", "preftune"),
]
MAX_LINES = 450


def _layer(module: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if prefixes and any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return LAYERS.index(None)


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


KNOWN = {m for m, _ in _modules()}


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                # `from preftune import packing` imports the submodule, not the package's __init__
                subs = {f"{node.module}.{a.name}" for a in node.names} & KNOWN
                found |= subs or {node.module}
    return {m for m in found if m == "preftune" or m.startswith("preftune.")}


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_imports_only_go_down_the_layers(module, path):
    own = _layer(module)
    known = {m for m, _ in _modules()}
    upward = sorted(m for m in _imports(path, module) if m in known and _layer(m) > own)
    assert not upward, f"{module} (layer {own}) imports higher layers: {upward}"


def test_no_module_is_too_long():
    long = {m: n for m, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_version_matches_pyproject():
    import re

    from preftune.version import __version__

    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == __version__
