"""Names from params files that become folder or file names (model names, ablation variants, LLM families).

A name such as ``../../escaped`` or ``a/b`` joined onto a run folder would write outside it or into a sub-folder
nobody asked for; :func:`safe_name` refuses those with an error naming the params source and the key, rather than
rewriting them (a silently renamed folder is as hard to find as an escaped one).
"""

from __future__ import annotations

import os

from .config import ParamsError

__all__ = ["safe_name"]

_MAX_BYTES = 255  # the longest file name of common file systems (ext4, xfs, APFS, NTFS in UTF-16 units)


def safe_name(name: object, key: str, source: str = "<params>") -> str:
    """Return ``name`` when it is one plain path component; raise :class:`ParamsError` otherwise.

    Refused: a non-string or empty name, ``.`` and ``..``, any path separator (slash, backslash, the platform's),
    NUL or other control characters, surrounding whitespace, and names longer than 255 bytes in UTF-8.

    Args:
        name: the candidate (a dict key or list entry of a params file).
        key: the params key it came from, e.g. ``"checkpoints"``.
        source: the params file (or other source) named in the error.
    """
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    why = None
    if not isinstance(name, str) or not name:
        why = "must be a non-empty string"
    elif name in (".", ".."):
        why = "is a relative path, not a name"
    elif any(s in name for s in seps):
        why = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains a control character"
    elif name != name.strip():
        why = "has leading or trailing whitespace"
    elif len(name.encode("utf-8")) > _MAX_BYTES:
        why = f"is longer than {_MAX_BYTES} bytes"
    if why:
        raise ParamsError(
            f"{source}: key '{key}': name {name!r} {why}; it becomes a folder name, so use one plain name "
            "(letters, digits, '-', '_', '.')"
        )
    return name
