"""Annotation-file loading and validation shared by the readers and the manifest (errors name file and line).

Files are validated entry by entry at dataset construction, so a malformed line fails before training starts.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .official import gqa_to_lavis, nocaps_to_lavis, vqa_to_lavis

__all__ = ["AnnotationError", "PackedRecords", "load_packed", "validate_entry", "load_annotations",
           "load_caption_gt", "iter_jsonl", "iter_text_lines", "read_json"]  # fmt: skip

logger = logging.getLogger(__name__)


class AnnotationError(UserError, ValueError):
    """A malformed annotation/manifest entry; the message names the file and line (or entry index)."""


_TYPES = {"str": str, "int": int, "float": (int, float), "any": object}


_NAMES = {"list[str]+": "a non-empty list of strings"}  # how an error names a type that its spelling hides


def _type_ok(value: Any, tname: str) -> bool:
    if tname in ("list[str]", "list[str]+"):  # "+": at least one (a VQA answer list, a retrieval caption list)
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return ok and (bool(value) or tname == "list[str]")
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
            raise AnnotationError(
                f"{where}: field {name!r} should be {_NAMES.get(tname, tname)}, got {entry[name]!r:.80}"
            )


def _not_utf8(path: Path, lineno: int, line: bytes, err: UnicodeDecodeError) -> AnnotationError:
    bad = line[err.start : err.start + 1].hex()
    return AnnotationError(f"{path}:{lineno}: not UTF-8 text (byte 0x{bad} at column {err.start + 1}); re-save the "
                           "file as UTF-8")  # fmt: skip


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file, read one line at a time (a BOM is dropped).

    Raises:
        AnnotationError: ``file:line: not UTF-8 text ...`` for the first line that does not decode.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, lineno, raw, err) from None
            yield lineno, text.lstrip("\ufeff") if lineno == 1 else text


def read_json(path: str | Path) -> Any:
    """Parse a whole UTF-8 JSON file; every failure names the file and line.

    Raises:
        AnnotationError: ``file:line:col: invalid JSON`` or ``file:line: not UTF-8 text``.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1  # the offending line: its number and its bytes
        line_err = UnicodeDecodeError(err.encoding, err.object, err.start - start, err.end - start, err.reason)
        raise _not_utf8(path, data.count(b"\n", 0, err.start) + 1, data[start:], line_err) from None
    del data
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None


_read_json = read_json


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` of each non-blank line of a JSONL file, streamed (one line in memory at a time).

    Raises:
        AnnotationError: ``file:line: invalid JSON`` or ``file:line: not UTF-8 text``.
    """
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    return [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path)]


class ReadOnlyEntry(dict):
    """A decoded :class:`PackedRecords` entry: a plain dict to read, but writing to it is an error.

    Why: a change would vanish silently (the next access decodes the stored entry again); copy it (``dict(e)``) to
    change it.
    """

    def _refuse(self, *args, **kwargs):
        raise TypeError("annotation entries are read-only (stored packed, decoded on each access): change a copy, "
                        "dict(entry), or the annotation file")  # fmt: skip

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self):  # pickle / deepcopy rebuild through the constructor, not item by item
        return ReadOnlyEntry, (dict(self),)


class PackedRecords(Sequence):
    """Read-only list of JSON objects kept as one UTF-8 buffer plus an ``(N + 1,) int64`` offset array.

    Why: a list of N dicts costs ~0.5–1 KB of Python objects per entry, and each forked DataLoader worker slowly
    copies all of it (reading an entry touches its reference counts, which dirties the shared page). Here an entry
    is ~its JSON size, there are only two Python objects, and workers share the pages untouched. An item is decoded
    on access (a few microseconds) as a :class:`ReadOnlyEntry`.
    """

    def __init__(self, records: Iterable[dict]):
        buf, offsets = bytearray(), array("q", [0])
        for record in records:
            buf += json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            offsets.append(len(buf))
        self._buf = buf  # kept as built: bytes(buf) would copy it once more at the peak
        self._offsets = np.frombuffer(offsets, dtype=np.int64)  # (N + 1,) a view: no second copy

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range ({n} records)")
        index %= n
        return json.loads(self._buf[self._offsets[index] : self._offsets[index + 1]], object_hook=_top_level_entry)

    def nbytes(self) -> int:
        """Bytes held (buffer + offsets)."""
        return len(self._buf) + self._offsets.nbytes


def _top_level_entry(obj: dict) -> dict:
    # object_hook runs innermost-first; annotation entries nest no objects, and a nested one read-only is harmless
    return ReadOnlyEntry(obj)


def _official_to_list(data: Any, path: Path) -> list | None:
    """Detect an official-format file and convert it; None when ``data`` is not one we know."""
    if isinstance(data, dict) and "questions" in data and "data_subtype" in data:
        return vqa_to_lavis(data, None)
    if isinstance(data, dict) and "images" in data and data["images"] and "file_name" in data["images"][0]:
        return nocaps_to_lavis(data, "test" if "test" in path.name else "val")
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "imageId" in v for v in data.values()):
        return gqa_to_lavis(data)
    return None


def _stream_jsonl(paths: list[Path], fields: dict[str, str] | None) -> Iterator[dict]:
    i = 0
    for path in paths:
        for lineno, entry in iter_jsonl(path):
            if fields is not None:
                validate_entry(entry, fields, f"{path}:{lineno}")
            entry["instance_id"] = str(i)
            i += 1
            yield entry


def load_packed(paths: str | Path | list, fields: dict[str, str] | None = None) -> PackedRecords:
    """:func:`load_annotations` into :class:`PackedRecords`; JSONL files are streamed into it, one line at a time.

    Memory (measured by ``tests/unit/test_reliability_data.py``): JSONL inputs peak at about the packed size (the
    file's size); JSON lists are parsed whole first (peak ~10× the file, a few KB per VQA question), then packed.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if all(Path(p).suffix == ".jsonl" for p in paths):
        return PackedRecords(_stream_jsonl(list(map(Path, paths)), fields))
    return PackedRecords(load_annotations(paths, fields))


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
