"""Optional de-duplication report: pre-training images that also appear in evaluation splits.

Two identities: ``coco_id`` (the 12-digit id in ``COCO_<split><year>_<id>.jpg`` names — COCO images recur across
train2014/val2014 copies only by id, and Karpathy test images sit in val2014) and ``hash`` (SHA-1 of the file
bytes; finds exact copies under any name, e.g. a COCO image re-hosted in a web crawl). Report only — nothing is
removed; the notebook shows the counts so a reader can judge leakage.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from .annotations import load_annotations

__all__ = ["coco_id", "file_sha1", "image_paths", "dedup_report"]

_COCO_NAME = re.compile(r"COCO_[A-Za-z0-9-]+_(\d+)\.\w+$")


def coco_id(path: str) -> int | None:
    """COCO image id of ``.../COCO_val2014_000000391895.jpg`` (391895); None for a non-COCO name."""
    m = _COCO_NAME.search(str(path))
    return int(m.group(1)) if m else None


def file_sha1(path: str | Path, chunk: int = 1 << 20) -> str | None:
    """SHA-1 of a file's bytes; None when it cannot be read."""
    h = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def image_paths(ann_paths: str | Path | list) -> list[str]:
    """Distinct ``image`` values of LAVIS-format annotation files, in first-appearance order."""
    seen: dict[str, None] = {}
    for entry in load_annotations(ann_paths):
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            seen.setdefault(entry["image"], None)
    return list(seen)


def _keys(paths: Iterable[str], root: Path | None, by: str, desc: str) -> dict:
    keys: dict = {}
    for p in tqdm(list(paths), desc=desc, disable=None, leave=False):
        key = coco_id(p) if by == "coco_id" else file_sha1(root / p if root else p)
        if key is not None:
            keys.setdefault(key, p)
    return keys


def dedup_report(
    pretrain: Iterable[str],
    evaluation: dict[str, Iterable[str]],
    by: str = "coco_id",
    pretrain_root: str | Path | None = None,
    eval_root: str | Path | None = None,
    max_examples: int = 20,
) -> dict:
    """Count pre-training images that are also in each evaluation split.

    Args:
        pretrain: pre-training image paths (e.g. ``image_paths(vg_caption.json + coco_karpathy_train.json)``).
        evaluation: split name → image paths (e.g. ``{"coco_karpathy_test": image_paths(...)}``).
        by: ``"coco_id"`` or ``"hash"``.
        pretrain_root: folder the pre-training paths are relative to (``hash`` only).
        eval_root: folder the evaluation paths are relative to (``hash`` only).
        max_examples: overlapping pairs listed per split.

    Returns:
        ``{"by", "n_pretrain", "n_pretrain_keyed", "splits": {name: {"n_eval", "n_overlap", "examples":
        [[pretrain_path, eval_path], ...]}}}``; ``n_pretrain_keyed`` counts paths that got a key (a COCO id, or a
        readable file).
    """
    if by not in ("coco_id", "hash"):
        raise ValueError(f"by must be 'coco_id' or 'hash', got {by!r}")
    pre_paths = list(pretrain)
    pre = _keys(pre_paths, Path(pretrain_root) if pretrain_root else None, by, "pretrain")
    report = {"by": by, "n_pretrain": len(pre_paths), "n_pretrain_keyed": len(pre), "splits": {}}
    for name, paths in evaluation.items():
        ev_paths = list(paths)
        ev = _keys(ev_paths, Path(eval_root) if eval_root else None, by, name)
        common = [k for k in ev if k in pre]
        report["splits"][name] = {
            "n_eval": len(ev_paths),
            "n_overlap": len(common),
            "examples": [[pre[k], ev[k]] for k in common[:max_examples]],
        }
    return report
