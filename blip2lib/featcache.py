"""Frozen-ViT feature cache: each image's vision-tower output kept after its first pass (user need 13).

Stages 1 and 2 never train the image encoder (docs/paper_map.md §2, §3), so with a fixed image transform (no
augmentation) every epoch recomputes the same features. With ``cache_vision_features: true`` the training tasks name
each sample's image (``image_id``) and :meth:`Blip2Base.encode_vision` computes only the images it has not seen;
``ln_vision`` — trained in both stages — still runs on every step. Memory: N images × tokens × width (ViT-g at 224 px:
257 × 1408 fp16 ≈
0.7 MB per image, so this is for small datasets and the toy world, not LAION); ``max_bytes`` (params
``cache_max_gib``) caps it with an error that says so, and :func:`estimate_bytes` lets a run check before step 1.

A key whose pixels change (augmentation on, or two images sharing one id) is an error, found by a per-image
checksum, never a silently wrong feature.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch


def _as_keys(image_ids) -> list[Hashable]:
    if isinstance(image_ids, torch.Tensor):
        return image_ids.reshape(-1).tolist()
    return list(image_ids)


class VisionFeatureCache:
    """Vision-tower outputs per image key, kept on ``device`` (CPU by default).

    Args:
        device: where cached features live; they move to the batch's device when read.
    """

    def __init__(self, device: torch.device | str = "cpu", max_bytes: float | None = None):
        self.device = torch.device(device)
        self.max_bytes = max_bytes  # params cache_max_gib; None: no limit
        self.nbytes = 0
        self.store: dict[Hashable, tuple[torch.Tensor, float]] = {}  # key → ((N, Dv) features, pixel checksum)
        self.hits = 0
        self.misses = 0
        self._keys: list[Hashable] | None = None

    @property
    def active(self) -> bool:
        """True inside :meth:`batch`: the next vision pass belongs to those keys."""
        return self._keys is not None

    @contextlib.contextmanager
    def batch(self, image_ids: Sequence[Hashable] | torch.Tensor) -> Iterator[None]:
        """Name the images of the vision passes run inside this block (one key per row)."""
        self._keys = _as_keys(image_ids)
        try:
            yield
        finally:
            self._keys = None

    def features(self, pixel_values: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B, 3, S, S) → (B, N, Dv): cached rows read back, the others computed by ``compute`` and stored."""
        keys = self._keys
        if keys is None:
            return compute(pixel_values)
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} image ids for a batch of {pixel_values.shape[0]} images")
        sums = pixel_values.detach().double().flatten(1).sum(1).tolist()  # one checksum per image
        missing, seen = [], set()
        for i, (key, s) in enumerate(zip(keys, sums)):
            if key in self.store:
                cached = self.store[key][1]
                if not math.isclose(cached, s, rel_tol=1e-6, abs_tol=1e-3):
                    raise ValueError(
                        f"image_id {key!r}: pixels differ from the image cached under that id (checksum {s:.6g} vs "
                        f"{cached:.6g}); the vision feature cache needs one fixed image per id (augment: none)"
                    )
            elif key not in seen:
                missing.append(i)
                seen.add(key)
        if missing:
            new = compute(pixel_values[torch.tensor(missing, device=pixel_values.device)])  # (m, N, Dv)
            self._check_budget(len(missing), new[0].numel() * new.element_size())
            for j, i in enumerate(missing):
                self.store[keys[i]] = (new[j].detach().to(self.device), sums[i])
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self.store[k][0] for k in keys]).to(pixel_values.device)  # (B, N, Dv)

    def _check_budget(self, n_new: int, per_image: int) -> None:
        """Refuse to grow past ``max_bytes``, saying what the whole cache would need."""
        self.nbytes += n_new * per_image
        if self.max_bytes is not None and self.nbytes > self.max_bytes:
            raise MemoryError(
                f"cache_vision_features: {len(self.store) + n_new} images × {per_image / 2**20:.2f} MiB of features "
                f"exceed the cache_max_gib budget of {self.max_bytes / 2**30:.2f} GiB; turn cache_vision_features off "
                "or raise cache_max_gib"
            )

    def stats(self) -> dict:
        """Images cached, hits and misses so far."""
        return {"images": len(self.store), "hits": self.hits, "misses": self.misses}


def estimate_bytes(n_images: int, image_size: int, patch_size: int, width: int, element_size: int = 4) -> int:
    """Bytes the cache needs for ``n_images`` (one class token + ``(image_size / patch_size)²`` patches each)."""
    tokens = (image_size // patch_size) ** 2 + 1
    return n_images * tokens * width * element_size


def check_feature_budget(n_images: int, image_size: int, patch_size: int, width: int, element_size: int,
                         max_bytes: float) -> None:  # fmt: skip
    """:class:`ValueError` when ``n_images`` distinct images' features (:func:`estimate_bytes`) exceed ``max_bytes``."""
    need = estimate_bytes(n_images, image_size, patch_size, width, element_size)
    if need > max_bytes:
        raise ValueError(
            f"cache_vision_features: {n_images} distinct training images need about {need / 2**30:.2f} GiB of "
            f"features, over the cache_max_gib budget of {max_bytes / 2**30:.2f} GiB; turn cache_vision_features off "
            "or raise cache_max_gib"
        )
