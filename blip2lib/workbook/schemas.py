"""Flat run-parameter schemas, one dataclass per notebook.

The notebook's parameters cell has the same names and defaults; ``tests/repo`` checks they stay in sync.

Two class-level (non-field) attributes steer the runner and the tests:

* ``records``: metric names the notebook always records; the smoke test asserts each is in ``metrics.json`` and
  finite.
* ``collects_variant``: the notebook reads every other run of its variant (``90_summary``), so any of them
  changing makes its outputs stale.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..config import Params, ParamsError

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
    """Build the embedded toy world (data + frozen stage-0 models) and measure its baselines."""

    toy_world: str = "full"  # world size: full (make demo) | tiny (seconds, CI)
    gallery_size: int = 8  # scenes shown in the report gallery
    oracle_goal: float = 95.0  # toy bar: text-oracle VQA accuracy of each frozen LLM (percent)
    probe_goal: float = 95.0  # toy bar: linear-probe slot and column accuracy of the frozen ViT (percent)
    force_rebuild: bool = False  # rebuild even when the cache holds this world

    records: ClassVar[tuple[str, ...]] = ("build_seconds",)


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

from ..train_params import TrainParams  # noqa: E402  (torch-free: the runner's --help reads these schemas)


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
    llm_steps: dict[str, int] = field(default_factory=dict)  # per-family override of `steps`, e.g. {t5: 800}
    min_lr: float = 5e-5  # paper §3.4 stage 2
    val_data: str = "toy"

    def __post_init__(self) -> None:
        families = self.llms or [self.llm]
        for fam, n in self.llm_steps.items():
            if fam not in families or n < 1:
                raise ParamsError(f"key 'llm_steps': '{fam}: {n}' must name a family of {families} with steps >= 1")


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


# ----------------------------------------------------------------------------------------------------------------
# Evaluation notebooks, one per paper table: evaluate named checkpoints on one split with the paper's scoring.


# The keys one row of a table notebook's ``checkpoints`` may carry when its models need different local files
# (``tables.evaluate_checkpoints`` passes them to the evaluator; the file-level keys of the same names are the
# defaults of rows given as a plain path). Other tools (preflight, rehearsal) read rows through these four keys.
CHECKPOINT_ROW_KEYS = ("checkpoint", "vision_weights", "llm_path", "bert_dir")


def check_checkpoint_rows(checkpoints: dict) -> None:
    """Each row is a path, or a mapping of :data:`CHECKPOINT_ROW_KEYS` (strings) that names its ``checkpoint``.

    Raises:
        ParamsError: naming the row and the key; an unknown key comes with the nearest valid one.
    """
    for row, value in checkpoints.items():
        if isinstance(value, str):
            continue
        if not isinstance(value, dict):
            raise ParamsError(f"key 'checkpoints': row '{row}' must be a path or a mapping of "
                              f"{list(CHECKPOINT_ROW_KEYS)}, got {type(value).__name__} {value!r}")  # fmt: skip
        for key, v in value.items():
            if key not in CHECKPOINT_ROW_KEYS:
                near = difflib.get_close_matches(str(key), CHECKPOINT_ROW_KEYS, n=1, cutoff=0.5)
                hint = f"did you mean '{near[0]}'? " if near else ""
                raise ParamsError(f"key 'checkpoints': row '{row}': unknown key '{key}' ({hint}valid keys: "
                                  f"{list(CHECKPOINT_ROW_KEYS)})")  # fmt: skip
            if not isinstance(v, str):
                raise ParamsError(f"key 'checkpoints': row '{row}': key '{key}' must be a string, got {v!r}")
        if not value.get("checkpoint"):
            raise ParamsError(f"key 'checkpoints': row '{row}' names no 'checkpoint'")


@dataclass
class _TableParams(Params):
    # model name → checkpoint (run folder, transformers dir, LAVIS file or tiny), or → a mapping of
    # CHECKPOINT_ROW_KEYS when the rows need their own vision tower / LLM / BERT files
    checkpoints: dict = field(default_factory=dict)
    split: str = ""  # a blip2lib.data.FORMATS key of the evaluated split
    images_root: str = ""  # image folder under data_root (empty: the split's default)
    image_size: int = 0  # 0 keeps each checkpoint's own resolution
    vision_weights: str = ""  # LAVIS / training checkpoints: local ViT file
    llm_path: str = ""  # LAVIS / training checkpoints: local LLM directory
    bert_dir: str = ""  # local bert-base-uncased directory (Q-Former tokenizer)
    toy_world: str = "full"  # toy world size when data_root is empty: full | tiny
    batch_size: int = 16  # evaluation batch per process
    paper_targets: dict = field(default_factory=dict)  # recorded metric → paper_targets.yaml id
    goals: dict = field(default_factory=dict)  # recorded metric → toy goal {goal, direction, label, baseline}

    records: ClassVar[tuple[str, ...]] = ("models_evaluated",)

    def __post_init__(self) -> None:
        check_checkpoint_rows(self.checkpoints)


@register("41_zeroshot_vqa")
@dataclass
class ZeroShotVQAParams(_TableParams):
    """Table 2: zero-shot VQA (VQAv2 val / test-dev, OK-VQA test, GQA test-dev) of stage-2 models."""

    split: str = "vqa_val_eval"
    # paper: beam 5, length penalty -1, "Question: {} Answer:" for OPT, 1–10 generated answer tokens |
    # lavis: LAVIS HEAD's yaml and lengths (FlanT5 min_len 1 counts the decoder start: an empty answer is allowed)
    recipe: str = "paper"
    blind_margin: float = 20.0  # toy goal: accuracy at least this many points above the blind (question-only) LLM


@register("42_captioning")
@dataclass
class CaptioningParams(_TableParams):
    """Table 3: COCO Karpathy test captioning of caption-fine-tuned models, and the NoCaps transfer."""

    split: str = "coco_karpathy_test"
    transfer_split: str = ""  # the NoCaps analogue evaluated zero-shot (empty: none)
    # paper: beam 5, 8–30 generated tokens, no repetition penalty, length penalty 1 |
    # lavis: LAVIS HEAD (repetition 1.15, length penalty 0; FlanT5 min_len 8 counts the decoder start: 7 tokens)
    recipe: str = "paper"
    metrics: list[str] = field(default_factory=lambda: ["BLEU", "CIDEr"])  # result names (Bleu_4 …) or groups (BLEU …)

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..evaluate.caption import metric_groups

        try:  # result names (Bleu_4, CIDEr, SPICE ...) and scorer groups (BLEU ...) are both accepted
            metric_groups(self.metrics)
        except ValueError as e:
            raise ParamsError(f"key 'metrics': {e}") from e


@register("43_vqa_finetuned")
@dataclass
class FinetunedVQAParams(_TableParams):
    """Table 4: VQAv2 of VQA-fine-tuned models (test-dev: writes the submission file for the server)."""

    split: str = "vqa_val_eval"
    recipe: str = "paper"  # the fine-tuning prompt "Question: {} Answer:", the paper's decoding (generated tokens)


@register("44_retrieval")
@dataclass
class RetrievalTableParams(_TableParams):
    """Table 5: image-text retrieval (Flickr30K zero-shot, COCO fine-tuned): ITC top-k then ITM re-ranking."""

    split: str = "coco_karpathy_test"
    k: int = 128  # ITC candidates re-ranked by ITM (docs/paper_map.md §4.3)
    fusion: str = "itm+itc"  # itm+itc (LAVIS) | itm (the paper's text) | itc


# ----------------------------------------------------------------------------------------------------------------
# Walk-through notebooks (helper "notebooks"; library calls in blip2lib.workbook.explore).


@register("00_explore")
@dataclass
class ExploreParams(Params):
    """Interactive walk-through: caption, VQA, ITC/ITM scores and the queries' cross-attention maps."""

    checkpoint: str = "tiny"  # stage-2 model: run folder, transformers dir, LAVIS file, or tiny (random)
    stage1_checkpoint: str = "tiny"  # stage-1 model for ITC/ITM: the same choices
    missing_ok: bool = False  # a checkpoint path that does not exist falls back to tiny
    family: str = "opt"  # LLM family of the tiny stage-2 model: opt | t5
    toy_world: str = "full"  # images from the toy world of this size (full | tiny), or synthetic
    num_images: int = 4  # images walked through
    max_new_tokens: int = 20  # longest caption or answer, in new tokens
    attention_layer: int = 0  # Q-Former layer whose cross-attention is drawn (a cross-attention layer)

    records: ClassVar[tuple[str, ...]] = ("num_images", "itc_matched_mean", "itc_mismatched_mean", "itm_matched_mean",
                                          "itm_mismatched_mean", "vqa_exact_match")  # fmt: skip


@register("02_prepare_data")
@dataclass
class PrepareDataParams(Params):
    """Convert official downloads with ``blip2lib.data.prepare``; size checks and a dedup report."""

    datasets: list[str] = field(default_factory=lambda: ["coco_karpathy"])  # blip2lib.data.prepare DATASETS
    src_root: str = ""  # folder of the official downloads ("" → a fake miniature written in the run folder)
    link_images: bool = False  # symlink the official image folders into data_root (no copying)
    fake_images: int = 10  # images of the fake miniature (src_root empty)
    dedup_pretrain: list[str] = field(default_factory=list)  # pre-training annotation files under data_root
    dedup_eval: list[str] = field(default_factory=list)  # evaluation annotation files under data_root
    dedup_by: str = "coco_id"  # dedup key: coco_id | hash

    records: ClassVar[tuple[str, ...]] = ("datasets_prepared", "size_warnings", "dedup_overlap")


@register("50_parity")
@dataclass
class ParityParams(Params):
    """Our model vs stock transformers on the same weights: max-abs differences per stage, greedy agreement."""

    # tiny-opt / tiny-t5 / tiny-retrieval (random), or local paths: a snapshot of a released Hub checkpoint (e.g.
    # weights/blip2-opt-2.7b, compared as it is), a LAVIS file or a run folder (exported to transformers first)
    checkpoints: list[str] = field(default_factory=lambda: ["tiny-opt", "tiny-t5", "tiny-retrieval"])
    skip_missing: bool = False  # checkpoint paths that do not exist are skipped
    goals: dict = field(default_factory=dict)  # report goals: metric → {goal, direction, label}

    records: ClassVar[tuple[str, ...]] = ("checkpoints_compared", "max_abs_diff", "min_agreement")

    def __post_init__(self) -> None:
        for c in self.checkpoints:  # nothing is downloaded: a Hub id must first become a local snapshot folder
            if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", c) and not c.startswith(_LOCAL) and not _exists(c):
                local = f"weights/{c.split('/')[-1]}"
                hint = f"download it once (huggingface-cli download {c} --local-dir {local}), name {local!r}"
                raise ParamsError(f"key 'checkpoints': {c!r} looks like a Hub id and is no local path; {hint}")


_LOCAL = ("runs/", "weights/", "data/", "./", "../")  # folders a params file names locally (never Hub ids)


def _exists(path: str) -> bool:
    """``path`` exists as given or under the repository root (where the runner starts notebooks)."""
    from .run import REPO_ROOT

    return Path(path).exists() or (REPO_ROOT / path).exists()


# ----------------------------------------------------------------------------------------------------------------
# Ablations: variants × seeds of one training recipe, each evaluated the same way.


@dataclass
class _AblationParams(Params):
    base: dict = field(default_factory=dict)  # TrainParams keys shared by every variant
    parent: dict = field(default_factory=dict)  # TrainParams of a parent run trained first (variants name it {parent})
    variants: dict = field(default_factory=dict)  # variant name → TrainParams overrides (first one is the reference)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds per variant (spread over seeds)
    eval_task: str = "retrieval"  # vqa | caption | retrieval
    eval_split: str = "coco_karpathy_test"  # blip2lib.data.FORMATS key of the evaluated split
    metrics: list[str] = field(default_factory=list)  # metrics summarised per variant (mean and spread)
    toy_world: str = "full"  # toy world size when data_root is empty: full | tiny
    batch_size: int = 16  # evaluation batch
    eval_settings: dict = field(default_factory=dict)  # more keys of the eval task's params, e.g. {k: 16}
    paper_targets: dict = field(default_factory=dict)  # recorded metric → paper_targets.yaml id
    goals: dict = field(default_factory=dict)  # recorded metric → toy goal

    records: ClassVar[tuple[str, ...]] = ("variants", "seeds_per_variant")


@register("45_ablation_itg")
@dataclass
class ITGAblationParams(_AblationParams):
    """Table 6: retrieval fine-tuning with and without the ITG loss."""

    variants: dict = field(default_factory=lambda: {"itc_itm": {"use_itg": False}, "itc_itm_itg": {"use_itg": True}})
    metrics: list[str] = field(default_factory=lambda: ["txt_r1", "txt_r5", "img_r1", "img_r5"])


@register("46_ablation_stage1")
@dataclass
class Stage1AblationParams(_AblationParams):
    """Figure 5: stage-2 training with and without stage-1 representation learning, zero-shot VQA."""

    eval_task: str = "vqa"
    eval_split: str = "vqa_val_eval"
    metrics: list[str] = field(default_factory=lambda: ["vqa_acc"])
