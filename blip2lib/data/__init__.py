"""Data: readers of the paper's datasets, user manifests, WebDataset shards, pre-processing (docs/paper_map.md §6).

See ``blip2lib/data/README.md`` for the on-disk layout under ``data_root`` and ``python -m blip2lib.data prepare``.

The torch-free modules (annotation files, official formats, ``prepare``, ``dedup``) are imported with the package;
the torch / PIL / torchvision ones on first use of one of their names (PEP 562), so ``python -m blip2lib.data
--help`` never pays for torch. ``from blip2lib.data import X`` works for every name in ``__all__`` either way.
"""

from __future__ import annotations

from ..lazy import lazy_exports
from .annotations import AnnotationError, load_annotations, load_caption_gt, validate_entry
from .dedup import dedup_report, image_paths
from .official import coco_id_from_path
from .prepare import DATASETS, KNOWN_SIZES, check_sizes, prepare

# name -> submodule that defines it, imported on first access (each of these modules imports torch or PIL)
_LAZY = {
    "Collate": "collate",
    "collate_samples": "collate",
    "BadSampleLog": "images",
    "SharedImageCache": "images",
    "load_image": "images",
    "ManifestDataset": "manifest",
    "read_manifest": "manifest",
    "CLIP_MEAN": "processors",
    "CLIP_STD": "processors",
    "CaptionProcessor": "processors",
    "QuestionProcessor": "processors",
    "image_eval_transform": "processors",
    "image_train_transform": "processors",
    "pre_caption": "processors",
    "pre_question": "processors",
    "FORMATS": "readers",
    "CaptionDataset": "readers",
    "CaptionEvalDataset": "readers",
    "GQADataset": "readers",
    "GQAEvalDataset": "readers",
    "NoCapsDataset": "readers",
    "RetrievalDataset": "readers",
    "RetrievalEvalDataset": "readers",
    "VGCaptionDataset": "readers",
    "VQADataset": "readers",
    "VQAEvalDataset": "readers",
    "answer_weights": "readers",
    "ResumableDistributedSampler": "sampler",
    "make_shard_dataset": "shards",
    "write_shards": "shards",
}

__all__ = [
    "AnnotationError",
    "BadSampleLog",
    "SharedImageCache",
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionDataset",
    "CaptionEvalDataset",
    "CaptionProcessor",
    "Collate",
    "DATASETS",
    "FORMATS",
    "GQADataset",
    "GQAEvalDataset",
    "KNOWN_SIZES",
    "ManifestDataset",
    "NoCapsDataset",
    "QuestionProcessor",
    "ResumableDistributedSampler",
    "RetrievalDataset",
    "RetrievalEvalDataset",
    "VGCaptionDataset",
    "VQADataset",
    "VQAEvalDataset",
    "answer_weights",
    "check_sizes",
    "coco_id_from_path",
    "collate_samples",
    "dedup_report",
    "image_eval_transform",
    "image_paths",
    "image_train_transform",
    "load_annotations",
    "load_caption_gt",
    "load_image",
    "make_shard_dataset",
    "pre_caption",
    "pre_question",
    "prepare",
    "read_manifest",
    "validate_entry",
    "write_shards",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
