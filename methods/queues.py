"""Shared memories of (feature, label) rows: a FIFO ring buffer and a per-class prototype memory.

- :class:`FeatureQueue` is the ring buffer of MoCo-style methods: DCQ's class-weight queue
  (bilylee/DCQ ``dcq.py``: ``weight_queue``, ``label_queue``, ``queue_ptr``) and SST/MASST's prototype
  queue (FaceX-Zoo ``head/SST_Prototype.py``: ``queue``, ``label_list``, ``index``). Rows are written at
  a pointer that advances modulo the capacity, so the oldest rows are overwritten first.
- :class:`ClassMemory` is Prototype Memory's store: at most one prototype per class, refreshed in place
  when its class is seen again, the least recently written evicted when a new class needs a slot.

Everything either structure keeps between steps is a registered buffer (rows, labels, write pointer,
``full`` flag, write stamps), so ``state_dict`` round-trips exactly; OpenSphere keeps its pointer that
way, whereas FaceX-Zoo's SST keeps labels in a Python list and pytorch-metric-learning its pointer in a
plain attribute, and neither resumes. Capacities follow from the run's shape
(:class:`methods.base.MethodContext`: the global batch size, the class count), which every method receives
at construction, so each structure is allocated once in its owner's ``__init__`` and a fresh instance
loads a checkpoint of the same run as is (nothing is resized on load).

Writes happen after the optimizer step: a method computes the rows in ``forward`` and stages them in a
:class:`StagedWrite`, which commits them in ``on_step_end`` (DCQ, SST/MASST, Prototype Memory).

Distributed runs enqueue the rows of every rank: the queues' ``enqueue`` methods take already-gathered
tensors, and the methods pass their batch through :func:`gather_for_enqueue` (an all-gather in rank
order) first, so every rank keeps the same queue.

Two small helpers shared by the queue methods: :func:`split_views` (the identity-major batch of a
``BatchSpec(views_per_class=k)`` as ``[identities, k, ...]``) and :func:`mask_same_label` (queue rows of a
sample's own identity never act as its negatives).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from methods.distributed import DistContext, all_gather
from methods.registry import ConfigError

#: Label of a row that holds no identity (an initial random row, or an empty slot).
NO_LABEL = -1


def gather_for_enqueue(dist: DistContext, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of each tensor, concatenated in rank order, without gradient.

    The order is the order one process would see the global batch in, so a queue fed by several ranks
    holds exactly the rows a single process would hold. One process: the tensors themselves (detached).
    """
    return tuple(all_gather(t.detach(), dist) for t in tensors)


def checked_queue_size(method: str, queue_size: int, rows_per_step: int, what: str) -> int:
    """A user-set ``queue_size``, which must be a multiple of the rows enqueued per step (each step
    overwrites whole batch slots; both DCQ's and SST's codebases assert it)."""
    if queue_size % rows_per_step:
        raise ConfigError(f"method '{method}': queue_size ({queue_size}) must be a multiple of {what} "
                          f"({rows_per_step})")
    return queue_size


def random_unit_rows(count: int, dim: int, generator: torch.Generator, kind: str = "normal") -> torch.Tensor:
    """``count`` random unit vectors of size ``dim`` (CPU, float32) from ``generator``.

    ``kind="normal"``: normalised Gaussian rows (bilylee/DCQ ``randn`` then ``normalize``);
    ``kind="uniform"``: normalised U(-1, 1) rows (FaceX-Zoo SST_Prototype).
    """
    if kind == "normal":
        rows = torch.randn(count, dim, generator=generator)
    elif kind == "uniform":
        rows = torch.rand(count, dim, generator=generator) * 2.0 - 1.0
    else:
        raise ValueError(f"kind must be 'normal' or 'uniform', got {kind!r}")
    return F.normalize(rows, dim=1)


def split_views(images: torch.Tensor, labels: torch.Tensor, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G*k, ...]`` identity-major batch -> ``([G, k, ...] images, [G] labels)``; checks the layout."""
    if images.shape[0] % views or labels.shape[0] != images.shape[0]:
        raise ValueError(f"batch of {images.shape[0]} images / {labels.shape[0]} labels is not "
                         f"{views} views per identity")
    grouped = labels.view(-1, views)
    if not bool((grouped == grouped[:, :1]).all()):
        raise ValueError(f"the {views} views of each identity must be adjacent (BatchSpec views_per_class={views})")
    return images.reshape(-1, views, *images.shape[1:]), grouped[:, 0]


def mask_same_label(cosines: torch.Tensor, labels: torch.Tensor, row_labels: torch.Tensor) -> torch.Tensor:
    """``cosines [B, N]`` with entries whose ``row_labels[j] == labels[i]`` set to -inf (never negatives)."""
    same = labels.unsqueeze(1) == row_labels.unsqueeze(0)
    return cosines.masked_fill(same, float("-inf"))


class StagedWrite:
    """Rows computed in ``forward`` and written to a queue or memory after the optimizer step.

    ours: the queue methods must not change their queue between the loss and the optimizer step (the
    authors enqueue after the update: bilylee/DCQ ``train.py``, FaceX-Zoo SST ``train.py``), so ``forward``
    calls :meth:`stage` and ``on_step_end`` calls :meth:`commit`. A forward without a step (evaluation of
    the loss) is overwritten by the next one, and nothing is written twice.
    """

    def __init__(self) -> None:
        self._rows: tuple[torch.Tensor, ...] | None = None

    def stage(self, *rows: torch.Tensor) -> None:
        """Keep ``rows`` (replacing any staged before) for the next :meth:`commit`."""
        self._rows = rows

    def commit(self, write: Callable[..., None]) -> None:
        """``write(*rows)`` with the staged rows, once; nothing when none are staged."""
        if self._rows is not None:
            rows, self._rows = self._rows, None
            write(*rows)


class FeatureQueue(nn.Module):
    """A FIFO ring buffer of ``capacity`` rows ``(feature [dim], label)``.

    Buffers: ``features [capacity, dim]`` (float32), ``labels [capacity]`` (int64, :data:`NO_LABEL` for
    rows without identity), ``ptr`` (the next slot written, in ``[0, capacity)``) and ``full`` (every
    slot holds a row). Live rows are all slots when ``full``, else slots ``[0, ptr)``. A queue allocated
    with initial rows (random unit vectors, as MoCo, DCQ and SST start) is full from the start; its
    initial rows carry :data:`NO_LABEL`.

    Writes wrap around: ``enqueue`` of ``n <= capacity`` rows fills slots ``ptr, ptr+1, ... (mod
    capacity)`` in order and advances ``ptr`` by ``n`` modulo the capacity. DCQ and SST additionally
    require the capacity to be a multiple of the (global) batch, as their authors assert; the queue
    itself does not.
    """

    def __init__(self, dim: int, capacity: int = 0, initial: torch.Tensor | None = None) -> None:
        super().__init__()
        if dim < 1 or capacity < 0:
            raise ValueError(f"FeatureQueue: need dim >= 1 and capacity >= 0, got {dim} and {capacity}")
        self.dim = dim
        self.register_buffer("features", torch.zeros(capacity, dim))
        self.register_buffer("labels", torch.full((capacity,), NO_LABEL, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("full", torch.zeros((), dtype=torch.bool))
        if capacity:
            self.allocate(capacity, initial)

    @property
    def capacity(self) -> int:
        return self.features.shape[0]

    @property
    def allocated(self) -> bool:
        return self.capacity > 0

    def allocate(self, capacity: int, initial: torch.Tensor | None = None) -> None:
        """Size the queue to ``capacity`` empty slots, or fill it with ``initial`` rows (then it is full)."""
        if capacity < 1:
            raise ValueError(f"FeatureQueue: capacity must be >= 1, got {capacity}")
        device = self.features.device
        if initial is not None:
            if initial.shape != (capacity, self.dim):
                raise ValueError(f"FeatureQueue: initial rows must be {(capacity, self.dim)}, "
                                 f"got {tuple(initial.shape)}")
            # The queue keeps the dtype it was built with (float32 normally, float64 in exactness tests).
            self.features = initial.detach().to(device=device, dtype=self.features.dtype).clone()
        else:
            self.features = torch.zeros(capacity, self.dim, device=device, dtype=self.features.dtype)
        self.labels = torch.full((capacity,), NO_LABEL, dtype=torch.long, device=device)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)
        self.full = torch.tensor(initial is not None, device=device)

    def positions(self, count: int) -> torch.Tensor:
        """The slots the next ``count`` rows will occupy: ``(ptr + arange(count)) % capacity``."""
        return (self.ptr + torch.arange(count, device=self.ptr.device)) % self.capacity

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write already-gathered rows (all ranks' rows, see :func:`gather_for_enqueue`) at the pointer."""
        count = features.shape[0]
        if not self.allocated:
            raise RuntimeError("FeatureQueue.enqueue before allocate()")
        if count > self.capacity or labels.shape != (count,):
            raise ValueError(f"FeatureQueue: cannot enqueue {count} rows with labels {tuple(labels.shape)} "
                             f"into capacity {self.capacity}")
        start = int(self.ptr)
        # Contiguous slice copies (at most two when the write wraps): much faster than scattering rows.
        first = min(count, self.capacity - start)
        for (begin, stop), (lo, hi) in (((start, start + first), (0, first)), ((0, count - first), (first, count))):
            if stop > begin:
                self.features[begin:stop] = features[lo:hi].detach()
                self.labels[begin:stop] = labels[lo:hi]
        self.full |= start + count >= self.capacity
        self.ptr.fill_((start + count) % self.capacity)

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)`` of the live rows, in slot order (not age order)."""
        if bool(self.full):
            return self.features, self.labels
        count = int(self.ptr)
        return self.features[:count], self.labels[:count]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)`` of the live rows from oldest to newest."""
        if bool(self.full):
            order = torch.roll(torch.arange(self.capacity, device=self.ptr.device), -int(self.ptr))
            return self.features[order], self.labels[order]
        return self.live()

    def with_rows_at_pointer(self, features: torch.Tensor) -> torch.Tensor:
        """All ``capacity`` rows with ``features`` written (out of place) at :meth:`positions`.

        SST's ``compute_theta``: the current batch's gallery features take the slots they will be
        enqueued into, so the queue the probe sees holds each current identity once, as its positive.
        Gradient does not flow into the queue; ``features`` keep theirs (SST passes detached ones).
        """
        return self.features.index_put((self.positions(features.shape[0]),), features.to(self.features.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, capacity={self.capacity}"


class ClassMemory(nn.Module):
    """At most one prototype per class in ``capacity`` slots, refreshed in place, oldest evicted first.

    Buffers: ``prototypes [capacity, dim]``, ``labels [capacity]`` (:data:`NO_LABEL` = empty slot),
    ``stamps [capacity]`` (the write count at which each slot was last written, -1 when empty) and
    ``clock`` (writes so far). ``write(prototypes, labels)`` with distinct labels:

    - a class already in memory has its slot overwritten (refresh: replaced, never duplicated), and the
      slot's stamp renewed;
    - each new class takes an empty slot if any, else the slot written longest ago (ageing: the oldest
      prototype is dequeued), never a slot of a class in the same write; ties (slots of one write) go to
      the lower slot index.
    """

    def __init__(self, dim: int, capacity: int = 0) -> None:
        super().__init__()
        if dim < 1 or capacity < 0:
            raise ValueError(f"ClassMemory: need dim >= 1 and capacity >= 0, got {dim} and {capacity}")
        self.dim = dim
        self.register_buffer("prototypes", torch.zeros(capacity, dim))
        self.register_buffer("labels", torch.full((capacity,), NO_LABEL, dtype=torch.long))
        self.register_buffer("stamps", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))

    @property
    def capacity(self) -> int:
        return self.prototypes.shape[0]

    @property
    def allocated(self) -> bool:
        return self.capacity > 0

    def allocate(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ClassMemory: capacity must be >= 1, got {capacity}")
        device = self.prototypes.device
        self.prototypes = torch.zeros(capacity, self.dim, device=device)
        self.labels = torch.full((capacity,), NO_LABEL, dtype=torch.long, device=device)
        self.stamps = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.clock = torch.zeros((), dtype=torch.long, device=device)

    def occupied(self) -> torch.Tensor:
        """Boolean mask of the slots holding a prototype."""
        return self.labels != NO_LABEL

    def slots_of(self, labels: torch.Tensor) -> torch.Tensor:
        """The slot holding each label's prototype, -1 where the label is not in memory."""
        # Binary search in the sorted labels: O((capacity + N) log capacity), no [N, capacity] matrix.
        sorted_labels, order = torch.sort(self.labels)
        at = torch.searchsorted(sorted_labels, labels).clamp_max(self.capacity - 1)
        found = (sorted_labels[at] == labels) & (labels != NO_LABEL)
        return torch.where(found, order[at], torch.full_like(labels, -1))

    @torch.no_grad()
    def write(self, prototypes: torch.Tensor, labels: torch.Tensor) -> None:
        """Refresh or insert one already-gathered prototype per distinct label (see the class docstring)."""
        count = labels.shape[0]
        if not self.allocated:
            raise RuntimeError("ClassMemory.write before allocate()")
        if count > self.capacity:
            raise ValueError(f"ClassMemory: {count} classes in one write exceed the capacity {self.capacity}")
        if torch.unique(labels).shape[0] != count:
            raise ValueError("ClassMemory.write needs distinct labels (one prototype per class)")
        slots = self.slots_of(labels)
        new = slots < 0
        if bool(new.any()):
            # Age key: empty slots first (stamp -1), then by stamp, then by slot index; slots refreshed
            # in this write are never evicted.
            index = torch.arange(self.capacity, device=self.stamps.device)
            key = (self.stamps + 1) * self.capacity + index
            protected = torch.zeros(self.capacity, dtype=torch.bool, device=key.device)
            protected[slots[~new]] = True
            key = key.masked_fill(protected, torch.iinfo(torch.long).max)
            evicted = torch.topk(key, int(new.sum()), largest=False, sorted=True).indices
            slots = slots.clone()
            slots[new] = evicted
        self.prototypes[slots] = prototypes.detach().to(self.prototypes.dtype)
        self.labels[slots] = labels.to(self.labels.dtype)
        self.stamps[slots] = self.clock
        self.clock += 1

    @torch.no_grad()
    def nearest_classes(self, labels: torch.Tensor, count: int) -> torch.Tensor:
        """For each label, the labels of the ``count`` prototypes most similar (cosine) to its own, nearest
        first: ``[N, count]`` int64, on ``labels``' device (the memory may be elsewhere).

        The building block of Prototype Memory's hard-class mining (batches of look-alike classes). Only
        occupied slots are candidates (an empty slot never, whatever its row holds), and never the label's
        own slot; rows of labels not in memory, and missing neighbours, are :data:`NO_LABEL`. Cost: one
        ``[N, capacity]`` product.
        """
        if count < 0:
            raise ValueError(f"ClassMemory.nearest_classes: count must be >= 0, got {count}")
        out = torch.full((labels.shape[0], count), NO_LABEL, dtype=torch.long, device=self.labels.device)
        k = min(count, self.capacity)
        if k and labels.numel():
            slots = self.slots_of(labels.to(device=self.labels.device, dtype=torch.long))
            own = slots.clamp_min(0)
            rows = F.normalize(self.prototypes, dim=1)  # written rows are unit already; cheap insurance
            sims = rows[own] @ rows.T
            sims.masked_fill_(~self.occupied().unsqueeze(0), float("-inf"))
            sims.scatter_(1, own.unsqueeze(1), float("-inf"))
            values, index = torch.topk(sims, k, dim=1)
            found = torch.isfinite(values) & (slots >= 0).unsqueeze(1)
            out[:, :k] = torch.where(found, self.labels[index], NO_LABEL)
        return out.to(labels.device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, capacity={self.capacity}"
