"""The architecture, checked: lean imports and the layering of slimkit's import graph.

Layers (imports only go downwards): the core packages, then the techniques (each
independent of the others), then ``slimkit.recipes``, then ``slimkit.cli``. Every
``import`` statement of every file counts, at module level or inside a function:
an import deferred into a function still ties the two modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slimkit"

CORE = {
    "calibration",
    "config",
    "errors",
    "batch",
    "utils",
    "data",
    "models",
    "metrics",
    "train",
    "report",
    "tasks",
    "graph",
    "export",
    "shipped_recipes",  # YAML files only (a link to the top-level recipes/ folder)
}
TECHNIQUES = {"prune", "quant", "distill", "transfer", "activations"}
SEARCH = {"search"}  # above the techniques (it calls their verbs), below the recipes
TOP = {"recipes", "cli"}
HEAVY = ("transformers", "onnx", "onnxruntime", "sklearn", "scipy")


# -- lean imports ------------------------------------------------------------------------------------
def _loaded_heavy(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it left in sys.modules."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import sys
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return [m for m in last.split(",") if m]


HELP = """
import contextlib, io
{call}
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        {run}
    except SystemExit as exit:
        assert exit.code in (0, None), exit.code
assert "usage: slimkit" in out.getvalue(), out.getvalue()
"""


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("import slimkit", "import slimkit"),
        (
            "slimkit.cli.main(['--help'])",
            HELP.format(call="import slimkit.cli", run="slimkit.cli.main(['--help'])"),
        ),
        (
            "slimkit run --help",
            HELP.format(call="import slimkit.cli", run="slimkit.cli.main(['run', '--help'])"),
        ),
        (
            "the slimkit console script --help",
            HELP.format(
                call=(
                    "import sys\nfrom importlib.metadata import entry_points\n"
                    "(ep,) = entry_points(group='console_scripts', name='slimkit')\n"
                    "assert ep.value == 'slimkit.cli:main', ep.value\n"
                    "sys.argv = ['slimkit', '--help']"
                ),
                run="ep.load()()",
            ),
        ),
    ],
)
def test_import_and_help_load_no_heavy_dependency(case, code):
    loaded = _loaded_heavy(code)
    assert not loaded, f"{case} loaded {', '.join(loaded)}: import them inside the functions that use them"


def test_python_m_cli_help_loads_no_heavy_dependency():
    # -X importtime lists every module the real ``python -m slimkit.cli --help`` imports, on stderr.
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "slimkit.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and "usage: slimkit" in done.stdout, done.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "slimkit.cli" in imported or "slimkit.errors" in imported, done.stderr[-2000:]
    loaded = sorted({m.split(".")[0] for m in imported} & set(HEAVY))
    assert not loaded, f"python -m slimkit.cli --help loaded {', '.join(loaded)}"


# -- the import graph -----------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function or class body rather than at module level
    typing_only: bool = False  # under ``if TYPE_CHECKING:``: still a dependency between the two modules

    def __str__(self) -> str:
        where = MODULES[self.source].relative_to(SRC.parent)
        notes = [
            n for n, on in (("inside a function", self.lazy), ("under TYPE_CHECKING", self.typing_only)) if on
        ]
        return f"{where}:{self.line} imports {self.target}" + (f" ({', '.join(notes)})" if notes else "")


def _resolve(name: str) -> str:
    """The module an import of ``name`` loads: the longest prefix that is a slimkit module."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) if parts else name


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module = module
        self.package = module if module in PACKAGES else module.rpartition(".")[0]
        self.depth = 0
        self.typing_only = 0
        self.edges: list[Edge] = []

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        self.typing_only += 1
        for child in node.body:
            self.visit(child)
        self.typing_only -= 1
        for child in node.orelse:
            self.visit(child)

    def _add(self, target: str, node: ast.AST) -> None:
        if target == "slimkit" or target.startswith("slimkit."):
            edge = Edge(self.module, _resolve(target), node.lineno, self.depth > 0, self.typing_only > 0)
            self.edges.append(edge)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in MODULES else base, node)


def _edges() -> list[Edge]:
    edges = []
    for name, path in MODULES.items():
        visitor = _Imports(name)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges.extend(visitor.edges)
    return edges


EDGES = _edges()


def _family(module: str) -> str:
    """``slimkit.quant.api`` -> ``quant``; the top-level ``slimkit`` package -> ``slimkit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "slimkit"


def _report(title: str, violations: list) -> str:
    return f"{title} ({len(violations)}):\n  " + "\n  ".join(str(v) for v in violations)


def test_the_graph_is_read():
    assert {"slimkit", "slimkit.cli", "slimkit.train.trainer", "slimkit.distill.api"} <= set(MODULES)
    assert any(e.source == "slimkit.distill.api" and e.target == "slimkit.train.trainer" for e in EDGES)
    assert any(e.lazy for e in EDGES)  # imports inside functions are seen too


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(
        {m for m in MODULES if _family(m) not in CORE | TECHNIQUES | SEARCH | TOP | {"slimkit"}}
    )
    assert not unplaced, _report("modules in no layer (add them to CORE, TECHNIQUES or TOP)", unplaced)


def test_techniques_import_neither_recipes_nor_cli():
    bad = [e for e in EDGES if _family(e.source) in TECHNIQUES and _family(e.target) in TOP]
    assert not bad, _report("technique modules importing slimkit.recipes or slimkit.cli", bad)


def test_search_sits_between_techniques_and_recipes():
    up = [e for e in EDGES if _family(e.source) in SEARCH and _family(e.target) in TOP]
    down = [e for e in EDGES if _family(e.source) in CORE | TECHNIQUES and _family(e.target) in SEARCH]
    assert not up, _report("slimkit.search importing slimkit.recipes or slimkit.cli", up)
    assert not down, _report("core or technique modules importing slimkit.search", down)


def test_no_technique_imports_another():
    bad = [
        e
        for e in EDGES
        if _family(e.source) in TECHNIQUES
        and _family(e.target) in TECHNIQUES
        and _family(e.target) != _family(e.source)
    ]
    assert not bad, _report("technique modules importing another technique", bad)


def test_core_imports_no_technique_recipes_or_cli():
    core = CORE | {"slimkit"}  # the top-level __init__ is below everything too
    bad = [e for e in EDGES if _family(e.source) in core and _family(e.target) in TECHNIQUES | TOP]
    assert not bad, _report("core modules importing a technique, slimkit.recipes or slimkit.cli", bad)


def test_no_module_imports_its_own_package_init():
    bad = []
    for e in EDGES:
        own = e.source if e.source in PACKAGES else e.source.rpartition(".")[0]
        ancestors = {".".join(own.split(".")[:i]) for i in range(2, own.count(".") + 2)}
        if e.target in ancestors:  # slimkit.quant.methods.qat -> slimkit.quant or slimkit.quant.methods
            bad.append(e)
    assert not bad, _report("modules importing their own package's __init__ (import the submodule)", bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path ending where it starts) per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_shortest_cycle(graph, c) for c in components]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return [*paths[node], start]
                if nxt in component and nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a strongly connected component


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        if e.target in MODULES:
            graph.setdefault(e.source, set()).add(e.target)
    cycles = _cycles(graph)
    lines = []
    for cycle in cycles:
        hops = [next(e for e in EDGES if e.source == a and e.target == b) for a, b in zip(cycle, cycle[1:])]
        lines.append(" -> ".join(cycle) + "\n      " + "\n      ".join(str(h) for h in hops))
    assert not cycles, _report("import cycles (each with the imports that close it)", lines)


def test_cycle_finder_reports_the_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]


def test_imports_are_resolved_to_modules():
    source = textwrap.dedent(
        """
        import slimkit.metrics.task as t
        from . import losses
        from .config import DistillConfig
        from slimkit.train import Trainer
        from slimkit.train import trainer
        from ..batch import text_inputs
        if TYPE_CHECKING:
            from slimkit.models import loading

        def later():
            from slimkit import errors
        """
    )
    visitor = _Imports("slimkit.distill.api")
    visitor.visit(ast.parse(source))
    got = [(e.target, e.lazy, e.typing_only) for e in visitor.edges]
    assert got == [
        ("slimkit.metrics.task", False, False),
        ("slimkit.distill.losses", False, False),
        ("slimkit.distill.config", False, False),
        ("slimkit.train", False, False),  # a name from the package: its __init__
        ("slimkit.train.trainer", False, False),
        ("slimkit.batch", False, False),
        ("slimkit.models.loading", False, True),
        ("slimkit.errors", True, False),
    ]
