"""The batches of a training run as a stream with a sample position (the loop's data-position protocol).

``loader_factory(start_position)`` yields the batches that follow the first ``start_position`` samples this rank
consumed; :class:`BatchStream` counts the position, re-opens a finite iterable at its end and passes over batches that
unreadable images left empty. The full protocol is in ``blip2lib/engine.py``'s module docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def batch_size_of(batch: object) -> int:
    """Samples a batch consumed.

    ``Collate``'s kept + dropped count, else the leading dim of the first tensor (or length of the first list)
    found depth-first.
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        if isinstance(batch.get("batch_size"), int):  # blip2lib.data.Collate: kept + dropped (bad) samples
            return batch["batch_size"] + int(batch.get("n_bad", 0))
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        if batch and isinstance(batch[0], (torch.Tensor, dict, list, tuple)):
            return batch_size_of(batch[0])
        return len(batch)
    raise TypeError(f"cannot infer the batch size of a {type(batch).__name__}")


def _is_empty(batch: object) -> bool:
    """A ``Collate`` batch whose every sample was unreadable (only ``batch_size`` 0 and the bad-sample count)."""
    return isinstance(batch, dict) and batch.get("batch_size") == 0


class BatchStream:
    """Iterator over ``loader_factory`` that tracks the sample position and re-opens exhausted iterables.

    A batch left empty by unreadable samples (``batch_size`` 0) still moves the position by its size and is then
    passed over: the position stays a function of the data order alone, so a resumed run sees the same batches as
    an uninterrupted one (and an epoch that ends on an empty batch does not re-read it).
    """

    def __init__(self, factory: Callable[[int], Iterable], position: int):
        self.factory, self.position = factory, position
        self._it = iter(factory(position))

    def next(self) -> object:
        """The next non-empty batch (the position moves past empty ones too)."""
        reopened, got_any = False, False
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                if reopened:  # a whole pass from the epoch start gave nothing usable: it never will
                    if got_any:
                        raise RuntimeError(
                            f"loader_factory({self.position}): every batch of a whole epoch was empty "
                            "(all its samples unreadable; see the skipped-image warnings)"
                        ) from None
                    raise RuntimeError(f"loader_factory({self.position}) yielded no batch") from None
                self._it, reopened, got_any = iter(self.factory(self.position)), True, False
                continue
            got_any = True
            self.position += batch_size_of(batch)
            if not _is_empty(batch):
                return batch
