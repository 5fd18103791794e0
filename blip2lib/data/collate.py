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

Length buckets (params ``text_len_buckets``): the tasks tokenize captions to the batch's longest (or to
``max_txt_len``); :func:`bucket_task_text` right-pads those ids to the smallest bucket that fits, so a step sees a
few text shapes only (what CUDA graphs and ``torch.compile`` need). Pads are masked wherever they go (attention
masks 0, labels -100), so a bucketed step computes the unbucketed step's losses and gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ParamsError
from .images import BadSampleLog

__all__ = ["Collate", "bucket_length", "bucket_task_text", "check_buckets", "collate_samples", "pad_to_bucket"]

IGNORE_INDEX = -100  # label of a position without loss (the LLM loss' ignore_index)


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


# ----------------------------------------------------------------------------------------------------------------
# Text length buckets


def check_buckets(buckets: Sequence[int], max_txt_len: int) -> list[int]:
    """``buckets`` sorted, refused unless positive, distinct and reaching ``max_txt_len`` (the longest text).

    Raises:
        ParamsError: naming the key (a user's mistake: one ``error:`` line from the command-line tools).
    """
    out = sorted(int(b) for b in buckets)
    if not out or out[0] < 1 or len(set(out)) != len(out):
        raise ParamsError(f"text_len_buckets must be distinct positive lengths, got {list(buckets)}")
    if out[-1] < max_txt_len:
        raise ParamsError(
            f"text_len_buckets {list(buckets)}: the largest bucket {out[-1]} is below max_txt_len={max_txt_len}, "
            "so a long caption would fit no bucket; add max_txt_len as the last bucket"
        )
    return out


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``length`` tokens (``buckets`` sorted ascending)."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"a text of {length} tokens fits no bucket of {list(buckets)}")


def pad_to_bucket(x: torch.Tensor, buckets: Sequence[int], value: int) -> torch.Tensor:
    """(B, L) → (B, bucket(L)), right-padded with ``value``."""
    return F.pad(x, (0, bucket_length(x.shape[1], buckets) - x.shape[1]), value=value)


def _bucket_llm_inputs(inputs: dict, buckets: Sequence[int], pad_id: int) -> dict:
    """LLM training inputs (``blip2lib.llm``) padded: ids → pad, masks → 0, labels → -100 (each side its bucket)."""
    out = dict(inputs)
    out["input_ids"] = pad_to_bucket(inputs["input_ids"], buckets, pad_id)  # (B, Te)
    out["attention_mask"] = pad_to_bucket(inputs["attention_mask"], buckets, 0)
    out["labels"] = pad_to_bucket(inputs["labels"], buckets, IGNORE_INDEX)  # OPT: Te; T5: Td (decoder side)
    if "decoder_attention_mask" in inputs:  # T5: decoder targets bucketed on their own length
        out["decoder_attention_mask"] = pad_to_bucket(inputs["decoder_attention_mask"], buckets, 0)
    return out


def bucket_task_text(task, buckets: Sequence[int], max_txt_len: int):
    """Pad a task's tokenized captions to length buckets, in place; returns ``task``.

    Stage 1 / retrieval FT (``task.tokenize``: Q-Former ids and mask) and the generative stages
    (``task.llm_inputs``: LLM ids, mask, labels) are wrapped: the original runs, then its tensors are right-padded.
    Under ``text_padding: longest`` with several ranks the tasks already agree on one global length, so every
    rank picks the same bucket.
    """
    buckets = check_buckets(buckets, max_txt_len)
    if hasattr(task, "tokenize"):
        tokenize, pad_id = task.tokenize, task.tokenizer.pad_token_id

        @functools.wraps(tokenize)
        def bucketed_tokenize(*args, **kwargs):
            ids, mask = tokenize(*args, **kwargs)  # (B, L)
            return pad_to_bucket(ids, buckets, pad_id), pad_to_bucket(mask, buckets, 0)  # (B, bucket(L))

        task.tokenize = bucketed_tokenize
    elif hasattr(task, "llm_inputs"):
        llm_inputs, pad_id = task.llm_inputs, task.model.tokenizer.pad_token_id

        @functools.wraps(llm_inputs)
        def bucketed_llm_inputs(*args, **kwargs):
            return _bucket_llm_inputs(llm_inputs(*args, **kwargs), buckets, pad_id)

        task.llm_inputs = bucketed_llm_inputs
    else:
        raise TypeError(f"text_len_buckets: {type(task).__name__} tokenizes no captions")
    return task
