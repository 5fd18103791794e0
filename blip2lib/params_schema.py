"""The flat run-parameter schema: ``Params`` (the base of every notebook's parameters), its YAML reader and checks.

Run parameters are flat dataclasses whose fields equal a notebook's ``parameters`` cell; YAML files are validated
against them (unknown key, wrong type or a value out of range → :class:`ParamsError` naming the file and key). Split
out of ``blip2lib/config.py``, which re-exports every name here; this module imports nothing from it, so the import
graph stays one-way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import UserError

# Values of the ``model_scale`` key (``full`` | ``rehearsal``, see blip2lib/config.py's size override).
MODEL_SCALES = ("full", "rehearsal")
# Run length under the override: keys a schema has are replaced (a few steps, tiny batches, one process).
REHEARSAL_RUN = {"steps": 2, "batch_size": 2, "num_gpus": 1, "num_workers": 0, "grad_accum": 1, "warmup_steps": 1,
                 "steps_per_epoch": 1, "ckpt_every": 0, "eval_every": 0, "val_images": 2, "shard_epoch_samples": 4,
                 "shuffle_buffer": 4, "itm_batch_size": 8, "progress": False}  # fmt: skip


class ParamsError(UserError, ValueError):
    """A params file or override is invalid (message names the file and key)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):  # noqa: D102
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_params_yaml(path: str | Path) -> dict:
    """Read a flat params YAML file: a mapping, no duplicate keys; errors name the file (and line).

    Raises:
        ParamsError: invalid YAML, a duplicate key, or a top level that is not a mapping.
    """
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of flat keys, got {type(data).__name__}")
    return data


def type_word(tp: Any) -> str:
    """A field's type as a user reads it: ``int``, ``list of str``, ``mapping of str to int``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_word(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (list, tuple) or tp in (list, tuple):
        return f"list of {type_word(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return f"mapping of {type_word(args[0])} to {type_word(args[1])}" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(_check_type(v, args[0]) for v in value))
    if origin is dict:
        args = typing.get_args(tp)
        return isinstance(value, dict) and (
            not args or all(_check_type(k, args[0]) and _check_type(v, args[1]) for k, v in value.items())
        )
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\)\s]+)\s*([\])])")


def in_range(value: float, spec: str) -> bool:
    """Whether ``value`` lies in the interval that ``spec`` starts with (``"[1, inf)"``, ``"(0, 1]"``; text may follow).

    Raises:
        ValueError: ``spec`` does not start with an interval (a schema bug, not a user error).
    """
    m = _INTERVAL.match(spec)
    if m is None:
        raise ValueError(f"range {spec!r} does not start with an interval such as '[1, inf)'")
    lo, hi = float(m.group(2)), float(m.group(3))
    above = value >= lo if m.group(1) == "[" else value > lo
    below = value <= hi if m.group(4) == "]" else value < hi
    return above and below and not (isinstance(value, float) and math.isnan(value))


@dataclass
class Params:
    """Base of every notebook's run parameters: the fields every notebook has.

    ``ranges`` (a class attribute, merged over the class hierarchy) maps numeric keys to their allowed interval;
    :meth:`from_dict` checks them before any work, so ``batch_size: 0`` is refused naming the file and the key
    instead of failing later (or, worse, running). A ``None`` value is never range-checked: it means "the recipe's".
    """

    ranges: ClassVar[dict[str, str]] = {"seed": "[0, 4294967295] (numpy seeds are 32-bit)", "num_gpus": "[1, inf)"}

    run_dir: str = ""  # output folder; "" → runs/<notebook>/<variant>/ chosen by the runner
    smoke_test: bool = False  # seconds-sized run for CI
    seed: int = 42  # global seed
    num_gpus: int = 1  # >1 launches torchrun as a subprocess
    model_scale: str = "full"  # full | rehearsal (tiny models from the same files, a few steps: blip2lib/rehearsal)
    data_root: str = ""  # folder with the prepared datasets ("" → toy world)
    weights_root: str = ""  # folder with local checkpoints ("" → toy world models)

    @classmethod
    def check_keys(cls, values: dict, source: str = "<dict>") -> None:
        """Unknown key (with the nearest known key) or wrong type (as a word): a ParamsError naming ``source``."""
        fields = dataclasses.fields(cls)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields]
        for key, value in values.items():
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(sorted(names))}"
                raise ParamsError(f"{source}: unknown key '{key}' for {cls.__name__} ({hint})")
            if not _check_type(value, hints[key]):
                raise ParamsError(
                    f"{source}: key '{key}' must be {type_word(hints[key])}, got {type(value).__name__} {value!r}"
                )

    @classmethod
    def from_dict(cls, values: dict, source: str = "<dict>") -> Params:
        """Validate ``values`` against the fields (unknown key / wrong type → :class:`ParamsError`)."""
        cls.check_keys(values, source)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: float(v) if hints[k] is float and isinstance(v, int) else v for k, v in values.items()}
        scale = values.get("model_scale", "full")
        if scale not in MODEL_SCALES:
            raise ParamsError(f"{source}: key 'model_scale' must be one of {list(MODEL_SCALES)}, got {scale!r}")
        if scale == "rehearsal":  # the rehearsal's run length (REHEARSAL_RUN); every other key stays as given
            values.update({k: v for k, v in REHEARSAL_RUN.items() if k in names})
        try:
            obj = cls(**values)
        except ParamsError as e:  # a schema's own cross-key check: name the file
            raise ParamsError(f"{source}: {e}") from e
        obj.check_ranges(source)
        return obj

    @classmethod
    def all_ranges(cls) -> dict[str, str]:
        """``ranges`` of this class and its bases (a subclass entry overrides its base's)."""
        merged: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("ranges", {}))
        return merged

    def check_ranges(self, source: str = "<params>") -> None:
        """Raise :class:`ParamsError` naming ``source``, the key and its allowed range for a value outside it."""
        for key, spec in self.all_ranges().items():
            value = getattr(self, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not in_range(value, spec):
                raise ParamsError(f"{source}: key '{key}' must be in {spec}, got {value!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Params:
        """Load and validate a flat YAML params file."""
        return cls.from_dict(load_params_yaml(path), source=str(path))

    @classmethod
    def from_namespace(cls, ns: dict) -> Params:
        """Build from a notebook's globals (only this class's field names are read)."""
        return cls.from_dict({f.name: ns[f.name] for f in dataclasses.fields(cls) if f.name in ns}, "notebook")

    def to_dict(self) -> dict:
        """Flat dict of all fields."""
        return dataclasses.asdict(self)
