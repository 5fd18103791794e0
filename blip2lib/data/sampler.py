"""A DistributedSampler whose position can be saved and restored for exact mid-epoch resume.

The order of an epoch is a pure function of ``(seed, epoch, num_replicas, rank, len(dataset))`` (torch's
``DistributedSampler`` recipe: one ``randperm`` per epoch, padded by wrap-around or truncated, then strided by
rank). The sampler cannot see what the training loop has consumed (DataLoader prefetches), so the loop tells it::

    sampler = ResumableDistributedSampler(ds, shuffle=True, seed=42)
    loader = DataLoader(ds, batch_size=B, sampler=sampler, collate_fn=...)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)              # keeps a restored position when epoch is the restored one
        for batch in loader:
            ...step...
            sampler.advance(B)                # indices drawn this step (count dropped bad samples too)
            if time_to_checkpoint: ckpt["sampler"] = sampler.state_dict()

After ``sampler.load_state_dict(ckpt["sampler"])`` the next iteration yields exactly the indices not yet consumed,
in the same order. Resuming needs the same world size (the per-rank order depends on it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

from .. import dist

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` + ``advance``/``state_dict``/``load_state_dict``; works without a process group.

    Args:
        dataset: a sized dataset.
        num_replicas: world size; default ``blip2lib.dist.get_world_size()`` (1 without a process group).
        rank: this rank; default ``blip2lib.dist.get_rank()``.
        shuffle: shuffle each epoch with ``seed + epoch``.
        seed: shuffle seed, identical on every rank.
        drop_last: truncate to a multiple of ``num_replicas`` instead of padding by wrap-around.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        rank = dist.get_rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.consumed = 0  # indices of the current epoch already used by this rank

    def _epoch_indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            pad = self.total_size - len(indices)
            while pad > 0:  # wrap around (repeatedly, for datasets smaller than the world size)
                indices += indices[:pad]
                pad = self.total_size - len(indices)
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_indices()[self.consumed :])

    def __len__(self) -> int:
        return self.num_samples - self.consumed

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one starts at its beginning."""
        if epoch != self.epoch:
            self.consumed = 0
        super().set_epoch(epoch)

    def advance(self, n: int) -> None:
        """Record that the loop has consumed ``n`` more indices of this epoch (capped at the epoch length)."""
        self.consumed = min(self.consumed + int(n), self.num_samples)

    def state_dict(self) -> dict:
        """Position and the quantities the order depends on."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "dataset_len": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`.

        Raises:
            ValueError: when world size, dataset length, seed or shuffle differ (the order would not be the same).
        """
        mine = self.state_dict()
        for key in ("num_replicas", "dataset_len", "seed", "shuffle", "drop_last"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume sampler exactly: {key} was {state[key]!r}, now {mine[key]!r}")
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
