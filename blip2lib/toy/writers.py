"""Generate the toy splits and write them in the real datasets' formats (docs/paper_map.md §6.1, §12 last bullet).

Layout under ``data_root`` (the same relative paths as ``blip2lib.data.readers.FORMATS``)::

    coco/images/{train,val,test,novel}/COCO_<split>_<12-digit id>.jpg
    coco/annotations/coco_karpathy_{train,val,test,novel}.json       # LAVIS caption/retrieval lists
    coco/annotations/coco_karpathy_{val,test,novel}_gt.json          # COCO caption-format ground truth
    coco/annotations/vqa_train.json, vqa_val_eval.json, vqa_test.json, vqa_novel_eval.json, answer_list.json
    coco/annotations/v2_OpenEnded_mscoco_<split>_questions.json      # official VQAv2 questions ...
    coco/annotations/v2_mscoco_<split>_annotations.json              # ... and annotations (10 answers each)
    gqa/annotations/{train,testdev}_balanced_questions.json          # GQA-style single answers (LAVIS list)
    nocaps/annotations/nocaps_val.json, nocaps_val_gt.json           # the novel split, NoCaps-style
    {gqa,nocaps}/images -> ../coco/images                            # relative symlinks, no copies
    toy/scenes_<split>.json                                          # scene graphs (objects, slots, pixels)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import world

SPLITS = ("train", "val", "test", "novel")
_ID_BASE = {"train": 0, "val": 100_000, "test": 200_000, "novel": 300_000}
_STREAM = {"train": 1, "val": 2, "test": 3, "novel": 4}  # independent RNG streams: resizing one split keeps others


@dataclass
class SplitData:
    """One split in memory: scenes, their JPEG bytes, captions and questions."""

    name: str
    scenes: list[world.Scene]
    jpegs: list[bytes]
    captions: list[list[str]]
    qas: list[list[tuple[str, str, str]]]  # per image: (family, question, answer)

    def image_path(self, i: int) -> str:
        """Path relative to ``coco/images`` (LAVIS COCO style: the integer id is the last ``_`` field)."""
        return f"{self.name}/COCO_{self.name}_{self.scenes[i].image_id:012d}.jpg"


def make_split(name: str, num_images: int, seed: int, questions_per_image: int = 4) -> SplitData:
    """Sample, render and describe ``num_images`` scenes of split ``name`` (deterministic in ``seed``).

    In the evaluation splits no two scenes share a canonical caption (a scene is redrawn until its caption is new):
    two images with the same five captions tie exactly in retrieval, so image→text R@k could not tell them apart
    (version 4's test split had 23 such images of 300, mostly single-object scenes, of which there are only 24
    kinds). The train split keeps repeats, as a web corpus does.
    """
    rng = np.random.default_rng([seed, _STREAM[name]])
    scenes, jpegs, caps, qas, used = [], [], [], [], set()
    for i in range(num_images):
        while True:
            scene = world.sample_scene(rng, _ID_BASE[name] + i + 1, name)
            described = world.captions(scene)
            if name == "train" or described[0] not in used:
                break
        used.add(described[0])
        image, _ = world.render(scene, rng)
        scenes.append(scene)
        jpegs.append(world.jpeg_bytes(image))
        caps.append(described)
        qas.append(world.questions(scene, rng, questions_per_image))
    return SplitData(name, scenes, jpegs, caps, qas)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")


def _symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        os.symlink(target, link, target_is_directory=True)


def _caption_files(ann: Path, split: SplitData) -> None:
    if split.name == "train":  # one entry per caption, image_id "coco_<int>" (docs/paper_map.md §6.1)
        entries = [
            {"image": split.image_path(i), "caption": c, "image_id": f"coco_{s.image_id}"}
            for i, s in enumerate(split.scenes)
            for c in split.captions[i]
        ]
        _dump(ann / "coco_karpathy_train.json", entries)
        return
    entries = [{"image": split.image_path(i), "caption": split.captions[i]} for i in range(len(split.scenes))]
    _dump(ann / f"coco_karpathy_{split.name}.json", entries)
    _dump(ann / f"coco_karpathy_{split.name}_gt.json", caption_gt(split))


def caption_gt(split: SplitData) -> dict:
    """COCO caption-format ground truth ``{"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}]}``."""
    images = [{"id": s.image_id} for s in split.scenes]
    anns = [
        {"image_id": s.image_id, "caption": c, "id": s.image_id * 10 + k}
        for s, caps in zip(split.scenes, split.captions)
        for k, c in enumerate(caps)
    ]
    return {"info": {"description": f"blip2lib toy world, {split.name}"}, "images": images, "annotations": anns}


def vqa_records(split: SplitData, seed: int) -> list[dict]:
    """Every question of a split with its 10 annotator answers (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, _STREAM[split.name], 7])
    out = []
    for i, scene in enumerate(split.scenes):
        for k, (family, question, answer) in enumerate(split.qas[i]):
            answers = world.annotator_answers(answer, family, rng)
            out.append(
                {
                    "question_id": scene.image_id * 10 + k,
                    "image_id": scene.image_id,
                    "image": split.image_path(i),
                    "question": question,
                    "family": family,
                    "answer": answer,
                    "answers": answers,
                }
            )
    return out


def _official_vqa(ann: Path, split: SplitData, records: list[dict]) -> None:
    # data_subtype = split name, so blip2lib.data.official.vqa_to_lavis maps image ids to our file names.
    header = {"info": {"description": "blip2lib toy world"}, "license": {}, "data_subtype": split.name}
    questions = [
        {"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]} for r in records
    ]
    _dump(
        ann / f"v2_OpenEnded_mscoco_{split.name}_questions.json",
        {**header, "task_type": "OpenEnded", "data_type": "toy", "questions": questions},
    )
    annotations = []
    for r in records:
        ten = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(r["answers"])]
        annotations.append(
            {
                "question_id": r["question_id"],
                "image_id": r["image_id"],
                "question_type": r["family"],
                "answer_type": world.answer_type(r["family"]),
                "multiple_choice_answer": Counter(r["answers"]).most_common(1)[0][0],
                "answers": ten,
            }
        )
    _dump(ann / f"v2_mscoco_{split.name}_annotations.json", {**header, "annotations": annotations})


_LAVIS_VQA_NAME = {"train": "vqa_train", "val": "vqa_val_eval", "test": "vqa_test", "novel": "vqa_novel_eval"}


def _vqa_files(root: Path, split: SplitData, seed: int) -> list[dict]:
    ann = root / "coco" / "annotations"
    records = vqa_records(split, seed)
    lavis = [
        {
            "question_id": r["question_id"],
            "question": r["question"],
            "answer": r["answers"],
            "image": r["image"],
            "dataset": "vqa",
            "question_type": r["family"],  # extra keys (not in LAVIS lists): per-family VQA accuracy in reports
            "answer_type": world.answer_type(r["family"]),
        }
        for r in records
    ]
    _dump(ann / f"{_LAVIS_VQA_NAME[split.name]}.json", lavis)
    _official_vqa(ann, split, records)
    if split.name in ("train", "test"):  # GQA-style: one answer, string question ids (docs/paper_map.md §6.1)
        gqa = [
            {
                "image": r["image"],
                "question": r["question"],
                "question_id": str(r["question_id"]),
                "answer": r["answer"],
            }
            for r in records
        ]
        name = "train_balanced_questions.json" if split.name == "train" else "testdev_balanced_questions.json"
        _dump(root / "gqa" / "annotations" / name, gqa)
    return records


def write_split(root: Path, split: SplitData, seed: int) -> list[dict]:
    """Write a split's images and every annotation file derived from it; return its VQA records."""
    img_dir = root / "coco" / "images" / split.name
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(split.jpegs):
        (root / "coco" / "images" / split.image_path(i)).write_bytes(data)
    ann = root / "coco" / "annotations"
    _caption_files(ann, split)
    _dump(root / "toy" / f"scenes_{split.name}.json", [s.to_json() for s in split.scenes])
    if split.name == "novel":
        noc = [
            {"image": split.image_path(i), "img_id": s.image_id, "domain": "out-domain"}
            for i, s in enumerate(split.scenes)
        ]
        _dump(root / "nocaps" / "annotations" / "nocaps_val.json", noc)
        _dump(root / "nocaps" / "annotations" / "nocaps_val_gt.json", caption_gt(split))
    return _vqa_files(root, split, seed)


def write_dataset(
    root: Path, splits: dict[str, SplitData], seed: int, tick: Callable[[], None] | None = None
) -> dict[str, list[dict]]:
    """Write all splits under ``root``; ``tick`` is called once per split (progress bar)."""
    records = {}
    for name, split in splits.items():
        records[name] = write_split(root, split, seed)
        if tick:
            tick()
    answers = sorted({r["answer"] for r in records["train"]})
    _dump(root / "coco" / "annotations" / "answer_list.json", answers)
    _symlink(root / "gqa" / "images", "../coco/images")
    _symlink(root / "nocaps" / "images", "../coco/images")
    return records
