"""Annotation-file loading and validation shared by the readers and the manifest (errors name file and line).

Files are validated entry by entry at dataset construction, so a malformed line fails before training starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import UserError
from .official import gqa_to_lavis, nocaps_to_lavis, vqa_to_lavis

__all__ = ["AnnotationError", "validate_entry", "load_annotations", "load_caption_gt"]

logger = logging.getLogger(__name__)


class AnnotationError(UserError, ValueError):
    """A malformed annotation/manifest entry; the message names the file and line (or entry index)."""


_TYPES = {"str": str, "int": int, "float": (int, float), "any": object}


def _type_ok(value: Any, tname: str) -> bool:
    if tname == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):  # bool is an int subclass; never a valid id or text
        return tname == "any"
    return any(isinstance(value, _TYPES[t]) for t in tname.split("|"))


def validate_entry(entry: Any, fields: dict[str, str], where: str) -> None:
    """Raise :class:`AnnotationError` naming ``where`` unless ``entry`` has every required field with its type."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    for name, tname in fields.items():
        optional = tname.endswith("?")
        tname = tname.rstrip("?")
        if name not in entry:
            if optional:
                continue
            raise AnnotationError(f"{where}: missing field {name!r} (fields present: {sorted(entry)})")
        if not _type_ok(entry[name], tname):
            raise AnnotationError(f"{where}: field {name!r} should be {tname}, got {entry[name]!r:.80}")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
    return rows


def _official_to_list(data: Any, path: Path) -> list | None:
    """Detect an official-format file and convert it; None when ``data`` is not one we know."""
    if isinstance(data, dict) and "questions" in data and "data_subtype" in data:
        return vqa_to_lavis(data, None)
    if isinstance(data, dict) and "images" in data and data["images"] and "file_name" in data["images"][0]:
        return nocaps_to_lavis(data, "test" if "test" in path.name else "val")
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "imageId" in v for v in data.values()):
        return gqa_to_lavis(data)
    return None


def load_annotations(paths: str | Path | list, fields: dict[str, str] | None = None) -> list[dict]:
    """Read one or more annotation files, validate every entry, add ``instance_id = str(index)``.

    See docs/paper_map.md §6.1.

    Args:
        paths: a ``.json`` list file, a ``.jsonl`` file, an official-format file (VQA questions, GQA, NoCaps), or a
            list of these (concatenated in order). An official VQA *annotations* file in the list supplies the
            ``answer`` lists of the questions read before it.
        fields: ``FORMATS[...]["fields"]`` to validate against; None skips validation.

    Returns:
        The concatenated entries.

    Raises:
        AnnotationError: on invalid JSON (``file:line:col``) or an entry that fails validation (``file:line`` for
            JSONL, ``file: entry i`` for JSON lists) — at construction, before any training step.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows: list[tuple[str, Any]] = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            rows.extend(_read_jsonl(path))
            continue
        data = _read_json(path)
        if _is_vqa_annotations(data) and rows:
            _merge_vqa_answers([e for _, e in rows], data, path)
            continue
        converted = _official_to_list(data, path)
        if converted is not None:
            data = converted
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
        rows.extend((f"{path}: entry {i}", e) for i, e in enumerate(data))
    out = []
    for i, (where, entry) in enumerate(rows):
        if fields is not None:
            validate_entry(entry, fields, where)
        entry["instance_id"] = str(i)
        out.append(entry)
    return out


def _is_vqa_annotations(data: Any) -> bool:
    anns = data.get("annotations") if isinstance(data, dict) else None
    return bool(anns) and isinstance(anns[0], dict) and "answers" in anns[0]


def _merge_vqa_answers(entries: list[dict], annotations: dict, path: Path) -> None:
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations["annotations"]}
    for entry in entries:
        if entry.get("question_id") in answers:
            entry["answer"] = answers[entry["question_id"]]
    logger.info("merged answers for %d questions from %s", len(answers), path)


def load_caption_gt(path: str | Path) -> dict[int, list[str]]:
    """Read a COCO-caption-format GT file (``coco_karpathy_{val,test}_gt.json``, NoCaps val) → {image_id: captions}.

    Every listed image gets an entry (possibly empty); annotations must reference listed images.
    """
    data = _read_json(Path(path))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise AnnotationError(f"{path}: expected COCO caption format with 'images' and 'annotations'")
    gt: dict[int, list[str]] = {}
    for i, img in enumerate(data["images"]):
        validate_entry(img, {"id": "int"}, f"{path}: images[{i}]")
        gt[img["id"]] = []
    for i, ann in enumerate(data["annotations"]):
        validate_entry(ann, {"image_id": "int", "caption": "str"}, f"{path}: annotations[{i}]")
        if ann["image_id"] not in gt:
            raise AnnotationError(f"{path}: annotations[{i}]: image_id {ann['image_id']} is not in 'images'")
        gt[ann["image_id"]].append(ann["caption"])
    return gt
