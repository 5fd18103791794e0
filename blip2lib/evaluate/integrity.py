"""Checks that keep an evaluation from scoring something other than what it claims to score.

* :func:`check_unique_ids`: a question id given twice in the evaluated split would make the second answer
  overwrite the first (one ground truth silently dropped, yet ``complete: true``); refused before any generation,
  naming the id, the entries and the file.
* :func:`duplicate_captions`: the same caption text on two images makes text-to-image retrieval ambiguous (both
  images score it identically, only one counts as correct); scored as the benchmark defines it, but warned about
  and counted in ``result.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from blip2lib.data import AnnotationError

__all__ = [
    "check_unique_ids",
    "duplicate_captions",
    "weights_fingerprint",
    "file_identity",
    "checkpoint_identity",
    "data_identity",
]

logger = logging.getLogger(__name__)
_MAX_LISTED = 20


def check_unique_ids(entries: Sequence[dict] | None, key: str, where: str) -> None:
    """Raise :class:`AnnotationError` when two ``entries`` share ``entries[i][key]``.

    Args:
        entries: the split's annotation entries (a dataset's ``annotation`` list); None or entries without ``key``
            are not checked.
        key: the id field, e.g. ``"question_id"``.
        where: the file (or dataset) named in the error.
    """
    first: dict[Any, int] = {}
    for i, entry in enumerate(entries or ()):
        if not isinstance(entry, dict) or key not in entry:
            continue
        qid = entry[key]
        if qid in first:
            repeats = sum(1 for e in entries if isinstance(e, dict) and e.get(key) == qid)
            raise AnnotationError(
                f"{where}: {key} {qid!r} appears {repeats} times (entries {first[qid]} and {i}, counted from 0); "
                "each must appear once, or one answer would overwrite the other"
            )
        first[qid] = i


def duplicate_captions(texts: Sequence[str], txt2img: Sequence[int], where: str) -> dict[str, Any]:
    """Caption texts shared by two or more different images (after the caption processor); warns when any.

    Returns:
        ``{"texts": number of distinct shared captions, "captions_affected": texts carrying one of them,
        "examples": [{"caption", "images": [gallery indices]}, ...] (first 20)}``.
    """
    images: dict[str, set[int]] = {}
    for text, img in zip(texts, txt2img):
        images.setdefault(text, set()).add(int(img))
    shared = {t: sorted(imgs) for t, imgs in images.items() if len(imgs) > 1}
    affected = sum(1 for t in texts if t in shared)
    if shared:
        logger.warning(
            "%s: %d caption text(s) belong to more than one image (%d captions affected): text-to-image recall "
            "counts only the annotated image as correct; first: %r on images %s",
            where, len(shared), affected, *next(iter(shared.items())),
        )  # fmt: skip
    examples = [{"caption": t, "images": imgs} for t, imgs in list(shared.items())[:_MAX_LISTED]]
    return {"texts": len(shared), "captions_affected": affected, "examples": examples}


# --------------------------------------------------------------------------------------------------------------
# Identities for the prediction cache's key and result.json (see drivers_common)


def weights_fingerprint(model: torch.nn.Module, per_tensor: int = 1024) -> str:
    """sha256 over every parameter's and buffer's name, shape, dtype and ``per_tensor`` evenly strided values.

    Cheap for billions of parameters (a few thousand values per tensor cross to the CPU) and deterministic for the
    same weights; two checkpoints that differ only in values the stride skips would collide, which is why callers
    also pass the checkpoint's own identity (:func:`checkpoint_identity`).
    """
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.is_meta or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor]
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: str | Path, content: bool = True) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns"}`` of a file (resolved), plus its ``sha256`` when ``content``."""
    p = Path(path).resolve()
    st = p.stat()
    out: dict[str, Any] = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content:
        out["sha256"] = _sha256(p)
    return out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json", ".model")


def checkpoint_identity(source: str | Path) -> dict[str, Any]:
    """Identity of a checkpoint as ``from_pretrained`` resolves it, for the cache key and ``result.json``.

    Our training checkpoints (a ``ckpt-<step>/`` or a run folder, resolved to its newest complete checkpoint): the
    manifest's sha256 (it lists the sha256 of every weight file). A transformers directory or a LAVIS file: size
    and mtime of each weight / config file (hashing many gigabytes per evaluation would cost more than it saves;
    a copied or rewritten file gets a new mtime, which supersedes the cache: safe, if sometimes needless).
    """
    from blip2lib.checkpoint import latest_checkpoint

    p = Path(source).resolve()
    out: dict[str, Any] = {"path": str(p)}
    ck = p if (p / "manifest.json").is_file() else None
    if ck is None and p.is_dir() and not (p / "config.json").is_file():
        ck = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
    if ck is not None:
        out.update(resolved=str(ck), manifest_sha256=_sha256(ck / "manifest.json"))
    elif p.is_dir():
        out["files"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir())
                        if f.is_file() and f.suffix in _WEIGHT_SUFFIXES}  # fmt: skip
    elif p.is_file():
        out["files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns]}
    return out


def data_identity(dataset: Dataset) -> dict[str, Any]:
    """sha256 of the dataset's annotation entries, its image folder and transform (the image size lives there)."""
    anns = getattr(dataset, "annotation", None)
    digest = None
    if anns is not None:
        digest = hashlib.sha256(json.dumps(anns, sort_keys=True, default=str).encode()).hexdigest()
    transform = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(getattr(dataset, "transform", None)))  # no addresses
    root = getattr(dataset, "root", None)
    return {"class": type(dataset).__name__, "annotations_sha256": digest, "images_root": str(root) if root else None,
            "transform": transform}  # fmt: skip
