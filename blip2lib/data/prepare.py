"""``python -m blip2lib.data prepare <dataset> --src <official download> --out <data_root>``.

Reads the official files (found by name in ``src`` up to two folders deep), writes the LAVIS-format files that the
readers take under ``data_root`` (layout: ``readers.FORMATS`` and ``data/README.md``), and compares the counts with
the published sizes, logging a warning with the difference for each mismatch. No network access, ever.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .annotations import read_json
from .official import caption_gt, gqa_to_lavis, karpathy_to_lavis, nocaps_to_lavis, vg_to_lavis, vqa_to_lavis

__all__ = ["DATASETS", "KNOWN_SIZES", "IMAGE_DIRS", "check_sizes", "prepare"]

logger = logging.getLogger(__name__)

# Published sizes (Karpathy 2015 splits; VQAv2, OK-VQA, GQA, NoCaps papers/download pages).
KNOWN_SIZES: dict[str, dict[str, int]] = {
    "coco_karpathy": {"train images": 113_287, "val images": 5_000, "test images": 5_000, "test captions": 25_010},
    "flickr30k": {"test images": 1_000, "test captions": 5_000},
    "vqav2": {"train questions": 443_757, "val questions": 214_354, "test-dev questions": 107_394},
    "okvqa": {"train questions": 9_009, "val questions": 5_046},
    "gqa": {"test-dev questions": 12_578},
    "nocaps": {"val images": 4_500, "test images": 10_600},
    "vg": {},
}
DATASETS = tuple(KNOWN_SIZES)

# Official image folders (found by name in src) → where they are linked under data_root with --link-images.
_COCO_IMAGES = [
    ("train2014", "coco/images/train2014"),
    ("val2014", "coco/images/val2014"),
    ("test2015", "coco/images/test2015"),
]
IMAGE_DIRS: dict[str, list[tuple[str, str]]] = {
    "coco_karpathy": _COCO_IMAGES,
    "vqav2": _COCO_IMAGES,
    "okvqa": _COCO_IMAGES,
    "flickr30k": [("flickr30k-images", "flickr30k/images/flickr30k-images")],
    "gqa": [("images", "gqa/images")],
    "nocaps": [("val", "nocaps/images/val"), ("test", "nocaps/images/test")],
    "vg": [("VG_100K", "vg/images/VG_100K"), ("VG_100K_2", "vg/images/VG_100K_2")],
}


def _find(src: Path, name: str) -> Path | None:
    for pattern in (name, f"*/{name}", f"*/*/{name}"):  # shallow on purpose: image folders hold 100k+ files
        hits = sorted(src.glob(pattern))
        if hits:
            return hits[0]
    return None


def _need(src: Path, name: str) -> Path:
    path = _find(src, name)
    if path is None:
        raise FileNotFoundError(f"{name} not found in {src} (searched two folders deep)")
    return path


def _load(path: Path) -> Any:
    logger.info("reading %s", path)
    return read_json(path)  # errors name the file and line (invalid JSON, not UTF-8)


def _write(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    logger.info("wrote %s", path)


def check_sizes(dataset: str, counts: dict[str, int]) -> list[str]:
    """Compare counts with ``KNOWN_SIZES``; log and return one message per mismatch (missing counts are skipped)."""
    messages = []
    for what, expected in KNOWN_SIZES.get(dataset, {}).items():
        if what in counts and counts[what] != expected:
            found = counts[what]
            msg = f"{dataset}: {what}: expected {expected:,}, found {found:,} (difference {found - expected:+,})"
            logger.warning(msg)
            messages.append(msg)
    return messages


def _karpathy(src: Path, out: Path, dataset: str) -> dict[str, int]:
    name, prefix = (
        ("dataset_coco.json", "coco") if dataset == "coco_karpathy" else ("dataset_flickr30k.json", "flickr30k")
    )
    data = _load(_need(src, name))
    short = "coco" if dataset == "coco_karpathy" else "flickr30k"
    counts = {}
    for split in tqdm(("train", "val", "test"), desc=dataset, disable=None):
        entries = karpathy_to_lavis(data, split, short)
        stem = "coco_karpathy" if prefix == "coco" else "flickr30k"
        _write(entries, out / prefix / "annotations" / f"{stem}_{split}.json")
        if split == "train":
            counts["train images"] = len({e["image"] for e in entries})
            counts["train captions"] = len(entries)
        else:
            counts[f"{split} images"] = len(entries)
            counts[f"{split} captions"] = sum(len(e["caption"]) for e in entries)
            if prefix == "coco":
                _write(caption_gt(entries), out / prefix / "annotations" / f"{stem}_{split}_gt.json")
    return counts


def _vqa(src: Path, out: Path, dataset: str) -> dict[str, int]:
    if dataset == "vqav2":
        q, a, folder, stem, tag = (
            "v2_OpenEnded_mscoco_{}_questions.json",
            "v2_mscoco_{}_annotations.json",
            "coco",
            "vqa",
            "vqa",
        )
    else:
        q, a, folder, stem, tag = (
            "OpenEnded_mscoco_{}_questions.json",
            "mscoco_{}_annotations.json",
            "okvqa",
            "okvqa",
            "okvqa",
        )
    splits = [("train", "train2014", f"{stem}_train.json"), ("val", "val2014", f"{stem}_val_eval.json")]
    if dataset == "vqav2":
        splits.append(("test-dev", "test-dev2015", "vqa_test.json"))
    counts, found_any = {}, False
    for split, subtype, out_name in tqdm(splits, desc=dataset, disable=None):
        qpath = _find(src, q.format(subtype))
        if qpath is None:
            logger.warning("%s: %s not found in %s; skipping the %s split", dataset, q.format(subtype), src, split)
            continue
        found_any = True
        apath = None if split == "test-dev" else _need(src, a.format(subtype))
        entries = vqa_to_lavis(_load(qpath), None if apath is None else _load(apath), tag)
        _write(entries, out / folder / "annotations" / out_name)
        counts[f"{split} questions"] = len(entries)
        if split == "val":  # the official pair is what the VQA scorer reads (docs/paper_map.md §6.1)
            for path in (qpath, apath):
                shutil.copyfile(path, out / folder / "annotations" / path.name)
    if not found_any:
        raise FileNotFoundError(f"no {dataset} question file ({q.format('<split>')}) found in {src}")
    return counts


def _gqa(src: Path, out: Path) -> dict[str, int]:
    counts = {}
    for split, name in (("test-dev", "testdev_balanced_questions.json"), ("train", "train_balanced_questions.json")):
        path = _need(src, name) if split == "test-dev" else _find(src, name)
        if path is None:
            continue
        data = _load(path)
        entries = gqa_to_lavis(data) if isinstance(data, dict) else data
        _write(entries, out / "gqa" / "annotations" / name)
        counts[f"{split} questions"] = len(entries)
    return counts


def _nocaps(src: Path, out: Path) -> dict[str, int]:
    counts = {}
    for split, name in (("val", "nocaps_val_4500_captions.json"), ("test", "nocaps_test_image_info.json")):
        path = _need(src, name) if split == "val" else _find(src, name)
        if path is None:
            continue
        data = _load(path)
        _write(nocaps_to_lavis(data, split), out / "nocaps" / "annotations" / f"nocaps_{split}.json")
        counts[f"{split} images"] = len(data["images"])
        if split == "val":  # official val captions are already COCO caption format: the GT file as is
            shutil.copyfile(path, out / "nocaps" / "annotations" / "nocaps_val_gt.json")
            counts["val captions"] = len(data["annotations"])
    return counts


def _vg(src: Path, out: Path) -> dict[str, int]:
    regions = _load(_need(src, "region_descriptions.json"))
    info_path = _find(src, "image_data.json")
    entries = vg_to_lavis(tqdm(regions, desc="vg", disable=None), _load(info_path) if info_path else None)
    _write(entries, out / "vg" / "annotations" / "vg_caption.json")
    return {"images": len(regions), "captions": len(entries)}


def _link_images(dataset: str, src: Path, out: Path) -> list[str]:
    linked = []
    for name, rel in IMAGE_DIRS[dataset]:
        found = _find(src, name)
        dest = out / rel
        if found is None or not found.is_dir() or dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(found.resolve(), dest, target_is_directory=True)
        linked.append(str(dest))
    return linked


def prepare(dataset: str, src: str | Path, out: str | Path, link_images: bool = False) -> dict:
    """Convert one official download to the reader formats under ``out`` and check its sizes.

    Args:
        dataset: one of ``DATASETS``.
        src: the folder holding the official files (unzipped as downloaded).
        out: ``data_root``.
        link_images: symlink the official image folders found in ``src`` into ``data_root`` (no copying).

    Returns:
        ``{"dataset", "counts", "warnings", "linked"}``; each warning names the count and its difference.
    """
    src, out = Path(src), Path(out)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder")
    if dataset in ("coco_karpathy", "flickr30k"):
        counts = _karpathy(src, out, dataset)
    elif dataset in ("vqav2", "okvqa"):
        counts = _vqa(src, out, dataset)
    elif dataset == "gqa":
        counts = _gqa(src, out)
    elif dataset == "nocaps":
        counts = _nocaps(src, out)
    else:
        counts = _vg(src, out)
    warnings = check_sizes(dataset, counts)
    linked = _link_images(dataset, src, out) if link_images else []
    return {"dataset": dataset, "counts": counts, "warnings": warnings, "linked": linked}
