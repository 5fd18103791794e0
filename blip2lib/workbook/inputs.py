"""What a run reads, for the runner: params with ``-p`` overrides and ``--runs`` rebasing, and the run's inputs record.

Params: a params file's values, then ``-p KEY=VALUE`` overrides (the value read as YAML, then typed by the notebook's
schema), then every ``runs/...`` string rebased onto ``--runs`` when one is given. Errors name the file or the
override, the key, and the expected type as a plain word; an unknown key suggests the nearest known one.

Inputs record (``inputs.json`` in a finished run): the params values, the notebook's hash, the hash of each upstream
run's ``metrics.json`` and of each library file, and the git commit. Its digest decides "up to date"; comparing two
records says what changed (params key by key, which library files) when a finished run is stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..config import Params, ParamsError

NOTEBOOK_KEY = "notebook"  # a params file may name its notebook; the runner consumes the key, the schema never sees it


# ---- types as words -----------------------------------------------------------------------------------------------


def field_types(schema: type[Params]) -> dict[str, Any]:
    """Field name → resolved type hint (class-level ``ClassVar`` attributes are not keys)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def check_values(values: Mapping[str, Any], schema: type[Params], source: str) -> None:
    """Unknown key (with the nearest known key) or wrong type (as a word) → :class:`ParamsError` naming ``source``."""
    schema.check_keys(dict(values), source)


# ---- -p overrides -------------------------------------------------------------------------------------------------


def override_texts(overrides: Iterable[str] | Mapping[str, Any] | None) -> tuple[str, ...]:
    """Overrides as ``KEY=VALUE`` texts (hashable, for a Job); a mapping's values are written as JSON (valid YAML)."""
    if not overrides:
        return ()
    if isinstance(overrides, Mapping):
        return tuple(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    return tuple(overrides)


def split_override(text: str) -> tuple[str, str]:
    """``"lr=1e-4"`` → ``("lr", "1e-4")``; a text without ``=`` or without a key is a :class:`ParamsError`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"-p {text!r}: expected KEY=VALUE, e.g. -p data_root=/data")
    return key.strip(), raw


def typed_override(text: str, schema: type[Params]) -> tuple[str, Any]:
    """One ``KEY=VALUE`` read as YAML, then typed by the schema's field.

    Typing: a ``str`` field keeps the text as written (``-p split=2017`` stays ``"2017"``, ``-p prompt=yes`` stays
    ``"yes"``); a ``float`` field also accepts ``1e-4`` (YAML 1.1, which PyYAML follows, reads it as a string).
    """
    key, raw = split_override(text)
    fields = field_types(schema)
    check_values({key: None} if key not in fields else {}, schema, f"-p {text}")  # unknown key first
    tp = fields[key]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: only a str field can take it (checked below)
    if tp is str and not isinstance(value, str):
        value = raw
    elif tp is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    check_values({key: value}, schema, f"-p {text}")
    return key, value


def overrides_for(schema: type[Params], overrides: Iterable[str]) -> tuple[str, ...]:
    """The overrides whose key the schema has (``run-all``: ``-p steps=10`` reaches only the training notebooks)."""
    fields = field_types(schema)
    return tuple(t for t in overrides if split_override(t)[0] in fields)


# ---- --runs ---------------------------------------------------------------------------------------------------------


def rebase_runs(value: Any, runs: Path) -> Any:
    """Every string (also inside lists and mappings) that starts with ``runs/`` moved onto the ``runs`` folder.

    ``init_from`` may list several folders (``runs/a, runs/b``): each part is rebased.
    """
    if isinstance(value, str):
        if not value.startswith("runs/"):
            return value
        parts = [p.strip() for p in value.split(",")]
        return ", ".join(str(runs / p[len("runs/") :]) if p.startswith("runs/") else p for p in parts)
    if isinstance(value, dict):
        return {k: rebase_runs(v, runs) for k, v in value.items()}
    if isinstance(value, list):
        return [rebase_runs(v, runs) for v in value]
    return value


# ---- the inputs record --------------------------------------------------------------------------------------------


def file_sha(path: Path) -> str:
    """SHA-256 of a file's bytes; ``"<missing>"`` when it does not exist."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "<missing>"


def library_hashes(library: Path) -> dict[str, str]:
    """``{"blip2lib/viz.py": sha, ...}`` for every ``*.py`` under the library folder."""
    return {str(f.relative_to(library.parent)): file_sha(f) for f in sorted(library.rglob("*.py"))}


def inputs_record(values: Mapping[str, Any], notebook: Path, upstream: Mapping[str, Path], library: Path,
                  commit: str = "") -> dict:  # fmt: skip
    """What a run's outputs depend on, each part hashed separately so that a change can be named."""
    return {
        "params": json.loads(json.dumps(dict(values), default=str)),  # JSON-normal, as read back from inputs.json
        "notebook": file_sha(notebook),
        "upstream": {name: file_sha(path) for name, path in upstream.items()},
        "library": library_hashes(library),
        "git_commit": commit,
    }


def record_digest(record: Mapping[str, Any]) -> str:
    """Digest of a record without its git commit: a commit that touches none of the inputs leaves a run current."""
    kept = {k: record.get(k) for k in ("params", "notebook", "upstream", "library")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


_UNSET = object()  # a key the params did not set (the schema's default applies)


def _short(value: Any) -> str:
    return json.dumps(value, default=str) if value is not _UNSET else "(default)"


def _names(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 12) -> list[str]:
    """Human lines saying what differs between a finished run's record and the present one ([] when none)."""
    lines = []
    op, np_ = old.get("params", {}), new.get("params", {})
    diffs = [f"{k}: {_short(op.get(k, _UNSET))} -> {_short(np_.get(k, _UNSET))}"
             for k in sorted(set(op) | set(np_)) if op.get(k, _UNSET) != np_.get(k, _UNSET)]  # fmt: skip
    if diffs:
        lines.append("params: " + "; ".join(diffs))
    if old.get("notebook") != new.get("notebook"):
        lines.append("notebook changed")
    for part, label in (("upstream", "upstream runs changed"), ("library", "library files changed")):
        names = _names(old.get(part, {}), new.get(part, {}))
        if names:
            more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
            lines.append(f"{label}: {', '.join(names[:limit])}{more}")
    return lines
