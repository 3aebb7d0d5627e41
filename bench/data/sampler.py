"""Batch samplers serving a method's :class:`methods.base.BatchSpec`.

Both samplers are pure functions of (seed, batch number): batch ``b`` is the same whether the run
started at step 0 or resumed at step ``b``, so a resumed run sees exactly the batches it would have seen.
The only state is the number of batches served (``state_dict``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

import numpy as np

from methods.registry import ConfigError

#: Stream ids separating the random draws of different purposes under one seed.
_EPOCH_PERMUTATION, _VIEW_CHOICE = 0, 1
#: Stream 2 is the loader's flips (bench.data.loader); 3 fills hard-class batches.
_HARD_FILL = 3


class _Sampler:
    def __init__(self, batch_size: int, seed: int) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.batches_served = 0
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int, n: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, _EPOCH_PERMUTATION, epoch])
            self._cached_epoch = (epoch, rng.permutation(n))
        return self._cached_epoch[1]

    def _stream(self, start: int, count: int, n: int) -> np.ndarray:
        """Positions ``[start, start + count)`` of the concatenation of per-epoch permutations of ``range(n)``."""
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // n):
            mask = positions // n == epoch
            out[mask] = self._permutation(int(epoch), n)[positions[mask] % n]
        return out

    def batch(self, number: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            indices = self.batch(self.batches_served)
            self.batches_served += 1
            yield indices

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self.batches_served, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ConfigError("sampler state was saved with another seed or batch size")
        self.batches_served = int(state["batches_served"])


class RandomBatchSampler(_Sampler):
    """Plain random batches: each epoch is a fresh permutation of all images; batches run across epochs."""

    def __init__(self, num_images: int, batch_size: int, seed: int) -> None:
        super().__init__(batch_size, seed)
        self.num_images = num_images

    def batch(self, number: int) -> np.ndarray:
        return self._stream(number * self.batch_size, self.batch_size, self.num_images)


class ClassBalancedBatchSampler(_Sampler):
    """``batch_size // k`` identities per batch, ``k`` images each, identity-major (views side by side).

    Identities are visited in a fresh random order every epoch; an identity's ``k`` images are drawn
    without replacement when it has at least ``k``, otherwise with replacement (so an identity with one
    image appears as ``k`` copies of it). A batch that spans two epochs never repeats an identity.
    ``views_with_replacement`` draws the ``k`` images with replacement whatever the identity's count
    (DCQ's reference images).

    ``identity_reuse_gap = G > 1`` (:class:`methods.base.BatchSpec`): two appearances of one identity in
    the identity stream are at least ``max(G, batch_size // k)`` positions apart. Within an epoch every
    identity appears once, so only epoch boundaries need care: an identity at position ``i`` of epoch
    ``e`` may take position ``j`` of epoch ``e + 1`` only if ``n - i + j >= G``, i.e. not before
    ``i - (n - G)``. Epoch ``e + 1`` is built greedily, position by position, taking among the identities
    already allowed there the one ranked first by the epoch's fresh random permutation (with ``G <= 1``
    this is that permutation). It always succeeds for ``G <= n``: at position ``j`` at least ``j + 1``
    identities are allowed. The original SST code (dituu/Semi-Siamese-Training ``main.py::train_sample``)
    instead draws the first ``Q`` identities of an epoch from outside the last ``Q`` of the previous one,
    which needs ``n >= 2 Q``; the rule here needs only ``n >= G``. Each epoch's order then depends on the
    previous one, so it is computed epoch by epoch from epoch 0 (cached), still a pure function of
    (seed, batch number).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, views_per_class: int, seed: int,
                 views_with_replacement: bool = False, identity_reuse_gap: int = 0) -> None:
        super().__init__(batch_size, seed)
        if batch_size % views_per_class:
            raise ConfigError(f"train.batch_size ({batch_size}) must be a multiple of the method's "
                              f"views_per_class ({views_per_class})")
        self.views = views_per_class
        self.classes_per_batch = batch_size // views_per_class
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        self.identities, starts, self.counts = np.unique(labels[order], return_index=True, return_counts=True)
        if self.identities.shape[0] < self.classes_per_batch:
            raise ConfigError(f"a batch needs {self.classes_per_batch} identities ({batch_size} images / "
                              f"{views_per_class} views) but the split has only {self.identities.shape[0]}")
        self._members = np.split(order, starts[1:])
        self.views_with_replacement = bool(views_with_replacement)
        n = self.identities.shape[0]
        if identity_reuse_gap > n:
            raise ConfigError(f"the method needs {identity_reuse_gap} identities between two appearances of one "
                              f"identity but the split has only {n}")
        self.reuse_gap = max(identity_reuse_gap, self.classes_per_batch) if identity_reuse_gap > 1 else 0
        self._gapped_orders: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int, n: int) -> np.ndarray:
        if not self.reuse_gap:
            return super()._permutation(epoch, n)
        if epoch not in self._gapped_orders:
            earlier = [e for e in self._gapped_orders if e < epoch]
            if earlier:
                done = max(earlier)
                order = self._gapped_orders[done]
            else:
                done, order = 0, super()._permutation(0, n).copy()
            for e in range(done + 1, epoch + 1):
                order = _reorder_with_gap(order, super()._permutation(e, n), self.reuse_gap)
            # A batch reads at most two consecutive epochs; keep a few for resumes near a boundary.
            self._gapped_orders = {e: o for e, o in self._gapped_orders.items() if e >= epoch - 2}
            self._gapped_orders[epoch] = order
        return self._gapped_orders[epoch]

    def batch(self, number: int) -> np.ndarray:
        p = self.classes_per_batch
        return self._views(self._distinct_identities(number * p, p), number)

    def _distinct_identities(self, start: int, count: int) -> np.ndarray:
        """``count`` distinct identity groups from position ``start`` of the identity stream. Across an epoch
        boundary the next permutation may repeat an identity already taken: further identities of the new
        epoch are taken instead."""
        n = self.identities.shape[0]
        chosen = self._stream(start, count, n)
        if len(np.unique(chosen)) < count:
            stream = self._stream(start, 2 * count, n)
            _, first = np.unique(stream, return_index=True)
            chosen = stream[np.sort(first)[:count]]
        return chosen

    def _views(self, groups: np.ndarray, number: int) -> np.ndarray:
        """The images of batch ``number``: ``k`` of each identity group in ``groups``, identity-major."""
        rng = np.random.default_rng([self.seed, _VIEW_CHOICE, number])
        picks = []
        for group in groups:
            members = self._members[group]
            replace = self.views_with_replacement or members.shape[0] < self.views
            picks.append(rng.choice(members, size=self.views, replace=replace))
        return np.concatenate(picks)


class HardClassBatchSampler(ClassBalancedBatchSampler):
    """Class-balanced batches composed by hard-class mining (``BatchSpec.hard_class_neighbours = n``).

    Of the ``P = batch_size // k`` identities of a batch, ``A = ceil(P / (n + 1))`` are anchors, taken from
    the identity stream of :class:`ClassBalancedBatchSampler` (every identity an anchor once per epoch);
    each anchor is followed by the ``n`` identities that ``nearest(anchors, n)`` names (the method's
    :meth:`methods.base.Method.nearest_classes`: class ids, ``-1`` for unknown). A neighbour that is
    unknown, not in this training set, or already in the batch leaves its slot to the next identity of a
    fill stream drawn per batch (``(seed, stream 3, batch number)``), so every batch has ``P`` distinct
    identities however little the method knows yet (at the first step: nothing).

    ``nearest`` is called when the batch is composed, so a batch depends on the method's state at that
    moment: on the in-memory path (SynthFace) that is after the previous optimizer step, so a run resumed
    from a checkpoint composes the same batches; where batches are decoded ahead by DataLoader workers,
    they are composed up to :data:`bench.data.loader.PREFETCH_BATCHES` per worker steps early (slightly
    older neighbours).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, views_per_class: int, seed: int,
                 neighbours: int, nearest: Callable[[np.ndarray, int], np.ndarray],
                 views_with_replacement: bool = False) -> None:
        super().__init__(labels, batch_size, views_per_class, seed, views_with_replacement=views_with_replacement)
        if neighbours < 1:
            raise ConfigError(f"hard-class mining needs >= 1 neighbour per anchor identity, got {neighbours}")
        self.neighbours, self.nearest = neighbours, nearest
        self.anchors_per_batch = -(-self.classes_per_batch // (neighbours + 1))

    def batch(self, number: int) -> np.ndarray:
        p, a, n = self.classes_per_batch, self.anchors_per_batch, self.identities.shape[0]
        anchors = self._distinct_identities(number * a, a)
        proposed = np.asarray(self.nearest(self.identities[anchors], self.neighbours), dtype=np.int64)
        if proposed.shape != (a, self.neighbours):
            raise ValueError(f"nearest() returned shape {proposed.shape}, expected {(a, self.neighbours)}")
        # Class ids -> identity groups of this sampler (-1: unknown or not in this training set).
        position = np.searchsorted(self.identities, proposed).clip(0, n - 1)
        groups = np.where(self.identities[position] == proposed, position, -1)
        chosen: list[int] = []
        taken: set[int] = set()
        for anchor, row in zip(anchors.tolist(), groups.tolist()):
            for group in (anchor, *row):
                if group >= 0 and group not in taken and len(chosen) < p:
                    chosen.append(group)
                    taken.add(group)
        if len(chosen) < p:
            fill = np.random.default_rng([self.seed, _HARD_FILL, number]).permutation(n)
            chosen.extend([g for g in fill.tolist() if g not in taken][:p - len(chosen)])
        return self._views(np.asarray(chosen, dtype=np.int64), number)


class CuratedSampler:
    """``sampler`` over a kept subset of a training set, from global batch ``first_batch`` on.

    ``sampler`` draws positions in ``kept`` (the indices of the images kept, e.g. after sub-center
    ArcFace's purification); this wrapper serves ``kept[positions]`` and numbers its batches globally
    (``first_batch`` + the inner sampler's count), so per-batch draws keyed by the batch number (the
    loader's flips) continue the run's sequence, and ``batches_served`` is the run's step.
    """

    def __init__(self, sampler: _Sampler, kept: np.ndarray, first_batch: int) -> None:
        self.sampler, self.kept, self.first_batch = sampler, np.asarray(kept, dtype=np.int64), int(first_batch)

    def __iter__(self) -> Iterator[np.ndarray]:
        for positions in self.sampler:
            yield self.kept[positions]

    @property
    def batches_served(self) -> int:
        return self.first_batch + self.sampler.batches_served

    def state_dict(self) -> dict[str, int]:
        return {**self.sampler.state_dict(), "batches_served": self.batches_served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        served = int(state["batches_served"])
        if served < self.first_batch:
            raise ConfigError(f"sampler state at batch {served} is before the curation at batch {self.first_batch}")
        self.sampler.load_state_dict({**state, "batches_served": served - self.first_batch})


def _reorder_with_gap(previous: np.ndarray, priority: np.ndarray, gap: int) -> np.ndarray:
    """The next epoch's order of ``previous``'s identities with every identity at least ``gap`` positions
    (counted across the boundary) after its place in ``previous``; ties broken by ``priority`` (a
    permutation: earlier is preferred). See :class:`ClassBalancedBatchSampler`."""
    n = previous.shape[0]
    slack = n - gap
    rank = np.empty(n, dtype=np.int64)
    rank[priority] = np.arange(n)
    previous_ranks = rank[previous].tolist()
    out = np.empty(n, dtype=np.int64)
    allowed: list[int] = []
    released = 0
    for position in range(n):
        # The identity at previous position i is allowed from position i - slack on.
        while released < n and released - slack <= position:
            heapq.heappush(allowed, previous_ranks[released])
            released += 1
        out[position] = heapq.heappop(allowed)
    return priority[out]


class RankSlice:
    """Rank ``rank``'s contiguous slice of every global batch served by ``sampler``.

    Global batches are identical on every rank (same seed), so the ranks together train on exactly the
    batches one process would; a class-balanced batch splits between whole identities when the slice
    size is a multiple of the views per class (checked by the harness).
    """

    def __init__(self, sampler: _Sampler, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self.sampler:
            share = batch.shape[0] // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share]

    @property
    def batches_served(self) -> int:
        return self.sampler.batches_served

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
