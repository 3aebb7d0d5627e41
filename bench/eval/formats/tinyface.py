"""TinyFace identification test set: read and write the published folder, and the ``.mat`` helpers it shares
with :mod:`bench.eval.formats.survface`.

TinyFace (Cheng, Zhu, Gong, "Low-Resolution Face Recognition", ACCV 2018). Layout, from the dataset's
``readme.txt`` ("Dataset Structure" and "Evaluation Instruction"), unless marked *unconfirmed*:

- ``tinyface/Testing_Set/Probe/``: 3,728 probe images of 2,569 test identities;
- ``tinyface/Testing_Set/Gallery_Match/``: 4,443 mated gallery images of the same 2,569 identities (several
  images per identity: the gallery is a set of images, not one template per identity);
- ``tinyface/Testing_Set/Gallery_Distractor/``: 153,428 distractor gallery images, mated to no probe. They are
  listed in no ``.mat`` file: the README's step 3 extracts "features of Gallery_Distractor images" without an
  order, and the evaluation script gives every distractor the label ``-100`` (:data:`DISTRACTOR_LABEL`);
- ``tinyface/Testing_Set/gallery_match_img_ID_pairs.mat``: variables ``gallery_set`` (a 4,443 x 1 cell of image
  names) and ``gallery_ids`` (4,443 x 1 identity ids); the README's step 1 extracts Gallery_Match features "in
  the order defined by" this file;
- ``tinyface/Testing_Set/probe_img_ID_pairs.mat``: ``probe_set`` (3,728 x 1 cell) and ``probe_ids`` (3,728 x 1).

Variable names and shapes: the Python port of the evaluation script (``loadmat(...)['gallery_ids']  #
(4443,1)``, ``['probe_ids']``), AdaFace ``validation_lq/tinyface_helper.py`` (``p[0].item() for p in
gallery_dict['gallery_set']``: each cell holds one char row vector). Names are file names inside the folder;
the training set's names are ``[PersonID]_[ImageName].jpg`` (README) and AdaFace reads the test images' labels
from the same ``<id>_`` prefix.

*Unconfirmed*, and accepted in every plausible variant:

- the numeric class of the ids (MATLAB's default ``double`` is written; any integer-valued numbers are read);
- where the two ``.mat`` files sit: the README places them in ``Testing_Set/``; several evaluation ports read
  them from ``tinyface/Face_Identification_Evaluation/`` (the folder of the MATLAB evaluation code). Both are
  looked in, ``Testing_Set/`` first;
- the distractor file order (none is defined): sorted relative paths, images found recursively (``.jpg``,
  ``.jpeg``, ``.png``), so the order is stable across machines;
- the root given by the user: the folder holding ``Testing_Set/`` (the archive's ``tinyface/``), ``Testing_Set``
  itself, or a folder holding ``tinyface/Testing_Set/``.

Every bad input is a one-line :class:`~bench.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bench.errors import DataError
from bench.eval.formats.images import encode_png

TESTING_SET = "Testing_Set"
ARCHIVE_FOLDER = "tinyface"
EVALUATION_FOLDER = "Face_Identification_Evaluation"
PROBE_FOLDER, MATCH_FOLDER, DISTRACTOR_FOLDER = "Probe", "Gallery_Match", "Gallery_Distractor"
GALLERY_MAT, PROBE_MAT = "gallery_match_img_ID_pairs.mat", "probe_img_ID_pairs.mat"
GALLERY_VARIABLES, PROBE_VARIABLES = ("gallery_set", "gallery_ids"), ("probe_set", "probe_ids")
#: The label the evaluation script (test_face_identification.m and its Python port) gives every distractor.
DISTRACTOR_LABEL = -100
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class TinyFaceSet:
    """The identification test set: probe and mated gallery images in their ``.mat`` order with their ids,
    and the distractors in sorted order (absolute paths)."""

    probe_paths: list[Path]
    probe_ids: np.ndarray
    gallery_paths: list[Path]
    gallery_ids: np.ndarray
    distractor_paths: list[Path]


# ----------------------------------------------------------------------------------------------------
# .mat helpers (shared with bench.eval.formats.survface)
# ----------------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_mat(path: Path, variables: Sequence[str]) -> dict[str, Any]:
    """The named variables of a MATLAB ``.mat`` file (``scipy.io.loadmat``); a missing file, an unreadable or
    corrupt one, or a missing variable is a one-line DataError naming the file."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: .mat file not found")
    try:
        content = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, MatReadError, TypeError, OSError... on corrupt files
        raise DataError(f"{path}: not a readable MATLAB .mat file ({_reason(exc)})") from None
    for variable in variables:
        if variable not in content:
            found = ", ".join(sorted(k for k in content if not k.startswith("__"))) or "none"
            raise DataError(f"{path}: no variable '{variable}' (variables found: {found})")
    return {variable: content[variable] for variable in variables}


def _cell_text(cell: Any) -> str | None:
    """The string in one cell of a cell array of char row vectors (``None`` when it holds no single string)."""
    if isinstance(cell, str):
        return cell
    array = np.asarray(cell)
    if array.dtype.kind == "U" and array.size == 1:
        return str(array.reshape(-1)[0])
    if array.dtype == object and array.size == 1:
        return _cell_text(array.reshape(-1)[0])
    return None


def mat_names(value: Any, path: Path, variable: str) -> list[str]:
    """The strings of a MATLAB cell array (any shape, read in MATLAB's column order) or char matrix, each a
    relative file name; anything else is a one-line DataError naming the file and the variable."""
    array = np.asarray(value)
    if array.dtype.kind == "U":  # a char matrix: one padded row per name
        cells = [str(row).rstrip() for row in array.reshape(-1)]
    elif array.dtype == object:
        cells = [_cell_text(cell) for cell in array.reshape(-1, order="F")]
    else:
        raise DataError(f"{path}: '{variable}' holds {array.dtype} values, expected a cell array of image names")
    for row, name in enumerate(cells):
        if not name:
            raise DataError(f"{path}: '{variable}' row {row + 1} is not an image name")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts:
            raise DataError(f"{path}: '{variable}' row {row + 1} ({name!r}) is not a file name inside the image folder")
    return cells  # type: ignore[return-value]


def mat_ids(value: Any, path: Path, variable: str) -> np.ndarray:
    """int64 ids of a numeric MATLAB vector (N x 1, 1 x N); non-integer or non-numeric values are a one-line
    DataError naming the file and the variable."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)) or array.dtype == bool:
        raise DataError(f"{path}: '{variable}' holds {array.dtype} values, expected numeric identity ids")
    if array.ndim > 2 or (array.ndim == 2 and min(array.shape) > 1):
        raise DataError(f"{path}: '{variable}' has shape {list(array.shape)}, expected a vector of identity ids")
    flat = array.reshape(-1)
    if np.issubdtype(flat.dtype, np.floating) and not (np.all(np.isfinite(flat)) and np.all(flat == np.round(flat))):
        raise DataError(f"{path}: '{variable}' holds values that are not whole numbers")
    return flat.astype(np.int64)


def mat_name_id_list(path: Path, names_variable: str, ids_variable: str) -> tuple[list[str], np.ndarray]:
    """The (names, ids) of an ``*_img_ID_pairs.mat`` file, checked to be equally long."""
    content = load_mat(path, (names_variable, ids_variable))
    names = mat_names(content[names_variable], path, names_variable)
    ids = mat_ids(content[ids_variable], path, ids_variable)
    if len(names) != ids.shape[0]:
        raise DataError(f"{path}: {len(names)} names in '{names_variable}' but {ids.shape[0]} ids in "
                        f"'{ids_variable}'")
    return names, ids


def find_file(name: str, folders: Sequence[Path], what: str) -> Path:
    """``folder / name`` for the first folder that holds it; else a one-line DataError naming every place
    looked in."""
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    others = " and ".join(str(f / name) for f in folders[1:])
    also = f" (also looked for {others})" if others else ""
    raise DataError(f"{folders[0] / name}: {what} not found{also}")


def image_folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def listed_paths(folder: Path, names: Sequence[str], mat: Path) -> list[Path]:
    """``folder / name`` for each listed name, each checked to exist (one line naming the first missing)."""
    paths = [folder / name for name in names]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: listed in {mat} but the image file does not exist")
    return paths


def folder_images(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursively), in sorted relative-path order."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def names_cell(names: Sequence[str]) -> np.ndarray:
    """A ``len(names) x 1`` object array, which ``scipy.io.savemat`` writes as a MATLAB cell of char rows."""
    cell = np.empty((len(names), 1), dtype=object)
    for row, name in enumerate(names):
        cell[row, 0] = name
    return cell


def ids_column(ids: Sequence[int]) -> np.ndarray:
    """A ``len(ids) x 1`` double column (MATLAB's default numeric class)."""
    return np.asarray(ids, dtype=np.float64).reshape(-1, 1)


def check_images(images: Sequence[np.ndarray], what: str) -> None:
    """Writers take uint8 ``[H, W, 3]`` RGB arrays (sizes may differ); anything else is a ValueError."""
    for index, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
            raise ValueError(f"{what} {index}: expected a uint8 [H, W, 3] RGB array, got {array.dtype} "
                             f"{list(array.shape)}")


def check_ids(ids: Sequence[int], count: int, what: str) -> list[int]:
    values = [int(v) for v in ids]
    if len(values) != count:
        raise ValueError(f"{count} {what} images but {len(values)} ids")
    return values


def write_listed(test_set: Path, folder: str, mat: str, variables: tuple[str, str], images: Sequence[np.ndarray],
                 ids: Sequence[int], pattern: str) -> None:
    """Write ``images`` into ``test_set/folder`` named by ``pattern`` (``{identity}``, ``{number}``: zero-padded
    position) and their names and ids as the ``.mat`` list ``test_set/mat`` with ``variables`` (names, ids)."""
    from scipy.io import savemat

    width = index_width(len(images))
    names = [pattern.format(identity=identity, number=f"{number:0{width}d}") for number, identity in enumerate(ids)]
    for name, image in zip(names, images):
        write_png(test_set / folder / name, image)
    savemat(str(test_set / mat), {variables[0]: names_cell(names), variables[1]: ids_column(ids)})


def write_numbered(folder: Path, images: Sequence[np.ndarray], pattern: str) -> None:
    """Write ``images`` into ``folder`` as ``pattern`` with ``{number}`` their zero-padded position."""
    width = index_width(len(images))
    for number, image in enumerate(images):
        write_png(folder / pattern.format(number=f"{number:0{width}d}"), image)


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.asarray(image)))


def index_width(count: int) -> int:
    """Digits of zero-padded file numbers, so that sorted names keep the written order."""
    return max(5, len(str(max(count - 1, 0))))


# ----------------------------------------------------------------------------------------------------
# TinyFace
# ----------------------------------------------------------------------------------------------------


def tinyface_testing_set(root: Path) -> Path:
    """The ``Testing_Set`` folder of a TinyFace root (see the module docstring for the roots accepted)."""
    root = Path(root)
    candidates = [root / TESTING_SET, root / ARCHIVE_FOLDER / TESTING_SET]
    if root.name == TESTING_SET or (root / PROBE_FOLDER).is_dir():
        candidates.insert(0, root)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(f"{root / TESTING_SET}: TinyFace test folder not found (also looked for "
                    f"{root / ARCHIVE_FOLDER / TESTING_SET}); give the folder holding Testing_Set/")


def _id_list(testing: Path, name: str, variables: tuple[str, str]) -> tuple[Path, list[str], np.ndarray]:
    mat = find_file(name, [testing, testing.parent / EVALUATION_FOLDER], "TinyFace id list")
    names, ids = mat_name_id_list(mat, *variables)
    return mat, names, ids


def read_tinyface(root: Path) -> TinyFaceSet:
    """The TinyFace identification test set under ``root`` (module docstring), every listed image checked to
    exist and every probe's identity checked to have a mated gallery image."""
    testing = tinyface_testing_set(root)
    probe_folder = image_folder(testing / PROBE_FOLDER, "TinyFace probe")
    match_folder = image_folder(testing / MATCH_FOLDER, "TinyFace mated gallery")
    distractor_folder = image_folder(testing / DISTRACTOR_FOLDER, "TinyFace distractor gallery")
    gallery_mat, gallery_names, gallery_ids = _id_list(testing, GALLERY_MAT, GALLERY_VARIABLES)
    probe_mat, probe_names, probe_ids = _id_list(testing, PROBE_MAT, PROBE_VARIABLES)
    if not probe_names:
        raise DataError(f"{probe_mat}: lists no probe image")
    unmated = np.flatnonzero(~np.isin(probe_ids, gallery_ids))
    if unmated.size:
        row = int(unmated[0])
        raise DataError(f"{probe_mat}: probe {probe_names[row]} (row {row + 1}) has id {probe_ids[row]}, which no "
                        f"image of {gallery_mat} has ({unmated.size} such probes)")
    if np.any(gallery_ids == DISTRACTOR_LABEL):
        raise DataError(f"{gallery_mat}: id {DISTRACTOR_LABEL} is the distractors' label in the evaluation script "
                        f"and cannot be an identity")
    return TinyFaceSet(
        probe_paths=listed_paths(probe_folder, probe_names, probe_mat), probe_ids=probe_ids,
        gallery_paths=listed_paths(match_folder, gallery_names, gallery_mat), gallery_ids=gallery_ids,
        distractor_paths=folder_images(distractor_folder),
    )


def write_tinyface(root: Path, probe_images: Sequence[np.ndarray], probe_ids: Sequence[int],
                   gallery_images: Sequence[np.ndarray], gallery_ids: Sequence[int],
                   distractor_images: Sequence[np.ndarray]) -> None:
    """Write a TinyFace test set under ``root`` in the published layout: ``root/Testing_Set/{Probe,
    Gallery_Match,Gallery_Distractor}/`` and the two ``.mat`` id lists in ``Testing_Set/``.

    Images are uint8 ``[H, W, 3]`` RGB arrays of any size, written as PNG (lossless): probes and mated gallery
    images as ``<id>_<number>.png`` (the README's ``[PersonID]_[ImageName]``), distractors as
    ``distractor_<number>.png`` with zero-padded numbers, so :func:`read_tinyface` returns every list in the
    order given here.
    """
    for images, what in ((probe_images, "probe"), (gallery_images, "gallery"), (distractor_images, "distractor")):
        check_images(images, what)
    probe_values = check_ids(probe_ids, len(probe_images), "probe")
    gallery_values = check_ids(gallery_ids, len(gallery_images), "gallery")
    testing = Path(root) / TESTING_SET
    for folder in (PROBE_FOLDER, MATCH_FOLDER, DISTRACTOR_FOLDER):
        (testing / folder).mkdir(parents=True, exist_ok=True)
    lists = ((PROBE_FOLDER, PROBE_MAT, PROBE_VARIABLES, probe_images, probe_values),
             (MATCH_FOLDER, GALLERY_MAT, GALLERY_VARIABLES, gallery_images, gallery_values))
    for folder, mat, variables, images, ids in lists:
        write_listed(testing, folder, mat, variables, images, ids, "{identity}_{number}.png")
    write_numbered(testing / DISTRACTOR_FOLDER, distractor_images, "distractor_{number}.png")
