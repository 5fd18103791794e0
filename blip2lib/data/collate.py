"""Batch collation that drops unreadable samples (``None``) and reports how many it dropped (docs/paper_map.md §6).

Output batch (a dict):

* every sample key, collated: tensors of one shape are stacked ``(B, ...)``; ints → ``LongTensor (B,)``;
  floats → ``FloatTensor (B,)``; anything else (strings, lists, string ids) → a Python list of length B.
  So an integer retrieval ``image_id`` becomes a tensor and a string caption ``image_id`` stays a list
  (docs/paper_map.md §10.15).
* VQA training samples (``answers``/``weights`` lists) additionally get LAVIS' flat form: ``answer`` (list of all
  answers, sample after sample), ``weight`` ``(sum n_answers,)`` and ``n_answers`` ``(B,)``.
* ``batch_size`` — samples kept; ``n_bad`` — samples dropped; ``bad_samples`` — their ``(path, reason)`` pairs
  when a ``BadSampleLog`` is shared with the dataset (see ``images.py`` for how the loop reads the count).

When every sample of a batch is dropped, the batch holds only ``batch_size`` (0), ``n_bad`` and ``bad_samples``.
"""

from __future__ import annotations

from typing import Any

import torch

from .images import BadSampleLog

__all__ = ["Collate", "collate_samples"]


def _collate_values(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values):
        return torch.stack(values)  # (B, ...)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.long)  # (B,)
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=torch.float)  # (B,)
    return list(values)


def collate_samples(samples: list[dict | None], bad_log: BadSampleLog | None = None) -> dict:
    """Collate sample dicts, dropping ``None`` entries and counting them.

    Args:
        samples: what the dataset returned for one batch of indices (``None`` = unreadable image).
        bad_log: the log shared with the dataset; its queued paths move into ``batch["bad_samples"]``.

    Returns:
        The collated batch (see module docstring).
    """
    kept = [s for s in samples if s is not None]
    n_bad = len(samples) - len(kept)
    bad = bad_log.drain() if bad_log is not None else []
    if len(bad) < n_bad:  # a log that was not shared with the dataset (or a dataset that does not record paths)
        bad = bad + [("<unknown>", "sample was None")] * (n_bad - len(bad))
    batch: dict[str, Any] = {"batch_size": len(kept), "n_bad": n_bad, "bad_samples": bad}
    if not kept:
        return batch
    keys = list(kept[0])
    for s in kept[1:]:
        if list(s) != keys:
            raise ValueError(f"samples in one batch have different keys: {keys} vs {list(s)}")
    for key in keys:
        batch[key] = _collate_values([s[key] for s in kept])
    if "answers" in keys and "weights" in keys:  # LAVIS VQA collater's flat form
        batch["answer"] = [a for s in kept for a in s["answers"]]
        batch["weight"] = torch.tensor([w for s in kept for w in s["weights"]], dtype=torch.float)  # (sum n,)
        batch["n_answers"] = torch.tensor([len(s["answers"]) for s in kept], dtype=torch.long)  # (B,)
    return batch


class Collate:
    """Picklable ``collate_fn`` for DataLoader: :func:`collate_samples` bound to a shared :class:`BadSampleLog`.

    Pass the same log object to the dataset and to ``Collate``; DataLoader workers receive copies of both
    together, so the collate running in a worker drains the paths its dataset copy recorded.
    """

    def __init__(self, bad_log: BadSampleLog | None = None):
        self.bad_log = bad_log

    def __call__(self, samples: list[dict | None]) -> dict:
        """Collate one batch."""
        return collate_samples(samples, self.bad_log)
