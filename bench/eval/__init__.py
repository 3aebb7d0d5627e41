"""Evaluation protocols by name (``--eval``), metrics and feature extraction.

A protocol is built once per ``bench run`` (it locates, generates or loads its data, and decodes and
aligns its images once) and then evaluates any encoder, extracting each image's features once for all
the metrics it reports (IJB: 1:1 and 1:N from one pass):

    build_protocol(name, data_settings, progress, eval_settings, input_size=S).evaluate(encoder, device, batch_size)

``S`` is the model's input size: every protocol brings its images to ``S x S`` (resizing them with
antialiasing where they are stored at another size, and saying so in its metrics' ``conventions``). In
``bench run`` it is the side of the training images, which the backbone is built for
(:func:`model_input_size`, checked before any work starts); in ``bench eval`` it is ``--input-size``.

``score_features(features)`` scores features computed elsewhere (``bench eval --features``).

The benchmark files are read and written by :mod:`bench.eval.formats` (pure readers and writers, which
import no protocol); the protocol modules below use them, and so do the synthetic generators of
:mod:`bench.eval.synth_benchmarks`, which the ``synth-*`` protocols call.

Registered protocols:

- ``synth-lfw``, ``synth-ijbc``, ``synth-megaface``: SynthFace benchmarks of held-out identities, written
  to disk in the real formats by :mod:`bench.eval.synth_benchmarks` and read by the real readers;
- ``lfw``, ``cfp_fp``, ``cfp_ff``, ``agedb_30``, ``calfw``, ``cplfw``, ``vgg2_fp``: insightface ``.bin``
  packs (:mod:`bench.eval.verification`);
- ``ijbb``, ``ijbc``: IJB-B / IJB-C 1:1 and 1:N (:mod:`bench.eval.ijb`);
- ``megaface``: MegaFace Challenge 1 identification and verification (:mod:`bench.eval.megaface`);
- ``synth-tail``: the long-tail diagnostic, rank-1 of held-out images of training identities per bucket of
  training images per identity (:mod:`bench.eval.synth_tail`). It declares ``needs_trainset = True``, so
  :func:`build_protocol` hands it the run's training set.

Real benchmark files cannot be downloaded by FaceBench (their licences require the user to obtain
them). :func:`locate_benchmark` finds them: ``$FACEBENCH_<NAME>`` (``FACEBENCH_LFW``, ``FACEBENCH_IJBC``,
``FACEBENCH_MEGAFACE``...), else ``<data root>/eval/<default>`` (``lfw.bin``, ``IJBC``, ``megaface``); an
optional card ``eval/<name>.yaml`` (in the data root or ``datasets/``) with ``where: {env, path}``, as the
training-set cards, changes either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol as _Protocol

import numpy as np
import torch
import yaml
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from methods.registry import ConfigError, Registry

if TYPE_CHECKING:
    from bench.data.datasets import TrainData

class EvalProtocol(_Protocol):
    name: ClassVar[str]
    #: The metric shown in summary tables, and whether higher is better.
    headline: ClassVar[str]

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None) -> None: ...

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]: ...

    def score_features(self, features: Any, flip: bool | str = True) -> dict[str, Any]: ...


PROTOCOLS: Registry[type[EvalProtocol]] = Registry("protocol")


def build_protocol(name: str, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                   trainset: Any = None, input_size: int | None = None) -> EvalProtocol:
    """Protocol ``name`` for a model of ``input_size`` (see :func:`eval_input_size`), given the training set
    when its class declares ``needs_trainset = True``."""
    cls = PROTOCOLS.get(name)
    if getattr(cls, "needs_trainset", False):
        return cls(data, progress, options=options, trainset=trainset, input_size=input_size)
    return cls(data, progress, options=options, input_size=input_size)


def eval_input_size(data: DataSettings, input_size: int | None = None) -> int:
    """The model's input size, which a protocol brings its images to: ``input_size`` when the caller knows it
    (``bench run``: the training images' side, the size the backbone was built for; ``bench eval``:
    ``--input-size``), else SynthFace's image size for SynthFace, else the side the dataset card declares."""
    if input_size is not None:
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ConfigError(f"the model's input size must be a positive integer, got {input_size!r}")
        return input_size
    if data.dataset == "synthface":
        return data.synthface.image_size
    from bench.data.real import card_for

    height, width = card_for(data).image_size
    if height != width:
        raise DataError(f"dataset {data.dataset}: the card declares {height}x{width} images; models take square "
                        f"inputs, so give the input size explicitly")
    return height


def model_input_size(backbone: str, embedding_size: int, trainset: TrainData, dataset: str) -> int:
    """The input size of a run's model: the side of its training images, which the backbone is built for
    and every protocol resizes its images to (ours: a fixed 112 px for real data broke evaluation of packs
    at other sizes after the whole training budget).

    Refuses, before any protocol is prepared or any step trained, a size the backbone cannot take: the
    backbone is built once on torch's ``meta`` device (shapes only, no memory, no initialisation cost), so
    its own checks (e.g. ``r50``: a multiple of 16) answer, with the origin of the size added.
    """
    size = int(trainset.image_size)
    from bench.backbones import build_backbone

    try:
        with torch.device("meta"):
            build_backbone(backbone, embedding_size=embedding_size, input_size=size)
    except ConfigError as exc:
        raise ConfigError(f"{exc}: the input size is the side of the training images of dataset '{dataset}' "
                          f"({size}x{size}); use a backbone that takes it, or images of a size it takes") from None
    return size


#: Where a real benchmark is looked for when no card says otherwise: ``$FACEBENCH_<NAME>``, else
#: ``<data root>/eval/<default>``. What the user must obtain is in each protocol module's docstring.
BENCHMARK_DEFAULTS = {
    **{name: f"{name}.bin" for name in ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")},
    "ijbb": "IJBB", "ijbc": "IJBC", "megaface": "megaface",
    "tinyface": "tinyface", "survface": "QMUL-SurvFace",
}
OBTAIN = {
    "bin": "the .bin packs ship inside insightface's training-set zips (e.g. faces_emore/lfw.bin)",
    "ijb": "insightface's IJB package (IJB_release: IJBB/ and IJBC/ with loose_crop/ and meta/, and the "
           "updated meta with the 1:N CSVs), linked from insightface recognition/_evaluation_/ijb/README.md",
    "megaface": "the MegaFace devkit (templatelists/) and testpack (facescrub_images/, megaface_images/) "
                "plus insightface's noise lists, see insightface recognition/_evaluation_/megaface",
    "tinyface": "the TinyFace archive from qmul-tinyface.github.io (its tinyface/ folder, holding Testing_Set/ "
                "with Probe/, Gallery_Match/, Gallery_Distractor/ and the two *_img_ID_pairs.mat lists)",
    "survface": "the QMUL-SurvFace archive from qmul-survface.github.io (its QMUL-SurvFace/ folder, holding "
                "Face_Verification_Test_Set/ and Face_Identification_Test_Set/)",
}


def _card(name: str, data: DataSettings) -> tuple[Path, dict[str, Any]] | None:
    """An optional card ``eval/<name>.yaml`` under the data root or the repository's ``datasets/``."""
    for directory in (data.resolved_root() / "eval", Path(__file__).resolve().parents[2] / "datasets" / "eval"):
        card = directory / f"{name}.yaml"
        if card.is_file():
            try:
                content = yaml.safe_load(card.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise DataError(f"{card}: cannot read the benchmark card ({str(exc).splitlines()[0]})") from None
            where = content.get("where") if isinstance(content, dict) else None
            if not isinstance(where, dict) or not ({"env", "path"} & set(where)):
                raise DataError(f"{card}: a benchmark card needs "
                                f"'where: {{env: VARIABLE, path: <under the data root>}}'")
            return card, where
    return None


def locate_benchmark(name: str, data: DataSettings, default: str, kind: str = "file") -> Path:
    """Where real benchmark ``name`` is: a card's ``where`` (``env``, else ``path`` under the data root), else
    ``$FACEBENCH_<NAME>``, else ``<data root>/eval/<default>``. A one-line DataError says what to set."""
    exists = Path.is_file if kind == "file" else Path.is_dir
    env, relative, origin = f"FACEBENCH_{name.upper()}", Path("eval") / default, "the data root"
    card = _card(name, data)
    if card is not None:
        env = str(card[1].get("env") or env)
        relative = Path(str(card[1].get("path") or relative))
    if os.environ.get(env):
        location, origin = Path(os.environ[env]), f"${env}"
    else:
        location = relative if relative.is_absolute() else data.resolved_root() / relative
        origin = f"card {card[0]}" if card is not None else origin
    if exists(location):
        return location
    kind_key = "ijb" if name.startswith("ijb") else name if name in OBTAIN else "bin"
    raise DataError(f"{name}: {location} (from {origin}) is not a {'file' if kind == 'file' else 'folder'}; "
                    f"set {env}={'FILE' if kind == 'file' else 'DIR'} or put {default} under <data root>/eval/; "
                    f"obtain it yourself: {OBTAIN[kind_key]}")


def check_available(name: str, data: DataSettings) -> None:
    """Raise now the one-line DataError that building protocol ``name`` would raise for a missing real
    benchmark (:func:`locate_benchmark`: a ``.bin`` pack is a file, IJB and MegaFace are folders).

    Reads nothing but directory entries and writes nothing, so ``bench run`` calls it for every protocol
    before the training set is built (ours: a missing benchmark used to be found after it). Synthetic
    protocols generate their data and always pass; a file that exists but is corrupt is found when the
    protocol is built.
    """
    canonical = PROTOCOLS.canonical(name)
    default = BENCHMARK_DEFAULTS.get(canonical)
    if default is not None:
        locate_benchmark(canonical, data, default, kind="file" if default.endswith(".bin") else "dir")


def features_file(path: Path, rows: int, what: str) -> np.ndarray:
    """float32 ``[rows, D]`` features of a ``.npy`` file, checked (``bench eval --features``)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: features file not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy features file ({str(exc).splitlines()[0]})") from None
    if array.ndim != 2 or array.shape[0] != rows:
        raise DataError(f"{path}: expected features [{rows}, D] ({what}), got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        raise DataError(f"{path}: features must be finite floating-point numbers")
    return array.astype(np.float32, copy=False)


from bench.eval import verification  # noqa: E402,F401  (registers synth-lfw and the .bin packs)
from bench.eval import ijb  # noqa: E402,F401  (registers synth-ijbc, ijbb, ijbc)
from bench.eval import megaface  # noqa: E402,F401  (registers synth-megaface, megaface)
from bench.eval import synth_tail  # noqa: E402,F401  (registers synth-tail)
from bench.eval import lowres_real  # noqa: E402,F401  (registers tinyface, survface)
from bench.eval import synth_lowres  # noqa: E402,F401  (registers synth-lowres)
from bench.eval import synth_quality  # noqa: E402,F401  (registers synth-quality)
from bench.eval import synth_geometry  # noqa: E402,F401  (registers synth-geometry)
