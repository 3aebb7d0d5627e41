"""pytest-benchmark: the margin heads' training step, Partial FC's sampling and IJB template pooling, on CPU.

- margin heads, forward + backward: ArcFace, CosFace, NPCFace and MV-Softmax at batch 128, 10,000 classes,
  embedding 512 (three ``128 x 10,000 x 512`` matrix products, about 2 GFLOP a step);
- Partial FC's sampling of the centers for one batch (:func:`methods.partial_fc.sample_centers`) at
  1,000,000 classes and r = 0.1 (100,000 centers: uniform scores, positives forced in, top-k, sort, remap);
- IJB template pooling (:func:`bench.eval.ijb.template_features`: media means, summed per template,
  normalised) at a tenth of IJB-C's 469,375 images and 23,124 templates (``FACEBENCH_FULL_EVAL_BENCH=1``
  for the full size).

Nothing is asserted about the time, which depends on the machine; each test checks its result (a finite
loss equal to the plain-autograd loss and finite gradients; every positive sampled and the labels remapped
onto it; template features equal to a per-template loop). Compare runs with
``pytest tests/benchmarks/test_bench_heads.py --benchmark-compare``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.eval.ijb import template_features
from methods.arcface import ArcFace, CosFace
from methods.mv_softmax import MVSoftmax
from methods.npcface import NPCFace
from methods.partial_fc import sample_centers

BATCH, CLASSES, DIM = 128, 10_000, 512
PFC_CLASSES, PFC_RATE = 1_000_000, 0.1
FULL = os.environ.get("FACEBENCH_FULL_EVAL_BENCH", "") not in ("", "0")
IJB_IMAGES, IJB_TEMPLATES, IJB_DIM = (469_375, 23_124, 512) if FULL else (46_938, 2_312, 512)


@pytest.mark.parametrize("head_cls", [ArcFace, CosFace, NPCFace, MVSoftmax], ids=lambda c: c.__name__)
def test_margin_head_forward_backward(benchmark, bench_rounds, head_cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    head = head_cls(DIM, CLASSES)
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(BATCH, DIM, generator=generator, requires_grad=True)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)

    def step() -> torch.Tensor:
        embeddings.grad = None
        head.weight.grad = None
        loss = head(embeddings, labels)
        loss.backward()
        return loss.detach()

    loss = benchmark.pedantic(step, iterations=1, **bench_rounds(5, 1))
    benchmark.extra_info.update(batch=BATCH, classes=CLASSES, dim=DIM,
                                gflop=round(3 * 2 * BATCH * CLASSES * DIM / 1e9, 2))
    assert torch.isfinite(loss) and loss.item() > 0
    assert head.weight.grad.shape == (CLASSES, DIM) and torch.isfinite(head.weight.grad).all()
    assert embeddings.grad.shape == (BATCH, DIM) and torch.isfinite(embeddings.grad).all()
    assert embeddings.grad.abs().sum() > 0
    # the fused loss equals cross-entropy of the plain-autograd logits (a second code path)
    with torch.no_grad():
        reference = F.cross_entropy(head.logits(embeddings, labels), labels)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


def test_partial_fc_sampling(benchmark, bench_rounds) -> None:
    num_sample = math.ceil(PFC_RATE * PFC_CLASSES)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, PFC_CLASSES, (BATCH,), generator=torch.Generator().manual_seed(1))

    index, remapped = benchmark.pedantic(sample_centers, args=(labels, PFC_CLASSES, num_sample, generator),
                                         iterations=1, **bench_rounds(10, 1))
    benchmark.extra_info.update(classes=PFC_CLASSES, sampled=num_sample, batch=BATCH)
    assert index.shape == (num_sample,)
    assert bool((index[1:] > index[:-1]).all())                       # sorted, no repeats
    assert 0 <= int(index[0]) and int(index[-1]) < PFC_CLASSES
    assert bool(torch.isin(labels, index).all())                       # every positive is sampled
    assert torch.equal(index[remapped], labels)                         # labels remapped onto the sample


def _pooled_by_loop(features: np.ndarray, templates: np.ndarray, medias: np.ndarray, scores: np.ndarray,
                    template: int) -> np.ndarray:
    """One template's feature, computed the slow way: mean per media, summed, normalised."""
    rows = np.flatnonzero(templates == template)
    total = np.zeros(features.shape[1], dtype=np.float64)
    for media in np.unique(medias[rows]):
        in_media = rows[medias[rows] == media]
        total += (features[in_media].astype(np.float64) * scores[in_media, None]).mean(axis=0)
    return total / np.linalg.norm(total)


def test_ijb_template_pooling(benchmark, bench_rounds) -> None:
    rng = np.random.default_rng(0)
    templates = rng.integers(1, 4 * IJB_TEMPLATES, size=IJB_TEMPLATES)[rng.integers(0, IJB_TEMPLATES, IJB_IMAGES)]
    # media ids: about 3 images per media (a video's frames), shared across templates as in IJB-C
    medias = rng.integers(0, IJB_IMAGES // 3, size=IJB_IMAGES)
    features = rng.standard_normal((IJB_IMAGES, IJB_DIM), dtype=np.float32)
    scores = rng.uniform(0.5, 1.0, size=IJB_IMAGES).astype(np.float32)

    template_ids, pooled = benchmark.pedantic(template_features, args=(features, templates, medias, scores),
                                              iterations=1, **bench_rounds(3, 1))
    benchmark.extra_info.update(images=IJB_IMAGES, templates=int(template_ids.shape[0]), dim=IJB_DIM)
    assert template_ids.tolist() == sorted(set(templates.tolist()))
    assert pooled.shape == (template_ids.shape[0], IJB_DIM) and pooled.dtype == np.float32
    assert np.allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    for k in rng.choice(template_ids.shape[0], size=20, replace=False):
        expected = _pooled_by_loop(features, templates, medias, scores, int(template_ids[k]))
        assert np.allclose(pooled[k], expected, atol=1e-5)
