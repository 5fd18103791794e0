"""VQA evaluation that does each piece of work once: one soft prompt per image, length-sorted question batches.

The stage-2 Q-Former of a zero-shot model never sees the question (docs/paper_map.md §1.5): the soft prompt is a
function of the image alone. VQAv2 val asks 214,354 questions about 40,504 images (5.3 per image), so running the
ViT and the Q-Former once per *question*, as the per-question path does, repeats that work 5.3 times (and reads
and decodes every JPEG 5.3 times). :class:`GroupedVQA` instead, for one rank's questions not yet in the cache:

1. groups the questions by image (the annotation's ``image`` path, first-appearance order);
2. reads and transforms each image ONCE, in DataLoader workers ahead of the model (the questions' text is
   processed there too), ``batch_size`` images per loaded chunk;
3. computes the chunk's soft prompts in one call, (B_img, Q, D_llm), and gives each question the row of its image;
4. keeps the questions in a pool sorted by tokenised prompt length and sends full batches of ``batch_size``
   questions of similar length to ``generate`` with the repeated prefix (less padding, fewer wasted positions);
   what is left waits for the next chunk, the tail goes last.

Answers are the per-question path's (the same prefix rows, prompts and decoding; tested at tiny size in fp32), and
records go to the same resumable cache as that path (``drivers_common``): one line per question, keyed by the
dataset index with the question id, written after every ``generate`` call. An unreadable image makes every one of
its questions a ``bad`` record with the reader's reason, as it would one by one.

:func:`auto_batch_size` picks ``batch_size`` from free accelerator memory (``batch_size="auto"``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from blip2lib.data.collate import collate_samples

__all__ = [
    "PIPELINES",
    "CPU_BATCH_SIZE",
    "GroupedVQA",
    "group_by_image",
    "supports_grouping",
    "auto_batch_size",
    "plan_generation",
    "plan_vqa_pipeline",
]

CPU_BATCH_SIZE = 16  # batch_size="auto" without CUDA: the CLI's default (a CPU run is bound by compute, not memory)
AUTO_MEMORY_FRACTION = 0.5  # share of the free memory the estimate may fill (allocator slack, fragmentation, ViT)
AUTO_MAX_BATCH = 256
_ANN_KEYS = ("image", "question", "question_id")


def supports_grouping(model: Any, dataset: Dataset) -> str | None:
    """Why ``model`` / ``dataset`` cannot take the grouped path, or None when they can.

    The model must have ``soft_prompt`` and no question input to its Q-Former (the VQA fine-tuned variant feeds the
    question through it, so its soft prompt is per question); the dataset must name each question's image, text
    and id in ``annotation`` (``VQAEvalDataset``, ``GQAEvalDataset``) and have a ``text_processor``.
    """
    if not callable(getattr(model, "soft_prompt", None)):
        return f"{type(model).__name__} has no soft_prompt"
    if getattr(model, "embeddings", None) is not None:
        return "the question enters this model's Q-Former (VQA fine-tuned variant): one soft prompt per question"
    ann = getattr(dataset, "annotation", None)
    if ann is None or not hasattr(dataset, "text_processor"):
        return f"{type(dataset).__name__} has no annotation list / text_processor"
    if len(ann) and not all(k in ann[0] for k in _ANN_KEYS):
        return f"{type(dataset).__name__} entries lack one of {list(_ANN_KEYS)}"
    return None


def group_by_image(dataset: Dataset, indices: Sequence[int]) -> list[list[int]]:
    """``indices`` grouped by their annotation's ``image`` path: groups in first-appearance order, members as given."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(dataset.annotation[i]["image"], []).append(i)
    return list(groups.values())


class _ImageGroups(Dataset):
    """Item ``g``: ``(indices, image or None, question texts, question ids)`` of the ``g``-th image group.

    The image is read once through the dataset (``dataset[first index]``: same reader, transform, cache and bad-sample
    log as the per-question path); the texts go through the dataset's own ``text_processor``.
    """

    def __init__(self, dataset: Dataset, groups: list[list[int]]):
        self.dataset, self.groups = dataset, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> tuple[list[int], Any, list[str], list[Any]]:
        idx = self.groups[g]
        sample = self.dataset[idx[0]]  # (3, S, S) image, or None when unreadable
        if sample is None:
            return idx, None, [], []
        ann, proc = self.dataset.annotation, self.dataset.text_processor
        return idx, sample["image"], [proc(ann[i]["question"]) for i in idx], [ann[i]["question_id"] for i in idx]


class _GroupCollate:
    """Picklable collate: stacked images of the readable groups, plus the groups' questions and the unreadable ones."""

    def __init__(self, bad_log: Any = None):
        self.bad_log = bad_log

    def __call__(self, items: list[tuple]) -> dict:
        batch = collate_samples([None if img is None else {"image": img} for _, img, _, _ in items], self.bad_log)
        batch["groups"] = [(idx, texts, ids) for idx, img, texts, ids in items if img is not None]
        batch["bad_groups"] = [idx for idx, img, _, _ in items if img is None]
        return batch


class GroupedVQA:
    """The grouped generation loop; ``drivers_common.generation_pass`` calls it with the questions to generate.

    Args:
        model: a ``Blip2`` (``soft_prompt``, ``generate(..., prefix_embeds=...)``, ``tokenizer``).
        dataset: a dataset accepted by :func:`supports_grouping`.
        batch_size: questions per ``generate`` call, and images per soft-prompt call.
        prompt_fn: the dataset's question text -> the LLM prompt.
        gen_kwargs: keyword arguments for ``generate`` (decoding, ``engine``).
        num_workers: DataLoader workers that read and transform the images.

    Attributes:
        timing: after a run, ``images`` / ``questions`` done and the seconds spent in the soft prompt (``vision_s``)
            and in ``generate`` (``generate_s``); on CUDA the device is synchronised around the soft prompt.
    """

    def __init__(self, model: Any, dataset: Dataset, batch_size: int, prompt_fn: Callable[[str], str],
                 gen_kwargs: dict[str, Any], num_workers: int = 0):  # fmt: skip
        reason = supports_grouping(model, dataset)
        if reason is not None:
            raise ValueError(f"the grouped VQA pipeline does not apply: {reason}")
        self.model, self.dataset, self.batch_size = model, dataset, batch_size
        self.prompt_fn, self.gen_kwargs, self.num_workers = prompt_fn, gen_kwargs, num_workers
        self.timing: dict[str, float] = {"images": 0, "questions": 0, "vision_s": 0.0, "generate_s": 0.0}

    def _prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt (the sort key); the LLM tokenizer's count, capped at ``max_prompt_len`` when set."""
        lens = [len(ids) for ids in self.model.tokenizer(prompts).input_ids]
        cap = self.gen_kwargs.get("max_prompt_len")
        return [min(n, cap) for n in lens] if cap else lens

    def _generate(self, items: list[tuple], write: Callable[[list[dict]], None]) -> None:
        """One ``generate`` call over pool items ``(length, index, prefix row (Q, D), prompt, id)``."""
        t0 = time.perf_counter()
        prefix = torch.stack([it[2] for it in items])  # (B, Q, D_llm): each question's image row, repeated
        texts = self.model.generate(None, [it[3] for it in items], prefix_embeds=prefix, **self.gen_kwargs)
        self.timing["generate_s"] += time.perf_counter() - t0
        self.timing["questions"] += len(items)
        write([{"index": it[1], "id": it[4], "text": t} for it, t in zip(items, texts)])

    def __call__(self, todo: Sequence[int], write: Callable[[list[dict]], None], device: torch.device) -> None:
        """Generate every question of ``todo`` (dataset indices), handing each batch's records to ``write``."""
        bad_log = getattr(self.dataset, "bad_log", None)
        loader = DataLoader(_ImageGroups(self.dataset, group_by_image(self.dataset, todo)), batch_size=self.batch_size,
                            shuffle=False, num_workers=self.num_workers, collate_fn=_GroupCollate(bad_log),
                            pin_memory=device.type == "cuda")  # fmt: skip
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
        pool: list[tuple] = []  # (prompt length, dataset index, prefix row, prompt, question id)
        for batch in loader:
            if bad_log is not None:
                bad_log.absorb(batch)
            reasons = [f"{p}: {r}" for p, r in batch["bad_samples"]]
            bad = [{"index": i, "bad": reasons[j] if j < len(reasons) else "sample was None"}
                   for j, idx in enumerate(batch["bad_groups"]) for i in idx]  # fmt: skip
            if bad:
                write(bad)
            if not batch["batch_size"]:
                continue
            t0 = time.perf_counter()
            prefix = self.model.soft_prompt(batch["image"].to(device, non_blocking=True))  # (B_img, Q, D_llm)
            sync(device)
            self.timing["vision_s"] += time.perf_counter() - t0
            self.timing["images"] += batch["batch_size"]
            for r, (idx, texts, ids) in enumerate(batch["groups"]):
                prompts = [self.prompt_fn(t) for t in texts]
                pool += [
                    (n, i, prefix[r], p, q) for n, i, p, q in zip(self._prompt_lengths(prompts), idx, prompts, ids)
                ]
            pool.sort(key=lambda it: (it[0], it[1]))  # similar lengths together; ties in dataset order
            while len(pool) >= self.batch_size:
                self._generate(pool[: self.batch_size], write)
                pool = pool[self.batch_size :]
        if pool:
            self._generate(pool, write)


def _llm_shape(cfg: Any) -> dict[str, int]:
    """Layers holding a KV cache, K/V width, hidden size and vocabulary of a transformers OPT or T5 config."""
    if getattr(cfg, "is_encoder_decoder", False):  # T5: decoder self- and cross-attention caches
        layers = 2 * (getattr(cfg, "num_decoder_layers", None) or cfg.num_layers)
        return {"kv_layers": layers, "kv_width": cfg.num_heads * cfg.d_kv, "hidden": cfg.d_model,
                "vocab": cfg.vocab_size}  # fmt: skip
    return {"kv_layers": cfg.num_hidden_layers, "kv_width": cfg.hidden_size, "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size}  # fmt: skip


def auto_batch_size(
    model: Any,
    num_beams: int,
    max_new_tokens: int,
    prompt_len: int = 32,
    free_bytes: int | None = None,
    device: torch.device | None = None,
) -> tuple[int, dict[str, Any]]:
    """Questions (or images) per ``generate`` call for ``batch_size="auto"``, and how the number was reached.

    Without CUDA (and without ``free_bytes``) it is :data:`CPU_BATCH_SIZE`. Otherwise one question is charged

    * its beams' KV cache: ``beams × kv_layers × 2 (K and V) × kv_width × seq × elem`` with
      ``seq = Q + prompt_len + max_new_tokens`` positions and ``elem`` the LLM weights' bytes per element;
    * its beams' logits: ``beams × vocab × 4 bytes × 4`` (fp32 logits, log-softmax, scores, top-k buffer);
    * its beams' prefill activations: ``beams × seq × hidden × elem × 16`` (≈ 16 hidden-size vectors per
      position: attention, the 4× FFN, residuals);

    and the batch is ``floor(AUTO_MEMORY_FRACTION × free / per question)``, rounded down to a multiple of 8 when
    at least 8, within ``[1, AUTO_MAX_BATCH]``. ``free_bytes`` defaults to ``torch.cuda.mem_get_info`` of the
    model's device after the weights are placed.
    """
    device = device or next(model.parameters()).device
    if free_bytes is None:
        if device.type != "cuda":
            return CPU_BATCH_SIZE, {"rule": f"no CUDA device: the CPU default {CPU_BATCH_SIZE}"}
        free_bytes = torch.cuda.mem_get_info(device)[0]
    lm = model.language_model
    shape = _llm_shape(lm.config)
    elem = next(lm.parameters()).element_size()
    seq = model.config.qformer.num_query_tokens + prompt_len + max_new_tokens
    kv = num_beams * shape["kv_layers"] * 2 * shape["kv_width"] * seq * elem
    logits = num_beams * shape["vocab"] * 4 * 4
    acts = num_beams * seq * shape["hidden"] * elem * 16
    per_q = kv + logits + acts
    n = math.floor(AUTO_MEMORY_FRACTION * free_bytes / per_q)
    n = max(1, min(AUTO_MAX_BATCH, n // 8 * 8 if n >= 8 else n))
    return n, {"rule": f"floor({AUTO_MEMORY_FRACTION} x free / bytes per question), multiple of 8, in [1, "
               f"{AUTO_MAX_BATCH}]", "free_bytes": int(free_bytes), "bytes_per_question": per_q,
               "kv_cache": kv, "logits": logits, "activations": acts, "positions": seq}  # fmt: skip


PIPELINES = ("auto", "grouped", "per_question")


def plan_generation(
    model: Any,
    batch_size: int | str,
    gen_kwargs: dict[str, Any],
    engine: str | None = None,
    prompt_len: int = 32,
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(batch_size, call kwargs, config)`` of a generation pass: resolves ``"auto"`` and adds the engine.

    ``"auto"`` charges ``prompt_len`` prompt tokens per item: 32 is LAVIS's OPT question truncation, and more than a
    caption prompt takes (the estimate errs on the side of memory).

    ``engine`` None leaves ``generate``'s own default (nothing is passed); the engine never changes an answer, so it
    is recorded in the result (``config``) but is not part of the prediction cache's key, like ``batch_size``.
    """
    config: dict[str, Any] = {"decode_engine": engine or "default"}
    if batch_size == "auto":
        batch_size, config["batch_size_auto"] = auto_batch_size(
            model, gen_kwargs.get("num_beams", 1), gen_kwargs.get("max_new_tokens", 30), prompt_len
        )
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    config["batch_size"] = batch_size
    return batch_size, {**gen_kwargs, **({"engine": engine} if engine else {})}, config


def plan_vqa_pipeline(model: Any, dataset: Dataset, pipeline: str) -> str:
    """The pipeline a VQA run takes: ``"auto"`` -> ``"grouped"`` where :func:`supports_grouping`, else per question.

    Raises:
        ValueError: unknown ``pipeline``, or ``"grouped"`` asked where it does not apply (the reason is named).
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    reason = supports_grouping(model, dataset)
    if pipeline == "grouped" and reason is not None:
        raise ValueError(f"pipeline='grouped' does not apply: {reason}")
    if pipeline == "auto":
        return "per_question" if reason is not None else "grouped"
    return pipeline
