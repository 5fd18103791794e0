"""ResumableDistributedSampler: same order as torch's DistributedSampler; exact mid-epoch resume."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from blip2lib.data import ResumableDistributedSampler


class _Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize(
    "n, world, shuffle, drop_last",
    [(11, 2, True, False), (11, 2, True, True), (10, 3, False, False), (2, 4, True, False)],
)
def test_order_matches_torch_distributed_sampler(n, world, shuffle, drop_last):
    ds = _Range(n)
    for epoch in (0, 3):
        for rank in range(world):
            ours = ResumableDistributedSampler(ds, world, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            ref = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


def test_single_process_default_is_a_permutation():
    s = ResumableDistributedSampler(_Range(9), seed=1)  # no process group → world 1, rank 0
    assert sorted(s) == list(range(9)) and s.num_replicas == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_after_k_batches_gives_identical_remaining_order(rank):
    ds, batch, k = _Range(23), 3, 2
    a = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=42)
    a.set_epoch(4)
    full = list(a)  # this rank's order for epoch 4 (12 indices)
    loader = DataLoader(ds, batch_size=batch, sampler=a)
    it = iter(loader)
    consumed = []
    for _ in range(k):
        consumed += next(it).tolist()
        a.advance(batch)
    state = a.state_dict()
    assert state["epoch"] == 4 and state["consumed"] == k * batch and consumed == full[: k * batch]

    b = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=42)
    b.load_state_dict(state)
    b.set_epoch(4)  # the loop's usual call at epoch start must not rewind a restored position
    rest = [i for x in DataLoader(ds, batch_size=batch, sampler=b) for i in x.tolist()]
    assert rest == full[k * batch :] and len(b) == len(full) - k * batch
    assert consumed + rest == full

    b.set_epoch(5)  # next epoch starts from its beginning, in epoch 5's order
    c = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=42)
    c.set_epoch(5)
    assert list(b) == list(c) and len(b) == 12


def test_load_state_refuses_a_different_world_size():
    ds = _Range(10)
    state = ResumableDistributedSampler(ds, num_replicas=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="num_replicas was 2, now 4"):
        ResumableDistributedSampler(ds, num_replicas=4, rank=0).load_state_dict(state)


def test_advance_is_capped_at_epoch_length():
    s = ResumableDistributedSampler(_Range(5), num_replicas=1, rank=0)
    s.advance(100)
    assert list(s) == [] and len(s) == 0
