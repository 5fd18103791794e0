"""Image loading that never kills a run, and the bad-sample counter.

See docs/paper_map.md §6: unreadable images → ``None``.

How the count reaches the training loop (works with ``num_workers`` 0 or N)::

    bad = BadSampleLog()                                   # one per dataset; shared with the collate
    ds = CaptionDataset(root, ann, transform, text_proc, bad_log=bad)
    loader = DataLoader(ds, batch_size=B, collate_fn=Collate(bad), num_workers=4)
    for batch in loader:
        bad.absorb(batch)                                  # main process: adds batch["n_bad"], keeps paths
        if batch["batch_size"] == 0:                       # every sample of this batch was unreadable
            continue
        ...
        metrics["data/bad_samples"] = bad.total

Inside a worker process, the dataset's copy of the log queues the path of every failed image (``record``); the
collate, which runs in that same worker, drains the queue into ``batch["bad_samples"]`` and counts the dropped
``None`` entries in ``batch["n_bad"]``. The main process folds each batch in with ``absorb``, so ``total`` is exact
whatever the number of workers, and nothing is counted twice with ``num_workers=0`` (``record`` only queues).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BadSampleLog", "SharedImageCache", "load_image", "to_rgb"]

logger = logging.getLogger(__name__)


class BadSampleLog:
    """Counts and remembers samples that were skipped because their image could not be read.

    Attributes:
        total: number of skipped samples folded in so far (main-process view, see module docstring).
        paths: the first ``max_paths`` skipped paths with their reasons, as ``(path, reason)``.
    """

    def __init__(self, max_paths: int = 1000):
        self.max_paths = max_paths
        self.total = 0
        self.paths: list[tuple[str, str]] = []
        self._pending: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def record(self, path: str | Path, reason: str) -> None:
        """Queue one unreadable image (called by datasets, in whichever process loads the sample)."""
        logger.warning("skipping unreadable sample %s (%s)", path, reason)
        with self._lock:
            self._pending.append((str(path), reason))

    def drain(self) -> list[tuple[str, str]]:
        """Return and clear the queued ``(path, reason)`` pairs (called by the collate)."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def absorb(self, batch: dict) -> int:
        """Fold a collated batch's bad-sample fields into ``total``/``paths``; returns the batch's count."""
        n = int(batch.get("n_bad", 0))
        with self._lock:
            self.total += n
            room = self.max_paths - len(self.paths)
            if room > 0:
                self.paths.extend(list(batch.get("bad_samples", []))[:room])
        return n

    def state_dict(self) -> dict:
        """Serialisable state (for checkpoints and ``metrics.json``)."""
        return {"total": self.total, "paths": [list(p) for p in self.paths]}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.total = int(state["total"])
        self.paths = [tuple(p) for p in state.get("paths", [])]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # locks do not pickle (spawned DataLoader workers)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BadSampleLog(total={self.total}, pending={len(self._pending)})"


class SharedImageCache:
    """Transformed training images (``cache_images``) in one shared-memory tensor, decoded once for all workers.

    A dict cache lives in each DataLoader worker and dies with it: the engine opens a new loader every epoch, so
    with ``num_workers: 2`` a 48-sample run decoded 40 times. Here every distinct image has a slot in one
    ``(N, *shape)`` float32 tensor in shared memory, allocated up front (so the budget is checked before any work);
    whichever process decodes an image first fills its slot, and every worker of every later epoch reads it. Two
    workers that fill the same slot at once write the same values (the transform is fixed: ``augment: none``).

    Args:
        keys: the distinct image keys (annotation paths), in any order.
        shape: shape of one transformed image, e.g. ``(3, S, S)``.
        max_bytes: memory budget (params ``cache_max_gib``); more raises :class:`ValueError` saying by how much.
        shared: put the tensors in shared memory (needed with DataLoader workers; ``num_workers: 0`` does not).
    """

    def __init__(self, keys, shape: tuple[int, ...], max_bytes: float, shared: bool = True):
        import torch

        self.slot = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        need = len(self.slot) * int(np.prod(shape)) * 4
        if need > max_bytes:
            raise ValueError(
                f"cache_images: {len(self.slot)} distinct images of {tuple(shape)} float32 need {need / 2**30:.2f} GiB,"
                f" over the cache_max_gib budget of {max_bytes / 2**30:.2f} GiB; turn cache_images off or raise "
                "cache_max_gib"
            )
        if shared:  # shared memory lives in /dev/shm (64 MB in a default Docker container): fail now, not SIGBUS later
            free = shm_free_bytes()
            if free is not None and need > free:
                raise ValueError(
                    f"cache_images: {need / 2**30:.2f} GiB of shared memory needed for the DataLoader workers, "
                    f"/dev/shm has {free / 2**30:.2f} GiB free; enlarge it (docker --shm-size), use num_workers: 0 "
                    "or turn cache_images off"
                )
        self.shape = tuple(shape)
        share = (lambda t: t.share_memory_()) if shared else (lambda t: t)
        self.data = share(torch.zeros((len(self.slot), *self.shape)))  # (N, *shape)
        self.filled = share(torch.zeros(len(self.slot), dtype=torch.bool))  # (N,)
        self.decoded = share(torch.zeros(1, dtype=torch.long))  # decodes, all processes (statistics)

    def __contains__(self, key) -> bool:
        i = self.slot.get(key)
        return i is not None and bool(self.filled[i])

    def __getitem__(self, key):
        return self.data[self.slot[key]]

    def __setitem__(self, key, image) -> None:
        if tuple(image.shape) != self.shape:
            raise ValueError(f"cache_images: image {key} transformed to {tuple(image.shape)}, the cache holds "
                             f"{self.shape}")  # fmt: skip
        i = self.slot[key]  # a key outside the annotation list is a bug in the caller: KeyError names it
        self.data[i] = image
        self.filled[i] = True  # after the data: a reader never sees a half-written slot as filled
        self.decoded += 1

    def __iter__(self):
        return (k for k, i in self.slot.items() if self.filled[i])

    def __len__(self) -> int:
        return int(self.filled.sum())


def shm_free_bytes() -> int | None:
    """Free bytes of ``/dev/shm`` (where torch's shared tensors live on Linux); None where there is none."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale (PNG, TIFF) and PIL's 32-bit int mode


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB copy of ``img``, with 16-bit greyscale scaled down instead of clipped.

    PIL's ``convert("RGB")`` clips ``I;16``/``I`` values above 255 to white (a 16-bit scan comes out almost all
    white); here the 0–65535 range maps onto 0–255 (``round(v / 257)``: 65535 → 255, 257 → 1). Mode ``I`` is read
    as 16-bit data, which is what PIL gives for 16-bit PNG greyscale; values outside 0–65535 are clipped.
    """
    if img.mode in _WIDE_GREY:
        wide = np.asarray(img).astype(np.float64)  # (H, W); I;16B arrives big-endian, astype makes it native
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, bad_log: BadSampleLog | None = None) -> Image.Image | None:
    """Open an image with PIL and convert it to 8-bit RGB (:func:`to_rgb`); ``None`` (and a log entry) if that fails.

    ``convert`` forces the full decode, so truncated files fail here rather than later inside a transform
    (PIL's ``LOAD_TRUNCATED_IMAGES`` is left at its default False on purpose).

    Args:
        path: image file.
        bad_log: where to record the failure; a warning is logged either way.

    Returns:
        The RGB image, or None when the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        reason = f"{type(err).__name__}: {err}"
        if bad_log is not None:
            bad_log.record(path, reason)
        else:
            logger.warning("skipping unreadable image %s (%s)", path, reason)
        return None
