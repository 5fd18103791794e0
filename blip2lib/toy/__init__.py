"""The embedded toy world: BLIP-2 in miniature (synthetic scenes, real file formats, frozen stage-0 models).

``build_toy_world()`` returns a :class:`ToyWorld` of paths (see ``README.md`` in this folder). The builder imports
torch and transformers, so its names are imported on first use (PEP 562): ``python -m blip2lib.toy --help`` stays
instant and ``from blip2lib.toy import build_toy_world`` works as before.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_LAZY = {"ToyWorld": "build", "build_toy_world": "build", "load_toy_world": "build"}  # name -> defining submodule

__all__ = ["ToyWorld", "build_toy_world", "load_toy_world"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
