"""The embedded toy world: BLIP-2 in miniature (synthetic scenes, real file formats, frozen stage-0 models).

``build_toy_world()`` returns a :class:`ToyWorld` of paths (see ``README.md`` in this folder).
"""

from .build import ToyWorld, build_toy_world, load_toy_world

__all__ = ["ToyWorld", "build_toy_world", "load_toy_world"]
