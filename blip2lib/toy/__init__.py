"""The embedded toy world: BLIP-2 in miniature (synthetic scenes, real file formats, frozen stage-0 models).

``build_toy_world()`` returns a :class:`ToyWorld` of paths (see ``README.md`` in this folder). The builder imports
torch and transformers, so its names are imported on first use (PEP 562): ``python -m blip2lib.toy --help`` stays
instant and ``from blip2lib.toy import build_toy_world`` works as before.
"""

from __future__ import annotations

import importlib

_LAZY = {"ToyWorld": "build", "build_toy_world": "build", "load_toy_world": "build"}  # name -> defining submodule

__all__ = ["ToyWorld", "build_toy_world", "load_toy_world"]


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first access and cache the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
