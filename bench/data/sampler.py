"""Batch samplers serving a method's :class:`methods.base.BatchSpec`.

Both samplers are pure functions of (seed, batch number): batch ``b`` is the same whether the run
started at step 0 or resumed at step ``b``, so a resumed run sees exactly the batches it would have seen.
The only state is the number of batches served (``state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from methods.registry import ConfigError

#: Stream ids separating the random draws of different purposes under one seed.
_EPOCH_PERMUTATION, _VIEW_CHOICE = 0, 1


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
    """

    def __init__(self, labels: np.ndarray, batch_size: int, views_per_class: int, seed: int) -> None:
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

    def batch(self, number: int) -> np.ndarray:
        p, n = self.classes_per_batch, self.identities.shape[0]
        start = number * p
        chosen = self._stream(start, p, n)
        # Across an epoch boundary the next permutation may repeat an identity already in this batch:
        # take further identities from the new epoch instead.
        if len(np.unique(chosen)) < p:
            stream = self._stream(start, 2 * p, n)
            _, first = np.unique(stream, return_index=True)
            chosen = stream[np.sort(first)[:p]]
        rng = np.random.default_rng([self.seed, _VIEW_CHOICE, number])
        picks = []
        for group in chosen:
            members = self._members[group]
            replace = members.shape[0] < self.views
            picks.append(rng.choice(members, size=self.views, replace=replace))
        return np.concatenate(picks)
