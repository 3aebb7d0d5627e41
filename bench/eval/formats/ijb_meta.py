"""The meta files of an IJB-B / IJB-C folder (insightface's IJB package): readers, cross-checked.

Files (insightface's IJB package, ``IJB_release/IJBC``; ``ijbb_`` for IJB-B):

- ``meta/ijbc_face_tid_mid.txt``: ``image template_id media_id`` per line (469,375 lines for IJB-C);
- ``meta/ijbc_name_5pts_score.txt``: ``image x1 y1 ... x5 y5 detector_score`` per line, same order;
- ``meta/ijbc_template_pair_label.txt``: ``template1 template2 label`` (15,658,489 pairs for IJB-C);
- ``meta/ijbc_1N_gallery_G1.csv``, ``..._G2.csv``, ``meta/ijbc_1N_probe_mixed.csv`` (IJB-B: ``ijbb_1N_gallery_S1``
  / ``S2``): a header row, then one row per image with columns ``TEMPLATE_ID,SUBJECT_ID,...``;
- ``loose_crop/<image>``: the detected faces, not aligned.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import DataError

#: Galleries of the 1:N protocol per benchmark.
GALLERIES = {"ijbc": ("G1", "G2"), "ijbb": ("S1", "S2")}


def _read_rows(path: Path, columns: int, what: str) -> list[list[str]]:
    """Whitespace-separated rows with exactly ``columns`` fields (a one-line DataError otherwise)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise DataError(f"{path}: line {number}: expected {columns} fields ({what}), got {len(fields)}")
        rows.append(fields)
    if not rows:
        raise DataError(f"{path}: {what} file is empty")
    return rows


def _as_int(values: list[str] | np.ndarray, path: Path, what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.int64)
    except ValueError:
        bad = next(v for v in values if not re.fullmatch(r"[+-]?\d+", str(v)))
        raise DataError(f"{path}: {what} must be integers, found {bad!r}") from None


def read_tid_mid(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image names, template ids, media ids) of ``*_face_tid_mid.txt``."""
    rows = np.asarray(_read_rows(path, 3, "image template media"))
    return rows[:, 0], _as_int(rows[:, 1], path, "template ids"), _as_int(rows[:, 2], path, "media ids")


def read_landmarks(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image names, landmarks ``[N, 5, 2]``, detector scores ``[N]``) of ``*_name_5pts_score.txt``."""
    rows = np.asarray(_read_rows(path, 12, "image, 5 landmarks (x y) and detector score"))
    try:
        numbers = rows[:, 1:].astype(np.float64)
    except ValueError:
        raise DataError(f"{path}: landmarks and scores must be numbers") from None
    if not np.all(np.isfinite(numbers)):
        raise DataError(f"{path}: landmarks and scores must be finite")
    return rows[:, 0], numbers[:, :10].reshape(-1, 5, 2), numbers[:, 10]


def read_pair_labels(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1, t2, label) of ``*_template_pair_label.txt`` (pandas' C parser: 15.7M lines in seconds)."""
    import pandas as pd

    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, dtype=np.int64, engine="c")
    except FileNotFoundError:
        raise DataError(f"{path}: template pair file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a 't1 t2 label' file ({str(exc).splitlines()[0]})") from None
    except (ValueError, OverflowError) as exc:
        raise DataError(f"{path}: pair fields must be integers ({str(exc).splitlines()[0]})") from None
    if table.shape[1] != 3:
        raise DataError(f"{path}: expected 3 fields per line (t1 t2 label), got {table.shape[1]}")
    t1, t2, label = (table[c].to_numpy() for c in range(3))
    if not np.all(np.isin(label, (0, 1))):
        raise DataError(f"{path}: pair labels must be 0 or 1, found {label[~np.isin(label, (0, 1))][0]}")
    return t1, t2, label.astype(bool)


def read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unique template ids of a 1:N CSV and the subject of each (columns TEMPLATE_ID, SUBJECT_ID)."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str)
    except FileNotFoundError:
        raise DataError(f"{path}: 1:N file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a CSV file ({str(exc).splitlines()[0]})") from None
    columns = {str(c).strip().upper(): c for c in table.columns}
    if "TEMPLATE_ID" not in columns or "SUBJECT_ID" not in columns:
        raise DataError(f"{path}: the header row must name TEMPLATE_ID and SUBJECT_ID, got {list(table.columns)[:4]}")
    templates = _as_int(table[columns["TEMPLATE_ID"]].to_numpy(), path, "TEMPLATE_ID values")
    subjects = _as_int(table[columns["SUBJECT_ID"]].to_numpy(), path, "SUBJECT_ID values")
    unique, first = np.unique(templates, return_index=True)
    by_template = subjects[first]
    if np.any(subjects != by_template[np.searchsorted(unique, templates)]):
        raise DataError(f"{path}: a template has rows with different SUBJECT_ID values")
    return unique, by_template


@dataclass
class IJBMeta:
    """The files of one IJB benchmark folder, read and cross-checked."""

    root: Path
    target: str
    names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    detector_scores: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    pair_labels: np.ndarray
    #: gallery name -> (template ids, subjects); and the probe_mixed (template ids, subjects); None if absent.
    galleries: dict[str, tuple[np.ndarray, np.ndarray]] | None
    probes: tuple[np.ndarray, np.ndarray] | None
    #: The 1:N files looked for (galleries, then probe_mixed).
    one_n_files: list[str]

    @property
    def num_images(self) -> int:
        return int(self.names.shape[0])


def read_ijb(root: Path, target: str) -> IJBMeta:
    """Read an IJB folder (``target`` is ``ijbb`` or ``ijbc``, the file prefix)."""
    root, meta = Path(root), Path(root) / "meta"
    names, templates, medias = read_tid_mid(meta / f"{target}_face_tid_mid.txt")
    lm_names, landmarks, scores = read_landmarks(meta / f"{target}_name_5pts_score.txt")
    if lm_names.shape != names.shape or np.any(lm_names != names):
        bad = int(np.argmax(lm_names != names)) if lm_names.shape == names.shape else min(len(names), len(lm_names))
        raise DataError(f"{meta / f'{target}_name_5pts_score.txt'}: line {bad + 1} does not name the same image as "
                        f"{target}_face_tid_mid.txt ({len(lm_names)} and {len(names)} lines); both list every "
                        f"image in the same order")
    pair_file = meta / f"{target}_template_pair_label.txt"
    t1, t2, labels = read_pair_labels(pair_file)
    known = np.unique(templates)
    for column in (t1, t2):
        missing = ~np.isin(column, known)
        if missing.any():
            raise DataError(f"{pair_file}: template {column[missing][0]} has no image in {target}_face_tid_mid.txt")
    galleries, probes = None, None
    csvs = {g: meta / f"{target}_1N_gallery_{g}.csv" for g in GALLERIES[target]}
    probe_csv = meta / f"{target}_1N_probe_mixed.csv"
    if _one_n_files_present(target, [*csvs.values(), probe_csv]):
        galleries = {g: read_1n_csv(p) for g, p in csvs.items()}
        probes = read_1n_csv(probe_csv)
        for path, (ids, _) in [*((csvs[g], galleries[g]) for g in galleries), (probe_csv, probes)]:
            missing = ~np.isin(ids, known)
            if missing.any():
                raise DataError(f"{path}: template {ids[missing][0]} has no image in {target}_face_tid_mid.txt")
    return IJBMeta(root, target, names, templates, medias, landmarks, scores, t1, t2, labels, galleries, probes,
                   [str(p) for p in (*csvs.values(), probe_csv)])


def _one_n_files_present(target: str, paths: list[Path]) -> bool:
    """Whether 1:N is evaluated: all of its files are there (True) or none is (False, with a warning on
    stderr naming every path looked for). Some but not all is an error naming the first missing file (ours:
    a half-copied meta folder once dropped 1:N silently, the result saying only that it was skipped)."""
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return True
    if len(missing) < len(paths):
        present = [p.name for p in paths if p not in missing]
        raise DataError(f"{missing[0]}: 1:N file not found, but {', '.join(present)} "
                        f"{'is' if len(present) == 1 else 'are'} there; {target} 1:N needs "
                        f"{', '.join(p.name for p in paths)} (add the missing one, or remove them all to evaluate "
                        f"1:1 only)")
    print(f"warning: {target}: 1:N skipped (1:1 only): none of its files exists; looked for "
          f"{', '.join(str(p) for p in paths)}", file=sys.stderr)  # stderr, as records.py's warnings
    return False
