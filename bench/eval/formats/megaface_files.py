"""MegaFace devkit files: probe and distractor lists, noise lists, feature files, and the folder they make.

Files (the MegaFace devkit and testpack, as insightface's recognition/_evaluation_/megaface uses them):

- ``templatelists/facescrub_features_list.json``: ``{"path": [...], "id": [...]}`` (3,530 probes, 80 people);
- ``templatelists/megaface_features_list.json_<size>_<set>``: ``{"path": [...]}`` for sizes 10 .. 1,000,000;
- ``facescrub_images/<path>``, ``megaface_images/<path>``: aligned 112 x 112 crops;
- feature files (what ``gen_megaface.py`` writes and the devkit reads, at ``<root>/<path><file_ending>``): an
  OpenCV Mat, a 16-byte header ``struct.pack('<4i', rows, cols, stride_bytes, cv_type)`` (type 5 =
  float32, 6 = float64) then ``rows * stride`` bytes; insightface writes ``(D, 1, 4, 5)`` + D float32;
- ``facescrub_noises.txt`` (605 names such as ``Aaron_Eckhart_136.png``) and ``megaface_noises.txt`` (707
  unique 3-part paths such as ``375/37531198@N00/4174611825_0.jpg``), each with a leading ``#`` comment.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import DataError

FEATURE_HEADER = struct.Struct("<4i")
CV_32F, CV_64F = 5, 6
PROBE_LIST = "facescrub_features_list.json"
DISTRACTOR_LIST_PREFIX = "megaface_features_list.json_"
FACESCRUB_NOISES, MEGAFACE_NOISES = "facescrub_noises.txt", "megaface_noises.txt"


def write_feature_file(path: str | Path, feature: np.ndarray) -> None:
    """A devkit feature file of one vector: header ``(D, 1, 4, 5)`` then D float32 (insightface ``write_bin``)."""
    vector = np.ascontiguousarray(np.asarray(feature, dtype="<f4").ravel())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(FEATURE_HEADER.pack(vector.shape[0], 1, 4, CV_32F) + vector.tobytes())


def read_feature_file(path: str | Path) -> np.ndarray:
    """The vector of a devkit feature file (any rows x cols Mat of float32 or float64), as float32."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: feature file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read feature file ({exc.strerror or exc})") from None
    if len(data) < FEATURE_HEADER.size:
        raise DataError(f"{path}: {len(data)} bytes, shorter than the 16-byte feature header")
    rows, cols, stride, cv_type = FEATURE_HEADER.unpack_from(data)
    if cv_type not in (CV_32F, CV_64F):
        raise DataError(f"{path}: feature type {cv_type}; the devkit writes 5 (float32) or 6 (float64)")
    item = 4 if cv_type == CV_32F else 8
    if rows <= 0 or cols <= 0 or stride < cols * item:
        raise DataError(f"{path}: bad header rows={rows} cols={cols} stride={stride}")
    if len(data) != FEATURE_HEADER.size + rows * stride:
        raise DataError(f"{path}: {len(data)} bytes, the header announces {FEATURE_HEADER.size + rows * stride}")
    body = np.frombuffer(data, dtype=np.uint8, offset=FEATURE_HEADER.size).reshape(rows, stride)
    values = body[:, :cols * item].copy().view("<f4" if cv_type == CV_32F else "<f8").ravel()
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: feature holds NaN or infinite values")
    return values.astype(np.float32)


def write_json_list(path: str | Path, paths: Sequence[str], ids: Sequence[str] | None = None) -> None:
    """A devkit JSON list: ``{"path": [...]}``, with ``"id"`` for the probe list."""
    payload: dict[str, Any] = {"path": list(paths)}
    if ids is not None:
        payload["id"] = list(ids)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload))


def read_json_list(path: str | Path, with_ids: bool = False) -> tuple[list[str], list[str] | None]:
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: list file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a JSON list file ({str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("path"), list):
        raise DataError(f"{path}: expected a JSON object with a 'path' list")
    paths = [str(p) for p in payload["path"]]
    if not with_ids:
        return paths, None
    ids = payload.get("id")
    if not isinstance(ids, list) or len(ids) != len(paths):
        raise DataError(f"{path}: expected an 'id' list as long as 'path' ({len(paths)} entries)")
    return paths, [str(i) for i in ids]


def read_noise_list(path: str | Path) -> list[str]:
    """Entries of a noise list: ``#`` lines skipped; ``idx<TAB>path`` lines give their path."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read noise list ({exc})") from None
    return [line.split("\t")[-1].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def distractor_lists(templatelists: Path, list_set: int = 1) -> dict[int, Path]:
    """``{size: path}`` of the devkit's distractor lists of set ``list_set`` in a templatelists folder."""
    pattern = re.compile(re.escape(DISTRACTOR_LIST_PREFIX) + r"(\d+)_" + str(list_set) + "$")
    found = {int(m.group(1)): p for p in templatelists.glob(DISTRACTOR_LIST_PREFIX + "*")
             if (m := pattern.match(p.name))}
    if not found:
        raise DataError(f"{templatelists}: no {DISTRACTOR_LIST_PREFIX}<size>_{list_set} distractor lists")
    return dict(sorted(found.items()))


@dataclass
class MegaFaceSet:
    """The lists of a MegaFace folder: probes, the distractor universe and each size's membership."""

    root: Path
    probe_paths: list[str]
    probe_ids: list[str]
    sizes: list[int]
    #: Every distractor path of any list, ordered by the smallest list that holds it.
    distractor_paths: list[str]
    #: bool [len(sizes), len(distractor_paths)]
    membership: np.ndarray
    probe_noise: np.ndarray | None
    distractor_noise: np.ndarray | None


def _relative_key(path: str, parts: int) -> str:
    return "/".join(path.replace("\\", "/").split("/")[-parts:])


def read_megaface(root: Path, list_set: int = 1) -> MegaFaceSet:
    root = Path(root)
    templatelists = root / "templatelists"
    probe_paths, probe_ids = read_json_list(templatelists / PROBE_LIST, with_ids=True)
    assert probe_ids is not None
    if not probe_paths:
        raise DataError(f"{templatelists / PROBE_LIST}: the probe list is empty")
    lists = distractor_lists(templatelists, list_set)
    order: dict[str, int] = {}
    per_size = {}
    for size, path in lists.items():
        paths, _ = read_json_list(path)
        if len(paths) != size:
            raise DataError(f"{path}: the name says {size} distractors, the list holds {len(paths)}")
        per_size[size] = paths
        for p in paths:
            order.setdefault(p, len(order))
    universe = list(order)
    membership = np.zeros((len(lists), len(universe)), dtype=bool)
    for row, size in enumerate(lists):
        membership[row, [order[p] for p in per_size[size]]] = True
    probe_noise = distractor_noise = None
    if (root / FACESCRUB_NOISES).is_file() and (root / MEGAFACE_NOISES).is_file():
        noisy_names = set(read_noise_list(root / FACESCRUB_NOISES))
        probe_noise = np.array([Path(p).name in noisy_names for p in probe_paths], dtype=bool)
        noisy_paths = {_relative_key(p, 3) for p in read_noise_list(root / MEGAFACE_NOISES)}
        distractor_noise = np.array([_relative_key(p, 3) in noisy_paths for p in universe], dtype=bool)
    return MegaFaceSet(root, probe_paths, probe_ids, list(lists), universe, membership, probe_noise,
                       distractor_noise)
