"""Flat run-parameter schemas, one dataclass per notebook.

The notebook's parameters cell has the same names and defaults; ``tests/repo`` checks they stay in sync.

Two class-level (non-field) attributes steer the runner and the tests:

* ``records``: metric names the notebook always records; the smoke test asserts each is in ``metrics.json`` and
  finite.
* ``collects_variant``: the notebook reads every other run of its variant (``90_summary``), so any of them
  changing makes its outputs stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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

    num_images: int = 500  # scenes in the toy world
    gallery_size: int = 8  # scenes shown in the report gallery
    min_distinct_captions: float = 0.9  # goal: share of scenes whose caption no other scene has
    force_rebuild: bool = False  # rebuild even when the cache holds this seed's world

    records: ClassVar[tuple[str, ...]] = ("num_images", "distinct_caption_frac", "blind_vqa_acc", "chance_img_r1",
                                          "chance_img_r5")  # fmt: skip


@register("90_summary")
@dataclass
class SummaryParams(Params):
    """Collect every run of a variant into ``reports/<variant>/index.html``."""

    runs_root: str = ""  # folder holding <notebook>/<variant>/metrics.json ("" → the runner's runs root)
    reports_root: str = ""  # folder receiving <variant>/index.html ("" → the runner's reports root)
    variant: str = ""  # variant to collect ("" → this run's own variant)

    records: ClassVar[tuple[str, ...]] = ("runs_collected", "runs_ok", "verdicts_match", "verdicts_differs",
                                          "verdicts_met", "verdicts_missed", "verdicts_not_measured")  # fmt: skip
    collects_variant: ClassVar[bool] = True
