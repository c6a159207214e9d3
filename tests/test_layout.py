"""The package's shape: imports only flow down the layers, no two modules import each other (by any path), no
module or function grows past what one reader holds, and the benchmarks and examples use the package, never
rewire it.

Layers, lowest first: errors/options → data → modeling (+ forward paths, scoring) → losses/objectives/optim →
config/outputs/callbacks → features (recipe, audit, eval, ...) → cli. A module may import its own layer or
lower ones, never a higher one (a function-local import counts too; an `if TYPE_CHECKING:` import, which never
runs, does not), so e.g. training never drags in the CLI and the data layer never depends on a model.
"""

from __future__ import annotations

import ast
import functools
import os
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
MAX_FUNCTION_LINES = 80
ROOT = PACKAGE.parent
# No two modules may import each other, by any path: the last two cycles (data/encode.py <-> data/tokenize.py,
# data/readers.py <-> data/sources.py) were cut in issue 23/25's data rework.
ALLOWED_CYCLES: list[set[str]] = []


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


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


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
    for node in _runtime_nodes(_tree(path)):
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


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_cycle_finder_finds_a_three_module_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [{"a", "b", "c"}]


def test_no_import_cycles():
    """No set of modules imports itself round (function-local imports count: hiding a cycle in a function only
    moves the failure to the first call). Cut a cycle by job: a module below both, not a local import."""
    graph = {m: {i for i in _imports(p, m) if i in KNOWN and i != m} for m, p in _modules()}
    new = [sorted(c) for c in _cycles(graph) if c not in ALLOWED_CYCLES]
    assert not new, f"modules that import each other: {new}"


def test_no_function_is_too_long():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for _, p in _modules() for n in ast.walk(_tree(p))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps with names): {long}"


def _preftune_names(tree: ast.AST) -> set[str]:
    """Names a script binds to preftune's modules or to what it imported from them."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "preftune"}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "preftune":
            names |= {a.asname or a.name for a in node.names}
    return names


def _rewiring(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = _preftune_names(tree)
    where = os.path.relpath(path, ROOT)

    def root(node: ast.AST) -> str | None:
        while isinstance(node, ast.Attribute):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        found += [f"{where}:{node.lineno} {ast.unparse(t)}" for t in targets
                  if isinstance(t, ast.Attribute) and root(t) in names]
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("setattr", "monkeypatch.setattr") \
                and node.args and root(node.args[0]) in names:
            found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
    return found


def test_rewiring_is_seen(tmp_path):
    import textwrap

    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import preftune.recipe as recipe
        from preftune.modeling import load
        from preftune import recipe as r2
        import other
        recipe.load_model = None
        load.x.y += 1
        setattr(r2.Recipe, "save", None)
        other.thing = 1
    """))
    assert [f.split(" ", 1)[1] for f in _rewiring(probe)] == [
        "recipe.load_model", "load.x.y", "setattr(r2.Recipe, 'save', None)"]


def test_bench_and_examples_use_the_package_without_rewiring_it():
    """bench/ and examples/ assign no attribute of a preftune module (or of what they imported from one): a
    benchmark that replaces the recipe's functions measures another program, and breaks silently when they
    move. Phases are timed through callbacks (on_phase_start/on_phase_end), extra callbacks of a CLI run passed to
    preftune.cli.main(argv, callbacks=...)."""
    found = [f for folder in ("bench", "examples") for p in sorted((ROOT / folder).rglob("*.py")) for f in _rewiring(p)]
    assert not found, f"assignments to preftune's attributes: {found}"


def test_version_matches_pyproject():
    import re

    from preftune.version import __version__

    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == __version__
