"""Pre-training at scale: WebDataset tar shards of image + caption(s) (paper §3.4).

Shard format (what img2dataset writes; what ``write_shards`` writes): members grouped by key,
``<key>.jpg`` (or ``.jpeg``/``.png``/``.webp``) plus ``<key>.txt`` (one caption) and/or ``<key>.json`` with
``{"captions": [...]}`` (CapFilt-style several captions) or ``{"caption": "..."}``. With several captions one is
sampled per step (paper §3.4: "top-2 kept per image, one sampled at each step").

Two modes (``make_shard_dataset``):

* ``resampled=False`` — an epoch is one pass: shards are split by rank (``shard i`` → rank ``i % world``), then by
  DataLoader worker; every sample is seen exactly once when #shards is a multiple of world × workers (otherwise
  some workers simply get fewer shards — nothing is repeated or lost).
* ``resampled=True`` — infinite: each (rank, worker) draws shards with replacement from its own deterministic
  stream (seed, rank, worker); ``epoch_samples`` cuts it into epochs per worker. This is the mode for multi-node
  pre-training, where equal work per rank matters more than exact once-per-epoch coverage.

Unreadable images and unusable captions (``.json`` that is not a UTF-8 JSON object, ``.txt`` that is not UTF-8)
yield ``None`` (recorded in the ``BadSampleLog`` with ``<shard>:<key>`` and the reason); ``Collate`` drops and
counts them exactly as for map-style datasets. A shard whose tar data breaks off (truncated, corrupt header) yields
the samples read before the break, then one ``None`` recorded under the shard's path; reading goes on with the next
shard.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from torch.utils.data import get_worker_info

from .. import dist
from .images import BadSampleLog, to_rgb

if TYPE_CHECKING:
    import webdataset as wds

__all__ = ["make_shard_dataset", "write_shards", "IMAGE_EXTS"]

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _worker_seed(rank: int) -> int:
    # Distinct, reproducible stream per (rank, worker); webdataset mixes in the seed and the epoch.
    return rank * 1000 + _worker_id()


class _SplitByRank:
    """Pipeline stage: keep shard ``i`` on rank ``i % world_size`` (explicit rank, no env lookup)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for i, shard in enumerate(src):
            if i % self.world_size == self.rank:
                yield shard


class _TarErrors:
    """webdataset exception handler that turns a shard's broken tar data into one skipped, counted sample.

    A shard that stops being readable (a truncated tar, a corrupt header) is kept as a pending ``(shard, reason)``
    that :class:`_Decode` yields as ``None``; reading goes on with the next shard.
    """

    def __init__(self):
        self.pending: list[tuple[str, str]] = []
        self.member_error: tuple[str, str] | None = None

    def __call__(self, exn: Exception) -> bool:
        # webdataset calls this twice for one break: first for the member being read (no shard url in the args; the
        # file object's repr names it), then for the shard (url appended to the args) — one failure, counted once
        first = str(exn.args[0]) if exn.args else ""
        url = exn.args[-1] if len(exn.args) > 1 and isinstance(exn.args[-1], str) else None
        reason = f"unreadable tar data, rest of the shard skipped ({type(exn).__name__}: {first.split(' @ ')[0]})"
        if url is None:
            self.flush()
            named = re.search(r"name='([^']*)'", first.rpartition(" @ ")[2])
            self.member_error = (named.group(1) if named else "<shard>", reason)
        else:
            self.member_error = None
            self.pending.append((url, reason))
        return True

    def flush(self) -> None:
        """Move a member error that no shard error followed (the shard went on) to ``pending``."""
        if self.member_error is not None:
            self.pending.append(self.member_error)
            self.member_error = None


class _Decode:
    """Pipeline stage: raw tar members → ``{"image", "text_input"}`` or ``None`` (bad image / caption / tar data)."""

    def __init__(self, transform, text_processor, bad_log: BadSampleLog | None, seed: int, rank: int,
                 tar_errors: _TarErrors | None = None):  # fmt: skip
        self.transform, self.text_processor, self.bad_log = transform, text_processor, bad_log
        self.seed, self.rank, self.tar_errors = seed, rank, tar_errors

    @staticmethod
    def _captions(sample: dict) -> list[str]:
        """The sample's captions; :class:`ValueError` saying which member is unusable and why."""
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f".json member is not valid UTF-8 JSON ({err})") from None
            if not isinstance(meta, dict):
                raise ValueError(f".json member must be an object with 'captions' or 'caption', got a "
                                 f"{type(meta).__name__}")  # fmt: skip
            if isinstance(meta.get("captions"), list) and meta["captions"]:
                return [str(c) for c in meta["captions"]]
            if isinstance(meta.get("caption"), str):
                return [meta["caption"]]
        if "txt" in sample:
            try:
                return [sample["txt"].decode("utf-8")]
            except UnicodeDecodeError as err:
                raise ValueError(f".txt member is not UTF-8 (byte {err.start}: {err.reason})") from None
        return []

    def _bad(self, where: str, reason: str) -> None:
        if self.bad_log is not None:
            self.bad_log.record(where, reason)
        else:
            logger.warning("skipping shard sample %s (%s)", where, reason)

    def _tar_failures(self) -> Iterator[None]:
        """One skipped sample per shard that broke off since the last call (counted like a bad image)."""
        if self.tar_errors is not None:
            self.tar_errors.flush()
        while self.tar_errors is not None and self.tar_errors.pending:
            self._bad(*self.tar_errors.pending.pop(0))
            yield None

    def __call__(self, src: Iterable[dict]) -> Iterator[dict | None]:
        rng = random.Random(self.seed * 1_000_003 + _worker_seed(self.rank))  # caption choice, per worker
        for sample in src:
            yield from self._tar_failures()
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            try:
                captions = self._captions(sample)
            except ValueError as err:
                self._bad(where, str(err))
                yield None
                continue
            if ext is None or not captions:
                self._bad(where, "no image member" if ext is None else "no caption (.txt or .json)")
                yield None
                continue
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    image = to_rgb(img)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                self._bad(where, f"{type(err).__name__}: {err}")
                yield None
                continue
            text = captions[0] if len(captions) == 1 else rng.choice(captions)
            if self.transform is not None:
                image = self.transform(image)
            if self.text_processor is not None:
                text = self.text_processor(text)
            yield {"image": image, "text_input": text, "key": sample.get("__key__", "")}
        yield from self._tar_failures()


def make_shard_dataset(
    urls: str | list[str],
    transform=None,
    text_processor=None,
    *,
    resampled: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 0,
    epoch_samples: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    bad_log: BadSampleLog | None = None,
) -> wds.DataPipeline:
    """Build the WebDataset pipeline (an ``IterableDataset``; use with ``DataLoader(batch_size=..., collate_fn)``).

    Args:
        urls: shard paths/URLs, a list or brace notation (``"shards/{000000..000099}.tar"``).
        transform: image transform (``image_train_transform(224)`` for pre-training).
        text_processor: e.g. ``CaptionProcessor()``.
        resampled: infinite sampling with replacement (see module docstring).
        seed: seeds shard resampling, the shuffle buffer and the caption choice.
        shuffle_buffer: sample-level shuffle buffer size (0 = keep shard order).
        epoch_samples: samples per worker per epoch (required when ``resampled``).
        rank: this rank; default ``blip2lib.dist.get_rank()``.
        world_size: default ``blip2lib.dist.get_world_size()``.
        bad_log: shared :class:`BadSampleLog` (pass the same one to ``Collate``).

    Returns:
        Pipeline yielding ``{"image", "text_input", "key"}`` or ``None`` for a skipped sample.
    """
    import webdataset as wds  # optional dependency (extra "data"); imported only when shards are used

    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    urls = [str(u) for u in urls] if isinstance(urls, (list, tuple)) else str(urls)
    if resampled:
        if epoch_samples is None:
            raise ValueError("resampled shards are infinite: give epoch_samples (samples per worker per epoch)")
        stages = [wds.ResampledShards(urls, seed=seed, worker_seed=partial(_worker_seed, rank), deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), _SplitByRank(rank, world_size), wds.split_by_worker]
    tar_errors = _TarErrors()
    stages.append(wds.tarfile_to_samples(handler=tar_errors))
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed + 7919 * rank))
    stages.append(_Decode(transform, text_processor, bad_log, seed, rank, tar_errors))
    pipeline = wds.DataPipeline(*stages)
    if epoch_samples is not None:
        pipeline = pipeline.with_epoch(epoch_samples)
    return pipeline


def write_shards(
    samples: Iterable[tuple[str, Image.Image | bytes, list[str]]], pattern: str, maxcount: int
) -> list[str]:
    """Write ``(key, image, captions)`` triples to tar shards with webdataset's ``ShardWriter``.

    Args:
        samples: key (no dots), a PIL image (saved as JPEG) or encoded image bytes, and one or more captions.
        pattern: shard path with a ``%06d``-style field, e.g. ``"/data/cc3m/%06d.tar"``.
        maxcount: samples per shard.

    Returns:
        The shard paths written, in order.
    """
    import webdataset as wds

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for key, image, captions in samples:
            if isinstance(image, Image.Image):
                buf = io.BytesIO()
                image.convert("RGB").save(buf, format="JPEG", quality=90)
                image = buf.getvalue()
            sink.write({"__key__": key, "jpg": image, "txt": captions[0], "json": json.dumps({"captions": captions})})
            if sink.fname not in written:
                written.append(sink.fname)
    return written
