"""User data without registry code: a JSONL or CSV manifest of images and texts.

Two kinds, decided by the columns of the first row and required on every row:

* captions — ``image`` + ``text`` (optional ``image_id``) → samples ``{"image", "text_input", "image_id"}``
  (``image_id`` stays a string: caption data must not switch on the retrieval-mode ITC, docs/paper_map.md §10.15);
* VQA — ``image`` + ``question`` + ``answers`` (optional ``question_id``) → ``{"image", "text_input", "answers",
  "weights", "question_id"}``. In JSONL ``answers`` is a list of strings (or one string); in CSV it is a JSON list
  (``["red", "red", "dark red"]``) or ``|``-separated (``red|red|dark red``).

``image`` is an absolute path or a path relative to ``root`` (default: the manifest's folder). URLs are rejected:
download first (img2dataset writes WebDataset shards that ``shards.py`` reads). Every row is checked when the
dataset is built; a bad row raises :class:`AnnotationError` naming ``file:line``.
"""

from __future__ import annotations

import csv
import itertools
import json
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .annotations import AnnotationError
from .images import BadSampleLog, load_image
from .readers import answer_weights

__all__ = ["ManifestDataset", "read_manifest"]


def _csv_rows(path: Path) -> Iterator[tuple[int, int, Any]]:
    """``(first line, byte offset, row dict)`` of each CSV record, streamed (quoted newlines included)."""
    lines = _OffsetLines(path)
    reader = csv.DictReader(lines)
    if reader.fieldnames is None:
        raise AnnotationError(f"{path}:1: empty CSV (expected a header row)")
    while True:
        offset = lines.offset  # csv reads no further than the record it returns: the next one starts here
        try:
            row = next(reader)
        except StopIteration:
            return
        yield reader.line_num, offset, row  # line_num: the record's last physical line


class _OffsetLines:
    """UTF-8 lines of a file with the byte offset where the next one starts (errors name the file and line)."""

    def __init__(self, path: Path, offset: int = 0, lineno: int = 0):
        self.path, self.offset, self.lineno = path, offset, lineno
        self._f = open(path, "rb")  # noqa: SIM115 -- closed when the iteration ends
        self._f.seek(offset)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        self.start = self.offset
        raw = self._f.readline()
        if not raw:
            self._f.close()
            raise StopIteration
        self.lineno += 1
        self.offset += len(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self._f.close()
            bad = raw[err.start : err.start + 1].hex()
            raise AnnotationError(f"{self.path}:{self.lineno}: not UTF-8 text (byte 0x{bad} at column "
                                  f"{err.start + 1}); re-save the file as UTF-8") from None  # fmt: skip
        return text.lstrip("\ufeff") if self.start == 0 else text


def _rows(path: Path) -> Iterator[tuple[int, int, Any]]:
    """``(line, byte offset, row)`` of each manifest row, one row in memory at a time."""
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path)
        return
    if path.suffix.lower() != ".jsonl":
        raise AnnotationError(f"{path}: manifest must end in .jsonl or .csv")
    lines = _OffsetLines(path)
    for line in lines:
        if not line.strip():
            continue
        try:
            yield lines.lineno, lines.start, json.loads(line)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}:{lines.lineno}: invalid JSON ({err.msg})") from None


def _answers(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{where}: 'answers' is not a valid JSON list ({err.msg})") from None
        else:
            value = [a.strip() for a in text.split("|")]
    if not (isinstance(value, list) and value and all(isinstance(a, str) and a for a in value)):
        raise AnnotationError(f"{where}: 'answers' must be a non-empty list of non-empty strings, got {value!r:.80}")
    return value


def _kind_of(row: Any) -> tuple[str, tuple[str, ...]]:
    kind = "vqa" if isinstance(row, dict) and "question" in row else "caption"
    return kind, ("image", "question", "answers") if kind == "vqa" else ("image", "text")


def _entry(row: Any, i: int, where: str, kind: str, need: tuple[str, ...]) -> dict:
    """Validate one manifest row (``where`` = ``file:line``) and normalise it; ``i`` is its row index."""
    if not isinstance(row, dict):
        raise AnnotationError(f"{where}: expected an object with fields {list(need)}, got {type(row).__name__}")
    for key in need:
        if key not in row or row[key] is None or row[key] == "":
            raise AnnotationError(f"{where}: missing or empty {key!r} (a {kind} manifest needs {list(need)})")
    if not isinstance(row["image"], str):
        raise AnnotationError(f"{where}: 'image' must be a path string, got {row['image']!r:.80}")
    if row["image"].startswith(("http://", "https://")):
        raise AnnotationError(f"{where}: URLs are not fetched; download the images (or build WebDataset shards)")
    if kind == "caption":
        if not isinstance(row["text"], str):
            raise AnnotationError(f"{where}: 'text' must be a string, got {row['text']!r:.80}")
        image_id = str(i if row.get("image_id") in (None, "") else row["image_id"])
        return {"image": row["image"], "text": row["text"], "image_id": image_id}
    if not isinstance(row["question"], str):
        raise AnnotationError(f"{where}: 'question' must be a string, got {row['question']!r:.80}")
    qid = row.get("question_id")
    try:
        qid = i if qid in (None, "") else int(qid)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: 'question_id' must be an integer, got {qid!r:.80}") from None
    return {"image": row["image"], "question": row["question"], "answers": _answers(row["answers"], where),
            "question_id": qid}  # fmt: skip


def _scan(path: Path) -> tuple[str, np.ndarray]:
    """Validate every row, streaming; returns the kind and each row's byte offset ``(N,) int64``."""
    offsets, kind, need = array("q"), None, ()
    for i, (lineno, offset, row) in enumerate(_rows(path)):
        if kind is None:
            kind, need = _kind_of(row)
        _entry(row, i, f"{path}:{lineno}", kind, need)
        offsets.append(offset)
    if kind is None:
        raise AnnotationError(f"{path}: manifest has no rows")
    return kind, np.frombuffer(offsets, dtype=np.int64)  # a view of the array: no second copy


def read_manifest(path: str | Path) -> tuple[str, list[dict]]:
    """Parse and validate a manifest, streaming it row by row.

    Args:
        path: ``.jsonl`` or ``.csv`` file.

    Returns:
        ``(kind, entries)`` with kind ``"caption"`` or ``"vqa"``; entries are normalised dicts with ``image``,
        ``text``/``question``+``answers``, and an id (``image_id`` str or ``question_id``). For large manifests use
        :class:`ManifestDataset`, which keeps only each row's byte offset.

    Raises:
        AnnotationError: ``file:line: ...`` for the first malformed row (or a line that is not UTF-8).
    """
    path = Path(path)
    entries, kind, need = [], None, ()
    for i, (lineno, _, row) in enumerate(_rows(path)):
        if kind is None:
            kind, need = _kind_of(row)
        entries.append(_entry(row, i, f"{path}:{lineno}", kind, need))
    if kind is None:
        raise AnnotationError(f"{path}: manifest has no rows")
    return kind, entries


class ManifestDataset(Dataset):
    """Dataset over a JSONL/CSV manifest (see module docstring for the sample keys).

    Memory: every row is validated when the dataset is built, streaming, and only its byte offset is kept (8 bytes
    a row: 80 MB for 10M captions, shared by forked DataLoader workers without copies, since a NumPy array has no
    per-row Python objects whose reference counts would dirty the pages); a sample re-reads its row from the file.

    Args:
        path: the manifest.
        root: folder that relative image paths start from; default the manifest's folder.
        transform: image transform (``image_train_transform`` / ``image_eval_transform``).
        text_processor: applied to ``text``/``question`` (e.g. ``CaptionProcessor()``); default identity.
        bad_log: shared :class:`BadSampleLog` (pass the same one to ``Collate``).
    """

    def __init__(self, path, root=None, transform=None, text_processor=None, bad_log: BadSampleLog | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.kind, self.offsets = _scan(self.path)
        self._need = _kind_of({"question": None} if self.kind == "vqa" else {})[1]
        self._header = None
        if self.path.suffix.lower() == ".csv":  # the header line, given to the parser of each re-read record
            with open(self.path, "rb") as f:
                self._header = f.readline().decode("utf-8").lstrip("\ufeff")
        self.transform = transform
        self.text_processor = text_processor
        self.bad_log = bad_log if bad_log is not None else BadSampleLog()

    def __len__(self) -> int:
        return len(self.offsets)

    def entry(self, index: int) -> dict:
        """Row ``index``, re-read from the file at its offset and normalised."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            if self._header is None:
                row = json.loads(f.readline().decode("utf-8"))
            else:  # a CSV record may span lines (quoted newlines): parse from its first line on
                lines = (raw.decode("utf-8") for raw in iter(f.readline, b""))
                row = next(csv.DictReader(itertools.chain([self._header], lines)))
        return _entry(row, index, f"{self.path}: row {index}", self.kind, self._need)

    def __getitem__(self, index: int) -> dict | None:
        entry = self.entry(index)
        image = load_image(self.root / entry["image"], self.bad_log)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        proc = self.text_processor if self.text_processor is not None else str
        if self.kind == "caption":
            return {"image": image, "text_input": proc(entry["text"]), "image_id": entry["image_id"]}
        answers, weights = answer_weights(entry["answers"])
        q = proc(entry["question"])
        return {
            "image": image,
            "text_input": q,
            "answers": answers,
            "weights": weights,
            "question_id": entry["question_id"],
        }
