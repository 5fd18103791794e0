"""Stand-in toy world for ``notebooks/01_toy_world.ipynb`` until ``blip2lib.toy.build_toy_world`` lands.

A deliberately small world (1–3 coloured squares/circles/crosses in 3 left→right slots of a 32×32 image, one
canonical caption, one "what colour is the <shape>?" question per scene) so the workbook machinery can be proven
end to end. Switch the notebook's import to ``blip2lib.toy`` and delete this module once the real world exists.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

SHAPES = ("square", "circle", "cross")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215), "yellow": (225, 195, 35)}
SLOTS = ("left", "middle", "right")
SIZE = 32


def _draw(img: np.ndarray, slot: int, shape: str, rgb: tuple[int, int, int]) -> None:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cx, cy, r = slot * SIZE / 3 + SIZE / 6, SIZE / 2, 4.0  # slot centre, radius in px
    if shape == "square":
        mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    elif shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    else:
        mask = ((abs(xx - cx) <= 1.2) | (abs(yy - cy) <= 1.2)) & (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    img[mask] = rgb


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, str, str, str]:
    img = np.full((SIZE, SIZE, 3), 245, dtype=np.uint8)  # (H, W, 3)
    slots = sorted(rng.choice(3, size=int(rng.integers(1, 4)), replace=False).tolist())
    objs = [(s, SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(4)]) for s in slots]
    for s, shape, colour in objs:
        _draw(img, s, shape, COLOURS[colour])
    caption = " and ".join(f"a {c} {sh} on the {SLOTS[s]}" for s, sh, c in objs)
    _, shape, colour = objs[int(rng.integers(len(objs)))]
    return img, caption, f"what colour is the {shape} ?", colour


def build_toy_world(num_images: int, seed: int, cache_dir: str | Path, force_rebuild: bool = False) -> dict:
    """Sample (or load from ``cache_dir``) the stand-in world and compute its baselines.

    Args:
        num_images: scenes to sample.
        seed: the world is a pure function of it.
        cache_dir: where ``world_<seed>_<n>.npz`` is kept.
        force_rebuild: resample even when the cache holds this world.

    Returns:
        ``{"images": (N, 32, 32, 3) uint8, "captions", "questions", "answers", "cache", "baselines"}`` with
        baselines ``distinct_caption_frac`` (share of scenes whose caption no other scene has: the text→image
        R@1 ceiling), ``blind_vqa_acc`` (%, majority answer without the image), ``chance_img_r1`` and
        ``chance_img_r5`` (%, random ranking).
    """
    cache = Path(cache_dir) / f"world_{seed}_{num_images}.npz"
    if cache.exists() and not force_rebuild:
        z = np.load(cache)
        images, captions, questions, answers = z["images"], *(z[k].tolist() for k in ("captions", "q", "a"))
    else:
        rng = np.random.default_rng(seed)
        scenes = [_scene(rng) for _ in range(num_images)]
        images = np.stack([s[0] for s in scenes])  # (N, H, W, 3)
        captions, questions, answers = ([s[i] for s in scenes] for i in (1, 2, 3))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, images=images, captions=captions, q=questions, a=answers)
    counts = Counter(captions)
    majority = Counter(answers).most_common(1)[0][1]
    baselines = {"distinct_caption_frac": sum(counts[c] == 1 for c in captions) / len(captions),
                 "blind_vqa_acc": 100.0 * majority / len(answers),
                 "chance_img_r1": 100.0 / num_images,
                 "chance_img_r5": 100.0 * min(5, num_images) / num_images}  # fmt: skip
    return {"images": images, "captions": captions, "questions": questions, "answers": answers,
            "cache": str(cache), "baselines": baselines}  # fmt: skip
