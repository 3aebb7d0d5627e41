"""QMUL-SurvFace verification and open-set identification test sets: read and write the published folders.

QMUL-SurvFace (Cheng, Zhu, Gong, "Surveillance Face Recognition Challenge", arXiv 1804.09691; the dataset's
``readme.txt``, "Dataset Structure"). The archive unpacks to ``QMUL-SurvFace/`` holding ``training_set/``,
``Face_Verification_Test_Set/``, ``Face_Identification_Test_Set/`` and the MATLAB evaluation code in
``Face_Verification_Evaluation/`` and ``Face_Identification_Evaluation/``. Facts, unless marked *unconfirmed*:

Verification (``Face_Verification_Test_Set/``, README):

- ``verification_images/``: 10,051 images, "randomly sampled to build 5,320 positive and 5,320 negative pairs";
- ``positive_pairs_names.mat``: variable ``positive_pairs_names``, a "5320_by_2 cell specifying the image
  pairs" (each cell one image name inside ``verification_images/``); ``negative_pairs_names.mat``: variable
  ``negative_pairs_names``, likewise. The variable names are those every public evaluation reads
  (``loadmat(...)['positive_pairs_names']``; pair ``k`` is ``(cell[k, 0], cell[k, 1])``).

Open-set identification (``Face_Identification_Test_Set/``, README and the protocol page
qmul-survface.github.io/protocols.html):

- ``gallery/``: 60,294 gallery images of the watch-list identities (several per identity);
- ``mated_probe/``: 60,423 probe images "with mated gallery true match images in the gallery folder";
- ``unmated_probe/``: 121,736 probe images without a mate in the gallery (the open-set non-mates);
- ``gallery_img_ID_pairs.mat``: ``gallery_set`` (N x 1 cell of names) and ``gallery_ids`` (N x 1 ids);
- ``mated_probe_img_ID_pairs.mat``: ``mated_probe_set`` and ``mated_probe_ids``, likewise.

Image names are ``[PersonID]_[CameraID]_[ImageName].jpg`` (README, training set; the test sets carry the same
person prefix), unlabelled unmated probes ``distractors_<number>.jpg``.

*Unconfirmed*, and accepted in every plausible variant:

- no id list of the unmated probes is published (the README names the two lists above only): the reader lists
  ``unmated_probe/`` (images found recursively, in sorted relative-path order) and gives them id ``-1``
  (:data:`UNMATED_ID`); a mated probe or gallery id of ``-1`` is refused;
- where the ``.mat`` files sit: the README places them in the test folders; some evaluations read the
  identification lists from ``Face_Identification_Evaluation/`` (and, by analogy, the pair lists from
  ``Face_Verification_Evaluation/``). The test folder is looked in first, then the evaluation folder;
- the ids' numeric class (``double`` is written; any integer-valued numbers are read);
- the root given by the user: the folder holding the test folders (the archive's ``QMUL-SurvFace/``), a folder
  holding ``QMUL-SurvFace/``, or the test folder itself.

Every bad input is a one-line :class:`~bench.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import DataError
from bench.eval.formats.images import encode_jpeg, encode_png
from bench.eval.formats.tinyface import (
    check_ids,
    check_images,
    find_file,
    folder_images,
    image_folder,
    listed_paths,
    load_mat,
    mat_name_id_list,
    mat_names,
    write_listed,
    write_numbered,
)

ARCHIVE_FOLDER = "QMUL-SurvFace"
VERIFICATION_SET, VERIFICATION_EVALUATION = "Face_Verification_Test_Set", "Face_Verification_Evaluation"
IDENTIFICATION_SET, IDENTIFICATION_EVALUATION = "Face_Identification_Test_Set", "Face_Identification_Evaluation"
VERIFICATION_IMAGES = "verification_images"
POSITIVE_MAT, NEGATIVE_MAT = "positive_pairs_names.mat", "negative_pairs_names.mat"
POSITIVE_VARIABLE, NEGATIVE_VARIABLE = "positive_pairs_names", "negative_pairs_names"
GALLERY_FOLDER, MATED_FOLDER, UNMATED_FOLDER = "gallery", "mated_probe", "unmated_probe"
GALLERY_MAT, MATED_MAT = "gallery_img_ID_pairs.mat", "mated_probe_img_ID_pairs.mat"
GALLERY_VARIABLES, MATED_VARIABLES = ("gallery_set", "gallery_ids"), ("mated_probe_set", "mated_probe_ids")
#: The id :func:`read_survface_identification` gives every unmated probe.
UNMATED_ID = -1


@dataclass(frozen=True)
class SurvFaceVerification:
    """The verification pairs: each image once (in order of first appearance, positives first),
    ``pairs[k] = (i, j)`` indexing ``image_paths``, ``issame`` true for the positive pairs (listed first)."""

    image_paths: list[Path]
    pairs: np.ndarray
    issame: np.ndarray


@dataclass(frozen=True)
class SurvFaceIdentification:
    """The open-set identification set: gallery images with their ids (``.mat`` order); probes = the mated
    probes (``.mat`` order, their ids) then the unmated probes (sorted, id ``-1``)."""

    gallery_paths: list[Path]
    gallery_ids: np.ndarray
    probe_paths: list[Path]
    probe_ids: np.ndarray


def survface_folder(root: Path, name: str) -> Path:
    """The test folder ``name`` (``Face_Verification_Test_Set`` or ``Face_Identification_Test_Set``) of a
    SurvFace root (see the module docstring for the roots accepted)."""
    root = Path(root)
    candidates = [root / name, root / ARCHIVE_FOLDER / name]
    if root.name == name:
        candidates.insert(0, root)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(f"{root / name}: QMUL-SurvFace test folder not found (also looked for "
                    f"{root / ARCHIVE_FOLDER / name}); give the folder holding {name}/")


# ----------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------


def _pair_names(mat: Path, variable: str) -> list[tuple[str, str]]:
    cell = np.asarray(load_mat(mat, (variable,))[variable])
    if cell.ndim != 2 or cell.shape[1] != 2:
        raise DataError(f"{mat}: '{variable}' has shape {list(cell.shape)}, expected an N x 2 cell of image names")
    return list(zip(mat_names(cell[:, 0], mat, variable), mat_names(cell[:, 1], mat, variable)))


def read_survface_verification(root: Path) -> SurvFaceVerification:
    """The verification pairs under ``root`` (module docstring), every listed image checked to exist."""
    test_set = survface_folder(root, VERIFICATION_SET)
    images = image_folder(test_set / VERIFICATION_IMAGES, "SurvFace verification images")
    folders = [test_set, test_set.parent / VERIFICATION_EVALUATION]
    index: dict[str, int] = {}
    names: list[str] = []
    rows: list[tuple[int, int]] = []
    counts = []
    for mat_name, variable in ((POSITIVE_MAT, POSITIVE_VARIABLE), (NEGATIVE_MAT, NEGATIVE_VARIABLE)):
        mat = find_file(mat_name, folders, "SurvFace verification pair list")
        pairs = _pair_names(mat, variable)
        if not pairs:
            raise DataError(f"{mat}: lists no pair; verification needs positive and negative pairs")
        fresh = [n for pair in pairs for n in pair if n not in index]
        listed_paths(images, list(dict.fromkeys(fresh)), mat)
        for pair in pairs:
            for name in pair:
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
            rows.append((index[pair[0]], index[pair[1]]))
        counts.append(len(pairs))
    return SurvFaceVerification(
        image_paths=[images / name for name in names],
        pairs=np.asarray(rows, dtype=np.int64).reshape(-1, 2),
        issame=np.repeat(np.array([True, False]), counts),
    )


def _encoded(name: str, image: np.ndarray) -> bytes:
    suffix = Path(name).suffix.lower()
    if suffix == ".png":
        return encode_png(image)
    if suffix in (".jpg", ".jpeg"):
        return encode_jpeg(image, 95)
    raise ValueError(f"image name {name!r}: use a .png (lossless) or .jpg/.jpeg (JPEG quality 95) name")


def _check_pairs(pairs: Sequence[tuple[int, int]], count: int, what: str) -> list[tuple[int, int]]:
    out = [(int(a), int(b)) for a, b in pairs]
    for a, b in out:
        if not (0 <= a < count and 0 <= b < count):
            raise ValueError(f"{what} pair ({a}, {b}) indexes outside the {count} images")
    return out


def write_survface_verification(root: Path, images: Sequence[np.ndarray], names: Sequence[str],
                                positive_pairs: Sequence[tuple[int, int]],
                                negative_pairs: Sequence[tuple[int, int]]) -> None:
    """Write ``root/Face_Verification_Test_Set/``: each image as ``verification_images/<name>`` (a ``.png``
    name is written losslessly, a ``.jpg``/``.jpeg`` one as JPEG quality 95), and the two pair lists as
    ``P x 2`` cells of names (``pairs`` index ``images``/``names``), as published."""
    from scipy.io import savemat

    check_images(images, "verification image")
    names = [str(n) for n in names]
    if len(names) != len(images) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per image, got {len(set(names))} distinct names for "
                         f"{len(images)} images")
    test_set = Path(root) / VERIFICATION_SET
    (test_set / VERIFICATION_IMAGES).mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images):
        path = test_set / VERIFICATION_IMAGES / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encoded(name, np.asarray(image)))
    for mat, variable, pairs in ((POSITIVE_MAT, POSITIVE_VARIABLE, positive_pairs),
                                 (NEGATIVE_MAT, NEGATIVE_VARIABLE, negative_pairs)):
        checked = _check_pairs(pairs, len(names), variable)
        cell = np.empty((len(checked), 2), dtype=object)
        for row, (a, b) in enumerate(checked):
            cell[row, 0], cell[row, 1] = names[a], names[b]
        savemat(str(test_set / mat), {variable: cell})


# ----------------------------------------------------------------------------------------------------
# Open-set identification
# ----------------------------------------------------------------------------------------------------


def read_survface_identification(root: Path) -> SurvFaceIdentification:
    """The open-set identification set under ``root`` (module docstring), every listed image checked to exist,
    every mated probe's identity checked to have a gallery image, and at least one mated and one unmated
    probe."""
    test_set = survface_folder(root, IDENTIFICATION_SET)
    gallery_folder = image_folder(test_set / GALLERY_FOLDER, "SurvFace gallery")
    mated_folder = image_folder(test_set / MATED_FOLDER, "SurvFace mated probe")
    unmated_folder = image_folder(test_set / UNMATED_FOLDER, "SurvFace unmated probe")
    folders = [test_set, test_set.parent / IDENTIFICATION_EVALUATION]
    gallery_mat = find_file(GALLERY_MAT, folders, "SurvFace gallery id list")
    mated_mat = find_file(MATED_MAT, folders, "SurvFace mated probe id list")
    gallery_names, gallery_ids = mat_name_id_list(gallery_mat, *GALLERY_VARIABLES)
    mated_names, mated_ids = mat_name_id_list(mated_mat, *MATED_VARIABLES)
    for mat, ids in ((gallery_mat, gallery_ids), (mated_mat, mated_ids)):
        if np.any(ids == UNMATED_ID):
            raise DataError(f"{mat}: id {UNMATED_ID} marks the unmated probes here and cannot be an identity")
    unmated = np.flatnonzero(~np.isin(mated_ids, gallery_ids))
    if unmated.size:
        row = int(unmated[0])
        raise DataError(f"{mated_mat}: mated probe {mated_names[row]} (row {row + 1}) has id {mated_ids[row]}, "
                        f"which no image of {gallery_mat} has ({unmated.size} such probes)")
    unmated_paths = folder_images(unmated_folder)
    if not mated_names or not unmated_paths:
        empty = f"{mated_mat}: lists no mated probe" if not mated_names else f"{unmated_folder}: no unmated probe image"
        raise DataError(f"{empty}; open-set identification needs mated and unmated probes")
    return SurvFaceIdentification(
        gallery_paths=listed_paths(gallery_folder, gallery_names, gallery_mat), gallery_ids=gallery_ids,
        probe_paths=listed_paths(mated_folder, mated_names, mated_mat) + unmated_paths,
        probe_ids=np.concatenate([mated_ids, np.full(len(unmated_paths), UNMATED_ID, dtype=np.int64)]),
    )


def write_survface_identification(root: Path, gallery_images: Sequence[np.ndarray], gallery_ids: Sequence[int],
                                  mated_probe_images: Sequence[np.ndarray], mated_probe_ids: Sequence[int],
                                  unmated_probe_images: Sequence[np.ndarray]) -> None:
    """Write ``root/Face_Identification_Test_Set/`` as published: ``gallery/`` and ``mated_probe/`` images named
    ``<id>_cam1_<number>.png`` with their ``.mat`` id lists, ``unmated_probe/`` images named
    ``distractors_<number>.png`` (zero-padded, so the reader's sorted order is the order given here). PNG:
    lossless."""
    for images, what in ((gallery_images, "gallery"), (mated_probe_images, "mated probe"),
                         (unmated_probe_images, "unmated probe")):
        check_images(images, what)
    gallery_values = check_ids(gallery_ids, len(gallery_images), "gallery")
    mated_values = check_ids(mated_probe_ids, len(mated_probe_images), "mated probe")
    if UNMATED_ID in gallery_values or UNMATED_ID in mated_values:
        raise ValueError(f"id {UNMATED_ID} marks unmated probes; give identities other ids")
    test_set = Path(root) / IDENTIFICATION_SET
    for folder in (GALLERY_FOLDER, MATED_FOLDER, UNMATED_FOLDER):
        (test_set / folder).mkdir(parents=True, exist_ok=True)
    for folder, mat, variables, images, ids in (
            (GALLERY_FOLDER, GALLERY_MAT, GALLERY_VARIABLES, gallery_images, gallery_values),
            (MATED_FOLDER, MATED_MAT, MATED_VARIABLES, mated_probe_images, mated_values)):
        write_listed(test_set, folder, mat, variables, images, ids, "{identity}_cam1_{number}.png")
    write_numbered(test_set / UNMATED_FOLDER, unmated_probe_images, "distractors_{number}.png")
