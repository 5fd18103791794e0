"""Preflight of data files: annotation entries against ``blip2lib.data.FORMATS``, ground truth, shards, images.

Files up to :data:`FULL_PARSE_BYTES` are validated whole with the readers' own validator
(``blip2lib.data.load_annotations``); larger JSON lists / JSONL files only by their first :data:`PREFIX_ENTRIES`
entries, decoded incrementally so that a multi-GB file is not parsed (the finding says so). Findings go to the
caller's context (``ctx.err`` / ``ctx.note`` with the params key).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import FORMATS, AnnotationError, load_annotations, load_caption_gt, validate_entry

FULL_PARSE_BYTES = 64 << 20  # annotation files up to this size are validated entry by entry, whole
PREFIX_ENTRIES = 2000  # larger files: this many leading entries (a list / JSONL) are validated
IMAGES_SPOT_CHECKED = 3  # leading entries whose image file must exist under the images folder
_SHARDS_SEEN: dict[tuple, tuple[int, list[str]]] = {}  # (spec, data_root) → (shards, missing); cleared per check


def clear_cache() -> None:
    """Forget what earlier checks saw on disk (each :func:`~.preflight.check` starts with this)."""
    _SHARDS_SEEN.clear()


def fields_for(rel: str, stage: str) -> tuple[dict, str]:
    """Fields to validate ``rel`` (a path under data_root) against, and their name for the finding.

    A file named in ``FORMATS`` takes its fields; any other training file those of the reader the stage builds from
    it; a validation file (``stage == "val"``) at least an ``image`` per entry.
    """
    from ..data import CaptionDataset, RetrievalDataset, VQADataset

    key = next((k for k, f in FORMATS.items() if f["file"] == rel), None)
    if key:
        return FORMATS[key]["fields"], f"FORMATS['{key}']"
    if stage == "val":
        return {"image": "str"}, "an image per entry"
    reader = {"retrieval_ft": RetrievalDataset, "vqa_ft": VQADataset}.get(stage, CaptionDataset)
    return reader.fields, f"{reader.__name__}'s fields"


def check_shards(ctx, key: str, spec: str, data_root: Path) -> None:
    """Every local shard of a brace-expanded ``train_data`` spec exists (remote URLs are not fetched)."""
    import os

    from braceexpand import braceexpand

    if (spec, data_root) not in _SHARDS_SEEN:  # paper files share one 12,900-shard spec: stat it once per check
        urls = [u for part in spec.split(",") if part.strip() for u in braceexpand(part.strip())]
        local = [
            u if u.startswith("/") else os.path.join(data_root, u) for u in urls if "://" not in u and "pipe:" not in u
        ]
        _SHARDS_SEEN[(spec, data_root)] = (len(urls), [u for u in local if not os.path.isfile(u)])
    n, missing = _SHARDS_SEEN[(spec, data_root)]
    if missing:
        shown = ", ".join(str(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        ctx.err(key, f"{len(missing)} of {n} shards missing under data_root: {shown}")


def check_gt(ctx, key: str, path: Path) -> None:
    """A caption ground-truth file in COCO caption format (``images`` + ``annotations``) reads and validates."""
    if not path.exists():
        ctx.err(key, f"caption ground truth {path} does not exist (COCO caption format: images + annotations)")
    elif path.stat().st_size > FULL_PARSE_BYTES:
        ctx.note(key, f"{path}: {path.stat().st_size >> 20} MB, not validated (over the preflight parse limit)")
    else:
        try:
            load_caption_gt(path)
        except (AnnotationError, OSError) as e:
            ctx.err(key, f"malformed caption ground truth: {e}")


def _prefix_entries(path: Path, limit: int) -> list | None:
    """The first ``limit`` entries of a large JSON list / JSONL file, decoded incrementally; None when not a list."""
    decoder = json.JSONDecoder()
    out: list = []
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
                if len(out) >= limit:
                    break
            return out
        buf = f.read(1 << 20).lstrip()
        if not buf.startswith("["):
            return None
        pos = 1
        while len(out) < limit:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                break
            try:
                entry, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(1 << 20)
                if not more:
                    raise
                buf, pos = buf[pos:] + more, 0
                continue
            out.append(entry)
            pos = end
    return out


def check_annotations(ctx, key: str, path: Path, fields: dict, label: str, images: Path | None) -> None:
    """Validate an annotation file's entries (bounded for huge files) and spot-check its first images."""
    if not path.exists():
        ctx.err(key, f"annotation file {path} does not exist")
        return
    size = path.stat().st_size
    try:
        if not fields:  # a manifest: its own reader validates it (JSONL / CSV rows)
            from ..data import read_manifest

            entries = read_manifest(path)[1]
        elif size <= FULL_PARSE_BYTES:
            entries = load_annotations(path, fields)
        else:
            entries = _prefix_entries(path, PREFIX_ENTRIES)
            if entries is None:
                ctx.note(key, f"{path}: {size >> 20} MB official-format file, entries not validated (over the "
                              "preflight parse limit)")  # fmt: skip
                return
            for i, entry in enumerate(entries):
                validate_entry(entry, fields, f"{path}: entry {i}")
            ctx.note(key, f"{path}: {size >> 20} MB, validated its first {len(entries)} entries against {label}")
    except (AnnotationError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        ctx.err(key, f"malformed annotation file (checked against {label}): {e}")
        return
    if images is not None:
        if not images.is_dir():
            ctx.err(key, f"image folder {images} does not exist (entries' 'image' paths are relative to it)")
            return
        lost = [images / e["image"] for e in entries[:IMAGES_SPOT_CHECKED]
                if isinstance(e.get("image"), str) and not (images / e["image"]).exists()]  # fmt: skip
        if lost:
            ctx.err(key, f"images of the first entries of {path.name} are missing, e.g. {lost[0]}: wrong images_root?")
