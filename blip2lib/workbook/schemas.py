"""Flat run-parameter schemas, one dataclass per notebook (the notebook's parameters cell has the same names and
defaults; ``tests/repo`` checks they stay in sync)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Params

SCHEMAS: dict[str, type[Params]] = {}


def register(notebook: str):
    """Class decorator: register ``cls`` as the schema of ``notebooks/<notebook>.ipynb``."""

    def deco(cls: type[Params]) -> type[Params]:
        SCHEMAS[notebook] = cls
        return cls

    return deco


def schema_for(notebook: str) -> type[Params]:
    """The schema of a notebook (KeyError names the notebook when none is registered)."""
    if notebook not in SCHEMAS:
        raise KeyError(f"no params schema registered for notebook '{notebook}' (known: {sorted(SCHEMAS)})")
    return SCHEMAS[notebook]


@register("01_toy_world")
@dataclass
class ToyWorldParams(Params):
    """Build the embedded toy world and measure its baselines."""

    force_rebuild: bool = False  # rebuild even when the cache holds this seed's world
