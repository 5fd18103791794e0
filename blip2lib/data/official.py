"""Pure converters: official dataset downloads (already parsed JSON) → the LAVIS-format lists the readers take.

No file-system access here (``prepare.py`` finds, reads and writes files). Provenance of every input format:

* Karpathy splits — ``dataset_coco.json`` / ``dataset_flickr30k.json`` from Karpathy's ``caption_datasets.zip``:
  ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw", ...}], "cocoid"?, "imgid"}], ...}``.
  COCO "train" = Karpathy ``train`` + ``restval`` (113,287 images), as BLIP/LAVIS use.
* VQAv2 / OK-VQA — official ``*_questions.json`` ``{"data_subtype", "questions": [{"image_id", "question",
  "question_id"}]}`` and ``*_annotations.json`` ``{"annotations": [{"question_id", "answers": [{"answer"}]}]}``.
* GQA — official ``*_balanced_questions.json``: ``{qid: {"imageId", "question", "answer", ...}}``.
* NoCaps — official ``nocaps_{val_4500_captions,test_image_info}.json`` (COCO format, images carry ``domain``).
* Visual Genome — official ``region_descriptions.json`` ``[{"id", "regions": [{"phrase", ...}]}]`` and optionally
  ``image_data.json`` ``[{"image_id", "url"}]`` (gives the VG_100K vs VG_100K_2 folder).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "karpathy_to_lavis",
    "caption_gt",
    "coco_id_from_path",
    "vqa_to_lavis",
    "gqa_to_lavis",
    "nocaps_to_lavis",
    "vg_to_lavis",
]

_TRAILING_INT = re.compile(r"(\d+)$")


def coco_id_from_path(path: str) -> int | None:
    """Integer image id from a file name, LAVIS-style: the last ``_``-separated field of the stem.

    See docs/paper_map.md §6.1.

    ``val2014/COCO_val2014_000000391895.jpg`` → 391895; ``1000092795.jpg`` → 1000092795; no digits → None.
    """
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    m = _TRAILING_INT.search(stem.rsplit("_", 1)[-1])
    return int(m.group(1)) if m else None


def _karpathy_image_path(img: dict, dataset: str) -> str:
    if dataset == "coco":
        return f"{img['filepath']}/{img['filename']}"
    return f"flickr30k-images/{img['filename']}"


def karpathy_to_lavis(karpathy: dict, split: str, dataset: str = "coco") -> list[dict]:
    """Karpathy ``dataset_{coco,flickr30k}.json`` → LAVIS ``{coco_karpathy,flickr30k}_{split}.json``.

    Args:
        karpathy: the parsed Karpathy file.
        split: ``"train"`` (one entry per caption; COCO adds ``restval``), ``"val"`` or ``"test"`` (one entry per
            image with its caption list).
        dataset: ``"coco"`` or ``"flickr30k"``.

    Returns:
        Train: ``[{"image", "caption": str, "image_id": str}]``; val/test: ``[{"image", "caption": [str]}]``.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown Karpathy split {split!r}")
    wanted = {"train", "restval"} if (split == "train" and dataset == "coco") else {split}
    out: list[dict] = []
    for img in karpathy["images"]:
        if img["split"] not in wanted:
            continue
        path = _karpathy_image_path(img, dataset)
        captions = [s["raw"].strip() for s in img["sentences"]]
        if split == "train":
            image_id = f"coco_{img['cocoid']}" if dataset == "coco" else str(img["filename"].rsplit(".", 1)[0])
            out.extend({"image": path, "caption": c, "image_id": image_id} for c in captions)
        else:
            out.append({"image": path, "caption": captions})
    return out


def caption_gt(eval_list: list[dict]) -> dict:
    """COCO-caption-format ground truth (``coco_karpathy_{val,test}_gt.json``) from an eval list.

    Image ids are parsed from the file names exactly as the eval dataset does (``coco_id_from_path``), so the ids
    in predictions and GT always agree.
    """
    images, annotations = [], []
    for entry in eval_list:
        image_id = coco_id_from_path(entry["image"])
        images.append({"id": image_id})
        for caption in entry["caption"]:
            annotations.append({"image_id": image_id, "caption": caption, "id": len(annotations)})
    return {"images": images, "annotations": annotations}


def _vqa_image_folder(subtype: str) -> str:
    # test-dev questions are a subset of the test2015 images (their data_subtype is "test-dev2015").
    return "test2015" if subtype.startswith("test") else subtype


def vqa_to_lavis(questions: dict, annotations: dict | None = None, dataset: str = "vqa") -> list[dict]:
    """Official VQAv2/OK-VQA questions (+ annotations) → LAVIS ``vqa_*.json`` / ``okvqa_*.json`` entries.

    Args:
        questions: parsed ``*_questions.json``.
        annotations: parsed ``*_annotations.json``; None for test/test-dev (no ``answer`` field then).
        dataset: value of the ``dataset`` field (``"vqa"`` or ``"okvqa"``).

    Returns:
        ``[{"question_id", "question", "answer": [10 str]?, "image", "dataset"}]``.
    """
    folder = _vqa_image_folder(questions["data_subtype"])
    answers = {}
    if annotations is not None:
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations["annotations"]}
    out = []
    for q in questions["questions"]:
        entry = {
            "question_id": q["question_id"],
            "question": q["question"],
            "image": f"{folder}/COCO_{folder}_{q['image_id']:012d}.jpg",
            "dataset": dataset,
        }
        if annotations is not None:
            if q["question_id"] not in answers:
                raise ValueError(f"question {q['question_id']} has no entry in the annotations file")
            entry["answer"] = answers[q["question_id"]]
        out.append(entry)
    return out


def gqa_to_lavis(official: dict) -> list[dict]:
    """Official GQA ``{qid: {...}}`` → LAVIS ``[{"image", "question", "question_id", "answer"}]`` (ids kept as str)."""
    out = []
    for qid, q in official.items():
        entry = {"image": f"{q['imageId']}.jpg", "question": q["question"], "question_id": qid}
        if "answer" in q:  # the GQA test split has no answers
            entry["answer"] = q["answer"]
        out.append(entry)
    return out


def nocaps_to_lavis(official: dict, split: str) -> list[dict]:
    """Official NoCaps image info → LAVIS ``nocaps_{split}.json``: ``[{"image", "img_id", "domain"}]``.

    Images are expected under ``nocaps/images/{split}/<file_name>``; ``domain`` is in-/near-/out-domain.
    """
    return [
        {"image": f"{split}/{img['file_name']}", "img_id": img["id"], "domain": img.get("domain", "")}
        for img in official["images"]
    ]


def vg_to_lavis(region_descriptions: Iterable[dict], image_data: Iterable[dict] | None = None) -> list[dict]:
    """Official Visual Genome region descriptions → ``vg_caption.json`` ``[{"image", "caption", "image_id"}]``.

    One entry per distinct (case-insensitive, stripped) region phrase of an image. The LAVIS-hosted
    ``vg_caption.json`` is a filtered subset of this; when you have it, the reader takes it unchanged.
    """
    folders = {}
    for info in image_data or []:
        parts = info["url"].rstrip("/").split("/")
        folders[info["image_id"]] = parts[-2]
    out = []
    for item in region_descriptions:
        image_id = item["id"]
        path = f"{folders.get(image_id, 'VG_100K')}/{image_id}.jpg"
        seen = set()
        for region in item["regions"]:
            phrase = region["phrase"].strip()
            if phrase and phrase.lower() not in seen:
                seen.add(phrase.lower())
                out.append({"image": path, "caption": phrase, "image_id": f"vg_{image_id}"})
    return out
