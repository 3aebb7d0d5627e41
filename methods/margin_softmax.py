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

A head that computes the loss every step at the same size can hand in a :class:`SoftmaxWorkspace`
(Partial FC does): the ``[B, K]`` buffer and the centers' ``[K, D]`` gradient are then written into
memory reused from step to step, and the backward pass turns the saved probabilities into the logits'
gradient in place. On CPU a fresh block of this size costs a page fault per 4 KiB page first touched
(such blocks go back to the OS when freed): about half the time of the matrix product that fills it.

The target logit's derivative is taken by autograd on the ``[B]`` vector of target cosines (the rule is
elementwise), so a rule's formula is written once, in :mod:`methods.margins`. Conventions that follow
insightface and FaceX-Zoo: cosines are clamped to [-1, 1] for the forward value (the gradient passes
through the clamp, which only acts on rounding error); the loss is ``log(sum exp) - logit_y`` computed
stably. Optional inter-class filtering (Partial FC, CVPR 2022, "abnormal inter-class filtering";
insightface losses.py): non-target cosines above ``filter_threshold`` are set to 0 and get no gradient.
"""

from __future__ import annotations

import weakref

import torch

from methods.distributed import DistContext, all_reduce
from methods.margins import MarginRule, hard_negative_mask

#: Rows of the centers' gradient computed per chunk: its matrix product, then its normalisation Jacobian
#: while the chunk is still in cache (ours: 1024 rows x 512 floats = 2 MiB; fastest of 1024/4096/8192 on
#: the 2-core CPU, the Jacobian then costs ~15 % of the product instead of ~50 % as a separate pass).
_CENTER_GRAD_CHUNK_ROWS = 1024


class SoftmaxWorkspace:
    """Memory one head reuses every step for the loss's ``[B, K]`` buffer and its centers' gradient.

    ours (issue 14, item 7). Owned by the head (no module-level state); neither block is state (nothing
    is saved or resumed). Two blocks:

    - the *shared* block (:meth:`shared`) holds the ``[B, K]`` buffer during the forward and backward
      passes; the head may borrow it for other per-step tensors once the loss is done with it (Partial FC
      gathers the sampled rows' momentum into it for the optimizer step). It is handed out again only once
      the tensor handed out before is gone, so two forwards before one backward each get their own buffer;
      it grows to the largest request.
    - the centers' gradient block (:meth:`center_grad`): the caller guarantees that the gradient it lands
      in (``.grad`` of the centers' leaf) has been cleared since it was last handed out. Partial FC's sparse
      update clears ``active_weight.grad`` after every optimizer step and only asks while it is clear.
    """

    def __init__(self) -> None:
        self._shared_block: torch.Tensor | None = None
        self._shared_handed: weakref.ref | None = None
        self._center_grad_block: torch.Tensor | None = None

    @staticmethod
    def _view(block: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``shape`` view of ``block``, or of a new block when it is too small or of another kind."""
        numel = shape[0] * shape[1]
        if block is None or block.numel() < numel or block.dtype != dtype or block.device != device:
            block = torch.empty(numel, dtype=dtype, device=device)
        return block, block[:numel].view(shape)

    def shared(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` tensor in the shared block when the one handed out last is gone, else a fresh one."""
        if self._shared_handed is not None and self._shared_handed() is not None:
            return torch.empty(shape, dtype=dtype, device=device)
        self._shared_block, view = self._view(self._shared_block, shape, dtype, device)
        self._shared_handed = weakref.ref(view)
        return view

    def center_grad(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The ``[K, D]`` gradient of the centers, in the reused block (see the class docstring)."""
        self._center_grad_block, view = self._view(self._center_grad_block, shape, dtype, device)
        return view


class _MarginSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, rule: MarginRule,
                filter_threshold: float, dist: DistContext, workspace: SoftmaxWorkspace | None) -> torch.Tensor:
        batch = embeddings.shape[0]
        rows = torch.arange(batch, device=labels.device)
        has_target = labels >= 0
        target_rows, target_cols = rows[has_target], labels[has_target]

        embedding_norm = embeddings.norm(dim=1).clamp_min(1e-12)
        unit = embeddings / embedding_norm.unsqueeze(1)
        inv_center_norm = centers.norm(dim=1).clamp_min(1e-12).reciprocal()
        if workspace is None:
            buffer = unit @ centers.t()
        else:
            buffer = torch.mm(unit, centers.t(), out=workspace.shared((batch, centers.shape[0]), unit.dtype,
                                                                        unit.device))
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
        ctx.workspace = workspace
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (probs, unit, embedding_norm, centers, inv_center_norm, target_rows, target_cols, target_grad, hard,
         filtered) = ctx.saved_tensors
        # d loss / d logits = (p - onehot) / B, times s for d loss / d (rule output). Without a workspace
        # a new buffer rather than the saved probabilities, so that backward can run twice (retain_graph,
        # gradcheck); with one, in place: a second backward is then refused by autograd's version check of
        # the saved probabilities ("modified by an inplace operation"), never a silent wrong gradient.
        coefficient = grad_loss * ctx.scale / ctx.batch
        grad = probs.mul_(coefficient) if ctx.workspace is not None else probs * coefficient
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
            grad_centers = _center_gradient(grad, unit, centers, inv_center_norm, ctx.workspace)
        return grad_embeddings, grad_centers, None, None, None, None, None


def _center_gradient(grad: torch.Tensor, unit: torch.Tensor, centers: torch.Tensor, inv_center_norm: torch.Tensor,
                     workspace: SoftmaxWorkspace | None) -> torch.Tensor:
    """``d loss / d w_k = (G_k - w_k (w_k . G_k) / |w_k|^2)`` with ``G = grad^T @ x_hat`` (``grad`` already
    carries the ``1/|w_k|`` factor): the product, then the Jacobian of ``1/|w|``, chunk by chunk of rows
    while each chunk is in cache; no ``[K, D]`` temporary."""
    shape = (centers.shape[0], centers.shape[1])
    out = (workspace.center_grad(shape, unit.dtype, unit.device) if workspace is not None
           else torch.empty(shape, dtype=unit.dtype, device=unit.device))
    grad_t = grad.t()
    products = torch.empty(min(_CENTER_GRAD_CHUNK_ROWS, shape[0]), shape[1], dtype=unit.dtype, device=unit.device)
    for start in range(0, shape[0], _CENTER_GRAD_CHUNK_ROWS):
        stop = min(start + _CENTER_GRAD_CHUNK_ROWS, shape[0])
        g, w, scratch = out[start:stop], centers[start:stop], products[:stop - start]
        torch.mm(grad_t[start:stop], unit, out=g)
        # row dots w_k . G_k (a product into scratch and a row sum: 2x faster than einsum's batched matmul)
        coefficient = torch.mul(g, w, out=scratch).sum(dim=1).mul_(inv_center_norm[start:stop].square())
        g.addcmul_(w, coefficient.unsqueeze(1), value=-1.0)
    return out


def margin_softmax_cross_entropy(embeddings: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor,
                                 rule: MarginRule, filter_threshold: float = 0.0,
                                 dist: DistContext | None = None,
                                 workspace: SoftmaxWorkspace | None = None) -> torch.Tensor:
    """Mean margin-softmax cross-entropy of raw ``embeddings [B, D]`` against raw ``centers [K, D]``.

    ``labels[i]`` is the column of row ``i``'s class in ``centers``. With several ranks (model parallel),
    ``embeddings`` are the all-gathered rows, ``centers`` this rank's shard, and ``labels[i]`` is -1 where
    row ``i``'s class lives on another rank; the loss is the global mean, the same on every rank.
    Computed in float32 (or float64 when the inputs are), outside autocast, as insightface runs its FC.
    ``workspace`` (optional): reused memory for the large buffers (see :class:`SoftmaxWorkspace`); a graph
    built with one can be back-propagated once (a second time is autograd's in-place error).
    """
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, centers.dtype), torch.float32)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _MarginSoftmaxCE.apply(embeddings.to(dtype), centers.to(dtype), labels, rule, filter_threshold,
                                      dist or DistContext(), workspace)
