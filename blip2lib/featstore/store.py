"""Disk-backed frozen-feature store: the frozen ViT's output written once per image, read back by the data loader.

Stages 1 and 2 never train the image encoder (docs/paper_map.md §2, §3). Where the images are not augmented
(evaluation, ablations, or a user who chooses ``augment: none``) each image's tower output is the same every epoch,
so it can be computed once — on a borrowed GPU, or overnight on a CPU — and read from disk by every later run.
Unlike the in-memory toy cache (:mod:`blip2lib.featcache`) the store outlives the process, is sharded, and reads
only the rows a batch needs (memory-mapped), so it scales past RAM.

Layout of a store folder::

    store.json                    format, tower identity, shard size, complete flag
    shard-00000.safetensors       "features" (k, N, Dv) in the tower's output dtype; metadata: keys, pixel checksums,
    shard-00001.safetensors       unreadable images (a plain safetensors file: any safetensors tool opens it)

The tower identity (weights digest, image size, precision, autocast, the transform's text) is compared with the
reading run's; any difference is refused naming the fields. Keys are annotation image paths (or the sample's
``image_id`` for datasets without an annotation list); a key whose pixels differ from the checksum stored at build
time is an error, never a silently wrong feature (checked wherever the loader still sees pixels).

Exactness: each stored row is the tower's output for that image, bit for bit, as the build computed it (the run's
tower, precision and autocast). On a CPU that is also what a live run computes at any batch size (tested on the tiny
tower); on a GPU a live run at another batch size may differ in the last bits, because matmul kernels are chosen per
batch shape — as two live runs at different batch sizes differ.

Build: ``python -m blip2lib.featstore build PARAMS.yaml --out DIR`` (:func:`blip2lib.featstore.build.build_store`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1
STORE_JSON = "store.json"
SHARD_GLOB = "shard-*.safetensors"
# safetensors dtype names → (numpy dtype of the same width to memory-map, torch dtype to view the bytes as)
_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16)}


class FeatureStoreError(UserError, ValueError):
    """A feature store that does not fit the run (other tower, transform, images) or an unfinished build."""


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict as placed (names, dtypes, shapes, bytes): another cast is another tower."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes (bf16 has no numpy dtype), not copied
    return h.hexdigest()


def pixel_checksum(pixels: torch.Tensor) -> float:
    """One float per image (the featcache checksum): the sum of the transformed pixels in float64."""
    return float(pixels.detach().double().sum())


def _same_pixels(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-3)


def run_identity(vision_model: torch.nn.Module, vision_precision: str, image_size: int, amp: str,
                 transform, device: torch.device) -> dict:  # fmt: skip
    """What makes a tower output what it is; two runs may share a store only when these are equal.

    Args:
        vision_model: the frozen tower as the run places it (weights cast to its precision on a GPU).
        vision_precision: the config's precision string (a CPU keeps fp32 whatever it says).
        image_size: input resolution.
        amp: the training autocast; a tower without its own precision policy runs under it.
        transform: the image transform (its ``repr`` is compared: resize, interpolation, normalisation).
        device: where the tower runs (CUDA and CPU kernels round differently).
    """
    cuda = device.type == "cuda"
    return {
        "weights_sha256": weights_digest(vision_model),
        "image_size": int(image_size),
        "precision": vision_precision if cuda else "fp32",  # place() leaves a CPU model in fp32
        "autocast": amp if cuda else "off",  # the engine's autocast is CUDA-only
        "device_type": device.type,
        "transform": re.sub(r" at 0x[0-9a-f]+", "", repr(transform)),  # a Lambda's address differs per process
    }


def refuse_random_transform(transform, what: str) -> None:
    """A transform that draws random numbers (crop, flip) gives a new image each epoch: one stored feature is wrong."""
    random_steps = [line.strip() for line in repr(transform).splitlines() if "Random" in line]
    if random_steps:
        raise FeatureStoreError(
            f"{what}: the image transform is random ({'; '.join(random_steps)}); "
            "a feature store holds one feature per image, so it needs augment: none (the stage-1 paper recipe's "
            "random crop + flip must compute features live)"
        )


def check_params(params, source: str = "feature_store") -> None:
    """Params a feature store cannot serve, refused before any work (augmentation, trained tower, other caches)."""
    if params.augment != "none":
        raise FeatureStoreError(
            f"{source}: augment={params.augment!r} draws a new crop/flip of each image every epoch; the store holds "
            "one feature per image, so it needs augment: none"
        )
    if not params.freeze_vit:
        raise FeatureStoreError(f"{source}: the vision tower is trained (freeze_vit: false); its features change")
    if params.cache_vision_features or params.cache_images:
        raise FeatureStoreError(f"{source}: turn cache_vision_features and cache_images off: the store already "
                                "serves every training image's features")  # fmt: skip
    from ..assemble import is_shard_spec  # lazily: assemble imports this module

    if is_shard_spec(params.train_data):
        raise FeatureStoreError(f"{source}: train_data={params.train_data!r} are tar shards; the store reads "
                                "annotation files, manifests or synthetic data")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Shards: written with safetensors, read with numpy memory maps


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the byte offset where its data starts (nothing else is read)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FeatureStoreError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    return header, 8 + n


def write_shard(path: Path, features: torch.Tensor, keys: list, sums: list[float], bad: list) -> None:
    """One shard, atomically: a temporary file renamed into place, so a shard on disk is always whole."""
    from safetensors.torch import save_file

    if path.exists():  # completed shards are never overwritten
        raise FileExistsError(f"{path}: a shard of that name exists; the store would be overwritten")
    meta = {"keys": json.dumps(keys), "checksums": json.dumps(sums), "bad": json.dumps(bad)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"features": features.detach().contiguous().cpu()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


class _Shard:
    """One shard's rows, memory-mapped on first use (never pickled: each DataLoader worker maps its own)."""

    def __init__(self, path: Path):
        self.path = path
        header, start = read_header(path)
        meta = header.get("__metadata__", {})
        self.keys = json.loads(meta.get("keys", "[]"))
        self.sums = json.loads(meta.get("checksums", "[]"))
        self.bad = json.loads(meta.get("bad", "[]"))
        spec = header.get("features")
        if spec is None and self.keys:
            raise FeatureStoreError(f"{path}: no 'features' tensor")
        if spec is not None and spec["dtype"] not in _DTYPES:
            raise FeatureStoreError(f"{path}: feature dtype {spec['dtype']} is not one of {sorted(_DTYPES)}")
        self.dtype = spec["dtype"] if spec else None
        self.shape = tuple(spec["shape"]) if spec else (0,)
        self.offset = start + (spec["data_offsets"][0] if spec else 0)
        self._map: np.memmap | None = None

    def rows(self) -> np.memmap:
        """The (k, N, Dv) array, mapped read-only; reading a row touches only that row's pages."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=_DTYPES[self.dtype][0], mode="r", offset=self.offset,
                                  shape=self.shape)  # fmt: skip
        return self._map

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` as a fresh (N, Dv) tensor in the stored dtype (bit-exact)."""
        return torch.from_numpy(np.array(self.rows()[i])).view(_DTYPES[self.dtype][1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


def _short(value):
    """An identity value as an error message shows it: a digest's first 12 digits, a transform's text on one line."""
    if not isinstance(value, str):
        return value
    return value[:12] if len(value) == 64 and value.isalnum() else " ".join(value.split())


class FeatureStore:
    """A built store opened for reading: ``store[key]`` → (N, Dv) features, ``None`` for an unreadable image.

    Args:
        root: the store folder.
        require_complete: refuse a store whose build has not finished (training needs every image).
    """

    def __init__(self, root: str | Path, require_complete: bool = True):
        self.root = Path(root)
        meta_path = self.root / STORE_JSON
        if not meta_path.is_file():
            raise FeatureStoreError(f"feature_store={str(root)!r}: no {STORE_JSON} (build it with "
                                    "python -m blip2lib.featstore build PARAMS.yaml --out DIR)")  # fmt: skip
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise FeatureStoreError(f"{meta_path}: format {self.meta.get('format')!r}, this blip2lib reads {FORMAT}")
        if require_complete and not self.meta.get("complete"):
            raise FeatureStoreError(
                f"feature_store={str(root)!r}: the build has not finished; run the same build command again to "
                "continue it"
            )
        self.shards = [_Shard(p) for p in sorted(self.root.glob(SHARD_GLOB))]
        self.index: dict[Hashable, tuple[int, int]] = {}  # key → (shard, row)
        self.sums: dict[Hashable, float] = {}
        self.bad: set = set()
        for s, shard in enumerate(self.shards):
            for r, (key, total) in enumerate(zip(shard.keys, shard.sums)):
                self.index[key] = (s, r)
                self.sums[key] = total
            self.bad.update(shard.bad)
        shapes = {sh.shape[1:] for sh in self.shards if sh.keys}
        self.feature_shape = shapes.pop() if len(shapes) == 1 else None  # (N, Dv)

    @property
    def identity(self) -> dict:
        """The tower identity recorded at build time."""
        return self.meta["identity"]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key) -> bool:
        return key in self.index or key in self.bad

    def __getitem__(self, key) -> torch.Tensor | None:
        if key in self.bad:
            return None  # the build could not read it: the sample is dropped, as the live loader drops it
        where = self.index.get(key)
        if where is None:
            raise FeatureStoreError(
                f"image {key!r} is not in feature_store {str(self.root)!r} ({len(self)} images): the store was built "
                "from other training data; build it from this run's params"
            )
        shard, row = where
        return self.shards[shard].row(row)

    def check_identity(self, run: dict) -> None:
        """Refuse a run whose tower, precision, image size or transform differs from the store's."""
        diff = [f"{k}: store {_short(self.identity.get(k))!r} vs run {_short(v)!r}" for k, v in run.items()
                if self.identity.get(k) != v]  # fmt: skip
        if diff:
            raise FeatureStoreError(
                f"feature_store {str(self.root)!r} was built for another vision tower or transform ("
                + "; ".join(diff)
                + "); build a store with this run's params"
            )


def open_for_run(params, model, device: torch.device, transform) -> FeatureStore:
    """The store ``params.feature_store`` names, checked against this run.

    Refused unless this run's tower, precision, image size and transform made it, and unless the run's params can
    use a store at all (no augmentation, frozen tower, no tar shards).
    """
    check_params(params)
    refuse_random_transform(transform, "feature_store")
    store = FeatureStore(params.feature_store)
    vision = model.config.vision
    store.check_identity(run_identity(model.vision_model, vision.precision, params.image_size, params.amp, transform,
                                      device))  # fmt: skip
    log.info("feature_store %s: %d images, features %s", params.feature_store, len(store), store.feature_shape)
    return store


# ----------------------------------------------------------------------------------------------------------------
# Reading in a run: the loader yields features in place of pixels, the model skips the tower for them


class StoreFeatures:
    """The model's vision hook (``model.vision_cache``) for a store-fed run.

    The loader puts each image's stored (N, Dv) features where its pixels were, so a batch's ``image`` is
    (B, N, Dv) instead of (B, 3, S, S): :meth:`features` passes such a batch through and runs the tower on pixels
    (validation images). ``ln_vision`` — trained in both stages — runs on both, in the model.
    """

    active = True  # always consulted: the batch's rank tells features from pixels

    def __init__(self, feature_shape: tuple[int, ...] | None):
        self.feature_shape = feature_shape  # (N, Dv) of the store
        self.reads = 0

    @contextlib.contextmanager
    def batch(self, image_ids) -> Iterator[None]:
        """No-op: the features arrived with the batch (kept for the feature-cache interface)."""
        yield

    def features(self, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B, N, Dv) stored features → themselves; (B, 3, S, S) pixels → ``compute`` (the live tower)."""
        if x.dim() == 4:
            return compute(x)
        if self.feature_shape is not None and tuple(x.shape[1:]) != tuple(self.feature_shape):
            raise FeatureStoreError(f"batch features {tuple(x.shape)} do not match the store's {self.feature_shape}")
        self.reads += x.shape[0]
        return x

    def stats(self) -> dict:
        """Feature rows served so far."""
        return {"reads": self.reads}


class _StoreView:
    """The annotation datasets' ``image_cache`` hook: every image path is served from the store (no decoding)."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def __contains__(self, key) -> bool:
        return True  # a path missing from the store is an error in __getitem__, never a silent pixel load

    def __getitem__(self, key) -> torch.Tensor | None:
        return self.store[key]


class StoreDataset(torch.utils.data.Dataset):
    """A dataset without an annotation list (synthetic, manifests): each sample's pixels swapped for its features.

    The pixels are still made, so each one is checked against the checksum stored under its ``image_id``.
    """

    def __init__(self, dataset, store: FeatureStore):
        self.dataset, self.store = dataset, store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        key = sample.get("image_id")
        if key is None:
            raise FeatureStoreError("feature_store needs an image_id per sample: this dataset yields none")
        feats = self.store[key]
        if feats is None:
            return None
        total, stored = pixel_checksum(sample["image"]), self.store.sums[key]
        if not _same_pixels(total, stored):
            raise FeatureStoreError(
                f"image_id {key!r}: pixels differ from the image stored under that id (checksum {total:.6g} vs "
                f"{stored:.6g}); one id must name one fixed image"
            )
        return {**sample, "image": feats}


def store_keys(dataset) -> list[tuple[Hashable, int]]:
    """Distinct ``(key, first sample index)`` in first-appearance order: annotation paths, else sample image ids."""
    seen: dict[Hashable, int] = {}
    anns = getattr(dataset, "annotation", None)
    for i in range(len(dataset)):
        if anns is not None:
            key = anns[i]["image"]
        else:
            sample = dataset[i]
            key = None if sample is None else sample.get("image_id")
            if key is None:
                raise FeatureStoreError(f"sample {i} has no image_id: a store needs one key per image")
        seen.setdefault(key, i)
    return list(seen.items())


def attach(dataset, store: FeatureStore):
    """``dataset`` yielding stored features as ``image``.

    Annotation datasets are served through their image hook (no image is decoded); the others are wrapped in
    :class:`StoreDataset`.
    """
    if getattr(dataset, "annotation", None) is not None and hasattr(dataset, "image_cache"):
        dataset.image_cache = _StoreView(store)
        return dataset
    return StoreDataset(dataset, store)
