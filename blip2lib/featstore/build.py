"""Building a feature store: each distinct training image through the frozen tower once, shard by shard, resumable.

A build is interrupted safely at any point: a shard appears on disk only whole (written to ``*.tmp``, then renamed),
so running the same command again keeps every finished shard, discards a half-written one (logged) and continues
with the images no shard holds. A folder holding another tower's store, or files that are not a store, is refused
rather than written over.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .store import (
    FORMAT,
    SHARD_GLOB,
    STORE_JSON,
    FeatureStore,
    FeatureStoreError,
    check_params,
    pixel_checksum,
    refuse_random_transform,
    run_identity,
    store_keys,
    write_shard,
)

log = logging.getLogger(__name__)


def _write_meta(out: Path, meta: dict) -> None:
    tmp = out / (STORE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / STORE_JSON)


def _open_folder(out: Path, identity: dict, shard_size: int) -> dict:
    """The store's ``store.json`` (new, or the one an earlier build of the same tower wrote)."""
    meta_path = out / STORE_JSON
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        diff = [k for k in identity if meta.get("identity", {}).get(k) != identity[k]]
        if diff:
            raise FeatureStoreError(
                f"{out}: holds a store of another tower or transform (differs in {', '.join(diff)}); choose another "
                "--out folder, or delete that store to rebuild it"
            )
        return meta
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty and holds no {STORE_JSON}; choose an empty or new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "identity": identity, "shard_size": shard_size, "complete": False}
    _write_meta(out, meta)
    return meta


def write_features(
    out: str | Path,
    identity: dict,
    items: Sequence[tuple[Hashable, int]],
    load: Callable[[list[int]], Iterable[torch.Tensor | None]],
    compute: Callable[[torch.Tensor], torch.Tensor],
    shard_size: int = 1024,
    batch_size: int = 64,
) -> dict:
    """Write (or continue writing) the features of ``items`` into the store folder ``out``.

    Args:
        out: the store folder (created; an earlier build of the same identity is continued).
        identity: :func:`blip2lib.featstore.run_identity` of the tower that ``compute`` runs.
        items: ``(key, sample index)`` per distinct image.
        load: sample indices → their transformed pixels (3, S, S) in that order, ``None`` for an unreadable image
            (an iterator, so DataLoader workers can decode ahead of the tower).
        compute: pixels (b, 3, S, S) → tower output (b, N, Dv).
        shard_size: images per shard.
        batch_size: images per tower pass.

    Returns:
        ``{"images", "bad", "shards", "written", "seconds"}`` for this call.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")
    out = Path(out)
    meta = _open_folder(out, identity, shard_size)
    for tmp in sorted(out.glob("*.safetensors.tmp")):
        log.warning("featstore: removing %s, a shard an interrupted build left half-written", tmp.name)
        tmp.unlink()
    done = FeatureStore(out, require_complete=False)
    todo = [(k, i) for k, i in items if k not in done]
    next_id = 1 + max((int(p.stem.split("-")[1]) for p in out.glob(SHARD_GLOB)), default=-1)
    if done and todo:
        log.info("featstore: continuing %s: %d images stored, %d to go", out, len(done) + len(done.bad), len(todo))
    t0, written, n_bad = time.perf_counter(), 0, 0
    stream = iter(load([index for _, index in todo]))  # pixels in todo order
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        keys, sums, bad, parts = [], [], [], []
        for b in range(0, len(chunk), batch_size):
            pixels = []
            for key, _ in chunk[b : b + batch_size]:
                px = next(stream)
                if px is None:  # unreadable: recorded, so the run drops the sample as a live loader would
                    bad.append(key)
                    continue
                keys.append(key)
                sums.append(pixel_checksum(px))
                pixels.append(px)
            if pixels:
                parts.append(compute(torch.stack(pixels)).cpu())  # (b, N, Dv) in the tower's output dtype
        feats = torch.cat(parts) if parts else torch.zeros(0)
        write_shard(out / f"shard-{next_id:05d}.safetensors", feats, keys, sums, bad)
        next_id, written, n_bad = next_id + 1, written + len(chunk), n_bad + len(bad)
        rate = written / max(time.perf_counter() - t0, 1e-9)
        log.info("featstore: shard %d written: %d/%d images this run (%.1f images/s, %.0f s to go)", next_id - 1,
                 written, len(todo), rate, (len(todo) - written) / rate)  # fmt: skip
    final = FeatureStore(out, require_complete=False)
    meta.update(complete=True, images=len(final), bad=len(final.bad), shards=len(final.shards))
    _write_meta(out, meta)
    seconds = time.perf_counter() - t0
    log.info("featstore: %s complete: %d images (%d unreadable) in %d shards", out, len(final), len(final.bad),
             len(final.shards))  # fmt: skip
    return {"images": len(final), "bad": len(final.bad), "shards": len(final.shards), "written": written,
            "seconds": seconds}  # fmt: skip


class _Pixels(torch.utils.data.Dataset):
    """The transformed pixels of ``dataset``'s samples ``indices`` (``None`` for an unreadable image)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> torch.Tensor | None:
        sample = self.dataset[self.indices[j]]
        return None if sample is None else sample["image"]


def build_store(params, out: str | Path, shard_size: int = 1024, batch_size: int = 64,
                device: torch.device | str | None = None) -> dict:  # fmt: skip
    """Build (or continue) the feature store of ``params``' training images with the tower ``params`` describe.

    The tower is made exactly as :func:`blip2lib.train.train` makes it (same seed, so a random ``tiny`` tower is the
    same tower) but alone, without Q-Former or LLM; images come from the run's training dataset with its (fixed)
    transform and run through the tower under the run's autocast, so the stored rows equal what the run computes.
    """
    from ..assemble import _train_dataset, _transforms, build_frozen_tower
    from ..data import BadSampleLog
    from ..vision import vision_features

    check_params(params, "featstore build")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(params.seed)  # as train() seeds before it builds the model (a random tiny tower is the same tower)
    torch.manual_seed(params.seed)
    np.random.seed(params.seed)
    tower, vision, comps = build_frozen_tower(params, device)
    transform = _transforms(params)[0]
    refuse_random_transform(transform, "featstore build")
    identity = run_identity(tower, vision.precision, params.image_size, params.amp, transform, device)
    dataset = _train_dataset(params, comps, BadSampleLog())
    items = store_keys(dataset)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(params.amp) if device.type == "cuda" else None
    dtype = next(tower.parameters()).dtype  # Blip2Base.vision_dtype

    def load(indices: list[int]) -> Iterable[torch.Tensor | None]:
        pixels = _Pixels(dataset, indices)
        if params.num_workers == 0:
            return (pixels[j] for j in range(len(pixels)))
        # workers decode and transform ahead of the tower; batch_size=None keeps single items (and None) in order
        return torch.utils.data.DataLoader(pixels, batch_size=None, num_workers=params.num_workers)

    def compute(pixels: torch.Tensor) -> torch.Tensor:  # what Blip2Base.encode_vision runs inside the engine
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return vision_features(tower, pixels.to(device).to(dtype))

    log.info("featstore: %d distinct images of %s → %s", len(items), params.train_data, out)
    return write_features(out, identity, items, load, compute, shard_size=shard_size, batch_size=batch_size)
