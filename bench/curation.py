"""Training-data curation during a run: the harness side of :meth:`methods.base.Method.curate`.

A method that cleans its own training data (sub-center ArcFace's purification, :mod:`methods.subcenter`)
names the step after which it does so (``method.curation_step``). Then :func:`curate_trainset` embeds every
training image with the method's default encoder (eval mode, no flip, L2-normalised: insightface's
subcenter_arcface drop.py), hands the embeddings and the *trained* labels to ``method.curate`` and gets
back which images to keep; the runner trains on those from the next step on.

:func:`curation_report` is what the run records (``curation.json``): how many images and classes were
dropped, and, where the training set knows which labels it corrupted (SynthFace's
``data.synthface.label_noise``: ``TrainSet.label_flipped``), the precision and recall of the dropped set
against the flipped labels, beside the base rate a random drop of the same size would reach (its expected
precision is the flipped fraction). No real dataset can give these: its noise is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.data.datasets import TrainData
from bench.eval.features import extract_features, l2_normalise
from methods.base import Method

#: Images embedded per forward pass while curating (ours: the evaluation batch size's order of magnitude).
CURATION_BATCH = 512


@dataclass
class Curation:
    """The outcome of one curation: the step after which it ran, the kept images (bool ``[N]``) and what
    the run records of it (:func:`curation_report`, derived once, when it ran)."""

    step: int
    keep: np.ndarray
    report: dict[str, Any]

    def state(self) -> dict[str, Any]:
        """For a checkpoint payload (a tensor and plain values, so torch.load's weights-only reader accepts it)."""
        return {"step": self.step, "keep": torch.from_numpy(self.keep.copy()), "report": self.report}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Curation:
        return cls(step=int(state["step"]), keep=torch.as_tensor(state["keep"]).numpy().astype(bool),
                   report=dict(state["report"]))

    @property
    def kept_indices(self) -> np.ndarray:
        return np.flatnonzero(self.keep)


def embed_trainset(encoder: torch.nn.Module, trainset: TrainData, device: torch.device,
                   batch_size: int = CURATION_BATCH) -> torch.Tensor:
    """L2-normalised float32 embeddings ``[N, D]`` of every training image, in index order (no flip)."""
    chunks = []
    for start in range(0, len(trainset), batch_size):
        images, _ = trainset.load(np.arange(start, min(start + batch_size, len(trainset))))
        chunks.append(extract_features(encoder, images, device, batch_size, flip=False))
    return torch.from_numpy(l2_normalise(np.concatenate(chunks)))


def curate_trainset(method: Method, trainset: TrainData, device: torch.device, step: int) -> Curation:
    """Run ``method``'s curation over the whole training set (every rank computes the same) and score it
    against the set's flipped labels where it knows them (``label_flipped``)."""
    embeddings = embed_trainset(method.encoder(), trainset, device)
    keep = method.curate(embeddings.to(device), trainset.labels.to(device))
    keep = keep.detach().cpu().numpy().astype(bool)
    if keep.shape != (len(trainset),):
        raise ValueError(f"method '{method.name}': curate returned shape {keep.shape}, expected ({len(trainset)},)")
    report = curation_report(step, keep, trainset.labels.numpy(), getattr(trainset, "label_flipped", None))
    return Curation(step=step, keep=keep, report=report)


def curation_report(step: int, keep: np.ndarray, labels: np.ndarray, flipped: np.ndarray | None) -> dict[str, Any]:
    """What ``curation.json`` records of a curation after ``step`` that kept ``keep``: images and classes
    dropped; with ``flipped`` (the ground truth of which labels were corrupted), precision and recall of
    the dropped set against it."""
    keep, labels = np.asarray(keep, dtype=bool), np.asarray(labels)
    dropped = ~keep
    classes = np.unique(labels)
    report: dict[str, Any] = {
        "step": step, "images": int(keep.size), "dropped": int(dropped.sum()),
        "dropped_fraction": float(dropped.mean()) if keep.size else 0.0,
        "classes": int(classes.size), "classes_removed": int(classes.size - np.unique(labels[keep]).size),
    }
    if flipped is not None:
        flipped = np.asarray(flipped, dtype=bool)
        hits = int((dropped & flipped).sum())
        report["label_noise"] = {
            "flipped": int(flipped.sum()), "flipped_fraction": float(flipped.mean()) if flipped.size else 0.0,
            "dropped_and_flipped": hits,
            # Undefined (None) when nothing was dropped / nothing was flipped.
            "precision": hits / int(dropped.sum()) if dropped.any() else None,
            "recall": hits / int(flipped.sum()) if flipped.any() else None,
            "flipped_kept": int((keep & flipped).sum()),
        }
    return report
