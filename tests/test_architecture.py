"""The import graph of ``slmkd/`` (read from the source with ``ast``: module-level and
function-level imports alike; ``if TYPE_CHECKING:`` blocks are annotations only and skipped) has
no cycle and respects the layer order of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "slmkd"

#: Layers, bottom (0) to top. A module may import its own layer or lower ones only. Stages are
#: ordered by the data flow (CoT -> runs -> predictions -> report): a stage may read an earlier
#: stage's files through that stage's modules, never a later one's.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("slmkd._version", "slmkd.config", "slmkd.fileio", "slmkd.runtime", "slmkd.links",
              "slmkd.layout", "slmkd.worlds")),
    ("pure", ("slmkd.data", "slmkd.scoring", "slmkd.losses", "slmkd.vocab", "slmkd.stats")),
    ("models", ("slmkd.modeling", "slmkd.generation")),
    ("tiny world", ("slmkd.tiny",)),
    ("stage: teacher", ("slmkd.teacher",)),
    ("stage: training", ("slmkd.training",)),
    ("stage: evaluation", ("slmkd.evaluation",)),
    ("stage: report", ("slmkd.report",)),
    ("faces", ("slmkd.planner", "slmkd.study_costs", "slmkd.study_plan", "slmkd.preflight", "slmkd.widgets",
               "slmkd.notebook", "slmkd.pipeline")),
    ("cli", ("slmkd.cli", "slmkd")),  # the CLI and the package root (the composition root)
]


def module_name(path: Path, root: Path = PKG) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str], root: Path = PKG) -> set[str]:
    """The slmkd modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a
    module, else ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path, root)
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "slmkd":
                        out.add(a.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rsplit(".", 1)[0]
                    base = f"{pkg}.{base}" if base else pkg
                if base.split(".")[0] != "slmkd":
                    continue
                for a in child.names:
                    full = f"{base}.{a.name}"
                    out.add(full if full in modules else base)
            visit(child)

    visit(tree)
    out.discard(me)
    return {m for m in out if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")
    return rank


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def _package_of(module: str) -> str:
    return module.rsplit(".", 1)[0]


def test_no_import_cycle():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a dependency of theirs
    pruned = {m: {d for d in deps if not (d == _package_of(m) and m.startswith(d + "."))}
              for m, deps in graph.items()}
    assert find_cycles(pruned) == []


def test_imports_go_downward_only():
    bad = []
    for mod, deps in import_graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} "
                           f"({LAYERS[layer_of(dep)][0]})")
    assert bad == []


def test_only_the_cli_is_a_command_line():
    """argparse lives in the CLI; stage modules never import it or the CLI."""
    offenders = []
    for f in sorted(PKG.rglob("*.py")):
        mod = module_name(f)
        if mod in ("slmkd.cli",):
            continue
        names = {a.name for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
                 if isinstance(n, ast.Import) for a in n.names}
        if "argparse" in names:
            offenders.append(mod)
    assert offenders == []


def test_the_tiny_world_is_reached_only_through_the_registry():
    users = sorted(m for m, deps in import_graph().items() if "slmkd.tiny" in deps)
    assert all(layer_of(m) >= layer_of("slmkd.planner") for m in users), users


def test_the_checker_sees_violations(tmp_path):
    """The checks above can fail: a function-level upward import is read and flagged, an
    import under TYPE_CHECKING is not, and a cycle is found."""
    root = tmp_path / "slmkd"
    (root / "data").mkdir(parents=True)
    (root / "training").mkdir()
    (root / "training" / "run.py").write_text("")
    f = root / "data" / "fake.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import slmkd.report\n"
                 "def g():\n    from slmkd.training import run\n")
    mods = {"slmkd.data.fake", "slmkd.training", "slmkd.training.run", "slmkd.report"}
    assert imports_of(f, mods, root) == {"slmkd.training.run"}
    assert layer_of("slmkd.training.run") > layer_of("slmkd.data.fake")
    graph = {"slmkd.data.x": {"slmkd.training.run"}, "slmkd.training.run": {"slmkd.data.x"}}
    assert find_cycles(graph) == [["slmkd.data.x", "slmkd.training.run"]]


@pytest.mark.parametrize("limit", [700])
def test_modules_stay_readable(limit):
    """No module over ~600 lines (a few one-concept modules up to ``limit``)."""
    long = {module_name(f): n for f in PKG.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > limit}
    assert long == {}
