"""Partial FC: a margin softmax over all positive class centers plus a uniform sample of negatives.

X. An, J. Deng, J. Guo, Z. Feng, X. Zhu, J. Yang, T. Liu, "Killing Two Birds with One Stone: Efficient
and Robust Training of Face Recognition CNNs by Partial FC", CVPR 2022, arXiv:2203.15565 (first version:
"Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021, arXiv:2010.05222).

Every class center is kept, but each step computes logits only for the centers of the classes present in
the batch (the positives) and for uniformly sampled other centers (the negatives): ``max(ceil(r * C),
#positives)`` centers in all, ``r`` the sample rate. Labels are remapped to columns of the sampled set,
and the margin softmax of any full-FC head (ArcFace, CosFace, combined, NPCFace, MV-Softmax) is computed
over those columns by :func:`methods.margin_softmax.margin_softmax_cross_entropy`: a ``[B, K]`` problem,
never ``[B, C]``. Sampling follows insightface partial_fc_v2.py: uniform scores for all centers,
positives forced to 2 (above any uniform draw), the top ``K`` kept and sorted, labels remapped with
``searchsorted``. With ``r = 1`` every center is used and the loss and gradients equal the full head's.

Update of the centers (``update``) and the optimizer state each center keeps:

- ``"sparse"`` (default; the paper, Sec. 3.1, and insightface's v1 ``partial_fc.py``): only the sampled
  centers are updated. They are copied into ``active_weight``, the parameter the optimizer sees; centers
  not sampled, and their optimizer state, stay bitwise unchanged (no weight decay, no momentum drift),
  and nothing of size ``C x D`` is allocated per step. Each center keeps its own optimizer state in
  ``row_state_*`` buffers (sharded with the centers), written by optimizer step hooks: call
  ``attach_optimizer(optimizer)`` once (the harness does). Without an attached optimizer the sampled
  centers still receive gradients and ``step_end()`` writes them back, but no per-row state is carried.

  * SGD: the sampled rows' momentum is swapped into torch's SGD state just before its step and written
    back just after; L2 weight decay is folded into the gradient of the sampled rows. Numerically torch's
    SGD on those rows (insightface v1 did the same with ``weight_mom``).
  * Adam / AdamW: each center keeps ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad) and
    its own step count ``row_state_step``: the number of steps at which it was sampled. A center's moments
    and step count advance only when it is sampled, and its bias corrections ``1 - beta^t`` use its own
    ``t``: the center is updated exactly as torch's Adam(W) would update it as a parameter of its own that
    receives a gradient only at those steps (the semantics of torch.optim.SparseAdam and TensorFlow
    Addons' LazyAdam). ours: the per-row update (:func:`adam_rows_`, torch's Adam arithmetic with a step
    count per row) runs in the pre-step hook, and torch's step skips ``active_weight``. insightface's v1
    ``PartialFCAdamW`` instead set one ``step`` for all rows, the global iteration count: a center first
    sampled at step 1000 then gets ``1 - 0.999^1000 = 0.63`` as its second-moment correction instead of
    ``1 - 0.999 = 0.001``, and its first update is about 2.5x Adam's unit step. Weight decay (AdamW's
    decoupled decay, Adam's L2) reaches the sampled rows only.

- ``"dense"``: ``weight`` is an ordinary parameter and the sampled centers are gathered from it with
  autograd, as insightface's current PartialFC_V2 (``partial_fc_v2.py``, trained with SGD or AdamW in
  ``train_v2.py``): the optimizer keeps dense state over all ``C`` rows with one step count, so every
  center's momentum / moments decay and weight decay moves it at every step, sampled or not, and an
  unsampled center keeps moving by its momentum (Adam: ``m / (sqrt(v) + eps)``). Works with any optimizer.

Optional inter-class filtering (``filter_threshold``, the paper's "abnormal inter-class filtering" for
noisy data, 0.4 in its WebFace12M-Conflict runs; insightface losses.py): non-target cosines above the
threshold are set to 0 and receive no gradient.

Defaults: ``r = 0.1``: the Partial FC paper's setting (An et al., ICCVW 2021, arXiv:2010.05222, abstract:
"no loss of accuracy when training with only 10% randomly sampled classes"), also used for insightface's
published Glint360K models ("Glint360K CosFace, PFC 0.1" in the 2021 arcface_torch README) and in its MXNet
``partial_fc`` README (IFRT R100: 88.67 at r = 1.0, 88.23 at r = 0.1). Not insightface's stored Glint360K
config: ``configs/glint360k_r100.py`` sets ``sample_rate = 1.0`` (plain model parallelism); its WebFace42M
configs with PFC_V2 (An et al., "Killing Two Birds with One Stone", CVPR 2022, arXiv:2203.15565) use 0.2
or 0.3. The margin's own defaults (ArcFace s = 64, m = 0.5 for MS1M presets; CosFace m = 0.4 for WebFace
presets, as insightface's configs); centers initialised N(0, 0.01) (partial_fc_v2.py). The number of centers is ``ceil(r * C)``
(insightface uses ``int(r * C)`` per rank).

Model parallelism (``dist`` with several ranks), as insightface: each rank keeps a contiguous shard of
the centers, all-gathers the batch, keeps every positive of the gathered batch that falls in its shard
and samples ``ceil(r * shard size)`` centers within its shard; the softmax runs across shards.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from methods.arcface import CENTER_INIT_STD, ArcFace, CombinedMargin, CosFace, check_sizes
from methods.base import check_params, parameter_defaults, register_head
from methods.distributed import (DistContext, all_gather, all_gather_with_grad, class_shard, draw_seed,
                                 init_center_rows)
from methods.margin_softmax import SoftmaxWorkspace, margin_softmax_cross_entropy
from methods.mv_softmax import MVSoftmax
from methods.npcface import NPCFace
from methods.registry import ConfigError, Registry

#: Heads whose margin Partial FC can apply (their ``rule_for`` builds the margin rule).
PFC_MARGINS: Registry[type[nn.Module]] = Registry("Partial FC margin")
for _name, _head in (("arcface", ArcFace), ("cosface", CosFace), ("combined", CombinedMargin),
                     ("npcface", NPCFace), ("mvsoftmax", MVSoftmax)):
    PFC_MARGINS.register(_name, _head)

#: Optimizers whose per-row state the sparse update keeps, by class name, and how: ``"sgd"`` swaps the
#: sampled rows' momentum into torch's SGD; ``"adam"`` updates the rows itself (:func:`adam_rows_`).
SPARSE_OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adam"}


def margin_rule(margin: str, params: dict[str, Any] | None):
    """The margin rule of head ``margin`` with ``params`` over that head's defaults (validated)."""
    head_cls = PFC_MARGINS.get(margin)
    defaults = parameter_defaults(head_cls, ("embedding_size", "num_classes", "dist"))
    return head_cls.rule_for(**check_params(f"Partial FC margin '{margin}'", defaults, params))


def sample_centers(labels: torch.Tensor, num_classes: int, num_sample: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted center indices (all positives + uniform negatives, ``max(num_sample, #positives)`` in all)
    and the labels remapped to positions in it. Labels of -1 (classes of another rank's shard) stay -1."""
    owned = labels >= 0
    positives = torch.unique(labels[owned])
    count = max(num_sample, positives.numel())
    if count >= num_classes:
        return torch.arange(num_classes, device=labels.device), labels
    scores = torch.rand(num_classes, generator=generator, device=generator.device)
    scores[positives.to(scores.device)] = 2.0  # above every U[0, 1) draw: positives are always kept
    # The kept centers in increasing order, as a mask's nonzero positions rather than a sort of the top-k
    # indices (ours: the same indices; O(C) and about 10x faster than sorting 100k indices on a 2-core CPU).
    chosen = torch.zeros(num_classes, dtype=torch.bool, device=scores.device)
    chosen[torch.topk(scores, count, sorted=False).indices] = True
    index = chosen.nonzero().squeeze(1).to(labels.device)
    remapped = torch.searchsorted(index, labels.clamp_min(0))
    return index, torch.where(owned, remapped, labels)


@torch.no_grad()
def adam_rows_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               steps: torch.Tensor, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               decoupled: bool, max_exp_avg_sq: torch.Tensor | None = None) -> None:
    """In place: one Adam (``decoupled``: AdamW) step of the rows of ``param`` ``[K, D]``, row ``k`` at its
    own step ``steps[k] >= 1`` (its updates so far, this one included), with its moments ``exp_avg``,
    ``exp_avg_sq`` (and ``max_exp_avg_sq``: amsgrad) ``[K, D]``.

    The arithmetic of torch.optim.Adam's single-tensor step (Kingma & Ba, arXiv:1412.6980, Algorithm 1;
    decoupled decay: Loshchilov & Hutter, arXiv:1711.05101), the bias corrections taken per row::

        AdamW: p <- p (1 - lr wd)          Adam: g <- g + wd p
        m <- beta1 m + (1 - beta1) g       v <- beta2 v + (1 - beta2) g^2      (amsgrad: v_max <- max(v_max, v))
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    beta1, beta2 = betas
    if weight_decay:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second_moment = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    t = steps.to(param.dtype).unsqueeze(1)
    step_size = lr / (1 - beta1 ** t)
    denom = (second_moment.sqrt() / (1 - beta2 ** t).sqrt()).add_(eps)
    param.addcdiv_(exp_avg * step_size, denom, value=-1.0)


class PartialFC(nn.Module):
    """Partial FC head: ``head(embeddings, labels) -> loss`` (see module docstring)."""

    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float = 0.1, margin: str = "arcface",
                 margin_params: dict[str, Any] | None = None, update: str = "sparse",
                 filter_threshold: float = 0.0, dist: DistContext | None = None) -> None:
        super().__init__()
        check_sizes("PartialFC", embedding_size, num_classes)
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"PartialFC: sample_rate must be in (0, 1], got {sample_rate}")
        if update not in ("sparse", "dense"):
            raise ConfigError(f"PartialFC: update must be 'sparse' or 'dense', got {update!r}")
        if not 0.0 <= filter_threshold < 1.0:
            raise ConfigError(f"PartialFC: filter_threshold must be in [0, 1) (0 disables), got {filter_threshold}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.margin, self.update, self.filter_threshold = sample_rate, margin, update, filter_threshold
        self.rule = margin_rule(margin, margin_params)
        self.dist = dist or DistContext()
        # Model parallel: this rank keeps a contiguous shard of the centers and samples within it.
        self.shard = class_shard(num_classes, self.dist.world_size, self.dist.rank)
        self.num_sample = math.ceil(sample_rate * self.shard.size)
        weight = init_center_rows(num_classes, self.shard.start, self.shard.stop, embedding_size, CENTER_INIT_STD,
                                  draw_seed())
        if update == "dense":
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
            self.active_weight = nn.Parameter(torch.empty(0, embedding_size))
            # Reused every step for the sampled rows (see _swap_in); not saved. torch.empty does not touch
            # its pages, so it costs resident memory only once used.
            self.register_buffer("active_rows_workspace", torch.empty(self.num_sample, embedding_size),
                                 persistent=False)
            # The loss's [B, K] buffer and the sampled centers' gradient, reused step to step (ours, issue 14
            # item 7: fresh blocks this large cost a page fault per page on CPU). Scratch, not state.
            self.softmax_workspace = SoftmaxWorkspace()
        # Sampling has its own generator (seeded from the global one) so that its state is resumable.
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self._optimizer: torch.optim.Optimizer | None = None
        #: Optimizer state entries kept per row (registered as ``row_state_<key>`` buffers on attach).
        self._row_state_keys: tuple[str, ...] = ()
        self._kind = ""  # "sgd" or "adam" once attached (SPARSE_OPTIMIZERS)
        self._saved_weight_decay: float | None = None  # SGD's group weight decay while folded into the gradient
        self._index: torch.Tensor | None = None
        #: Class ids (of all ranks' numbering) of the last forward's logit columns, in column order: what the
        #: labels were remapped to. For inspection and tests; not state.
        self.sampled_classes: torch.Tensor | None = None

    # --- optimizer coupling (sparse update) ---

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the per-row optimizer state of the class centers (sparse update only; module docstring).

        Registers step hooks on ``optimizer``: just before its step, SGD gets the sampled rows' momentum
        swapped in (L2 weight decay folded into the gradient in place, so the optimizer allocates no
        ``[K, D]`` temporary for it), or the sampled rows take their Adam(W) step here, each at its own step
        count, and torch's step skips them; just after, the rows and their state are written back.
        ``active_weight`` must be alone in its parameter group.
        """
        if self.update != "sparse":
            return
        kind = SPARSE_OPTIMIZERS.get(type(optimizer).__name__)
        if kind is None:
            raise ConfigError(f"PartialFC sparse update supports {', '.join(SPARSE_OPTIMIZERS)}, "
                              f"not {type(optimizer).__name__}; use update='dense'")
        groups = [g for g in optimizer.param_groups if any(p is self.active_weight for p in g["params"])]
        if not groups:
            raise ConfigError("PartialFC: the optimizer does not hold active_weight; build it from the "
                              "head's parameters")
        if len(groups[0]["params"]) != 1:
            raise ConfigError("PartialFC: give active_weight a parameter group of its own (its weight decay "
                              "is applied to the sampled rows only)")
        if kind == "adam" and groups[0].get("maximize"):
            raise ConfigError("PartialFC sparse update: Adam with maximize=True is not supported")
        self._optimizer, self._group, self._kind = optimizer, groups[0], kind
        if kind == "sgd":
            keys: tuple[str, ...] = ("momentum_buffer",)
        else:
            keys = ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if self._group.get("amsgrad") else ()))
            # AdamW is Adam with decoupled decay (torch >= 2.6 names it in the group; older AdamW does not).
            self._decoupled = bool(self._group.get("decoupled_weight_decay",
                                                   isinstance(optimizer, torch.optim.AdamW)))
        for key in keys:
            if not hasattr(self, f"row_state_{key}"):
                self.register_buffer(f"row_state_{key}", torch.zeros_like(self.weight))
        if kind == "adam" and not hasattr(self, "row_state_step"):
            # Steps at which each center was sampled (its Adam step count t).
            self.register_buffer("row_state_step", torch.zeros(self.weight.shape[0], dtype=torch.long,
                                                               device=self.weight.device))
        self._row_state_keys = (*keys, "step") if kind == "adam" else keys
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._index is None or self.active_weight.grad is None:
            return
        if self._kind == "adam":
            self._adam_step_sampled_rows()
            return
        state = optimizer.state[self.active_weight]
        rows = self.row_state_momentum_buffer
        # Into the softmax workspace's shared block, free once the loss is back-propagated: no fresh [K, D]
        # per step, and no more memory at the step's peak.
        out = self.softmax_workspace.shared((self._index.numel(), rows.shape[1]), rows.dtype, rows.device)
        state["momentum_buffer"] = torch.index_select(rows, 0, self._index, out=out)
        self._saved_weight_decay = self._group["weight_decay"]  # put back by _after_step
        if self._saved_weight_decay:
            self.active_weight.grad.add_(self.active_weight.detach(), alpha=self._saved_weight_decay)
            self._group["weight_decay"] = 0.0

    def _adam_step_sampled_rows(self) -> None:
        """The sampled rows' Adam(W) step, each at its own step count; then torch's step skips them (their
        gradient is cleared, as :meth:`step_end` would clear it anyway)."""
        group, index = self._group, self._index
        rows = {key: getattr(self, f"row_state_{key}").index_select(0, index)
                for key in self._row_state_keys if key != "step"}
        steps = self.row_state_step.index_select(0, index) + 1
        beta1, beta2 = group["betas"]
        adam_rows_(self.active_weight.detach(), self.active_weight.grad, rows["exp_avg"], rows["exp_avg_sq"], steps,
                   lr=float(group["lr"]), betas=(float(beta1), float(beta2)), eps=float(group["eps"]),
                   weight_decay=float(group["weight_decay"]), decoupled=self._decoupled,
                   max_exp_avg_sq=rows.get("max_exp_avg_sq"))
        with torch.no_grad():
            for key, value in rows.items():
                getattr(self, f"row_state_{key}").index_copy_(0, index, value)
            self.row_state_step.index_copy_(0, index, steps)
        self.active_weight.grad = None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._index is None:
            return
        if self._kind == "sgd":
            if self._saved_weight_decay is not None:
                self._group["weight_decay"], self._saved_weight_decay = self._saved_weight_decay, None
            state = optimizer.state[self.active_weight]
            with torch.no_grad():
                if "momentum_buffer" in state:
                    self.row_state_momentum_buffer.index_copy_(0, self._index, state.pop("momentum_buffer"))
        self.step_end()

    def _swap_in(self, index: torch.Tensor) -> None:
        """The sampled rows become ``active_weight``, gathered into the reusable workspace when they fit.

        ours (issue 14, item 7): a fresh ``[K, D]`` tensor every step costs, on CPU, a page fault per 4 KiB
        page first touched (blocks this large go back to the OS when freed), about twice the gather itself.
        The momentum rows (:meth:`_before_step`) are gathered into the softmax workspace's shared block,
        which holds the loss's ``[B, K]`` buffer during the forward and backward passes.
        """
        workspace = self.active_rows_workspace
        with torch.no_grad():
            if index.numel() > workspace.shape[0] or workspace.dtype != self.weight.dtype:
                self.active_weight.data = self.weight.index_select(0, index)  # more positives than samples
            else:
                self.active_weight.data = torch.index_select(self.weight, 0, index, out=workspace[:index.numel()])

    def step_end(self) -> None:
        """Write the updated sampled centers back (after ``optimizer.step()``; idempotent)."""
        if self.update != "sparse" or self._index is None:
            return
        index, self._index = self._index, None
        with torch.no_grad():
            self.weight.index_copy_(0, index, self.active_weight.detach())
            self.active_weight.data = torch.empty(0, self.embedding_size, dtype=self.weight.dtype,
                                                  device=self.weight.device)
        self.active_weight.grad = None

    # --- forward ---

    @property
    def is_sharded(self) -> bool:
        return self.dist.is_distributed

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.generator.device != self.weight.device:
            self._move_generator(self.weight.device)
        embeddings = all_gather_with_grad(embeddings, self.dist)
        shard_labels = self.shard.to_local(all_gather(labels, self.dist))
        index, local_labels = sample_centers(shard_labels, self.shard.size, self.num_sample, self.generator)
        self.sampled_classes = index + self.shard.start
        workspace = None
        if self.update == "dense":
            centers = self.weight if index.numel() == self.shard.size else self.weight.index_select(0, index)
        else:
            # The gradient lands in the workspace only while active_weight.grad is clear (step_end clears it),
            # so that gradients accumulated over two backward passes never alias.
            if self.active_weight.grad is None:
                workspace = self.softmax_workspace
            self._swap_in(index)
            self._index = index
            centers = self.active_weight
        return margin_softmax_cross_entropy(embeddings, centers, local_labels, self.rule, self.filter_threshold,
                                            dist=self.dist, workspace=workspace)

    def _move_generator(self, device: torch.device) -> None:
        moved = torch.Generator(device=device)
        moved.manual_seed(int(torch.randint(0, 2**62, (), generator=self.generator).item()))
        self.generator = moved

    # --- state: the sampling generator and the per-row optimizer state resume exactly ---

    def sharded_state_keys(self) -> list[str]:
        """State-dict entries split along dim 0 across ranks (the centers and their per-row state, Adam's
        per-row step count included)."""
        return ["weight", *(f"row_state_{key}" for key in self._row_state_keys)]

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "generator_device": str(self.generator.device)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if torch.device(state["generator_device"]) != self.generator.device:
            self.generator = torch.Generator(device=state["generator_device"])
        self.generator.set_state(state["generator"])

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "active_weight", None)  # transient: the rows sampled in this step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        if self.update == "sparse":
            state_dict = {**state_dict, prefix + "active_weight": self.active_weight.detach()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, margin={self.margin}, update={self.update}, rule={self.rule}")


register_head("pfc", PartialFC)
