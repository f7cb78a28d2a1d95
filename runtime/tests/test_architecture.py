"""The layout is the architecture: imports point one way, there are no cycles, no module is too long.

An AST walk over the source files of ``ptycho_runtime`` and ``ptycho_export``
(read by path, nothing is imported, so it runs without torch and in every CI
venv). Every ``import`` counts, at module level or inside a function
(a lazy import is still a dependency), including ``if TYPE_CHECKING:`` blocks.

The layers of each package are declared once, below, lowest first. A module
may import from a lower layer and from its own sub-package; an import from a
higher layer, or from another sub-package of the same layer, fails. Cycles
fail in either package. docs/architecture.md explains the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "runtime" / "ptycho_runtime"
EXPORT = REPO / "ptycho_export"
MAX_LINES = 600

# Lowest layer first. A name is a top-level module or sub-package of the package ("" is its __init__).
LAYERS: dict[str, list[set[str]]] = {
    "ptycho_runtime": [
        {"_version", "_deprecation"},
        {"format"},                 # the bundle file: schema, safe reader, checks, writer, atomic writes
        {"reconstruction"},         # geometry, grouping, input checks, stitching, alignment (numpy only)
        {"refinement"},             # engines that refine a reconstruction against the data (batched, ePIE, pty-chi)
        {"inference"},              # Bundle / load_bundle, backends, parity, streaming, host compatibility
        {"files"},                  # scan NPZ in, reconstruction HDF5 and PNG out
        {"hosts", "distributed"},   # worker + ptychodus; Triton repository/server + Dask (peers: no imports between)
        {"cli"},                    # the ptycho-runtime command
        # the public API and the deprecated flat module paths (one release): nothing in the runtime imports them
        {"", "alignment", "backends", "bundle", "bundle_format", "cli_cluster", "geometry", "grouping", "infer_many",
         "inputs", "npz", "parity", "physics", "ptychodus", "remote", "serve", "stitching", "streaming",
         "triton_client", "triton_model", "worker"},
    ],
    "ptycho_export": [
        {""},                                   # __version__ only
        {"config", "physics", "metrics", "reference", "stitching"},
        {"params"},
        {"data"},
        {"model"},
        {"model_manager", "training"},
        {"export", "pretraining", "evaluate"},
        {"verify"},
        {"workflows"},
        {"testing", "cli", "expect_table"},
    ],
}

# Known exceptions, each with the edge it allows and why.
KNOWN_EDGES: set[tuple[str, str]] = set()  # (importer, imported) pairs excused from the checks: none
LONG_MODULE_EXCEPTIONS: set[str] = set()   # modules excused from the length limit: none


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package __init__) for every .py file under ``root``."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (f, is_pkg)
    return out


def _imports(name: str, is_pkg: bool, tree: ast.AST, modules: dict, package: str) -> Iterable[tuple[str, int]]:
    """(imported module of ``package``, line) for every import in ``tree``; ``from X import y`` → X.y if a module."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else target), node.lineno


def _graph(package: str) -> dict[str, dict[str, int]]:
    """Module → {imported module: first line} within ``package`` (read from source)."""
    root = RUNTIME if package == "ptycho_runtime" else EXPORT
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in modules.items():
        deps: dict[str, int] = {}
        for dep, line in _imports(name, is_pkg, ast.parse(path.read_text(), str(path)), modules, package):
            while dep not in modules and "." in dep:  # ``import a.b.c`` of a name that is not a module
                dep = dep.rsplit(".", 1)[0]
            if dep != name:
                deps.setdefault(dep, line)
        graph[name] = deps
    return graph


def _unit(package: str, module: str) -> str:
    """The layer unit of a module: its top-level name inside the package ("" for the package __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(package: str, unit: str) -> int:
    for i, layer in enumerate(LAYERS[package]):
        if unit in layer:
            return i
    raise AssertionError(f"{package}.{unit} is in no layer: add it to LAYERS[{package!r}] in {__file__} "
                         "(and to docs/architecture.md)")


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), known edges removed."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if (v, w) in KNOWN_EDGES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_import_cycles(package):
    cycles = _cycles(_graph(package))
    assert not cycles, f"import cycles in {package}: {cycles}"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_point_down_the_layers(package):
    bad = []
    for module, deps in _graph(package).items():
        unit = _unit(package, module)
        rank = _rank(package, unit)
        for dep, line in deps.items():
            dep_unit = _unit(package, dep)
            if dep_unit == unit or (module, dep) in KNOWN_EDGES:
                continue
            dep_rank = _rank(package, dep_unit)
            if dep_rank > rank:
                bad.append(f"{module}:{line} imports {dep} (a higher layer)")
            elif dep_rank == rank:
                bad.append(f"{module}:{line} imports {dep} (another sub-package of the same layer)")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_layer_name_exists():
    """A layer that names a module nobody has is a stale declaration."""
    for package, layers in LAYERS.items():
        units = {_unit(package, m) for m in _graph(package)}
        missing = sorted(u for layer in layers for u in layer if u not in units)
        assert not missing, f"LAYERS[{package!r}] names {missing}, which do not exist"


def test_no_module_is_too_long():
    long = []
    for root in (RUNTIME, EXPORT):
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(REPO).as_posix()
            n = len(f.read_text().splitlines())
            if n > MAX_LINES and rel not in LONG_MODULE_EXCEPTIONS:
                long.append(f"{rel}: {n} lines")
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)


def test_the_checker_sees_cycles_and_upward_imports(tmp_path, monkeypatch):
    """The walk itself: a planted cycle and a planted upward import are found."""
    pkg = tmp_path / "ptycho_runtime"
    for sub in ("format", "inference"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "format" / "a.py").write_text("from ..inference import b\n")                 # upward
    (pkg / "inference" / "b.py").write_text("def f():\n    from ..format import a\n")    # lazy: still a cycle
    monkeypatch.setitem(globals(), "RUNTIME", pkg)
    graph = _graph("ptycho_runtime")
    assert graph["ptycho_runtime.format.a"] == {"ptycho_runtime.inference.b": 1}
    assert _cycles(graph) == [["ptycho_runtime.format.a", "ptycho_runtime.inference.b"]]
    with pytest.raises(AssertionError, match="format.a:1 imports ptycho_runtime.inference.b"):
        test_imports_point_down_the_layers("ptycho_runtime")
