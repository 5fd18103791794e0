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
import json
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .annotations import AnnotationError
from .images import BadSampleLog, load_image
from .readers import answer_weights

__all__ = ["ManifestDataset", "read_manifest"]


def _rows(path: Path) -> list[tuple[int, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise AnnotationError(f"{path}:1: empty CSV (expected a header row)")
            # DictReader.line_num is the physical line just read (handles quoted newlines).
            return [(reader.line_num, row) for row in reader]
    if path.suffix.lower() != ".jsonl":
        raise AnnotationError(f"{path}: manifest must end in .jsonl or .csv")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
    return rows


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


def read_manifest(path: str | Path) -> tuple[str, list[dict]]:
    """Parse and validate a manifest.

    Args:
        path: ``.jsonl`` or ``.csv`` file.

    Returns:
        ``(kind, entries)`` with kind ``"caption"`` or ``"vqa"``; entries are normalised dicts with ``image``,
        ``text``/``question``+``answers``, and an id (``image_id`` str or ``question_id``).

    Raises:
        AnnotationError: ``file:line: ...`` for the first malformed row.
    """
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise AnnotationError(f"{path}: manifest has no rows")
    kind = "vqa" if "question" in rows[0][1] else "caption"
    need = ("image", "question", "answers") if kind == "vqa" else ("image", "text")
    entries = []
    for i, (lineno, row) in enumerate(rows):
        where = f"{path}:{lineno}"
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
            entries.append(
                {
                    "image": row["image"],
                    "text": row["text"],
                    "image_id": str(i if row.get("image_id") in (None, "") else row["image_id"]),
                }
            )
        else:
            if not isinstance(row["question"], str):
                raise AnnotationError(f"{where}: 'question' must be a string, got {row['question']!r:.80}")
            qid = row.get("question_id")
            try:
                qid = i if qid in (None, "") else int(qid)
            except (TypeError, ValueError):
                raise AnnotationError(f"{where}: 'question_id' must be an integer, got {qid!r:.80}") from None
            answers = _answers(row["answers"], where)
            entries.append({"image": row["image"], "question": row["question"], "answers": answers, "question_id": qid})
    return kind, entries


class ManifestDataset(Dataset):
    """Dataset over a JSONL/CSV manifest (see module docstring for the sample keys).

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
        self.kind, self.entries = read_manifest(self.path)
        self.transform = transform
        self.text_processor = text_processor
        self.bad_log = bad_log if bad_log is not None else BadSampleLog()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict | None:
        entry = self.entries[index]
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
