"""Every branch of the MV-Softmax, NPCFace and ArcFace target rules, reached inside the head.

Random embeddings near their centers give target cosines of about 0.5 to 0.95 (tests/test_heads.py), which
never reach MV-Softmax's ``cos_y <= m`` / ``cos_y <= 0`` cases, NPCFace's ``cos_y <= 0`` case, rows with no
hard negative, or ArcFace's theta + m > pi fallback. Here the cosines are chosen: the centers are the first
C axes of R^(C+1) (rotated at random, and of unequal norms), and an embedding with cosines c_0..c_{C-1} to
them is sum_k c_k e_k + sqrt(1 - sum c_k^2) e_C. Each head's loss and gradients (embeddings and centers),
through the fused loss and through the plain autograd path, are checked against a float64 reference
written plainly from the equations with per-sample loops.

Tolerances: float64 heads, 1e-10 relative on the loss, 1e-9 absolute on gradients (round-off of a few dozen
float64 operations times s = 32). float32 heads against the float64 reference: 2e-5 relative on the loss and
2e-4 absolute on gradients of size up to about 6 (float32 eps is 1.2e-7, times s and the softmax's
conditioning). No constructed cosine lies within 3e-3 of a threshold, so float32 rounding cannot flip a mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from methods.arcface import ArcFace
from methods.mv_softmax import MVSoftmax
from methods.npcface import NPCFace

M = 0.35  # FaceX-Zoo's margin for MV-Softmax and NPCFace; ArcFace below uses 0.5
S = 32.0
NUM_CLASSES = 5

#: (label, cosines to classes 0..4) per row; the comments say which branch each row reaches.
ROWS = [
    (0, [0.80, 0.55, 0.10, -0.20, 0.05]),   # cos_y > m: margin everywhere; 0.55 hard for AM and Arc
    (3, [0.30, -0.10, 0.60, 0.20, -0.50]),  # 0 < cos_y <= m: FaceX-Zoo AM leaves the target bare
    (1, [0.40, -0.30, -0.70, 0.20, -0.35]), # cos_y <= 0: no margin (FaceX-Zoo, SV-X easy); -0.7 easy
    (4, [0.15, -0.10, 0.05, 0.12, -0.97]),  # theta_y + m > pi: ArcFace fallback, unguarded Arc "always"
    (2, [0.10, -0.20, 0.90, 0.30, 0.00]),   # no hard negative for Arc / NPCFace (threshold 0.696)
]


def _problem(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [5, 6] and centers [5, 6] with exactly the cosines of ROWS, and the labels."""
    generator = torch.Generator().manual_seed(seed)
    dim = NUM_CLASSES + 1
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    centers = torch.eye(dim, dtype=torch.float64)[:NUM_CLASSES] * torch.tensor([[1.0], [0.3], [2.5], [0.8], [1.7]])
    embeddings = []
    for _, cosines in ROWS:
        c = torch.tensor(cosines, dtype=torch.float64)
        embeddings.append(torch.cat([c, torch.sqrt(1 - (c * c).sum()).view(1)]))
    embeddings = torch.stack(embeddings) * torch.tensor([[2.0], [0.5], [1.0], [3.0], [0.7]])
    labels = torch.tensor([label for label, _ in ROWS])
    return (embeddings @ rotation).to(dtype), (centers @ rotation).to(dtype), labels


def _cosines(embeddings: torch.Tensor, centers: torch.Tensor) -> list[list[torch.Tensor]]:
    """cos[i][k] pairwise, each a 0-d tensor (differentiable)."""
    return [[torch.dot(x / x.norm(), w / w.norm()).clamp(-1.0, 1.0) for w in centers] for x in embeddings]


def _cross_entropy(rows: list[list[torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
    losses = [torch.logsumexp(torch.stack(row), 0) - row[y] for row, y in zip(rows, labels.tolist())]
    return torch.stack(losses).mean()


def _cos_plus(c: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m) from the angle itself (acos), not from sin = sqrt(1 - cos^2) as the code does."""
    return torch.cos(torch.acos(c) + m)


def reference_mv(embeddings, centers, labels, s, m, t, variant, base, target_condition):
    """MV-Softmax (Wang et al., AAAI 2020): f = cos_y - m (AM) or cos(theta_y + m) (Arc); negative k is
    mis-classified when cos_k > f; it becomes (t + 1) cos_k + t (adaptive) or cos_k + t (fixed). The target
    is f where the condition holds: FaceX-Zoo MV_Softmax.py, cos_y > m (AM) / cos_y > 0 (Arc); SV-X
    fc_layers.py easy_margin=True, cos_y > 0; easy_margin=False, always."""
    rows = []
    for i, row in enumerate(_cosines(embeddings, centers)):
        y = int(labels[i])
        cos_y = row[y]
        f = cos_y - m if base == "am" else _cos_plus(cos_y, m)
        if target_condition == "facexzoo":
            applies = cos_y > (m if base == "am" else 0.0)
        else:
            applies = target_condition == "always" or cos_y > 0
        logits = []
        for k, c in enumerate(row):
            if k == y:
                logits.append(s * (f if applies else cos_y))
            elif c > f:
                logits.append(s * ((t + 1) * c + t if variant == "adaptive" else c + t))
            else:
                logits.append(s * c)
        rows.append(logits)
    return _cross_entropy(rows, labels)


def reference_npcface(embeddings, centers, labels, s, m, m0, m1, t, alpha):
    """NPCFace (FaceX-Zoo head/NPCFace.py): hard when cos_k > cos(theta_y + m); m' = m0 + m1 * mean of the
    hard cosines (a constant: no gradient; m0 if none); target cos(theta_y + m') if cos_y > 0 else cos_y;
    hard negatives t cos_k + alpha."""
    rows = []
    for i, row in enumerate(_cosines(embeddings, centers)):
        y = int(labels[i])
        cos_y = row[y]
        threshold = _cos_plus(cos_y, m)
        hard = [k for k, c in enumerate(row) if k != y and c > threshold]
        margin = m0 + m1 * (sum(row[k].item() for k in hard) / len(hard) if hard else 0.0)
        logits = []
        for k, c in enumerate(row):
            if k == y:
                logits.append(s * (_cos_plus(cos_y, margin) if cos_y > 0 else cos_y))
            else:
                logits.append(s * (t * c + alpha if k in hard else c))
        rows.append(logits)
    return _cross_entropy(rows, labels)


def reference_arcface(embeddings, centers, labels, s, m, fallback):
    """ArcFace Eq. 3 with insightface's pre-2023 fallback cos - m sin m where theta_y + m > pi."""
    rows = []
    for i, row in enumerate(_cosines(embeddings, centers)):
        y = int(labels[i])
        target = row[y]
        if torch.acos(target) + m <= math.pi or not fallback:
            target = _cos_plus(target, m)
        else:
            target = target - m * math.sin(m)
        rows.append([s * (target if k == y else c) for k, c in enumerate(row)])
    return _cross_entropy(rows, labels)


MV_CONFIGS = [(variant, base, condition) for variant in ("adaptive", "fixed") for base in ("am", "arc")
              for condition in ("facexzoo", "positive", "always")]

HEADS = [
    *[(f"mv-{v}-{b}-{c}", lambda v=v, b=b, c=c: MVSoftmax(6, NUM_CLASSES, s=S, m=M, t=0.12, variant=v, base=b,
                                                         target_condition=c),
       lambda e, w, y, v=v, b=b, c=c: reference_mv(e, w, y, S, M, 0.12, v, b, c)) for v, b, c in MV_CONFIGS],
    ("npcface", lambda: NPCFace(6, NUM_CLASSES, s=S, m=M),
     lambda e, w, y: reference_npcface(e, w, y, S, M, 0.40, 0.20, 1.10, 0.20)),
    ("arcface", lambda: ArcFace(6, NUM_CLASSES, s=S, m=0.5),
     lambda e, w, y: reference_arcface(e, w, y, S, 0.5, True)),
    ("arcface-nofallback", lambda: ArcFace(6, NUM_CLASSES, s=S, m=0.5, fallback=False),
     lambda e, w, y: reference_arcface(e, w, y, S, 0.5, False)),
]


def test_rows_reach_every_branch():
    """The construction gives the intended cosines, and the rows cover the branches named in ROWS (so a test
    below cannot pass by never visiting one)."""
    embeddings, centers, labels = _problem(torch.float64)
    cos = torch.stack([torch.stack(row) for row in _cosines(embeddings, centers)])
    assert torch.allclose(cos, torch.tensor([c for _, c in ROWS], dtype=torch.float64), atol=1e-12)
    cos_y = cos[torch.arange(5), labels]
    assert cos_y[0] > M and 0 < cos_y[1] <= M and cos_y[2] <= 0 and torch.acos(cos_y[3]) + M > math.pi
    assert torch.acos(cos_y[3]) + 0.5 > math.pi  # ArcFace's fallback row
    arc_threshold = torch.cos(torch.acos(cos_y) + M)
    off_target = torch.ones_like(cos, dtype=torch.bool)
    off_target[torch.arange(5), labels] = False
    hard_arc = (cos > arc_threshold[:, None]) & off_target
    hard_am = (cos > (cos_y - M)[:, None]) & off_target
    assert hard_arc.sum(1).tolist() == [1, 3, 3, 4, 0]  # row 4: no hard negative (NPCFace's m' = m0)
    assert hard_am.sum(1).tolist() == [1, 3, 3, 4, 0]  # hard and easy negatives for AM too
    gaps = torch.cat([(cos - arc_threshold[:, None])[off_target], (cos - (cos_y - M)[:, None])[off_target],
                      cos_y - M, cos_y])
    assert gaps.abs().min() > 3e-3  # no cosine near a threshold: float32 cannot flip a branch


@pytest.mark.parametrize("dtype, loss_rel, grad_abs", [(torch.float64, 1e-10, 1e-9), (torch.float32, 2e-5, 2e-4)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name, make_head, reference", HEADS, ids=[h[0] for h in HEADS])
def test_head_matches_reference_in_every_branch(name, make_head, reference, dtype, loss_rel, grad_abs):
    """Catches, per head: a branch condition changed (e.g. FaceX-Zoo's cos_y > m for AM replaced by
    cos_y > 0, rows 1-2), the fixed/adaptive weights or AM/Arc bases swapped, NPCFace's margin not falling
    back to m0 without hard negatives (row 4) or its cos_y <= 0 branch margined (row 2), ArcFace's fallback
    or its gradient wrong inside the head (row 3), and a fused backward that disagrees with the plain path
    in any of these branches."""
    embeddings, centers, labels = _problem(dtype)
    head = make_head().to(dtype)
    with torch.no_grad():
        head.weight.copy_(centers)
    x = embeddings.clone().requires_grad_(True)
    loss = head(x, labels)
    grad_x, grad_w = torch.autograd.grad(loss, (x, head.weight))

    x_plain = embeddings.clone().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(head.logits(x_plain, labels), labels)
    plain_x, plain_w = torch.autograd.grad(plain, (x_plain, head.weight))

    x_ref = embeddings.double().requires_grad_(True)
    w_ref = centers.double().requires_grad_(True)
    expected = reference(x_ref, w_ref, labels)
    ref_x, ref_w = torch.autograd.grad(expected, (x_ref, w_ref))

    for got, got_x, got_w in ((loss, grad_x, grad_w), (plain, plain_x, plain_w)):
        assert got.item() == pytest.approx(expected.item(), rel=loss_rel)
        assert torch.allclose(got_x.double(), ref_x, rtol=0, atol=grad_abs)
        assert torch.allclose(got_w.double(), ref_w, rtol=0, atol=grad_abs)


def test_mv_variants_and_conditions_change_the_loss_on_these_rows():
    """The rows tell the MV-Softmax configurations apart (losses more than 1e-3 apart), so a parameter the
    head silently ignored could not pass the reference test above. For Arc, FaceX-Zoo's condition is
    cos_y > 0, the same as ``"positive"``: those two pairs must agree."""
    embeddings, centers, labels = _problem(torch.float64)
    losses = {}
    for variant, base, condition in MV_CONFIGS:
        head = MVSoftmax(6, NUM_CLASSES, s=S, m=M, variant=variant, base=base, target_condition=condition).double()
        with torch.no_grad():
            head.weight.copy_(centers)
        losses[(variant, base, condition)] = head(embeddings, labels).item()
    for variant in ("adaptive", "fixed"):
        assert losses.pop((variant, "arc", "positive")) == losses[(variant, "arc", "facexzoo")]
    values = sorted(losses.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-3, losses
