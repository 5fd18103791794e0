"""Scoring half of BLIP-2 evaluation (docs/paper_map.md §4.3, §5): VQA accuracy, caption metrics, retrieval recalls.

Every function takes predictions / score matrices / callables from a driver (``blip2lib.tasks`` or a notebook) and
returns plain dicts whose scores are in percent, with an explicit ``"unit": "percent"`` entry (user need 31).

The scoring modules (``vqa``, ``caption``) are torch-free and imported with the package; the drivers and retrieval
(torch) on first use of one of their names (PEP 562), so ``python -m blip2lib.evaluate --help`` stays instant.
"""

from __future__ import annotations

from blip2lib.evaluate.caption import (
    ALL_METRICS,
    DOMAINS,
    CaptionDecoding,
    JavaNotFoundError,
    check_java,
    coco_caption_scores,
    nocaps_breakdown,
    spice_models_available,
    write_nocaps_submission,
)
from blip2lib.evaluate.vqa import (
    VQA_PROMPTS,
    VQA_SCORERS,
    LemmatizerUnavailable,
    VQADecoding,
    evaluate_gqa,
    evaluate_okvqa,
    evaluate_vqa,
    gqa_accuracy,
    lemmatize_answers,
    load_lemmatizer,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    write_vqav2_submission,
)
from blip2lib.lazy import lazy_exports

# name -> submodule that defines it, imported on first access (these modules import torch)
_LAZY = {
    "run_caption": "drivers",
    "run_retrieval": "drivers",
    "run_vqa": "drivers",
    "CacheMismatchError": "drivers_common",
    "FUSIONS": "retrieval",
    "NEG_FILL": "retrieval",
    "candidate_scores": "retrieval",
    "ranks": "retrieval",
    "recall_at_k": "retrieval",
    "rerank_scores": "retrieval",
    "shard_rows": "retrieval",
}

__all__ = [
    "ALL_METRICS",
    "CacheMismatchError",
    "DOMAINS",
    "FUSIONS",
    "NEG_FILL",
    "VQA_PROMPTS",
    "VQA_SCORERS",
    "CaptionDecoding",
    "JavaNotFoundError",
    "LemmatizerUnavailable",
    "VQADecoding",
    "candidate_scores",
    "check_java",
    "coco_caption_scores",
    "evaluate_gqa",
    "evaluate_okvqa",
    "evaluate_vqa",
    "gqa_accuracy",
    "lemmatize_answers",
    "load_lemmatizer",
    "nocaps_breakdown",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "ranks",
    "recall_at_k",
    "run_caption",
    "run_retrieval",
    "run_vqa",
    "rerank_scores",
    "shard_rows",
    "spice_models_available",
    "vqa_accuracy",
    "write_nocaps_submission",
    "write_vqav2_submission",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
