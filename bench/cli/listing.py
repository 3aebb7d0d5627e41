"""``bench list``: the registered methods (with their defaults), backbones, datasets, splits and protocols.

Ours (issue 14, item 5): the listing must print without torch (well under a second), but every registry
lives in a module that imports torch. So methods come from :func:`methods.catalog.method_catalog` (their
registrations and constructor defaults read from the source), the harness's registries from the static
:data:`HARNESS_CATALOG` below. tests/test_cli_startup.py keeps both equal to the real registries (names,
aliases, method defaults), so the listing cannot drift from what ``bench run`` accepts.
"""

from __future__ import annotations

from typing import Optional

import typer

from bench.cli.common import one_line_errors
from bench.errors import ConfigError
from methods.catalog import method_catalog

#: The harness's registries by listing section: name -> aliases (``bench.backbones.BACKBONES``,
#: ``bench.data.catalog.DATASETS``, ``bench.data.splits.SPLITS``, ``bench.eval.PROTOCOLS``).
HARNESS_CATALOG: dict[str, dict[str, tuple[str, ...]]] = {
    "backbones": {name: () for name in ("mbf", "mbf_large", "r100", "r18", "r200", "r34", "r50", "small")},
    "datasets": {name: () for name in ("casia", "custom", "glint360k", "ms1mv2", "ms1mv3", "synthface",
                                       "webface12m", "webface42m", "webface4m")},
    "splits": {name: () for name in ("full", "longtail", "shallow")},
    "protocols": {name: () for name in ("agedb_30", "calfw", "cfp_ff", "cfp_fp", "cplfw", "ijbb", "ijbc", "lfw",
                                        "megaface", "survface", "synth-geometry", "synth-ijbc", "synth-lfw",
                                        "synth-lowres", "synth-megaface", "synth-quality",
                                        "synth-tail", "tinyface", "vgg2_fp")},
}

#: Marks a default that is ours or unconfirmed (``unconfirmed_defaults`` of the method's class).
UNCONFIRMED_MARK = "*"
#: The listing's sections, in print order.
SECTIONS = ("methods", "backbones", "datasets", "splits", "protocols")


def listing_lines(section: str) -> list[str]:
    """The lines ``bench list`` prints for one section: ``name (alias: a, b)  k=v, ...`` in name order
    (defaults for methods only)."""
    if section == "methods":
        entries = {name: (info.aliases, info.defaults, info.unconfirmed) for name, info in method_catalog().items()}
    else:
        entries = {name: (aliases, None, ()) for name, aliases in HARNESS_CATALOG[section].items()}
    lines = [f"{section}:"]
    for name in sorted(entries):
        aliases, defaults, unconfirmed = entries[name]
        alias_text = f" (alias: {', '.join(sorted(aliases))})" if aliases else ""
        detail = ("  " + ", ".join(f"{k}={v}{UNCONFIRMED_MARK if k in unconfirmed else ''}"
                                   for k, v in defaults.items()) if defaults is not None else "")
        lines.append(f"  {name}{alias_text}{detail}")
    if section == "methods":
        lines.append(f"  ({UNCONFIRMED_MARK} a default that is ours or not confirmed by the paper or the authors' code; "
                     f"the method module's docstring says why)")
    return lines


@one_line_errors
def list_command(
    what: Optional[str] = typer.Argument(None, help="methods, backbones, datasets, splits or protocols (default: all)."),
) -> None:
    """Print the registered methods (with their default hyperparameters), backbones, datasets, splits and protocols."""
    if what is not None and what not in SECTIONS:
        raise ConfigError(f"unknown listing '{what}'; valid: {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if what is None or section == what:
            typer.echo("\n".join(listing_lines(section)))
