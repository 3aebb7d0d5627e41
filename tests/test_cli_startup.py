"""The light CLI start (issue 14, item 5): ``bench --help``, ``bench list`` and ``bench run --help`` import
neither torch nor numpy nor pandas, and the static catalogs they print from stay equal to the real
registries. Wall times are measured in tests/benchmarks/test_bench_cli_startup.py, not asserted here."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from bench.cli.listing import HARNESS_CATALOG, SECTIONS, listing_lines
from methods.catalog import method_catalog
from methods.errors import ConfigError, UnknownNameError
from methods.registry import Registry
from tests.faults.fault_helpers import REPO, python_env

#: Modules a light command must not load.
HEAVY = ("torch", "numpy", "pandas", "matplotlib")

#: Runs ``bench ARGS`` in this interpreter and prints, as JSON, the exit code and which HEAVY modules loaded.
_PROBE = """
import json, sys
from bench.cli import main
sys.argv = ["bench", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules],
                  "loaded": [m for m in ("pydantic",) if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def _probe(*args: str) -> tuple[dict, str]:
    """``bench ARGS`` in a fresh interpreter: (the probe's report, stdout)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=REPO,
                          env=python_env(), timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc.stdout


@pytest.mark.parametrize("args, expected", [
    (("--help",), "Usage: bench"),
    (("run", "--help"), "Usage: bench run"),
    (("list",), "methods:"),
])
def test_light_commands_do_not_import_torch(args, expected):
    """Catches a module-level ``import torch`` (or numpy, pandas, matplotlib) anywhere on the path of
    ``bench --help``, ``bench run --help`` or ``bench list``: the CLI package, a command module, bench.errors,
    methods/__init__ or methods.registry. The help pages also stay clear of pydantic (typer loads it to
    coerce a value that is not a bool: catches the group's ``--help`` default going back to ``None``).
    The output check catches a probe that passes because it printed nothing."""
    report, stdout = _probe(*args)
    assert report["code"] == 0 and report["heavy"] == [], report
    if "--help" in args:
        assert "pydantic" not in report["loaded"], report
    assert expected in stdout


def test_config_error_imports_nothing_heavy():
    """``from methods.registry import ConfigError`` and ``import bench.errors`` stay light: catches
    methods/__init__ importing the method modules again (the old eager imports pulled torch in)."""
    code = ("import sys; from methods.registry import ConfigError; import bench.errors, methods; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=python_env(),
                          timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def _import_every_method_module() -> None:
    """Import every module of methods/ (so the registry holds whatever any of them registers)."""
    for path in sorted((REPO / "methods").glob("*.py")):
        importlib.import_module(f"methods.{path.stem}")


def test_method_catalog_matches_the_registry():
    """The catalog read from the source equals the registry built by importing every module of methods/:
    names, registering module, aliases and ``defaults()`` (values and order). Catches a registration the
    source scan misses (a new method absent from ``bench list`` and never imported by the lazy registry),
    a default scanned wrongly (a non-literal, an inherited one, the base class's ``batch_spec``), or a
    wrong alias."""
    from methods.base import METHODS

    _import_every_method_module()
    expected = {name: (METHODS.get(name).__module__, tuple(METHODS.aliases_of(name)),
                       list(METHODS.get(name).defaults().items()), METHODS.get(name).unconfirmed())
                for name in METHODS.names()}
    assert len(expected) >= 11
    assert {name: (f"methods.{info.module}", info.aliases, list(info.defaults.items()), info.unconfirmed)
            for name, info in method_catalog().items()} == expected


def test_every_default_marked_unconfirmed_is_a_parameter_and_bench_list_marks_it():
    """Each name a method class lists in ``unconfirmed_defaults`` is one of its parameters (a renamed
    parameter would silently lose its mark), the marks reach ``bench list`` with the legend, and the
    methods whose docstrings list ours / unconfirmed defaults have marks (Prototype Memory's memory
    fraction, sub-center ArcFace's drop_at, MASST's agents)."""
    from methods.base import METHODS

    _import_every_method_module()
    for name in METHODS.names():
        method = METHODS.get(name)
        declared = {n for klass in method.__mro__ for n in vars(klass).get("unconfirmed_defaults", ())}
        head = vars(method).get("head_cls")
        declared |= set(getattr(head, "unconfirmed_defaults", ())) if head is not None else set()
        assert declared <= set(method.defaults()), (name, declared - set(method.defaults()))
    lines = listing_lines("methods")
    assert "memory_fraction=0.1*" in next(line for line in lines if "prototype_memory" in line)
    assert "drop_at=0.0*" in next(line for line in lines if line.strip().startswith("subcenter"))
    assert "num_agents=3*" in next(line for line in lines if line.strip().startswith("masst"))
    assert "*" not in next(line for line in lines if line.strip().startswith("arcface"))
    assert lines[-1].startswith("  (* a default that is ours or not confirmed")


def test_registry_populates_itself_in_a_fresh_process():
    """``METHODS`` from methods.base alone (no ``import methods.<module>`` first) already holds what it holds
    once every module of methods/ is imported: catches the populate hook not wired, or importing too few
    modules."""
    code = ("import importlib, json, pathlib; from methods.base import METHODS; "
            "first = {n: METHODS.aliases_of(n) for n in METHODS.names()}; "
            "[importlib.import_module('methods.' + p.stem) for p in sorted(pathlib.Path('methods').glob('*.py'))]; "
            "print(json.dumps([first, {n: METHODS.aliases_of(n) for n in METHODS.names()}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=python_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, complete = json.loads(proc.stdout)
    assert first == complete and len(first) >= 11 and first["prototype_memory"] == ["pm"]


def test_harness_catalog_matches_the_registries():
    """Catches the static harness table drifting from the real registries: a backbone, dataset, split or
    protocol added, removed, renamed or given an alias without ``bench list`` showing it."""
    from bench.backbones import BACKBONES
    from bench.data.catalog import DATASETS
    from bench.data.splits import SPLITS
    from bench.eval import PROTOCOLS

    registries = {"backbones": BACKBONES, "datasets": DATASETS, "splits": SPLITS, "protocols": PROTOCOLS}
    for section, registry in registries.items():
        assert HARNESS_CATALOG[section] == {n: tuple(registry.aliases_of(n)) for n in registry.names()}, section


def test_listing_prints_what_the_registries_hold():
    """The listing's lines, rebuilt from the live registries the way ``bench list`` printed them before the
    catalog (a second path): catches a format change (alias text, defaults' order or ``k=v`` form) or a
    section printed from the wrong table."""
    from methods.base import METHODS

    lines = listing_lines("methods")
    assert lines[0] == "methods:"
    expected = []
    for name in METHODS.names():
        aliases = METHODS.aliases_of(name)
        alias_text = f" (alias: {', '.join(aliases)})" if aliases else ""
        marked = METHODS.get(name).unconfirmed()
        detail = ", ".join(f"{k}={v}{'*' if k in marked else ''}" for k, v in METHODS.get(name).defaults().items())
        expected.append(f"  {name}{alias_text}  {detail}")
    assert lines[1:-1] == expected
    assert listing_lines("splits") == ["splits:", "  full", "  longtail", "  shallow"]
    assert SECTIONS == ("methods", "backbones", "datasets", "splits", "protocols")


def test_registry_populate_runs_once_at_first_lookup_and_retries_after_a_failure():
    """The populate hook: not run at construction or registration, run once by the first lookup (names,
    get, ``in``, len), and run again after it failed. Catches an eager hook, one that runs at every lookup
    (re-registration errors), or a failure that leaves the registry silently empty."""
    calls = []

    def populate() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("first try fails")
        registry.register("b", 2)

    registry: Registry[int] = Registry("thing", populate=populate)
    registry.register("a", 1)
    assert calls == []
    with pytest.raises(ImportError):
        registry.names()
    assert registry.names() == ["a", "b"] and len(calls) == 2
    assert registry.get("b") == 2 and "a" in registry and len(registry) == 2 and len(calls) == 2
    with pytest.raises(UnknownNameError, match="unknown thing 'c'; valid: a, b"):
        registry.get("c")
    assert issubclass(UnknownNameError, ConfigError)


def _commands(group, path=()):
    """``(path, click command)`` of every leaf command under ``group``."""
    for name, command in getattr(group, "commands", {}).items():
        if getattr(command, "commands", None):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_shared_options_are_declared_once():
    """Each shared flag has one help text on every command that takes it, and the commands that take it
    are those listed. Catches a command re-declaring ``--progress``, ``--device``, ``--data-root``,
    ``--results`` or a run's ``--out`` by hand (its help drifting), or losing the flag."""
    from typer.main import get_command

    from bench.cli import app

    expected = {"--progress": {"run", "reproduce", "eval", "data pack", "data inspect", "data verify"},
                "--device": {"run", "reproduce", "eval", "profile", "invert"},
                "--data-root": {"run", "eval", "data verify"},
                "--results": {"report", "check", "baseline save"}}
    seen: dict[str, dict[str, str]] = {flag: {} for flag in expected}
    for path, command in _commands(get_command(app)):
        for param in command.params:
            for flag in expected:
                if flag in param.opts:
                    seen[flag][path] = param.help
    for flag, commands in expected.items():
        assert set(seen[flag]) == commands, flag
        assert len(set(seen[flag].values())) == 1, (flag, seen[flag])
