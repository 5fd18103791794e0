"""The toy-world notebook's library calls: build (or open) the world, flatten its baselines, pick gallery items."""

from __future__ import annotations

import json

from PIL import Image


def flat_baselines(world) -> dict[str, float]:
    """Baselines as flat ``name → value`` (percent unless the name says otherwise) for ``record``."""
    out: dict[str, float] = {}
    b = world.baselines
    for split, fams in b.get("vqa", {}).items():
        for who, scores in fams.items():
            if isinstance(scores, dict) and "overall" in scores:
                out[f"vqa_{split}_{who}"] = float(scores["overall"])
    for split, r in b.get("retrieval_chance", {}).items():
        for k in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
            if k in r:
                out[f"chance_{split}_{k}"] = float(r[k])
    for split, p in b.get("vision_probe", {}).items():
        for k, v in p.items():
            if isinstance(v, (int, float)):
                out[f"vision_probe_{split}_{k}"] = float(v)
    out["build_seconds"] = float(sum(b.get("build_seconds", {}).values()))
    return out


def gallery(world, split: str = "test", n: int = 8) -> tuple[list, list[str], list[str]]:
    """First ``n`` images of a split with their canonical caption and one question → answer each."""
    ann = json.loads(world.annotations[f"coco_karpathy_{split}"].read_text())[:n]
    names = [f"vqa_{split}_eval", f"vqa_{split}"]  # LAVIS names: vqa_val_eval, vqa_test, vqa_train
    qa = json.loads(world.annotations[next(n for n in names if n in world.annotations)].read_text())
    by_image: dict[str, str] = {}
    for q in qa:
        by_image.setdefault(q["image"], f"{q['question']} → {q['answer'][0]}")
    images = [Image.open(world.images_dir / a["image"]).convert("RGB") for a in ann]
    return images, [a["caption"][0] for a in ann], [by_image.get(a["image"], "") for a in ann]
