"""Margin-softmax cross-entropy over a set of class centers, fused for memory and speed.

``margin_softmax_cross_entropy(embeddings, centers, labels, rule)`` is the mean over the batch of
``-log softmax(s * rule(cos))[y]``, where ``cos[i, k]`` is the cosine between embedding ``i`` and center
``k``, and ``rule`` (a :class:`methods.margins.MarginRule`) puts the margin on the target and may
reweight hard negatives. Every full-FC head and Partial FC computes its loss here.

Why a custom autograd function. With autograd, a ``[B, K]`` margin softmax keeps five or more ``[B, K]``
tensors alive (cosines, margin-applied, scaled, softmax, and their gradients) and normalises the centers
into a second ``[K, D]`` copy. Here one ``[B, K]`` buffer holds cosines, then logits, then
probabilities, then the logits' gradient; the centers are never normalised into a copy (the cosine is
``(x_hat . w_k) / |w_k|``, and the backward pass applies the normalisation's Jacobian to the gradient in
place, in row chunks). What remains is the three matrix products no implementation can avoid (logits,
gradient w.r.t. the embeddings, gradient w.r.t. the centers) plus a few passes over the buffer.
insightface's DistCrossEntropyFunc (partial_fc_v2.py) uses the same in-place softmax.

The target logit's derivative is taken by autograd on the ``[B]`` vector of target cosines (the rule is
elementwise), so a rule's formula is written once, in :mod:`methods.margins`. Conventions that follow
insightface and FaceX-Zoo: cosines are clamped to [-1, 1] for the forward value (the gradient passes
through the clamp, which only acts on rounding error); the loss is ``log(sum exp) - logit_y`` computed
stably. Optional inter-class filtering (Partial FC, CVPR 2022, "abnormal inter-class filtering";
insightface losses.py): non-target cosines above ``filter_threshold`` are set to 0 and get no gradient.
"""

from __future__ import annotations

import torch

from methods.distributed import DistContext, all_reduce
from methods.margins import MarginRule, hard_negative_mask

#: Rows per chunk when applying the centers' normalisation Jacobian, bounding the temporary memory.
_JACOBIAN_CHUNK_ROWS = 16384


class _MarginSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, rule: MarginRule,
                filter_threshold: float, dist: DistContext) -> torch.Tensor:
        batch = embeddings.shape[0]
        rows = torch.arange(batch, device=labels.device)
        has_target = labels >= 0
        target_rows, target_cols = rows[has_target], labels[has_target]

        embedding_norm = embeddings.norm(dim=1).clamp_min(1e-12)
        unit = embeddings / embedding_norm.unsqueeze(1)
        inv_center_norm = centers.norm(dim=1).clamp_min(1e-12).reciprocal()
        buffer = unit @ centers.t()
        buffer.mul_(inv_center_norm).clamp_(-1.0, 1.0)

        cos_y = buffer[target_rows, target_cols]
        filtered = None
        if filter_threshold > 0:
            filtered = buffer > filter_threshold
            filtered[target_rows, target_cols] = False
            buffer.masked_fill_(filtered, 0.0)

        hard, hard_mean = None, None
        if rule.has_hard_negatives:
            # Every row's target cosine, wherever its center lives (one owner per row: a sum).
            full_cos_y = torch.zeros(batch, dtype=buffer.dtype, device=buffer.device)
            full_cos_y[has_target] = cos_y
            all_reduce(full_cos_y, dist)
            hard = hard_negative_mask(buffer, labels, rule.hard_threshold(full_cos_y))
            if rule.needs_hard_mean:
                hard_sum = torch.where(hard, buffer, torch.zeros((), dtype=buffer.dtype, device=buffer.device)).sum(1)
                hard_count = hard.sum(1).to(buffer.dtype)
                all_reduce(hard_sum, dist), all_reduce(hard_count, dist)
                hard_mean = (hard_sum / hard_count.clamp_min(1))[has_target]
            buffer[hard] = buffer[hard] * rule.hard_slope + rule.hard_bias

        with torch.enable_grad():
            leaf = cos_y.detach().requires_grad_(True)
            target = rule.target_logit(leaf, hard_mean)
            (target_grad,) = torch.autograd.grad(target.sum(), leaf) if target.requires_grad else (
                torch.zeros_like(leaf),)
        buffer[target_rows, target_cols] = target.detach()

        buffer.mul_(rule.s)
        # Softmax across all ranks' columns: all-reduce of the row max and of the row sum (as
        # insightface's DistCrossEntropyFunc); each row's target logit comes from its one owner.
        row_max = all_reduce(buffer.max(dim=1).values, dist, op="max")
        logit_y = torch.zeros(batch, dtype=buffer.dtype, device=buffer.device)
        logit_y[has_target] = buffer[target_rows, target_cols]
        all_reduce(logit_y, dist)
        buffer.sub_(row_max.unsqueeze(1)).exp_()
        row_sum = all_reduce(buffer.sum(dim=1), dist)
        buffer.div_(row_sum.unsqueeze(1))  # now the softmax probabilities
        # loss_i = log sum_k exp(z_ik) - z_iy, computed stably; identical on every rank.
        loss = (row_sum.log() + row_max - logit_y).sum() / batch

        ctx.save_for_backward(buffer, unit, embedding_norm, centers, inv_center_norm, target_rows, target_cols,
                              target_grad, hard if hard is not None else torch.empty(0),
                              filtered if filtered is not None else torch.empty(0))
        ctx.rule_slope, ctx.scale, ctx.batch = rule.hard_slope, rule.s, batch
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (probs, unit, embedding_norm, centers, inv_center_norm, target_rows, target_cols, target_grad, hard,
         filtered) = ctx.saved_tensors
        # d loss / d logits = (p - onehot) / B, times s for d loss / d (rule output). A new buffer rather
        # than the saved probabilities, so that backward can run twice (retain_graph, gradcheck).
        coefficient = grad_loss * ctx.scale / ctx.batch
        grad = probs * coefficient
        grad[target_rows, target_cols] -= coefficient
        grad[target_rows, target_cols] *= target_grad  # through the target margin
        if hard.numel():
            grad[hard] *= ctx.rule_slope                # through the hard-negative reweighting
        if filtered.numel():
            grad.masked_fill_(filtered, 0.0)            # filtered cosines are constants
        grad.mul_(inv_center_norm)                     # cos = (x_hat . w) / |w|: d / d (x_hat . w)

        grad_embeddings = grad_centers = None
        if ctx.needs_input_grad[0]:
            grad_unit = grad @ centers
            # through x_hat = x / |x|: (g - x_hat (x_hat . g)) / |x|
            radial = (grad_unit * unit).sum(dim=1, keepdim=True)
            grad_embeddings = (grad_unit - unit * radial) / embedding_norm.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            grad_centers = grad.t() @ unit  # d loss / d w before the 1/|w| Jacobian's radial part
            # through 1/|w|: subtract w * (w . g) / |w|^2, row chunk by row chunk (no [K, D] temporary)
            for start in range(0, centers.shape[0], _JACOBIAN_CHUNK_ROWS):
                stop = start + _JACOBIAN_CHUNK_ROWS
                g, w = grad_centers[start:stop], centers[start:stop]
                # row dots as a batched product: no [rows, D] temporary (2.8x faster than (g * w).sum(1))
                coefficient = torch.einsum("kd,kd->k", g, w) * inv_center_norm[start:stop] ** 2
                g.addcmul_(w, coefficient.unsqueeze(1), value=-1.0)
        return grad_embeddings, grad_centers, None, None, None, None


def margin_softmax_cross_entropy(embeddings: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor,
                                 rule: MarginRule, filter_threshold: float = 0.0,
                                 dist: DistContext | None = None) -> torch.Tensor:
    """Mean margin-softmax cross-entropy of raw ``embeddings [B, D]`` against raw ``centers [K, D]``.

    ``labels[i]`` is the column of row ``i``'s class in ``centers``. With several ranks (model parallel),
    ``embeddings`` are the all-gathered rows, ``centers`` this rank's shard, and ``labels[i]`` is -1 where
    row ``i``'s class lives on another rank; the loss is the global mean, the same on every rank.
    Computed in float32 (or float64 when the inputs are), outside autocast, as insightface runs its FC.
    """
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, centers.dtype), torch.float32)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _MarginSoftmaxCE.apply(embeddings.to(dtype), centers.to(dtype), labels, rule, filter_threshold,
                                      dist or DistContext())
