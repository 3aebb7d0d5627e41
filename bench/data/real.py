"""Real training sets described by dataset cards (``datasets/<name>.yaml``), decoded on demand.

A card says what a dataset is (format, expected counts, image size), where its files are (an environment
variable, else a folder under the data root; ``data.path`` overrides both) and what the user must obtain
themselves (none of these sets can be downloaded by FaceBench). Each card in ``datasets/`` is registered
in :data:`bench.data.datasets.DATASETS` under its name; ``custom`` reads the card given as ``data.card``.

The training set is the chosen split of the pool (computed from the labels alone, cached under the data
root keyed by the labels' hash, the recipe and the seed), served by :class:`EncodedTrainSet`, which
decodes images on demand; :class:`bench.data.loader.BatchLoader` runs it in DataLoader workers.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml

from bench.config import DataSettings
from bench.data.datasets import DATASETS
from bench.data.encoded import EncodedDataset, log, present_counts
from bench.data.splits import load_or_make_split
from bench.errors import DataError

#: The cards shipped with FaceBench (the repository's ``datasets/`` folder).
CARD_DIR = Path(__file__).resolve().parents[2] / "datasets"
FORMATS = ("recordio", "folder")
LAYOUTS = {"recordio": ("insightface", "im2rec"), "folder": ("flat", "sharded")}


@dataclass(frozen=True)
class DatasetCard:
    """One ``datasets/<name>.yaml``. Counts are what the published files hold (the card's ``source``)."""

    name: str
    title: str
    #: Accepted formats, in order of preference: a ``train.rec`` is used when present, else a folder.
    formats: tuple[str, ...]
    #: Expected layout per format, e.g. ``{"recordio": "insightface"}``; checked by ``bench data verify``.
    layouts: dict[str, str]
    env: str
    path: str
    identities: int
    images: int
    image_size: tuple[int, int]
    obtain: str
    source: str = ""
    notes: str = ""
    #: Optional sha256 of small files (``train.idx``, ``property``), checked by ``bench data verify --checksums``.
    checksums: dict[str, str] = field(default_factory=dict)
    card_file: Path = Path()

    @property
    def short_obtain(self) -> str:
        return " ".join(self.obtain.split()).split(". ")[0].rstrip(".")


def load_card(path: str | Path) -> DatasetCard:
    """Read and validate a card; a bad key or value is a one-line DataError naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: dataset card not found") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a dataset card is a mapping")
    names = {f.name for f in dataclasses.fields(DatasetCard)} - {"card_file", "formats", "layouts", "image_size"}
    names |= {"format", "layout", "where", "image_size"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise DataError(f"{path}: unknown key '{unknown[0]}'; valid: {', '.join(sorted(names))}")
    for key in ("name", "title", "format", "where", "identities", "images", "image_size", "obtain"):
        if key not in raw:
            raise DataError(f"{path}: missing key '{key}'")
    formats = tuple(raw["format"]) if isinstance(raw["format"], list) else (raw["format"],)
    if not formats or any(f not in FORMATS for f in formats):
        raise DataError(f"{path}: 'format' must be one or a list of {', '.join(FORMATS)}, got {raw['format']!r}")
    layouts = raw.get("layout") or {}
    if not isinstance(layouts, dict) or any(layouts.get(f, LAYOUTS[f][0]) not in LAYOUTS[f] for f in formats) \
            or set(layouts) - set(formats):
        raise DataError(f"{path}: 'layout' maps formats to layouts ({LAYOUTS}), got {layouts!r}")
    where = raw["where"]
    if not isinstance(where, dict) or set(where) - {"env", "path"} or not where.get("env") or not where.get("path"):
        raise DataError(f"{path}: 'where' needs 'env' (an environment variable) and 'path' (under the data root)")
    if Path(str(where["path"])).is_absolute():
        raise DataError(f"{path}: 'where.path' must be relative to the data root (use the env variable for an "
                        f"absolute location)")
    size = raw["image_size"]
    counts = (raw["identities"], raw["images"], *(size if isinstance(size, list) else [None]))
    if not (isinstance(size, list) and len(size) == 2) or not all(isinstance(c, int) and c > 0 for c in counts):
        raise DataError(f"{path}: 'identities', 'images' must be positive integers and 'image_size' [H, W]")
    checksums = raw.get("checksums") or {}
    if not isinstance(checksums, dict):
        raise DataError(f"{path}: 'checksums' maps file names to sha256 hex digests")
    return DatasetCard(name=str(raw["name"]), title=str(raw["title"]), formats=formats, layouts=dict(layouts),
                       env=str(where["env"]), path=str(where["path"]), identities=int(raw["identities"]),
                       images=int(raw["images"]), image_size=(int(size[0]), int(size[1])),
                       obtain=str(raw["obtain"]).strip(), source=str(raw.get("source", "")).strip(),
                       notes=str(raw.get("notes", "")).strip(), checksums={str(k): str(v) for k, v in checksums.items()},
                       card_file=path)


def card_for(settings: DataSettings) -> DatasetCard:
    """The card of ``settings.dataset``: ``settings.card`` if given, else ``datasets/<name>.yaml``."""
    if settings.card:
        return load_card(settings.card)
    return load_card(CARD_DIR / f"{settings.dataset}.yaml")


def locate(card: DatasetCard, settings: DataSettings) -> Path:
    """The folder holding the dataset: ``data.path``, else ``$<card.env>``, else ``<data root>/<card.path>``.

    Raises a one-line DataError saying what to set when nothing usable is there.
    """
    if settings.path:
        location, origin = Path(settings.path), "data.path"
    elif os.environ.get(card.env):
        location, origin = Path(os.environ[card.env]), f"${card.env}"
    else:
        location, origin = settings.resolved_root() / card.path, "the data root"
    wanted = ", or ".join(_format_files(f) for f in card.formats)
    hint = (f"set {card.env}=DIR (or --set data.path=DIR) to the folder holding {wanted}; "
            f"{card.short_obtain} (see {card.card_file})")
    if not location.exists():
        raise DataError(f"dataset {card.name}: {location} (from {origin}) does not exist; {hint}")
    if "recordio" in card.formats and (location / "train.rec").is_file():
        return location
    if "folder" in card.formats and location.is_dir() and any(p.is_dir() for p in location.iterdir()):
        return location
    raise DataError(f"dataset {card.name}: no {wanted} in {location} (from {origin}); {hint}")


def _format_files(fmt: str) -> str:
    """What a format's files are called in messages (a noun phrase that reads after "no" and "holding")."""
    return ("train.rec, train.idx and property" if fmt == "recordio"
            else "identity folders (<identity>/<image> or <shard>/<identity>/<image>)")


def open_dataset(card: DatasetCard, location: Path, cache_root: Path | None, progress: bool) -> EncodedDataset:
    """The dataset at ``location`` in the first of the card's formats that is present."""
    if "recordio" in card.formats and (location / "train.rec").is_file():
        from bench.data.recordio import RecordDataset

        return RecordDataset(location, cache_root=cache_root, progress=progress)
    from bench.data.folder import FolderDataset

    return FolderDataset(location)


def check_against_card(card: DatasetCard, dataset: EncodedDataset) -> list[dict[str, Any]]:
    """Counts, image size and layout against the card: ``[{check, ok, expected, found}]``."""
    identities = int(present_counts(dataset.labels).shape[0])
    checks = [("images", card.images, len(dataset)), ("identities", card.identities, identities),
              ("image_size", list(card.image_size), [int(s) for s in dataset.image_size])]
    if dataset.format in card.layouts:
        checks.append(("layout", card.layouts[dataset.format], dataset.layout))
    if dataset.format == "recordio" and getattr(dataset, "property", None) is not None:
        checks.append(("property num_classes", card.identities, int(dataset.num_classes)))
    return [{"check": name, "ok": expected == found, "expected": expected, "found": found}
            for name, expected, found in checks]


class EncodedTrainSet:
    """A split of an :class:`EncodedDataset` with trained class ids ``0..num_classes-1``; images decoded
    on demand. Same interface as the in-memory :class:`bench.data.datasets.TrainSet`."""

    decodes_on_demand: ClassVar[bool] = True

    def __init__(self, source: EncodedDataset, pool_indices: np.ndarray, info: dict[str, Any],
                 workers: int = 2) -> None:
        height, width = source.image_size
        if height != width:
            raise DataError(f"{source.path}: images are {height}x{width}; training needs square images")
        self.source, self.pool_indices = source, np.asarray(pool_indices, dtype=np.int64)
        self.identities = source.labels[self.pool_indices]
        # Trained class ids: the split's identities renumbered 0..C-1 in order (np.unique's inverse, in O(n)).
        present = np.flatnonzero(np.bincount(self.identities))
        renumber = np.zeros(int(present[-1]) + 1, dtype=np.int64)
        renumber[present] = np.arange(present.shape[0])
        self.labels = torch.from_numpy(renumber[self.identities])
        self.num_classes = int(present.shape[0])
        self.info, self.workers = info, workers

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.source.image_size[0])

    def load(self, indices: np.ndarray | torch.Tensor, flip: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``[B, 3, S, S]`` (decoded now) and labels ``[B]`` of the given split indices; images
        where the boolean ``flip`` is set are mirrored horizontally (in the same copy that moves the channels
        first: half the cost of a separate flip)."""
        index = np.asarray(indices, dtype=np.int64)
        size = self.image_size
        decoded = np.empty((index.shape[0], size, size, 3), dtype=np.uint8)
        self.source.decode_into(self.pool_indices[index], decoded)
        images = np.empty((index.shape[0], 3, size, size), dtype=np.uint8)
        if flip is None or not flip.any():
            images[:] = decoded.transpose(0, 3, 1, 2)
        else:
            keep = ~flip
            images[keep] = decoded[keep].transpose(0, 3, 1, 2)
            images[flip] = decoded[flip][:, :, ::-1].transpose(0, 3, 1, 2)
        return torch.from_numpy(images), self.labels[torch.from_numpy(index)]


def card_trainset(settings: DataSettings, progress: bool = True) -> EncodedTrainSet:
    """The chosen split of the dataset described by the card of ``settings.dataset``."""
    card = card_for(settings)
    root = settings.resolved_root()
    location = locate(card, settings)
    source = open_dataset(card, location, root, progress)
    mismatches = [c for c in check_against_card(card, source) if not c["ok"]]
    for check in mismatches:
        log.warning("dataset %s at %s: %s is %s, the card says %s (bench data verify %s)", card.name, location,
                    check["check"], check["found"], check["expected"], card.name)
    split = load_or_make_split(source.labels, settings.split, root / "splits" / card.name)
    # One decode before any training: a pack whose property file declares another size than its images hold
    # would otherwise fail at the first batch, after the run record was opened (one line either way).
    source.decode(int(split.indices[0]))
    info = {"dataset": card.name,
            "card": {"file": str(card.card_file), "title": card.title, "identities": card.identities,
                     "images": card.images, "matches": not mismatches},
            "source": {k: v for k, v in source.describe().items() if k != "images_per_identity"},
            "split": {"recipe": split.recipe, **split.stats}}
    return EncodedTrainSet(source, split.indices, info, workers=settings.workers)


def _register_cards() -> None:
    for card_file in sorted(CARD_DIR.glob("*.yaml")):
        DATASETS.register(card_file.stem, card_trainset)
    DATASETS.register("custom", card_trainset)  # the card comes from data.card


_register_cards()
