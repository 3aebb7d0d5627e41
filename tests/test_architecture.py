"""The import shape of FaceBench (docs/architecture.md, issue 14 items 4 and 6), read from the AST.

Every ``.py`` under ``bench/`` and ``methods/`` is parsed (nothing is imported); each ``import`` and
``from ... import`` anywhere in a module (inside functions and ``if TYPE_CHECKING:`` blocks too: a circle
is a circle wherever the import stands) is resolved to the project module it names, a package import
counting as its ``__init__``. A module importing one of its own ancestor packages is not an arrow: that is
the registry pattern (``bench/eval/__init__.py`` imports its protocol modules at the bottom, and they import
``PROTOCOLS`` from the package). The rules:

- no import circle among the project's modules (strongly connected components of more than one module);
- ``methods`` never imports ``bench`` (a method is a paper, not a harness);
- ``bench.eval.formats`` imports nothing from ``bench.eval`` outside ``bench.eval.formats``: file formats
  know no protocol and no generator (here the ancestor rule does not apply: ``bench.eval`` itself is the
  protocol registry);
- the CLI is on top: only ``bench.cli`` itself and ``bench.__main__`` import ``bench.cli``;
- the report reads records: ``bench.report`` imports neither ``methods`` nor the code that makes records
  (``bench.runner``, ``bench.train``, ``bench.profile``).

The walker is checked on small trees planted in a temporary folder, so a walker that saw nothing would fail
there rather than pass on the real tree. No third-party tool (ours: the rules are five, the walk is 40 lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOPS = ("bench", "methods")
FORMATS = "bench.eval.formats"
CLI = "bench.cli"
#: Modules allowed to import the CLI besides its own: ``python -m bench`` is the ``bench`` command.
CLI_ENTRY_POINTS = ("bench.__main__",)
#: What the report may not import: it reads records, it does not make them.
RECORD_MAKERS = ("methods", "bench.runner", "bench.train", "bench.profile")


def project_modules(root: Path, tops: tuple[str, ...] = TOPS) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/<top>`` (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _inside(module: str, package: str) -> bool:
    """Whether ``module`` is ``package`` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to: itself, or the module holding it (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load (``from a import b`` may load ``a`` or ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def module_imports(root: Path, tops: tuple[str, ...] = TOPS) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (ancestor packages included)."""
    modules = project_modules(root, tops)
    imports: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        targets = {_resolve(name, modules) for node in ast.walk(tree)
                   for name in _imported_names(node, module, is_package)}
        imports[module] = {t for t in targets if t is not None and t != module}
    return imports


def import_graph(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """The arrows that can close a circle: every import except of the module's own ancestor packages."""
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in imports.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def architecture_problems(root: Path, tops: tuple[str, ...] = TOPS) -> list[str]:
    """One line per broken rule (empty when the tree keeps them all)."""
    imports = module_imports(root, tops)
    problems = [f"import circle among: {', '.join(c)}" for c in circles(import_graph(imports))]
    problems += [f"methods imports bench: {m} -> {t}" for m, targets in sorted(imports.items())
                 if m.split(".")[0] == "methods" for t in sorted(targets) if t.split(".")[0] == "bench"]
    problems += [f"a format imports a protocol: {m} -> {t}" for m, targets in sorted(imports.items())
                 if _inside(m, FORMATS) for t in sorted(targets)
                 if _inside(t, "bench.eval") and not _inside(t, FORMATS)]
    problems += [f"imports the CLI: {m} -> {t}" for m, targets in sorted(imports.items())
                 if not _inside(m, CLI) and m not in CLI_ENTRY_POINTS for t in sorted(targets) if _inside(t, CLI)]
    problems += [f"the report imports a record maker: {m} -> {t}" for m, targets in sorted(imports.items())
                 if _inside(m, "bench.report") for t in sorted(targets)
                 if any(_inside(t, maker) for maker in RECORD_MAKERS)]
    return problems


def test_the_project_keeps_its_import_shape():
    """Catches: any import circle among bench/ and methods/ modules (e.g. datasets.py <-> real.py coming
    back), a methods module importing bench, a file format importing a protocol or generator, and library
    code importing the CLI."""
    assert len(project_modules(REPO)) > 50  # the walk saw the project, not an empty folder
    assert architecture_problems(REPO) == []


def test_the_three_issue_14_circles_stay_apart():
    """Catches: the registry, the .bin codec or the report tables importing their consumers again (the
    three circles of issue 14 item 4), even through a path that a refactor makes longer."""
    imports = module_imports(REPO)
    graph = import_graph(imports)

    def reaches(source: str, target: str) -> bool:
        seen, todo = set(), [source]
        while todo:
            module = todo.pop()
            if module == target:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        return False

    assert not reaches("bench.data.datasets", "bench.data.real")
    assert not reaches("bench.eval.formats.bin", "bench.eval.verification")
    assert not reaches("bench.eval.synth_benchmarks", "bench.eval.verification")
    assert not reaches("bench.eval.synth_benchmarks", "bench.eval.megaface")
    for leaf in ("bench.report.tables", "bench.report.figures", "bench.report.profile_table"):
        for other in ("bench.report.tables", "bench.report.figures", "bench.report.profile_table"):
            assert leaf == other or other not in imports[leaf], (leaf, other)


def _plant(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_walker_finds_a_planted_circle_through_a_function_level_relative_import(tmp_path):
    """Catches: a walker that skips imports inside functions, misreads relative imports, or reports the
    circle without naming its modules."""
    root = _plant(tmp_path, {
        "bench/__init__.py": "",
        "bench/a.py": "from bench.b import thing\n",
        "bench/b.py": "def thing():\n    from .c import other\n",
        "bench/c.py": "import bench.a\n",
        "bench/d.py": "from bench import a\n",  # d -> a only: outside the circle
    })
    assert architecture_problems(root, ("bench",)) == ["import circle among: bench.a, bench.b, bench.c"]


def test_walker_counts_a_package_import_as_its_init_but_not_an_ancestor(tmp_path):
    """Catches: counting ``from pkg import NAME`` in pkg's own submodule as an arrow (every registry would be
    a circle), or missing the circle when an outside module and the package's ``__init__`` import each other."""
    registry = {
        "bench/__init__.py": "",
        "bench/eval/__init__.py": "PROTOCOLS = {}\nfrom bench.eval import lfw  # noqa\n",
        "bench/eval/lfw.py": "from bench.eval import PROTOCOLS\nfrom ..eval import PROTOCOLS as again\n",
    }
    assert architecture_problems(_plant(tmp_path / "ok", registry), ("bench",)) == []
    circular = {**registry, "bench/runner.py": "from bench.eval import PROTOCOLS\n",
                "bench/eval/__init__.py": "PROTOCOLS = {}\nfrom bench import runner\n"}
    assert architecture_problems(_plant(tmp_path / "bad", circular), ("bench",)) == [
        "import circle among: bench.eval, bench.runner"]


def test_walker_flags_each_forbidden_direction(tmp_path):
    """Catches: a direction rule not being checked (a method reaching into the harness, a file format
    importing the protocol registry, a protocol or a synthetic generator, library code importing the CLI)."""
    root = _plant(tmp_path, {
        "bench/__init__.py": "",
        "bench/__main__.py": "from bench.cli import main\n",
        "bench/cli/__init__.py": "from bench import config\n",
        "bench/config.py": "def hint():\n    from bench.cli import app\n",
        "bench/eval/__init__.py": "PROTOCOLS = {}\n",
        "bench/eval/ijb.py": "from bench.eval.formats.meta import read\n",
        "bench/eval/formats/__init__.py": "",
        "bench/eval/formats/meta.py": "from . import images\nfrom bench.eval import PROTOCOLS\n",
        "bench/eval/formats/images.py": "def f():\n    import bench.eval.ijb\n",
        "methods/__init__.py": "",
        "methods/arcface.py": "import torch\n\ndef build():\n    from bench.config import x\n",
        "bench/profile.py": "",
        "bench/report/__init__.py": "",
        "bench/report/tables.py": "def f():\n    from bench import profile\n",
    })
    assert architecture_problems(root) == [
        "import circle among: bench.cli, bench.config",
        "import circle among: bench.eval.formats.images, bench.eval.formats.meta, bench.eval.ijb",
        "methods imports bench: methods.arcface -> bench.config",
        "a format imports a protocol: bench.eval.formats.images -> bench.eval.ijb",
        "a format imports a protocol: bench.eval.formats.meta -> bench.eval",
        "imports the CLI: bench.config -> bench.cli",
        "the report imports a record maker: bench.report.tables -> bench.profile",
    ]


@pytest.mark.parametrize("statement, expected", [
    ("from bench.eval import ijb", {"bench.eval", "bench.eval.ijb"}),  # runs the package, loads the submodule
    ("from bench.eval.ijb import read", {"bench.eval.ijb"}),  # an attribute of a module
    ("import bench.eval", {"bench.eval"}),                   # a package: its __init__
    ("from ..eval import ijb", {"bench.eval", "bench.eval.ijb"}),  # relative, two dots from bench/tools/x.py
    ("import numpy", set()),                                 # third party: not a project module
])
def test_walker_resolves_each_import_form(tmp_path, statement, expected):
    """Catches: an import form resolved to the wrong module (or dropped), which would hide arrows."""
    root = _plant(tmp_path, {"bench/__init__.py": "", "bench/eval/__init__.py": "", "bench/eval/ijb.py": "",
                             "bench/tools/__init__.py": "", "bench/tools/x.py": statement + "\n"})
    assert module_imports(root, ("bench",))["bench.tools.x"] == expected
