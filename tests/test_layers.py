"""psa's layers: core < study < analysis < cli. A module imports only its own layer or lower
ones, and no modules import each other in a circle (imports inside functions and under
`if TYPE_CHECKING:` count too: a cycle a type checker needs is still a design cycle). Within
core, the two kinds of model (core/mlp, core/module) never import each other, core's shared
modules import neither, and the kernels (core/kernels) know nothing of populations. No module
is longer than MAX_LINES.

The import graph is read from the source with `ast`, not by importing: an edge A -> B for
every `import psa.B` / `from psa.B import x` in A (B's submodule when x is one). An import
of a package's submodule runs the package's __init__ too; that implicit edge is not counted
(a package's __init__ importing its own submodules is no circle). psa/__init__.py and
psa/__main__.py stand above the layers and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import psa

SRC = Path(psa.__file__).resolve().parent
LAYERS = ("core", "study", "analysis", "cli")  # lowest first
TOP = {"psa", "psa.__main__", "psa.library", "psa.results", "psa.estimate", "psa.progress"}  # psa.fit and its result, estimate and progress bar use core and analysis
# Edges that break the layering, each with the change that would remove it. An entry that no
# longer matches an import fails the test, so that the list only ever shrinks.
WAIVED: set[tuple[str, str]] = set()


def module_names(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = ["psa", *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer(module: str) -> str | None:
    """The layer a module belongs to (None: above the layers, or in none)."""
    if module in TOP:
        return None
    part = module.split(".")[1]
    return part if part in LAYERS else None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The psa modules `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def known(name: str) -> str | None:  # the module itself, else its nearest enclosing package
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "psa" or t.startswith("psa."):
                target = known(t)
                if target is not None and target != module:
                    out.add(target)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the psa modules it imports, without psa/__init__.py and psa/__main__.py."""
    modules = module_names(src)
    return {m: {t for t in imports_of(m, p, modules) if t not in TOP} for m, p in modules.items() if m not in TOP}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports of a higher layer's module by a lower layer's."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return {(a, b) for a, targets in graph.items() for b in targets
            if layer(a) is not None and layer(b) is not None and rank[layer(a)] < rank[layer(b)]}


def missing_imports(src: Path = SRC) -> list[str]:
    """Imports of psa modules that do not exist (`import psa.x.y`, `from psa.x import y` where
    neither psa.x.y nor psa.x is a module): the graph above would otherwise drop them quietly."""
    modules = module_names(src)
    out = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("psa"):
                if node.module not in modules:
                    out.append(f"{name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                out += [f"{name}: import {a.name}" for a in node.names
                        if a.name.startswith("psa.") and a.name not in modules]
    return sorted(out)


def test_every_psa_import_names_a_module_that_exists() -> None:
    missing = missing_imports()
    assert not missing, "imports of psa modules that do not exist:\n  " + "\n  ".join(missing)


def test_every_module_is_in_a_layer() -> None:
    stray = sorted(m for m in import_graph() if layer(m) is None)
    assert not stray, f"modules in no layer ({' < '.join(LAYERS)}): {', '.join(stray)}"


def test_no_module_imports_a_higher_layer() -> None:
    up = upward_edges(import_graph())
    bad = sorted(up - WAIVED)
    stale = sorted(WAIVED - up)
    lines = [f"  {a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in bad]
    assert not bad, "imports of a higher layer (" + " < ".join(LAYERS) + "):\n" + "\n".join(lines)
    assert not stale, f"waived imports that are gone: remove them from WAIVED: {stale}"


def test_no_import_circles() -> None:
    graph = import_graph()
    found = cycles(graph)
    lines = []
    for comp in found:
        members = set(comp)
        edges = sorted((a, b) for a in comp for b in graph[a] if b in members)
        lines.append("  circle among " + ", ".join(comp) + ":\n" + "\n".join(f"    {a} -> {b}" for a, b in edges))
    assert not found, "modules that import each other in a circle:\n" + "\n".join(lines)


# core's parts: its shared modules, and the packages that build on them
CORE_PARTS = ("psa.core.mlp", "psa.core.module", "psa.core.kernels")
MAX_LINES = 600


def core_part(module: str) -> str | None:
    """The core package a module belongs to (psa.core.mlp, ...), "shared" for core's own
    modules, None outside core."""
    if not module.startswith("psa.core"):
        return None
    return next((p for p in CORE_PARTS if module == p or module.startswith(p + ".")), "shared")


def core_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that break core's inner layering: shared -> a part, mlp <-> module, kernels -> a kind."""
    out = []
    for a, targets in graph.items():
        pa = core_part(a)
        for b in targets:
            pb = core_part(b)
            if pa is None or pb is None or pa == pb:
                continue
            if pa == "shared" and pb != "psa.core.kernels":
                out.append(f"{a} (shared core) imports {b} ({pb})")
            elif {pa, pb} == {"psa.core.mlp", "psa.core.module"}:
                out.append(f"{a} ({pa}) imports {b} ({pb}): the two kinds of model never depend on each other")
            elif pa == "psa.core.kernels" and pb in ("psa.core.mlp", "psa.core.module"):
                out.append(f"{a} (kernels) imports {b} ({pb}): kernels know nothing of populations")
    return sorted(out)


def test_core_keeps_its_inner_layers() -> None:
    bad = core_violations(import_graph())
    assert not bad, "imports that break core's inner layers:\n  " + "\n  ".join(bad)


def test_no_module_is_longer_than_the_limit() -> None:
    long = sorted((len(p.read_text().splitlines()), name) for name, p in module_names().items()
                  if len(p.read_text().splitlines()) > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split them by job): " + ", ".join(
        f"{name} ({n})" for n, name in long)


def test_the_checks_see_what_they_should(tmp_path: Path) -> None:
    """A package with a planted upward import and a circle (inside a function) is caught."""
    pkg = tmp_path / "psa"
    for d in ("core", "study", "cli"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from psa.study import b\n")
    (pkg / "study" / "b.py").write_text("from psa.core.a import f\nfrom . import c\n")
    (pkg / "study" / "c.py").write_text("import psa.core\n")
    (pkg / "cli" / "d.py").write_text("from psa.study.b import x\nfrom psa.core import a\n")
    # a cycle through a type-only import is a cycle
    (pkg / "core" / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from psa.core.f import F\n")
    (pkg / "core" / "f.py").write_text("from psa.core import e\n")
    for part in ("mlp", "module", "kernels"):
        (pkg / "core" / part).mkdir()
        (pkg / "core" / part / "__init__.py").write_text("")
    (pkg / "core" / "mlp" / "g.py").write_text("from psa.core.module import h\n")
    (pkg / "core" / "module" / "h.py").write_text("from psa.core import a\n")
    (pkg / "core" / "kernels" / "k.py").write_text("from psa.core.mlp import g\n")
    (pkg / "study" / "gone.py").write_text("from psa.core.nowhere import x\n")
    assert missing_imports(pkg) == ["psa.study.gone: from psa.core.nowhere import ..."]
    (pkg / "study" / "gone.py").unlink()
    graph = import_graph(pkg)
    assert graph["psa.study.b"] == {"psa.core.a", "psa.study.c"}
    assert graph["psa.cli.d"] == {"psa.study.b", "psa.core.a"}
    assert upward_edges(graph) == {("psa.core.a", "psa.study.b")}
    assert cycles(graph) == [["psa.core.a", "psa.study.b"], ["psa.core.e", "psa.core.f"]]
    bad = core_violations(graph)
    assert len(bad) == 2 and "psa.core.mlp.g (psa.core.mlp) imports psa.core.module.h" in bad[1]
    assert "psa.core.kernels.k (kernels) imports psa.core.mlp.g" in bad[0]


def test_every_module_has_its_line_in_the_architecture_page() -> None:
    """docs/architecture.md says what each module is for: one of a layer's table rows (`name`
    relative to the layer's folder), or for psa/cli its prose. A module added without one fails."""
    page = SRC.parent.parent / "docs" / "architecture.md"
    if not page.is_file():  # an installed copy without the repository's docs
        return
    text = page.read_text()
    missing = []
    for name, path in module_names().items():
        parts = name.split(".")
        if path.name == "__init__.py" or len(parts) < 3 or parts[1] not in LAYERS:
            continue
        rel = "/".join(parts[2:])
        if (f"`{rel}`" if parts[1] == "cli" else f"| `{rel}` |") not in text:
            missing.append(name)
    assert not missing, f"modules docs/architecture.md does not describe: {', '.join(missing)}"
