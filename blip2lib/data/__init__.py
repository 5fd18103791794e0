"""Data: readers of the paper's datasets, user manifests, WebDataset shards, pre-processing (docs/paper_map.md §6).

See ``blip2lib/data/README.md`` for the on-disk layout under ``data_root`` and ``python -m blip2lib.data prepare``.
"""

from .annotations import AnnotationError, load_annotations, load_caption_gt, validate_entry
from .collate import Collate, collate_samples
from .dedup import dedup_report, image_paths
from .images import BadSampleLog, SharedImageCache, load_image
from .manifest import ManifestDataset, read_manifest
from .official import coco_id_from_path
from .prepare import DATASETS, KNOWN_SIZES, check_sizes, prepare
from .processors import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionProcessor,
    QuestionProcessor,
    image_eval_transform,
    image_train_transform,
    pre_caption,
    pre_question,
)
from .readers import (
    FORMATS,
    CaptionDataset,
    CaptionEvalDataset,
    GQADataset,
    GQAEvalDataset,
    NoCapsDataset,
    RetrievalDataset,
    RetrievalEvalDataset,
    VGCaptionDataset,
    VQADataset,
    VQAEvalDataset,
    answer_weights,
)
from .sampler import ResumableDistributedSampler
from .shards import make_shard_dataset, write_shards

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
