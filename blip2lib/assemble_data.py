"""The training data of a run: datasets, transforms, tar-shard streams and the resumable loader factory.

Split from :mod:`blip2lib.assemble` (which builds the model and task and re-exports these names): what a run reads
(``train_data``: the toy world, an annotation file, a manifest, synthetic samples or WebDataset shards) and how the
engine asks for it (``loader_factory(position)``, resumable at any sample position, rank-aware).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import dist
from .data import (
    BadSampleLog,
    CaptionDataset,
    CaptionProcessor,
    Collate,
    ManifestDataset,
    QuestionProcessor,
    ResumableDistributedSampler,
    RetrievalDataset,
    SharedImageCache,
    VQADataset,
    image_eval_transform,
    image_train_transform,
)
from .featcache import check_feature_budget
from .featstore import attach as attach_store

log = logging.getLogger(__name__)


def toy_world(params):
    """The embedded toy world for ``params`` (built once, then cached; ``data_root`` may name a world folder)."""
    from .toy import build_toy_world, load_toy_world

    if params.data_root and (Path(params.data_root) / "manifest.json").exists():
        return load_toy_world(params.data_root)
    return build_toy_world(size=params.toy_world, progress=params.progress)


def _transforms(params) -> tuple:
    """``(image transform, text processor)`` of the training data."""
    # The toy world encodes left/right in its captions: a flip (or a tight crop) would make them wrong.
    if params.augment == "none":
        transform = image_eval_transform(params.image_size)
    else:
        transform = image_train_transform(params.image_size, flip=params.augment == "paper")
    if params.stage == "vqa_ft":
        return transform, QuestionProcessor()
    return transform, CaptionProcessor(prompt=f"{params.prompt} " if params.prompt else "")


def _train_dataset(params, comps: dict, bad: BadSampleLog):
    transform, text = _transforms(params)
    spec = params.train_data
    if params.cache_images and (spec == "synthetic" or str(spec).endswith((".jsonl", ".csv"))):
        raise ValueError(f"cache_images works with annotation-file datasets (toy, COCO-style JSON), not {spec!r}")
    if spec == "synthetic":
        from .toy.synthetic import SyntheticImageText

        return SyntheticImageText(256, params.image_size, seed=params.seed, vqa=params.stage == "vqa_ft")
    if spec == "toy":
        world = comps.get("world") or toy_world(params)
        name = "vqa_train" if params.stage == "vqa_ft" else "coco_karpathy_train"
        ann, images = world.annotations[name], world.images_dir
    else:
        root = Path(params.data_root or ".")
        ann, images = root / spec, root / params.images_root
    if str(ann).endswith((".jsonl", ".csv")) and spec != "toy":
        return ManifestDataset(ann, root=images, transform=transform, text_processor=text, bad_log=bad)
    cls = {"retrieval_ft": RetrievalDataset, "vqa_ft": VQADataset}.get(params.stage, CaptionDataset)
    ds = cls(images, [ann], transform=transform, text_processor=text, bad_log=bad)
    if params.cache_images:  # validated: augment none, so each path always gives the same tensor
        keys = (a["image"] for a in ds.annotation)  # shared by every DataLoader worker and epoch, budget checked
        shape, budget = (3, params.image_size, params.image_size), params.cache_max_gib * 2**30
        ds.image_cache = SharedImageCache(keys, shape, budget, shared=params.num_workers > 0)
    return ds


def _top_answer(batch: dict) -> dict:
    # VQA FT target: the most frequent annotator answer (docs/paper_map.md §4.2 leaves the choice open; BLIP-1 weighted
    # all).
    if "answers" in batch and "weights" in batch:
        batch["answer"] = [
            a[max(range(len(w)), key=lambda i: w[i])] for a, w in zip(batch["answers"], batch["weights"])
        ]
    return batch


def _deliver(batches, bad: BadSampleLog, to_device):
    """Count each batch's dropped samples and move the batch to the device.

    A batch left empty by unreadable samples is counted like the others and yielded as it is (``batch_size`` 0):
    the engine moves the data position past it and asks for the next one, so the skip is part of the position.
    """
    for batch in batches:
        bad.absorb(batch)
        yield to_device(batch) if batch.get("batch_size", 1) else batch


def is_shard_spec(spec: str) -> bool:
    """``train_data`` names WebDataset tar shards: a ``.tar`` path, brace notation or a comma-separated list."""
    return any(part.strip().endswith(".tar") or ".tar}" in part for part in spec.split(","))


def _shard_urls(params) -> list[str]:
    """Brace-expanded shard list; local shards must exist (webdataset would otherwise retry them forever)."""
    from braceexpand import braceexpand  # a webdataset dependency

    # Relative shard paths live under data_root like annotation files; absolute paths and explicit URLs pass as
    # given (a remote URL is only ever read because the user wrote it into the params).
    def remote(url: str) -> bool:
        return "://" in url or url.startswith("pipe:")

    root = Path(params.data_root or ".")
    urls = []
    for part in (p.strip() for p in params.train_data.split(",") if p.strip()):
        for url in braceexpand(part):
            urls.append(url if remote(url) or url.startswith("/") else str(root / url))
    missing = [u for u in urls if not remote(u) and not Path(u).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"train_data={params.train_data!r}: {len(missing)} of {len(urls)} shards missing: {shown}"
        )
    return urls


def _shard_factory(params, bad: BadSampleLog, text, transform, to_device):
    """Loader factory over resampled shards (docs/paper_map.md §3.4 web data), exact to the sample position.

    Epoch ``e`` is the deterministic stream ``make_shard_dataset(seed=seed + e, resampled=True)`` cut to
    ``shard_epoch_samples`` per rank (split evenly over the DataLoader workers, whole batches only). Resuming at a
    position inside an epoch replays that epoch's stream and discards the batches already consumed: exact, at the
    cost of re-reading them once (log line says how many).
    """
    from .data import make_shard_dataset

    if params.shard_epoch_samples <= 0:
        raise ValueError(
            f"train_data={params.train_data!r} names tar shards: set shard_epoch_samples (samples per rank and "
            "epoch, e.g. the dataset size / world size) so the run has epochs and an exact resume position"
        )
    workers = max(1, params.num_workers)
    per_worker = (params.shard_epoch_samples // workers // params.batch_size) * params.batch_size
    if per_worker == 0:
        raise ValueError(
            f"shard_epoch_samples={params.shard_epoch_samples} is less than batch_size={params.batch_size} per "
            f"DataLoader worker ({workers} workers)"
        )
    usable, urls = per_worker * workers, _shard_urls(params)

    def factory(position: int):
        epoch, offset = divmod(position, usable)
        ds = make_shard_dataset(
            urls, transform, text, resampled=True, seed=params.seed + epoch,
            shuffle_buffer=params.shuffle_buffer, epoch_samples=per_worker, bad_log=bad,
        )  # fmt: skip
        g = torch.Generator().manual_seed(params.seed * 1000 + epoch)  # DataLoader seeds: never the global RNG
        loader = DataLoader(
            ds, batch_size=params.batch_size, num_workers=params.num_workers, collate_fn=Collate(bad),
            drop_last=True, persistent_workers=False, generator=g,
        )  # fmt: skip
        skip = offset // params.batch_size
        if skip:
            log.info("shards: replaying %d batches of epoch %d to reach sample position %d", skip, epoch, position)
        yield from _deliver(itertools.islice(loader, skip, None), bad, to_device)  # skipped: consumed before

    return factory


def build_data(params, comps: dict, device: torch.device) -> dict:
    """``loader_factory(position)`` for the engine (resumable, rank-aware), the bad-sample log, eval transform."""
    bad = BadSampleLog()

    def to_device(batch: dict) -> dict:
        batch = _top_answer(batch)
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    if is_shard_spec(params.train_data):
        if params.stage in ("vqa_ft", "retrieval_ft"):
            raise ValueError(f"stage {params.stage} needs annotation files (question/image ids), not tar shards")
        transform, text = _transforms(params)
        factory = _shard_factory(params, bad, text, transform, to_device)
        per_worker = params.shard_epoch_samples // max(1, params.num_workers) // params.batch_size
        return {"loader_factory": factory, "bad_log": bad, "dataset": None,
                "batches_per_epoch": per_worker * max(1, params.num_workers),  # lavis_epoch's epoch length
                "eval_transform": image_eval_transform(params.image_size)}  # fmt: skip
    ds = _train_dataset(params, comps, bad)
    if comps.get("feature_store") is not None:  # samples carry stored (N, Dv) features in place of pixels
        ds = attach_store(ds, comps["feature_store"])
    if params.cache_vision_features:  # refused before step 1 when the distinct images cannot fit the budget
        vision, anns = comps["config"].vision, getattr(ds, "annotation", None)
        half = device.type == "cuda" and (params.vit_precision or vision.precision) != "fp32"  # features kept as made
        n_images = len({a["image"] for a in anns}) if anns is not None else len(ds)
        check_feature_budget(n_images, params.image_size, vision.patch_size, vision.width, 2 if half else 4,
                             params.cache_max_gib * 2**30)  # fmt: skip
    per_rank = len(ds) // dist.get_world_size()  # drop_last sampler: samples per rank and epoch
    usable = (per_rank // params.batch_size) * params.batch_size  # full batches only (DataLoader drop_last)
    if usable == 0:
        raise ValueError(f"train_data has {len(ds)} samples: fewer than batch_size={params.batch_size} per rank")

    def factory(position: int):
        epoch, offset = divmod(position, usable)  # the sample position alone decides where to continue
        sampler = ResumableDistributedSampler(ds, shuffle=True, seed=params.seed, drop_last=True)
        sampler.set_epoch(epoch)
        sampler.advance(offset)
        g = torch.Generator().manual_seed(params.seed * 1000 + epoch)  # worker seeds: not the global RNG
        loader = DataLoader(
            ds,
            batch_size=params.batch_size,
            sampler=sampler,
            num_workers=params.num_workers,
            collate_fn=Collate(bad),
            drop_last=True,
            generator=g,
            persistent_workers=False,
            pin_memory=device.type == "cuda",
        )
        yield from _deliver(loader, bad, to_device)

    return {
        "loader_factory": factory,
        "bad_log": bad,
        "dataset": ds,
        "batches_per_epoch": usable // params.batch_size,  # per rank: LAVIS's iters_per_epoch (lavis_epoch)
        "eval_transform": image_eval_transform(params.image_size),
    }


__all__ = ["build_data", "is_shard_spec", "toy_world"]
