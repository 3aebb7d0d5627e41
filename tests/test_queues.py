"""methods.queues: ring-buffer FIFO order and pointer arithmetic, class memory refresh/ageing, resume."""

from __future__ import annotations

import pytest
import torch

from methods.distributed import DistContext
from methods.queues import (NO_LABEL, ClassMemory, FeatureQueue, StagedWrite, gather_for_enqueue, mask_same_label,
                            random_unit_rows, split_views)


def _rows(values, dim=3):
    """Rows whose every entry is the row's value, so slot contents are readable."""
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).repeat(1, dim)


def test_fifo_order_and_pointer_arithmetic_by_hand():
    queue = FeatureQueue(dim=3)
    queue.allocate(5)
    assert int(queue.ptr) == 0 and not bool(queue.full) and queue.live()[0].shape == (0, 3)
    queue.enqueue(_rows([0, 1]), torch.tensor([10, 11]))
    assert int(queue.ptr) == 2 and not bool(queue.full)
    assert queue.live()[1].tolist() == [10, 11]
    queue.enqueue(_rows([2, 3]), torch.tensor([12, 13]))
    assert int(queue.ptr) == 4 and not bool(queue.full)
    # The third write wraps: slots 4 and 0; pointer (4 + 2) mod 5 = 1; now full.
    assert queue.positions(2).tolist() == [4, 0]
    queue.enqueue(_rows([4, 5]), torch.tensor([14, 15]))
    assert int(queue.ptr) == 1 and bool(queue.full)
    assert queue.labels.tolist() == [15, 11, 12, 13, 14]
    assert queue.features[:, 0].tolist() == [5, 1, 2, 3, 4]
    features, labels = queue.ordered()  # oldest first
    assert labels.tolist() == [11, 12, 13, 14, 15] and features[:, 0].tolist() == [1, 2, 3, 4, 5]
    # A write of exactly the capacity replaces everything and leaves the pointer where it was.
    queue.enqueue(_rows([20, 21, 22, 23, 24]), torch.arange(20, 25))
    assert int(queue.ptr) == 1 and queue.ordered()[1].tolist() == [20, 21, 22, 23, 24]


def test_fifo_against_a_list_model_over_many_writes():
    capacity, dim = 12, 2
    queue = FeatureQueue(dim)
    queue.allocate(capacity)
    model: list[int] = []  # the last `capacity` labels ever written, oldest first
    generator = torch.Generator().manual_seed(0)
    label = 0
    for _ in range(40):
        count = int(torch.randint(1, capacity + 1, (), generator=generator))
        labels = torch.arange(label, label + count)
        label += count
        queue.enqueue(labels.float().unsqueeze(1).repeat(1, dim), labels)
        model = (model + labels.tolist())[-capacity:]
        ordered_features, ordered_labels = queue.ordered()
        assert ordered_labels.tolist() == model
        assert ordered_features[:, 0].tolist() == [float(v) for v in model]
        assert int(queue.ptr) == label % capacity
        assert bool(queue.full) == (label >= capacity)


def test_initial_rows_make_the_queue_full_without_labels():
    queue = FeatureQueue(dim=4)
    initial = random_unit_rows(6, 4, torch.Generator().manual_seed(1))
    queue.allocate(6, initial)
    assert bool(queue.full) and int(queue.ptr) == 0
    features, labels = queue.live()
    assert torch.equal(features, initial) and (labels == NO_LABEL).all()
    assert torch.allclose(initial.norm(dim=1), torch.ones(6))
    uniform = random_unit_rows(6, 4, torch.Generator().manual_seed(1), "uniform")
    assert torch.allclose(uniform.norm(dim=1), torch.ones(6))


def test_rows_at_pointer_is_out_of_place():
    queue = FeatureQueue(dim=3)
    queue.allocate(4, torch.zeros(4, 3))
    queue.enqueue(_rows([1, 2, 3]), torch.tensor([1, 2, 3]))  # ptr = 3
    view = queue.with_rows_at_pointer(_rows([7, 8]))  # slots 3 and 0
    assert view[:, 0].tolist() == [8, 2, 3, 7]
    assert queue.features[:, 0].tolist() == [1, 2, 3, 0] and int(queue.ptr) == 3


def test_queue_errors():
    queue = FeatureQueue(dim=2)
    with pytest.raises(RuntimeError, match="before allocate"):
        queue.enqueue(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    queue.allocate(3)
    with pytest.raises(ValueError, match="cannot enqueue 4 rows"):
        queue.enqueue(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="initial rows"):
        queue.allocate(3, torch.zeros(2, 2))


def test_queue_state_dict_round_trip_resumes_identically():
    """A queue built with its capacity and other initial rows, loaded from a state dict, continues exactly
    as the original (rows, labels, pointer, full flag all restored); a queue of another capacity is refused
    (no resize-on-load). Catches state kept outside buffers, and a silent resize."""
    queue = FeatureQueue(2, 5, torch.ones(5, 2))
    queue.enqueue(_rows([1, 2, 3], 2), torch.tensor([1, 2, 3]))
    fresh = FeatureQueue(2, 5)  # empty slots, pointer 0, not full
    fresh.load_state_dict(queue.state_dict())
    assert fresh.capacity == 5 and int(fresh.ptr) == 3 and bool(fresh.full)
    with pytest.raises(RuntimeError, match="size mismatch"):
        FeatureQueue(2, 4).load_state_dict(queue.state_dict())
    for value in (4, 5, 6):
        for q in (queue, fresh):
            q.enqueue(_rows([value, value + 10], 2), torch.tensor([value, value + 10]))
    for name, tensor in queue.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name


def test_gather_for_enqueue_single_process():
    x = torch.randn(3, 2, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    gathered_x, gathered_labels = gather_for_enqueue(DistContext(), x, labels)
    assert torch.equal(gathered_x, x) and not gathered_x.requires_grad and torch.equal(gathered_labels, labels)


def _gather_on_rank(rank: int, world_size: int):
    x = torch.full((2, 3), float(rank))
    return gather_for_enqueue(DistContext(rank, world_size), x, torch.tensor([rank, rank + 10]))


def test_gather_for_enqueue_across_two_ranks_is_in_rank_order(tmp_path):
    from tests.dist_helpers import run_ranks

    for rows, labels in run_ranks(_gather_on_rank, 2, tmp_path):
        assert torch.equal(rows, torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        assert labels.tolist() == [0, 10, 1, 11]


def test_split_views_and_label_mask():
    images = torch.arange(12.0).view(6, 2)
    labels = torch.tensor([4, 4, 7, 7, 9, 9])
    grouped, identity = split_views(images, labels, 2)
    assert grouped.shape == (3, 2, 2) and identity.tolist() == [4, 7, 9]
    assert torch.equal(grouped[1, 1], images[3])
    with pytest.raises(ValueError, match="adjacent"):
        split_views(images, torch.tensor([4, 7, 4, 7, 9, 9]), 2)
    cosines = torch.zeros(3, 4)
    masked = mask_same_label(cosines, identity, torch.tensor([7, 4, -1, 7]))
    expected = torch.tensor([[0, -1, 0, 0], [-1, 0, 0, -1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(torch.isinf(masked), expected)


# -- ClassMemory -------------------------------------------------------------------------------------

def _memory_state(memory: ClassMemory) -> dict[int, float]:
    """label -> the value of its prototype row, for the occupied slots."""
    occupied = memory.occupied()
    return dict(zip(memory.labels[occupied].tolist(), memory.prototypes[occupied, 0].tolist()))


def test_memory_refresh_replaces_rather_than_duplicates():
    memory = ClassMemory(dim=2, capacity=4)
    memory.write(_rows([1.0, 2.0], 2), torch.tensor([10, 20]))
    slot_of_20 = int(memory.slots_of(torch.tensor([20])))
    memory.write(_rows([3.0, 4.0], 2), torch.tensor([20, 30]))  # 20 refreshed, 30 new
    assert _memory_state(memory) == {10: 1.0, 20: 3.0, 30: 4.0}
    assert int(memory.slots_of(torch.tensor([20]))) == slot_of_20  # replaced in its slot
    assert (memory.labels == 20).sum() == 1
    assert memory.stamps[slot_of_20] == 1  # its age renewed
    assert memory.slots_of(torch.tensor([99, 10])).tolist() == [-1, int(memory.slots_of(torch.tensor([10])))]


def test_memory_ageing_drops_the_oldest_by_hand():
    memory = ClassMemory(dim=2, capacity=3)
    memory.write(_rows([1.0], 2), torch.tensor([1]))        # write 0: slot 0
    memory.write(_rows([2.0, 3.0], 2), torch.tensor([2, 3]))  # write 1: slots 1, 2 (full)
    memory.write(_rows([4.0], 2), torch.tensor([4]))        # evicts class 1 (written at 0)
    assert _memory_state(memory) == {2: 2.0, 3: 3.0, 4: 4.0}
    memory.write(_rows([5.0], 2), torch.tensor([2]))        # refresh 2: now the youngest
    memory.write(_rows([6.0], 2), torch.tensor([6]))        # evicts 3 (written at 1), not 2
    assert _memory_state(memory) == {2: 5.0, 4: 4.0, 6: 6.0}
    # A class refreshed in a write is never evicted by a new class of the same write.
    # Oldest is 4 (write 2), but it is refreshed by this write, so 9 evicts 2 (write 3).
    memory.write(_rows([7.0, 8.0], 2), torch.tensor([4, 9]))
    assert _memory_state(memory) == {4: 7.0, 6: 6.0, 9: 8.0}


def test_memory_against_an_lru_model():
    """A slot-level model: a new class takes the free or least recently written slot (lowest index on
    ties), never one refreshed or taken in the same write; a seen class keeps its slot."""
    capacity, generator = 7, torch.Generator().manual_seed(3)
    memory = ClassMemory(dim=1, capacity=capacity)
    slots: list[tuple[int, int, float] | None] = [None] * capacity  # (label, write number, value)
    for write in range(60):
        count = int(torch.randint(1, 5, (), generator=generator))
        labels = torch.randperm(12, generator=generator)[:count]
        values = torch.rand(count, generator=generator)
        memory.write(values.unsqueeze(1), labels)
        for label, value in zip(labels.tolist(), values.tolist()):
            where = [i for i, s in enumerate(slots) if s is not None and s[0] == label]
            if not where:
                free = [i for i, s in enumerate(slots) if s is None]
                taken = [i for i, s in enumerate(slots) if s is not None and s[0] not in labels.tolist()]
                where = free[:1] or [min(taken, key=lambda i: (slots[i][1], i))]
            slots[where[0]] = (label, write, value)
        expected_labels = [s[0] if s else NO_LABEL for s in slots]
        assert memory.labels.tolist() == expected_labels
        assert memory.prototypes[:, 0].tolist() == pytest.approx([s[2] if s else 0.0 for s in slots])


def test_memory_errors_and_state_round_trip():
    memory = ClassMemory(dim=2, capacity=2)
    with pytest.raises(ValueError, match="distinct labels"):
        memory.write(torch.zeros(2, 2), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="exceed the capacity"):
        memory.write(torch.zeros(3, 2), torch.tensor([1, 2, 3]))
    memory.write(_rows([1.0], 2), torch.tensor([5]))
    fresh = ClassMemory(dim=2, capacity=2)
    fresh.load_state_dict(memory.state_dict())
    for m in (memory, fresh):
        m.write(_rows([2.0, 3.0], 2), torch.tensor([6, 7]))
    for name, tensor in memory.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name


def _brute_force_nearest(memory: ClassMemory, label: int, count: int) -> list[int]:
    """A loop over the occupied slots: the ``count`` other labels by descending cosine, -1 past them."""
    slots = [i for i in range(memory.capacity) if int(memory.labels[i]) != NO_LABEL]
    own = [i for i in slots if int(memory.labels[i]) == label]
    if not own:
        return [NO_LABEL] * count
    query = memory.prototypes[own[0]].double()
    sims = sorted(((float(query @ memory.prototypes[i].double()), int(memory.labels[i])) for i in slots
                   if i != own[0]), reverse=True)
    found = [lab for _, lab in sims[:count]]
    return found + [NO_LABEL] * (count - len(found))


def test_nearest_classes_against_brute_force():
    """Nearest classes by prototype cosine against a loop, in a memory with empty slots and one after
    evictions (slot order unrelated to labels). Catches a class returned as its own neighbour, an empty
    slot returned (one planted with the query's exact row: the most similar if not masked), neighbours
    out of order, -1 missing past the stored classes or for a class not in memory, and a result left
    on another device or dtype."""
    generator = torch.Generator().manual_seed(0)
    partial = ClassMemory(dim=8, capacity=12)
    prototypes = torch.nn.functional.normalize(torch.randn(8, 8, generator=generator), dim=1)
    partial.write(prototypes, torch.arange(100, 108))
    empty = int((partial.labels == NO_LABEL).nonzero()[0])
    partial.prototypes[empty] = prototypes[3]  # a stale row in an empty slot, identical to class 103's
    evicted = ClassMemory(dim=8, capacity=6)
    for step in range(5):
        labels = torch.randperm(20, generator=generator)[:4]
        evicted.write(torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1), labels)
    for memory, queries in ((partial, [103, 100, 555, 107]), (evicted, list(range(20)))):
        query = torch.tensor(queries)
        for count in (0, 1, 3, 12):
            found = memory.nearest_classes(query, count)
            assert found.dtype == torch.int64 and found.shape == (len(queries), count)
            assert found.tolist() == [_brute_force_nearest(memory, label, count) for label in queries]
    assert (partial.nearest_classes(torch.tensor([103]), 12)[0, 7:] == NO_LABEL).all()  # only 7 others
    assert partial.nearest_classes(torch.tensor([], dtype=torch.long), 3).shape == (0, 3)
    assert ClassMemory(dim=8, capacity=4).nearest_classes(torch.tensor([1, 2]), 2).tolist() == [[-1, -1]] * 2
    with pytest.raises(ValueError, match="count must be >= 0"):
        partial.nearest_classes(torch.tensor([100]), -1)


def test_staged_write_commits_the_last_staged_rows_once():
    """StagedWrite (the shared stage-in-forward, write-after-the-step pattern of DCQ, SST and PM): commit
    writes the rows staged last, exactly once, and nothing when none are staged. Catches a double write
    (a second on_step_end re-enqueuing) and a lost or stale batch."""
    queue = FeatureQueue(2, 4)
    staged = StagedWrite()
    staged.commit(queue.enqueue)  # nothing staged: nothing written
    assert int(queue.ptr) == 0 and not bool(queue.full)
    staged.stage(_rows([1.0], 2), torch.tensor([1]))
    staged.stage(_rows([2.0, 3.0], 2), torch.tensor([2, 3]))  # a second forward replaces the first
    staged.commit(queue.enqueue)
    staged.commit(queue.enqueue)
    assert queue.live()[1].tolist() == [2, 3] and int(queue.ptr) == 2
