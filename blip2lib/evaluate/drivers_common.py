"""Shared machinery of the evaluation drivers (``drivers.py``): sharding, resumable prediction cache, batched loop.

Resumable evaluation (user need 33): every rank appends one JSON line per item to
``<out_dir>/predictions.<rank>.jsonl`` after each batch (flushed and fsynced), keyed by the **dataset index**:

* ``{"meta": {...}}`` — first line: task, split, dataset length, decoding. A restart with a different recipe or
  dataset raises :class:`CacheMismatchError` instead of silently mixing predictions of two recipes (user need 7/8).
* ``{"index": i, "id": <question/image id>, "text": <answer/caption>, ...}`` — one generated item.
* ``{"index": i, "bad": "<path>: <reason>"}`` — an unreadable image (the dataset returned ``None``): never retried.

On restart every rank reads *all* ``predictions.*.jsonl`` files (so a changed world size still resumes), skips the
indices already present and generates only the rest. A truncated last line (killed mid-write) is ignored.
Sharding: rank ``r`` of ``W`` owns the contiguous slice ``[r*N//W, (r+1)*N//W)``; results are merged with
``dist.all_gather_object`` and rank 0 scores and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from blip2lib import dist
from blip2lib.data.collate import collate_samples

__all__ = [
    "CacheMismatchError",
    "shard_range",
    "IndexedSubset",
    "IndexedCollate",
    "environment_info",
    "model_device",
    "load_cache",
    "generation_pass",
    "gather_records",
    "write_json",
]

logger = logging.getLogger(__name__)

_CACHE_GLOB = "predictions.*.jsonl"
_LIBRARIES = ("torch", "transformers", "timm", "tokenizers", "pycocoevalcap", "blip2lib")


class CacheMismatchError(RuntimeError):
    """``out_dir`` holds cached predictions of a different task, split, dataset or decoding recipe."""


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous slice of ``range(n)`` owned by ``rank`` (sizes differ by at most one)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


class IndexedSubset(Dataset):
    """``dataset`` restricted to ``indices``; items are ``(index, sample-or-None)`` so bad samples keep their index."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, Any]:
        i = self.indices[j]
        return i, self.dataset[i]


class IndexedCollate:
    """Picklable collate for :class:`IndexedSubset`: ``collate_samples`` plus ``index`` / ``bad_index`` lists."""

    def __init__(self, bad_log: Any = None):
        self.bad_log = bad_log

    def __call__(self, items: list[tuple[int, Any]]) -> dict:
        """Collate kept samples; ``index`` = their dataset indices, ``bad_index`` = indices of ``None`` samples."""
        batch = collate_samples([s for _, s in items], self.bad_log)
        batch["index"] = [i for i, s in items if s is not None]
        batch["bad_index"] = [i for i, s in items if s is None]
        return batch


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-less module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def environment_info(model: torch.nn.Module, autocast: str | None = None) -> dict[str, Any]:
    """Library versions, device and per-module precision, for result JSONs (user need 8)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # the build tag (+cu130 / +cpu) matters for reproducibility
    versions["cuda"] = torch.version.cuda
    device = model_device(model)
    precision: dict[str, Any] = {"autocast": autocast or "off"}
    for name in ("vision_model", "qformer", "language_model"):
        sub = getattr(model, name, None)
        p = next(sub.parameters(), None) if isinstance(sub, torch.nn.Module) else None
        if p is not None:
            precision[name] = str(p.dtype).replace("torch.", "")
    info = {"versions": versions, "device": str(device), "precision": precision, "world_size": dist.get_world_size()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def load_cache(out_dir: Path, meta: dict) -> dict[int, dict]:
    """Read every rank's cache file in ``out_dir``: dataset index -> record (generated or bad).

    Raises:
        CacheMismatchError: a cache file was written for a different ``meta`` (task/split/dataset/decoding).
    """
    meta = _normalise(meta)
    records: dict[int, dict] = {}
    for path in sorted(out_dir.glob(_CACHE_GLOB)):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write: regenerate that item
                    logger.warning("%s:%d: ignoring an unreadable (truncated) cache line", path, lineno)
                    continue
                if "meta" in row:
                    if row["meta"] != meta:
                        raise CacheMismatchError(
                            f"{path} holds predictions for {row['meta']}, not for {meta}; use a fresh out_dir or "
                            "delete the predictions.*.jsonl files to start over"
                        )
                    continue
                records[int(row["index"])] = row
    return records


def _open_cache(path: Path, meta: dict):
    """Open this rank's cache for appending: meta line first in a new file, newline after a truncated tail."""
    fresh = not path.exists() or path.stat().st_size == 0
    if not fresh:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the caller's context manager)
    if fresh:
        f.write(json.dumps({"meta": _normalise(meta)}) + "\n")
    elif needs_newline:
        f.write("\n")
    return f


def generation_pass(
    model: torch.nn.Module,
    dataset: Dataset,
    out_dir: Path,
    meta: dict,
    batch_size: int,
    prompts_fn: Callable[[dict], list[str]],
    record_fn: Callable[[dict, int], dict],
    gen_kwargs: dict[str, Any],
    num_workers: int = 0,
    progress: bool = True,
    autocast: str | None = None,
) -> tuple[dict[int, dict], dict[str, Any]]:
    """Generate text for this rank's shard of ``dataset``, resuming from and appending to the cache.

    Args:
        model: a ``Blip2`` (``generate(pixel_values, prompts, **gen_kwargs) -> list[str]``).
        dataset: map-style dataset returning sample dicts with ``image`` (or ``None`` for an unreadable image).
        out_dir: cache folder (created).
        meta: recipe fingerprint stored as the cache's first line.
        batch_size: images per ``generate`` call.
        prompts_fn: batch -> one prompt per kept sample.
        record_fn: (batch, row) -> fields saved with the generated text (``id`` at least).
        gen_kwargs: decoding keyword arguments for ``generate``.
        num_workers: DataLoader workers.
        progress: tqdm bar with ETA on rank 0.
        autocast: ``"fp16"`` / ``"bf16"`` to run under ``torch.autocast``; None = model dtypes as placed.

    Returns:
        ``(records, stats)``: this shard's records (dataset index -> cache record) and counts/timing.
    """
    from tqdm.auto import tqdm

    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = load_cache(out_dir, meta)
    shard = shard_range(len(dataset), rank, world)
    records = {i: cached[i] for i in shard if i in cached}
    todo = [i for i in shard if i not in cached]
    logger.info("rank %d/%d: %d items, %d cached, %d to generate", rank, world, len(shard), len(records), len(todo))
    device = model_device(model)
    bad_log = getattr(dataset, "bad_log", None)
    loader = DataLoader(IndexedSubset(dataset, todo), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=IndexedCollate(bad_log), pin_memory=device.type == "cuda")  # fmt: skip
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(autocast or "")
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    was_training, generated, start = model.training, 0, time.perf_counter()
    model.eval()
    bar = tqdm(total=len(todo), unit="item", desc=f"{meta.get('task', 'eval')} {meta.get('split', '')}".strip(),
               disable=not (progress and rank == 0))  # fmt: skip
    # no_grad rather than inference_mode: a model evaluated mid-training must not keep inference-mode buffers
    try:
        with _open_cache(out_dir / f"predictions.{rank}.jsonl", meta) as cache, torch.no_grad(), amp:
            for batch in loader:
                if bad_log is not None:
                    bad_log.absorb(batch)
                reasons = [f"{p}: {r}" for p, r in batch["bad_samples"]]
                rows = [{"index": i, "bad": reasons[j] if j < len(reasons) else "sample was None"}
                        for j, i in enumerate(batch["bad_index"])]  # fmt: skip
                if batch["batch_size"]:
                    pixels = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
                    extra = {}
                    if getattr(model, "embeddings", None) is not None and "text_input" in batch:
                        extra["questions"] = list(batch["text_input"])  # VQA-FT: the question enters the Q-Former
                    texts = model.generate(pixels, prompts_fn(batch), **gen_kwargs, **extra)  # strings only
                    rows += [
                        {"index": i, **record_fn(batch, j), "text": t}
                        for j, (i, t) in enumerate(zip(batch["index"], texts))
                    ]
                    generated += len(texts)
                cache.write("".join(json.dumps(r) + "\n" for r in rows))
                cache.flush()
                os.fsync(cache.fileno())
                records.update({r["index"]: r for r in rows})
                bar.update(len(batch["index"]) + len(batch["bad_index"]))
    finally:
        bar.close()
        model.train(was_training)
    wall = time.perf_counter() - start
    stats = {"generated_this_run": generated, "from_cache": len(shard) - len(todo), "wall_s": round(wall, 3),
             "items_per_s": round(generated / wall, 3) if wall > 0 else None}  # fmt: skip
    return records, stats


def gather_records(records: dict[int, dict], stats: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """Merge every rank's records (sorted by dataset index) and sum their stats; same result on every rank."""
    parts = dist.all_gather_object((records, stats))
    merged: dict[int, dict] = {}
    for recs, _ in parts:
        merged.update(recs)
    total = {
        "generated_this_run": sum(s["generated_this_run"] for _, s in parts),
        "from_cache": sum(s["from_cache"] for _, s in parts),
        "wall_s": max(s["wall_s"] for _, s in parts),
        "per_rank": [s for _, s in parts],
    }
    return [merged[i] for i in sorted(merged)], total


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path
