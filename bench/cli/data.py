"""``bench data``: pack an image folder into RecordIO, inspect a dataset, verify one against its card.

Thin commands over :mod:`bench.data.folder`, :mod:`bench.data.recordio` and :mod:`bench.data.real`.
JSON goes to stdout, progress to stderr. Exit codes as ``bench``: 0 success, 1 a failed verification,
2 a usage or data error (one line).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import typer

from bench.cli.common import DataRootOption, ProgressOption, one_line_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pack, inspect and verify training data (RecordIO .rec/.idx and image folders).")

def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


def open_path(path: Path, progress: bool = True):
    """A RecordIO dataset (a .rec file, or a folder holding train.rec) or an image folder."""
    from bench.config import DataSettings
    from bench.data.folder import FolderDataset
    from bench.data.recordio import RecordDataset
    from bench.errors import DataError

    if not path.exists():
        raise DataError(f"{path}: does not exist")
    if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").exists()):
        # The labels cache goes beside the data, else under the default data root.
        return RecordDataset(path, cache_root=DataSettings().resolved_root(), require_property=False,
                             progress=progress)
    if path.is_dir():
        return FolderDataset(path)
    raise DataError(f"{path}: neither a .rec file, a folder holding train.rec, nor an image folder")


@app.command()
@one_line_errors
def pack(
    folder: Path = typer.Argument(..., help="Image folder: FOLDER/<identity>/<image> or FOLDER/<shard>/<identity>/<image>."),
    out: Path = typer.Argument(..., help="Output folder; gets train.rec, train.idx and property (never overwritten)."),
    quality: Optional[int] = typer.Option(None, min=1, max=100,
                                          help="Re-encode every image as JPEG at this quality. Default: copy the bytes."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="Write records in random order (as im2rec)."),
    seed: int = typer.Option(100, help="Seed of the write order (im2rec uses 100)."),
    progress: ProgressOption = True,
) -> None:
    """Write an im2rec-style train.rec/train.idx/property from an image folder (labels in sorted folder order)."""
    from rich.console import Console
    from rich.progress import Progress

    from bench.data.folder import FolderDataset, pack_folder

    total = len(FolderDataset(folder))  # also fails early, before OUT is created
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task(f"packing {folder}", total=total)
        summary = pack_folder(folder, out, quality=quality, shuffle=shuffle, seed=seed,
                              on_image=lambda: bar.advance(task))
    _echo_json(summary)


@app.command()
@one_line_errors
def inspect(
    path: Path = typer.Argument(..., help="A .rec file, a folder holding train.rec (+ .idx, property), or an image folder."),
    progress: ProgressOption = True,
) -> None:
    """Print JSON: format, layout, images, identities, images per identity (min/median/max), image size."""
    dataset = open_path(path, progress)
    summary = dataset.describe()
    summary["first_image_decoded_size"] = list(dataset.decode(0).shape[:2])
    _echo_json(summary)


@app.command()
@one_line_errors
def verify(
    name: str = typer.Argument(..., help="Dataset name (a card in datasets/, see `bench list datasets`)."),
    path: Optional[Path] = typer.Option(None, "--path", help="Folder of the dataset (overrides the card's env variable)."),
    data_root: DataRootOption = None,
    card: Optional[Path] = typer.Option(None, "--card", help="A dataset card to use instead of datasets/NAME.yaml."),
    shards: int = typer.Option(16, min=1, help="Decode one image from each of this many parts (or each WebFace shard)."),
    checksums: bool = typer.Option(False, "--checksums", help="Also check the sha256 of the files the card lists."),
    progress: ProgressOption = True,
) -> None:
    """Check a dataset against its card (counts, image size, layout, one decoded image per shard); exit 1 if wrong."""
    from bench.config import DataSettings
    from bench.data.real import card_for, check_against_card, locate, open_dataset
    from bench.errors import DataError

    settings = DataSettings(dataset=name, path=str(path or ""), card=str(card or ""),
                            root=str(data_root or ""))
    the_card = card_for(settings)
    location = locate(the_card, settings)
    dataset = open_dataset(the_card, location, settings.resolved_root(), progress)
    checks = check_against_card(the_card, dataset)
    for shard, index in dataset.shard_samples(shards):
        try:
            image = dataset.decode(index)
            checks.append({"check": f"decode {shard}", "ok": True, "found": list(image.shape)})
        except DataError as exc:
            checks.append({"check": f"decode {shard}", "ok": False, "found": str(exc)})
    if checksums:
        for file_name, expected in the_card.checksums.items():
            file = location / file_name
            found = _sha256(file) if file.is_file() else "missing"
            checks.append({"check": f"sha256 {file_name}", "ok": found == expected, "expected": expected, "found": found})
    ok = all(check["ok"] for check in checks)
    _echo_json({"dataset": the_card.name, "path": str(location), "format": dataset.format, "ok": ok, "checks": checks})
    if not ok:
        from rich.console import Console

        failed = [c["check"] for c in checks if not c["ok"]]
        Console(stderr=True).print(f"[red]verify failed:[/] {the_card.name}: {', '.join(failed)}", highlight=False)
        raise typer.Exit(1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
