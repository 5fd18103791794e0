"""Flat run-parameter schemas, one dataclass per notebook.

The notebook's parameters cell has the same names and defaults; ``tests/repo`` checks they stay in sync.

Two class-level (non-field) attributes steer the runner and the tests:

* ``records``: metric names the notebook always records; the smoke test asserts each is in ``metrics.json`` and
  finite.
* ``collects_variant``: the notebook reads every other run of its variant (``90_summary``), so any of them
  changing makes its outputs stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


# ----------------------------------------------------------------------------------------------------------------
# Training notebooks: the flat TrainParams keys (blip2lib.train) with per-stage defaults and report goals.

from ..train import TrainParams  # noqa: E402


@dataclass
class _StageParams(TrainParams):
    goals: dict = field(default_factory=dict)  # report goals: metric → {goal, direction, label, baseline}

    records: ClassVar[tuple[str, ...]] = ("loss_start", "loss_end", "steps", "trainable_params")

    def train_params(self) -> TrainParams:
        """The plain :class:`TrainParams` (drops the report-only keys)."""
        keep = {f for f in TrainParams.__dataclass_fields__}
        return TrainParams(**{k: v for k, v in self.to_dict().items() if k in keep})


@register("10_stage1_pretrain")
@dataclass
class Stage1Params(_StageParams):
    """Stage 1 (paper §3.2): ITC + ITM + ITG on the Q-Former with a frozen image encoder."""

    stage: str = "stage1"
    val_data: str = "toy"


@register("20_stage2_pretrain")
@dataclass
class Stage2Params(_StageParams):
    """Stage 2 (paper §3.3): generative learning from a frozen LLM, one run per family in ``llms``."""

    stage: str = "stage2"
    llms: list[str] = field(default_factory=list)  # LLM families trained one after the other (empty: [llm])
    min_lr: float = 5e-5  # paper §3.4 stage 2
    val_data: str = "toy"


@register("30_finetune_caption")
@dataclass
class CaptionFTParams(_StageParams):
    """COCO-style caption fine-tuning (paper §4.2, Table 7): prompt "a photo of", ViT unfrozen."""

    stage: str = "caption_ft"
    prompt: str = "a photo of"
    freeze_vit: bool = False
    lr: float = 1e-5
    min_lr: float = 0.0
    beta2: float = 0.999
    warmup_steps: int = 1000
    val_data: str = "toy"


@register("31_finetune_retrieval")
@dataclass
class RetrievalFTParams(_StageParams):
    """Retrieval fine-tuning (paper §4.4, Table 9): image-id-aware ITC/ITM + ITG, ViT unfrozen."""

    stage: str = "retrieval_ft"
    freeze_vit: bool = False
    lr: float = 1e-5
    min_lr: float = 0.0
    beta2: float = 0.999
    warmup_steps: int = 1000
    lr_layer_decay: float = 0.95
    val_data: str = "toy"


@register("32_finetune_vqa")
@dataclass
class VQAFTParams(_StageParams):
    """VQA fine-tuning (paper §4.3, Table 8): the question goes through the Q-Former and the LLM prompt."""

    stage: str = "vqa_ft"
    freeze_vit: bool = False
    lr: float = 1e-5
    min_lr: float = 0.0
    beta2: float = 0.999
    warmup_steps: int = 1000
    lr_layer_decay: float = 0.95
