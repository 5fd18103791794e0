"""Shared machinery of the evaluation drivers (``drivers.py``): sharding, resumable prediction cache, batched loop.

Resumable evaluation (user need 33): every rank appends one JSON line per item to
``<out_dir>/predictions.<rank>.jsonl`` after each batch (flushed and fsynced), keyed by the **dataset index**:

* ``{"meta": {...}}`` — first line: the cache key, everything that changes an answer (:func:`cache_meta`): task,
  split, decoding recipe and ``generate`` arguments (prompt included), the weights (a sampled fingerprint of every
  parameter plus the caller's checkpoint identity: path and manifest sha256, or size and mtime of the weight
  files), the evaluated annotations (sha256 of the dataset's entries, plus the file's identity when the caller
  gives it), image folder and transform (image size), autocast and module dtypes, and :data:`DECODING_VERSION`.
  A restart whose key differs never reuses a prediction: the old cache and results are **moved aside** into
  ``<out_dir>/superseded-<UTC time>/`` (never deleted), a warning names the changed keys, everything is generated
  afresh, and ``result.json`` records the key and what was moved (``"cache"``).
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

from .integrity import data_identity, weights_fingerprint

__all__ = [
    "DECODING_VERSION",
    "CacheMismatchError",
    "cache_meta",
    "shard_range",
    "IndexedSubset",
    "IndexedCollate",
    "environment_info",
    "model_device",
    "load_cache",
    "generation_pass",
    "encode_images",
    "gather_records",
    "write_json",
]

logger = logging.getLogger(__name__)

_CACHE_GLOB = "predictions.*.jsonl"
_LIBRARIES = ("torch", "transformers", "timm", "tokenizers", "pycocoevalcap", "blip2lib")
# What a driver writes into out_dir besides the caches: moved aside with them when the cache key changes.
_OUTPUTS = ("result.json", "predictions.json", "per_question.json", "vqav2_submission.json", "captions.json")

# Bump when a change to the generation path (prompt building, question processing, Blip2.generate, beam search,
# length rules) can change an answer: caches written before are then superseded instead of reused.
DECODING_VERSION = 1


class CacheMismatchError(RuntimeError):
    """``out_dir`` holds cached predictions made under another cache key (model, data, decoding, ...).

    ``changed`` lists the differing keys of the cache key (dotted paths, e.g. ``identity.checkpoint.path``).
    """

    def __init__(self, message: str, changed: Sequence[str] = ()):
        super().__init__(message)
        self.changed = list(changed)


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
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def cache_meta(model: torch.nn.Module, dataset: Dataset, identity: dict | None, autocast: str | None,
               **task_meta: Any) -> dict[str, Any]:  # fmt: skip
    """The cache key: ``task_meta`` (task, split, decoding, ...) plus the model, data and precision identity.

    ``identity`` is what only the caller knows (the checkpoint path behind an in-memory model, the annotation
    file); it is recorded as given. The weights fingerprint and the data digest are computed here, so an in-memory
    model or dataset is keyed too.
    """
    vision = getattr(getattr(model, "config", None), "vision", None)
    precision = environment_info(model, autocast)["precision"]
    return _normalise({**task_meta, "identity": identity or {}, "weights_sha256_sampled": weights_fingerprint(model),
                       "data": data_identity(dataset), "image_size": getattr(vision, "image_size", None),
                       "precision": precision, "decoding_version": DECODING_VERSION})  # fmt: skip


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


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
                        changed = _changed_keys(row["meta"], meta)
                        raise CacheMismatchError(
                            f"{path} holds predictions made under another cache key (changed: "
                            f"{', '.join(changed[:12])}{' ...' if len(changed) > 12 else ''}); use a fresh out_dir "
                            "or move the predictions.*.jsonl files away to start over",
                            changed,
                        )
                    continue
                records[int(row["index"])] = row
    return records


def _supersede(out_dir: Path) -> Path:
    """Move every cache file and driver output of ``out_dir`` into a new ``superseded-<UTC time>`` folder."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = out_dir / f"superseded-{stamp}", 1
    while dest.exists():
        dest, n = out_dir / f"superseded-{stamp}-{n}", n + 1
    dest.mkdir()
    for f in [*sorted(out_dir.glob(_CACHE_GLOB)), *(out_dir / name for name in _OUTPUTS)]:
        if f.is_file():
            os.replace(f, dest / f.name)
    return dest


def prepare_cache(out_dir: Path, meta: dict) -> tuple[dict[int, dict], dict[str, Any]]:
    """:func:`load_cache`, but a cache made under another key is moved aside (every rank calls this together).

    Returns:
        ``(records, info)``: the reusable records and ``{"superseded": None | {"moved_to", "changed"}}``.
    """
    try:
        load_cache(out_dir, meta)
        changed = None
    except CacheMismatchError as err:
        changed = err.changed
    dist.barrier()  # every rank has read the old files before rank 0 moves them
    moved = None
    if changed is not None and dist.is_main():
        dest = _supersede(out_dir)
        logger.warning("%s: cached predictions were made under another cache key (changed: %s); moved them and the "
                       "old results to %s and generating afresh", out_dir, ", ".join(changed[:12]), dest)  # fmt: skip
        moved = {"moved_to": str(dest), "changed": changed}
    moved = dist.broadcast_object(moved)  # also waits for the move
    return load_cache(out_dir, meta), {"superseded": moved}


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
    runner: Callable[[list[int], Callable[[list[dict]], None], torch.device], None] | None = None,
) -> tuple[dict[int, dict], dict[str, Any]]:
    """Generate text for this rank's shard of ``dataset``, resuming from and appending to the cache.

    Args:
        model: a ``Blip2`` (``generate(pixel_values, prompts, **gen_kwargs) -> list[str]``).
        dataset: map-style dataset returning sample dicts with ``image`` (or ``None`` for an unreadable image).
        out_dir: cache folder (created).
        meta: the cache key (:func:`cache_meta`), stored as the cache's first line.
        batch_size: images per ``generate`` call.
        prompts_fn: batch -> one prompt per kept sample.
        record_fn: (batch, row) -> fields saved with the generated text (``id`` at least).
        gen_kwargs: keyword arguments for ``generate`` (decoding, and ``engine`` when chosen).
        num_workers: DataLoader workers.
        progress: tqdm bar with ETA on rank 0.
        autocast: ``"fp16"`` / ``"bf16"`` to run under ``torch.autocast``; None = model dtypes as placed.
        runner: None -> the items in dataset order, ``batch_size`` per ``generate`` call; else
            ``runner(todo, write, device)`` generates the dataset indices ``todo`` its own way (the grouped VQA
            pipeline, ``pipeline.GroupedVQA``) and hands every batch of cache records to ``write``
            (``prompts_fn`` / ``record_fn`` are then unused).

    Returns:
        ``(records, stats)``: this shard's records (dataset index -> cache record) and counts/timing, with
        ``superseded`` (None, or where an old cache under another key was moved and which keys changed).
    """
    from tqdm.auto import tqdm

    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    cached, cache_info = prepare_cache(out_dir, meta)
    shard = shard_range(len(dataset), rank, world)
    records = {i: cached[i] for i in shard if i in cached}
    todo = [i for i in shard if i not in cached]
    logger.info("rank %d/%d: %d items, %d cached, %d to generate", rank, world, len(shard), len(records), len(todo))
    device = model_device(model)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(autocast or "")
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    was_training, counts, start = model.training, {"generated": 0}, time.perf_counter()
    model.eval()
    bar = tqdm(total=len(todo), unit="item", desc=f"{meta.get('task', 'eval')} {meta.get('split', '')}".strip(),
               disable=not (progress and rank == 0))  # fmt: skip
    # no_grad rather than inference_mode: a model evaluated mid-training must not keep inference-mode buffers
    try:
        with _open_cache(out_dir / f"predictions.{rank}.jsonl", meta) as cache, torch.no_grad(), amp:

            def write(rows: list[dict]) -> None:  # one flushed, fsynced append per batch: a kill loses <= a batch
                cache.write("".join(json.dumps(r) + "\n" for r in rows))
                cache.flush()
                os.fsync(cache.fileno())
                records.update({r["index"]: r for r in rows})
                counts["generated"] += sum("bad" not in r for r in rows)
                bar.update(len(rows))

            if runner is not None:
                runner(todo, write, device)
            else:
                _per_item(model, dataset, todo, write, device, batch_size, prompts_fn, record_fn, gen_kwargs,
                          num_workers)  # fmt: skip
    finally:
        bar.close()
        model.train(was_training)
    wall, generated = time.perf_counter() - start, counts["generated"]
    stats = {"generated_this_run": generated, "from_cache": len(shard) - len(todo), "wall_s": round(wall, 3),
             "items_per_s": round(generated / wall, 3) if wall > 0 else None, **cache_info}  # fmt: skip
    return records, stats


def _per_item(
    model: torch.nn.Module,
    dataset: Dataset,
    todo: list[int],
    write: Callable[[list[dict]], None],
    device: torch.device,
    batch_size: int,
    prompts_fn: Callable[[dict], list[str]],
    record_fn: Callable[[dict, int], dict],
    gen_kwargs: dict[str, Any],
    num_workers: int,
) -> None:
    """The item-by-item loop: ``batch_size`` dataset items per ``generate`` call, in dataset order."""
    bad_log = getattr(dataset, "bad_log", None)
    loader = DataLoader(IndexedSubset(dataset, todo), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=IndexedCollate(bad_log), pin_memory=device.type == "cuda")  # fmt: skip
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
                {"index": i, **record_fn(batch, j), "text": t} for j, (i, t) in enumerate(zip(batch["index"], texts))
            ]
        write(rows)


@torch.no_grad()
def encode_images(model, dataset: Dataset, batch_size: int, num_workers: int, progress: bool):
    """All images -> (kept indices, image_embeds (N, P, Dv) CPU, image_feats (N, Q, E) CPU, bad rows)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    loader = DataLoader(IndexedSubset(dataset, range(len(dataset))), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=IndexedCollate(getattr(dataset, "bad_log", None)))  # fmt: skip
    kept, embeds, feats, bad = [], [], [], []
    for batch in tqdm(loader, desc="images", disable=not (progress and dist.is_main())):
        reasons = [f"{p}: {r}" for p, r in batch["bad_samples"]]
        bad += [{"index": i, "bad": reasons[j] if j < len(reasons) else "sample was None"}
                for j, i in enumerate(batch["bad_index"])]  # fmt: skip
        if batch["batch_size"]:
            out = model.encode_image(batch["image"].to(device))
            kept += batch["index"]
            embeds.append(out["image_embeds"].cpu())  # (B, P, Dv): kept on CPU, moved per ITM batch
            feats.append(out["image_feats"].cpu())  # (B, Q, E)
    if not kept:
        raise RuntimeError(f"retrieval: none of the {len(dataset)} images could be read (first: {bad[:1]})")
    return kept, torch.cat(embeds), torch.cat(feats), bad


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
        "per_rank": [{k: v for k, v in s.items() if k != "superseded"} for _, s in parts],
        "superseded": parts[0][1].get("superseded"),  # the same on every rank (rank 0 moved, then broadcast)
    }
    return [merged[i] for i in sorted(merged)], total


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path
