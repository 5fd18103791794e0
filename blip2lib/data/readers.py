"""Map-style datasets over LAVIS-format annotation files (docs/paper_map.md §6.1), returning LAVIS sample keys.

``FORMATS`` below is the machine-readable description of every file the readers take (the toy world writes files
to match it, and the readers validate against it at construction). Conventions:

* ``file``: path relative to ``data_root``; images live under ``images_root`` (relative to ``data_root``) and the
  ``image`` field is relative to that folder (absolute paths are also accepted).
* ``container``: ``"list"`` = a JSON list of objects (``.json``) — ``.jsonl`` files (one object a line) are
  accepted wherever a list is; ``"coco"`` = COCO caption format ``{"images": [{"id"}], "annotations": [...]}``.
* ``fields``: name → type; a trailing ``?`` marks an optional field. Types: ``str``, ``int``, ``float``,
  ``list[str]``, ``list[str]+`` (at least one string), ``str|int`` (either), ``any``.
* ``official``: readers also accept the official format in that file (converted on load by ``official.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .annotations import AnnotationError, PackedRecords, load_annotations, load_caption_gt, load_packed, validate_entry
from .images import BadSampleLog, SharedImageCache, load_image
from .official import coco_id_from_path

__all__ = [
    "FORMATS",
    "AnnotationError",
    "load_annotations",
    "load_caption_gt",
    "validate_entry",
    "answer_weights",
    "CaptionDataset",
    "CaptionEvalDataset",
    "VGCaptionDataset",
    "RetrievalDataset",
    "RetrievalEvalDataset",
    "VQADataset",
    "VQAEvalDataset",
    "GQADataset",
    "GQAEvalDataset",
    "NoCapsDataset",
]

logger = logging.getLogger(__name__)

_CAP_TRAIN = {"image": "str", "caption": "str", "image_id": "str|int"}
_CAP_EVAL = {"image": "str", "caption": "list[str]"}
_VQA = {"question_id": "int", "question": "str", "answer": "list[str]", "image": "str", "dataset": "str?"}
_VQA_TEST = {"question_id": "int", "question": "str", "image": "str", "dataset": "str?"}
_GQA = {"image": "str", "question": "str", "question_id": "str|int", "answer": "str"}
_NOCAPS = {"image": "str", "img_id": "int", "domain": "str?"}
_NOCAPS_OFFICIAL = "NoCaps COCO-style image info {images: [{id, file_name, domain}]} (test if 'test' in file name)"
_COCO_GT = {"images": [{"id": "int"}], "annotations": [{"image_id": "int", "caption": "str", "id": "int"}]}

_VQA_OFFICIAL = "VQA questions file {data_subtype, questions[...]}, optionally followed by its annotations file"


def _fmt(file: str, images_root: str | None, fields: dict, container: str = "list", official: str = "") -> dict:
    out = {"file": file, "container": container, "fields": fields}
    if images_root:
        out["images_root"] = images_root
    if official:
        out["official"] = official
    return out


FORMATS: dict[str, dict[str, Any]] = {
    "coco_karpathy_train": _fmt("coco/annotations/coco_karpathy_train.json", "coco/images", _CAP_TRAIN),
    "coco_karpathy_val": _fmt("coco/annotations/coco_karpathy_val.json", "coco/images", _CAP_EVAL),
    "coco_karpathy_test": _fmt("coco/annotations/coco_karpathy_test.json", "coco/images", _CAP_EVAL),
    "coco_karpathy_val_gt": _fmt("coco/annotations/coco_karpathy_val_gt.json", None, _COCO_GT, "coco"),
    "coco_karpathy_test_gt": _fmt("coco/annotations/coco_karpathy_test_gt.json", None, _COCO_GT, "coco"),
    "flickr30k_train": _fmt("flickr30k/annotations/flickr30k_train.json", "flickr30k/images", _CAP_TRAIN),
    "flickr30k_val": _fmt("flickr30k/annotations/flickr30k_val.json", "flickr30k/images", _CAP_EVAL),
    "flickr30k_test": _fmt("flickr30k/annotations/flickr30k_test.json", "flickr30k/images", _CAP_EVAL),
    "vqa_train": _fmt("coco/annotations/vqa_train.json", "coco/images", _VQA, official=_VQA_OFFICIAL),
    "vqa_val_eval": _fmt("coco/annotations/vqa_val_eval.json", "coco/images", _VQA, official=_VQA_OFFICIAL),
    "vqa_test": _fmt("coco/annotations/vqa_test.json", "coco/images", _VQA_TEST, official=_VQA_OFFICIAL),
    "okvqa_train": _fmt("okvqa/annotations/okvqa_train.json", "coco/images", _VQA, official=_VQA_OFFICIAL),
    "okvqa_val_eval": _fmt("okvqa/annotations/okvqa_val_eval.json", "coco/images", _VQA, official=_VQA_OFFICIAL),
    "gqa_testdev": _fmt(
        "gqa/annotations/testdev_balanced_questions.json", "gqa/images", _GQA, official="GQA {qid: {imageId, ...}}"
    ),
    "nocaps_val": _fmt("nocaps/annotations/nocaps_val.json", "nocaps/images", _NOCAPS, official=_NOCAPS_OFFICIAL),
    "nocaps_test": _fmt("nocaps/annotations/nocaps_test.json", "nocaps/images", _NOCAPS, official=_NOCAPS_OFFICIAL),
    "nocaps_val_gt": _fmt("nocaps/annotations/nocaps_val_gt.json", None, _COCO_GT, "coco"),
    "vg_caption": _fmt("vg/annotations/vg_caption.json", "vg/images", {**_CAP_TRAIN, "image_id": "str|int?"}),
}


def _identity(text: str) -> str:
    return text


class _AnnotationDataset(Dataset):
    """Shared plumbing: annotations, image root, transforms, bad-sample log."""

    fields: dict[str, str] = {"image": "str"}

    def __init__(self, root, ann_paths, transform=None, text_processor=None, bad_log: BadSampleLog | None = None):
        self.root = Path(root)
        # packed: ~the file's size in memory, shared by forked workers (PackedRecords); entries decode on access
        self.annotation: PackedRecords = load_packed(ann_paths, self.fields)
        self.transform = transform
        self.text_processor = text_processor or _identity
        self.bad_log = bad_log if bad_log is not None else BadSampleLog()
        # Opt-in (``cache_images``): transformed images kept per path — only valid for a deterministic transform. A
        # dict is per process (each DataLoader worker fills its own copy); a SharedImageCache is shared by all.
        self.image_cache: dict[str, object] | SharedImageCache | None = None

    def __len__(self) -> int:
        return len(self.annotation)

    def _image(self, rel: str):
        if self.image_cache is not None and rel in self.image_cache:
            return self.image_cache[rel]
        image = load_image(self.root / rel, self.bad_log)  # absolute `rel` overrides root (pathlib semantics)
        if image is not None and self.transform is not None:
            image = self.transform(image)
        if image is not None and self.image_cache is not None:
            self.image_cache[rel] = image
        return image


class CaptionDataset(_AnnotationDataset):
    """Caption training (``coco_karpathy_train``, ``flickr30k_train``): ``{"image", "text_input", "image_id"}``.

    ``image_id`` is the raw annotation id (a string such as ``"coco_391895"``), never an integer: an integer id is
    what switches the ITC/ITM losses into the retrieval multi-positive mode (docs/paper_map.md §10.15).
    """

    fields = {"image": "str", "caption": "str", "image_id": "str|int?"}

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        image_id = str(ann.get("image_id", ann["image"]))  # optional in user files: the path identifies the image
        return {"image": image, "text_input": self.text_processor(ann["caption"]), "image_id": image_id}


class VGCaptionDataset(CaptionDataset):
    """Visual Genome captions for pre-training: ``{"image", "text_input"}`` (no id → no retrieval-mode ITC)."""

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        return None if image is None else {"image": image, "text_input": self.text_processor(ann["caption"])}


class CaptionEvalDataset(_AnnotationDataset):
    """Caption evaluation (Karpathy val/test): ``{"image", "image_id": int, "instance_id"}``.

    The integer id is parsed from the file name (docs/paper_map.md §6.1), matching ``coco_karpathy_*_gt.json``.
    """

    fields = {"image": "str", "caption": "list[str]?"}

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        image_id = coco_id_from_path(ann["image"])
        return {"image": image, "image_id": index if image_id is None else image_id, "instance_id": ann["instance_id"]}


class NoCapsDataset(_AnnotationDataset):
    """NoCaps val/test: ``{"image", "image_id" (= img_id), "instance_id", "domain"}``; domain may be ``""``."""

    fields = _NOCAPS

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        return {
            "image": image,
            "image_id": ann["img_id"],
            "instance_id": ann["instance_id"],
            "domain": ann.get("domain", ""),
        }


class RetrievalDataset(_AnnotationDataset):
    """Retrieval training: ``{"image", "text_input", "image_id": int (dense index), "instance_id"}``.

    See docs/paper_map.md §4.3.
    """

    fields = {"image": "str", "caption": "str", "image_id": "str|int"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.img_ids: dict[Any, int] = {}
        for ann in self.annotation:  # first-appearance order, as LAVIS
            self.img_ids.setdefault(ann["image_id"], len(self.img_ids))

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        return {
            "image": image,
            "text_input": self.text_processor(ann["caption"]),
            "image_id": self.img_ids[ann["image_id"]],
            "instance_id": ann["instance_id"],
        }


class RetrievalEvalDataset(_AnnotationDataset):
    """Retrieval evaluation: items ``{"image", "index"}``; dataset-level ``text``, ``image``, ``txt2img``, ``img2txt``.

    ``text`` holds every processed caption in file order; ``img2txt[i]`` lists the text indices of image ``i`` and
    ``txt2img[t]`` the image of text ``t`` (5 captions per image in COCO/Flickr, a few COCO images have 6–7).
    """

    fields = {"image": "str", "caption": "list[str]+"}  # an image without text breaks the rank metrics

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for img_id, ann in enumerate(self.annotation):
            self.image.append(ann["image"])
            self.img2txt[img_id] = []
            for caption in ann["caption"]:
                self.txt2img[len(self.text)] = img_id
                self.img2txt[img_id].append(len(self.text))
                self.text.append(self.text_processor(caption))

    def __getitem__(self, index: int) -> dict | None:
        image = self._image(self.annotation[index]["image"])
        return None if image is None else {"image": image, "index": index}


def answer_weights(answers: list[str]) -> tuple[list[str], list[float]]:
    """Unique answers (first-seen order) and weights = count / number of annotators (docs/paper_map.md §6.1).

    Computed as an exact ratio (10 identical answers → 1.0), not LAVIS' running sum of 1/n (0.9999999999999999).
    """
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return list(counts), [c / len(answers) for c in counts.values()]


class VQADataset(_AnnotationDataset):
    """VQAv2 / OK-VQA training: ``{"image", "text_input", "answers", "weights"}`` (collated by ``Collate``)."""

    fields = {"question_id": "int?", "question": "str", "answer": "list[str]+", "image": "str"}  # weights need one

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        answers, weights = answer_weights(ann["answer"])
        return {
            "image": image,
            "text_input": self.text_processor(ann["question"]),
            "answers": answers,
            "weights": weights,
        }


class VQAEvalDataset(_AnnotationDataset):
    """VQAv2 / OK-VQA evaluation and test-dev: ``{"image", "text_input", "question_id", "instance_id"}``."""

    fields = {"question_id": "int", "question": "str", "image": "str"}

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        q = self.text_processor(ann["question"])
        return {"image": image, "text_input": q, "question_id": ann["question_id"], "instance_id": ann["instance_id"]}


class GQADataset(VQADataset):
    """GQA training: one answer with weight 1 → ``{"image", "text_input", "answers", "weights"}``."""

    fields = {"image": "str", "question": "str", "answer": "str"}

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        return {
            "image": image,
            "text_input": self.text_processor(ann["question"]),
            "answers": [ann["answer"]],
            "weights": [1.0],
        }


class GQAEvalDataset(_AnnotationDataset):
    """GQA balanced test-dev: ``{"image", "text_input", "answer", "question_id", "instance_id"}``.

    See docs/paper_map.md §6.1.
    """

    fields = _GQA

    def __getitem__(self, index: int) -> dict | None:
        ann = self.annotation[index]
        image = self._image(ann["image"])
        if image is None:
            return None
        return {
            "image": image,
            "text_input": self.text_processor(ann["question"]),
            "answer": ann["answer"],
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
        }
