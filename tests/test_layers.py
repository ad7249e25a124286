"""The package's layers and their one-way imports (ARCHITECTURE.md), checked on the source.

Every import of a module of the package is counted: at module level, under
``TYPE_CHECKING`` and inside functions.  The rules:

- no import cycle between modules;
- a layer imports only layers below it: cli -> analysis, flow -> checkpoints -> store ->
  _format -> (errors, _types, _display); analysis and flow do not import each other;
- only the CLI (and ``__main__``) imports the package root, the public surface;
- a function-local import is for an optional dependency, never for a module of the package.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

import computable_flows_shim

PKG = "computable_flows_shim"
SRC = os.path.dirname(computable_flows_shim.__file__)

RANK = {
    "errors": 0,
    "_types": 0,
    "_display": 0,
    "_platform": 0,
    "_format": 1,
    "store": 2,
    "checkpoints": 3,
    "flow": 4,
    "analysis": 4,
    "cli": 5,
    "__main__": 6,
    "": 7,  # the package root: the public surface
}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def modules(src: str = SRC) -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for base, _dirs, files in os.walk(src):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(base, f), src)[:-3].replace(os.sep, ".")
                rel = rel[: -len("__init__")].rstrip(".") if rel.endswith("__init__") else rel
                out[f"{PKG}.{rel}" if rel else PKG] = os.path.join(base, f)
    return out


def layer(module: str) -> str:
    """The layer of a dotted module name: its first component under the package."""
    rest = module[len(PKG) :].lstrip(".")
    return rest.split(".")[0]


def imports(mods: dict[str, str], module: str) -> Iterator[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for each import of a package module."""
    path = mods[module]
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(_read(path))
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_pkg else module.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            for a in node.names:  # "from pkg.sub import mod" imports the module, else the package
                name = f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target
                yield name, node.lineno, id(node) in local
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    yield a.name, node.lineno, id(node) in local


def graph(mods: dict[str, str]) -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(mods, m) if t in mods and t != m} for m in mods}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def violations(mods: dict[str, str]) -> list[str]:
    out = [f"import cycle: {' -> '.join(c)}" for c in cycles(graph(mods))]
    for m in mods:
        src = layer(m)
        if src not in RANK:
            out.append(f"{m}: in no layer (add it to ARCHITECTURE.md and to RANK here)")
            continue
        for target, line, in_function in imports(mods, m):
            dst = layer(target)
            where = f"{os.path.relpath(mods[m], SRC)}:{line}"
            if in_function:
                out.append(f"{where}: function-local import of {target} (only optional dependencies import late)")
            if dst == src:
                continue
            if dst == "" and src not in ("cli", "__main__"):
                out.append(f"{where}: imports the package root (only the CLI uses the public surface)")
            elif RANK.get(dst, 99) >= RANK[src] and dst != "":
                out.append(f"{where}: {src} imports {target} ({dst} is not below {src})")
    return out


def test_imports_point_one_way():
    assert violations(modules()) == []


def test_the_checker_fails_on_a_cycle_and_an_upward_import(tmp_path):
    """The rules above are not vacuous: a copy of the package with one upward import added
    (the format importing the manager, which imports the format) is refused."""
    import shutil

    copy = tmp_path / PKG
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    arrays = copy / "_format" / "arrays.py"
    upward = "\nfrom computable_flows_shim.checkpoints._manager import CheckpointManager\n"
    arrays.write_text(arrays.read_text() + upward)
    found = violations(modules(str(copy)))
    assert any(v.startswith("import cycle:") and f"{PKG}._format.arrays" in v for v in found), found
    assert any("_format imports computable_flows_shim.checkpoints._manager" in v for v in found), found


@pytest.mark.parametrize("limit", [500])
def test_no_module_over_500_lines_without_its_reason(limit):
    """A long module says at its top why it is one module ("Why one module:")."""
    long = []
    for m, path in modules().items():
        text = _read(path)
        if text.count("\n") > limit and "Why one module:" not in text[:3000]:
            long.append(f"{os.path.relpath(path, SRC)}: {text.count(chr(10))} lines")
    assert long == []
