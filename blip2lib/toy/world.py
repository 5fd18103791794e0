"""The toy world's scenes: sampling, rendering, captions, questions and splits (the paper in miniature).

A scene is 1–4 objects placed in 4 fixed left→right slots of a 64×64 image; each object has a shape, a colour, a size
and a position (its slot, and a row of the tower's 8-px patch grid). Captions list the objects left→right (5 paraphrase
templates per scene, like COCO's 5 captions), questions need grounding (attribute, counting, existence, relation) and
carry 10 annotator answers with realistic disagreement ("2" vs "two", the odd wrong answer), so the official VQA
accuracy (docs/paper_map.md §5.1) means something. The ``novel`` split holds scenes containing (colour, shape) pairs
that never occur in the train/val/test scenes — the toy analogue of NoCaps' zero-shot transfer (docs/paper_map.md §5.2).
Everything is a pure function of a seed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
NUM_SLOTS = 4  # fixed left→right slots, so "left of" and the caption order are well defined
IMAGE_SIZE = 64
SLOT_PX = IMAGE_SIZE // NUM_SLOTS
# (colour, shape) pairs held out of train/val/test: every shape and every colour is still seen in training.
NOVEL_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
FAMILIES = ("attribute", "count", "exist", "relation")  # question families = VQA question_type
_ANSWER_TYPE = {"attribute": "other", "count": "number", "exist": "yes/no", "relation": "other"}
_RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215), "yellow": (225, 195, 35)}
_RADIUS = {"small": 3.6, "large": 6.6}  # px; a small object fits one 8-px patch, a large one spans 2 × 2 patches
# P(number of objects = 1, 2, 3, 4): few single-object scenes, whose captions are the least distinctive.
_N_OBJ_P = (0.1, 0.25, 0.3, 0.35)
NUM_CLASSES = 1 + len(SHAPES) * len(COLOURS) * len(SIZES)  # 0 = empty/background, then (shape, colour, size)


@dataclass(frozen=True)
class Obj:
    """One object: slot 0..3 (left→right), attributes, and its pixel centre."""

    slot: int
    shape: str
    colour: str
    size: str
    x: int
    y: int

    @property
    def cls(self) -> int:
        """Class index 1..24 of (shape, colour, size); 0 is reserved for an empty slot / background patch."""
        return (
            1
            + (SHAPES.index(self.shape) * len(COLOURS) + COLOURS.index(self.colour)) * len(SIZES)
            + SIZES.index(self.size)
        )

    def phrase(self) -> str:
        """Noun phrase used by every caption template."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: its global image id, split and objects sorted left→right."""

    image_id: int
    split: str
    objects: tuple[Obj, ...]

    def slot_labels(self) -> list[int]:
        """Per-slot class (0 = empty), the target of the vision probe."""
        labels = [0] * NUM_SLOTS
        for o in self.objects:
            labels[o.slot] = o.cls
        return labels

    def to_json(self) -> dict:
        """Scene graph as written to ``toy/scenes_<split>.json``."""
        return {
            "image_id": self.image_id,
            "split": self.split,
            "objects": [
                {"slot": o.slot, "shape": o.shape, "colour": o.colour, "size": o.size, "x": o.x, "y": o.y}
                for o in self.objects
            ],
        }


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def _is_novel(colour: str, shape: str) -> bool:
    return (colour, shape) in NOVEL_PAIRS


def sample_scene(rng: np.random.Generator, image_id: int, split: str) -> Scene:
    """Draw a scene; ``split == "novel"`` forces ≥ 1 held-out pair, any other split forbids them.

    ``split == "any"`` (the unimodal pretraining pools) allows every combination: the frozen ViT and LLMs know all
    colours and shapes, as web-pretrained towers do; only the BLIP-2 training data lacks the novel pairs.
    """
    n = int(rng.choice(4, p=_N_OBJ_P)) + 1
    slots = sorted(rng.choice(NUM_SLOTS, size=n, replace=False).tolist())
    forced = int(rng.integers(n)) if split == "novel" else -1
    objs = []
    for k, slot in enumerate(slots):
        while True:
            shape, colour = SHAPES[rng.integers(3)], COLOURS[rng.integers(4)]
            novel = _is_novel(colour, shape)
            if split == "any" or (novel if k == forced else not novel):
                break
        size = SIZES[rng.integers(2)]
        x, y = _grid_position(slot, size, rng)
        objs.append(Obj(slot, shape, colour, size, x, y))
    return Scene(image_id, split, tuple(objs))


def _grid_position(slot: int, size: str, rng: np.random.Generator) -> tuple[int, int]:
    """Pixel centre on the tower's 8-px patch grid (a slot is 2 patch columns).

    Why the grid: with free positions every object straddled patch borders and each patch saw a fragment, so the
    tiny ViT's patch tokens told shapes apart poorly (measured: slot probe 78.67%, shape 71.88%; 400 pretraining
    steps: 42% of object patches classified right). A small object now sits inside one patch (centre of patch
    column 2·slot or 2·slot + 1, any row) and a large one on the corner of 2 × 2 patches (each patch sees a
    quadrant whose outline still names the shape): 100% of patches right after 400 steps.
    """
    if size == "small":
        return slot * SLOT_PX + 4 + 8 * int(rng.integers(2)), 4 + 8 * int(rng.integers(IMAGE_SIZE // 8))
    return slot * SLOT_PX + SLOT_PX // 2, 8 * int(rng.integers(1, IMAGE_SIZE // 8))


# ----------------------------------------------------------------------------------------------------------------
# Rendering


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres


def _mask(o: Obj) -> np.ndarray:
    dx, dy, r = _XX - o.x, _YY - o.y, _RADIUS[o.size]
    if o.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if o.shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    # upward triangle: apex at the top, half-width growing linearly to r at the base
    t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene.

    Args:
        scene: The scene.
        rng: Noise source (background texture, colour jitter).

    Returns:
        ``(image, patch_labels)``: (64, 64, 3) uint8 RGB and (8, 8) int64 class of the object covering most of each
        8-px patch (0 = background; an object needs ≥ 8 of the 64 pixels), the ViT's dense pretraining target.
    """
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 232.0) + rng.normal(0, 5, (IMAGE_SIZE, IMAGE_SIZE, 1))
    for o in scene.objects:
        img[_mask(o)] = np.asarray(_RGB[o.colour], dtype=float) + rng.normal(0, 10, 3)
    return np.clip(img, 0, 255).round().astype(np.uint8), patch_labels(scene)


def patch_labels(scene: Scene) -> np.ndarray:
    """(8, 8) class of the object covering most of each 8-px patch (0 = background; ≥ 8 of its 64 pixels).

    A function of the geometry only (no noise), so a probe can label any scene without re-rendering it.
    """
    best = np.zeros((8, 8))
    labels = np.zeros((8, 8), dtype=np.int64)
    for o in scene.objects:
        cover = _mask(o).reshape(8, 8, 8, 8).sum(axis=(1, 3))  # (8, 8) pixels of this object per patch
        take = (cover >= 8) & (cover > best)
        labels[take], best[take] = o.cls, cover[take]
    return labels


def jpeg_bytes(image: np.ndarray) -> bytes:
    """Encode as the JPEG written to disk (quality 95; deterministic for a given libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Decode JPEG bytes back to (64, 64, 3) uint8, i.e. exactly the pixels a dataset reader sees."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ----------------------------------------------------------------------------------------------------------------
# Language: captions and questions


def _join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene) -> list[str]:
    """Five paraphrases, all listing the objects left→right (COCO has 5 captions per image)."""
    nps = [o.phrase() for o in scene.objects]
    n = len(nps)
    count = f"there is one object, {nps[0]}" if n == 1 else f"there are {NUMBER_WORDS[n]} objects, {_join_and(nps)}"
    return [
        _join_and(nps),
        " left of ".join(nps),
        count,
        f"from left to right, {_join_and(nps)}" if n > 1 else f"a single {nps[0][2:]}",
        f"a picture of {_join_and(nps)}",
    ]


def _unique(objs: tuple[Obj, ...], **attrs: str) -> Obj | None:
    hits = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def _attribute(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    objs, kind = scene.objects, int(rng.integers(3))
    o = objs[rng.integers(len(objs))]
    if kind == 0 and _unique(objs, shape=o.shape):
        return f"what colour is the {o.shape}?", o.colour
    if kind == 1 and _unique(objs, colour=o.colour):
        return f"what shape is the {o.colour} object?", o.shape
    if kind == 2 and _unique(objs, colour=o.colour, shape=o.shape):
        return f"what size is the {o.colour} {o.shape}?", o.size
    return None


def _count(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    kind = int(rng.integers(3))
    if kind == 0:
        shape = SHAPES[rng.integers(3)]
        return f"how many {shape}s are there?", str(sum(o.shape == shape for o in scene.objects))
    if kind == 1:
        colour = COLOURS[rng.integers(4)]
        return f"how many {colour} objects are there?", str(sum(o.colour == colour for o in scene.objects))
    return "how many objects are there?", str(len(scene.objects))


def _exist(scene: Scene, rng: np.random.Generator, allow_novel: bool) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:  # balanced yes/no: half the questions name an object in the scene
        colour, shape = sorted(present)[rng.integers(len(present))]
    else:
        pool = [
            (c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and (allow_novel or not _is_novel(c, s))
        ]
        colour, shape = pool[rng.integers(len(pool))]
    return f"is there a {colour} {shape}?", "yes" if (colour, shape) in present else "no"


def _relation(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    objs = scene.objects
    if len(objs) < 2:
        return None
    # Only ask when exactly one object lies on the asked side of the referent, so "left of" is unambiguous.
    side = "left" if rng.random() < 0.5 else "right"
    k = 1 if side == "left" else len(objs) - 2
    ref, other = objs[k], objs[k - 1 if side == "left" else k + 1]
    if _unique(objs, colour=ref.colour, shape=ref.shape) is None:
        return None
    if rng.random() < 0.5:
        return f"what shape is {side} of the {ref.colour} {ref.shape}?", other.shape
    return f"what colour is {side} of the {ref.colour} {ref.shape}?", other.colour


def make_question(scene: Scene, family: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A (question, canonical answer) of ``family`` about ``scene``, or None when the family does not apply."""
    if family == "attribute":
        return _attribute(scene, rng)
    if family == "count":
        return _count(scene, rng)
    if family == "exist":
        return _exist(scene, rng, allow_novel=scene.split in ("novel", "any"))
    return _relation(scene, rng)


def questions(scene: Scene, rng: np.random.Generator, per_image: int) -> list[tuple[str, str, str]]:
    """``per_image`` distinct questions ``(family, question, answer)``, cycling families from a random start."""
    out, seen = [], set()
    start = int(rng.integers(len(FAMILIES)))
    for t in range(per_image * 4):  # each family gets several tries before the next one is asked instead
        family = FAMILIES[(start + t) % len(FAMILIES)]
        for _ in range(6):
            qa = make_question(scene, family, rng)
            if qa is not None and qa[0] not in seen:
                seen.add(qa[0])
                out.append((family, *qa))
                break
        if len(out) == per_image:
            break
    return out


_ALTERNATIVES = {"other": SHAPES + COLOURS + SIZES, "number": ("0", "1", "2", "3", "4"), "yes/no": ("yes", "no")}


def annotator_answers(answer: str, family: str, rng: np.random.Generator) -> list[str]:
    """Ten human-like answers for a canonical ``answer``.

    Numbers are sometimes written as words ("2"/"two", equal after the official normalisation, docs/paper_map.md §5.1)
    and 20% of questions get one or two wrong answers of the same kind.
    """
    answers = [answer] * 10
    kind = _ANSWER_TYPE[family]
    if kind == "number" and rng.random() < 0.4:
        for i in rng.choice(10, size=int(rng.integers(1, 5)), replace=False):
            answers[i] = NUMBER_WORDS[int(answer)]
    if rng.random() < 0.2:
        pool = [a for a in _ALTERNATIVES[kind] if a != answer and (kind != "other" or _same_kind(a, answer))]
        for i in rng.choice(10, size=int(rng.integers(1, 3)), replace=False):
            answers[i] = pool[rng.integers(len(pool))]
    return answers


def _same_kind(a: str, b: str) -> bool:
    return any(a in group and b in group for group in (SHAPES, COLOURS, SIZES))


def answer_type(family: str) -> str:
    """VQA ``answer_type`` of a question family: ``yes/no``, ``number`` or ``other``."""
    return _ANSWER_TYPE[family]
