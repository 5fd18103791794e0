"""Image and text pre-processing, exactly as docs/paper_map.md §6.

Image side: torchvision transforms only (no hand-written resizing), so the pixels match LAVIS'
``blip2_image_train`` / ``blip_image_eval`` processors up to the PIL version.
Text side: ``pre_caption`` / ``pre_question`` reproduce LAVIS' ``blip_caption`` / ``blip_question``.
"""

from __future__ import annotations

import re

from torchvision import transforms
from torchvision.transforms import InterpolationMode

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "image_train_transform",
    "image_eval_transform",
    "pre_caption",
    "pre_question",
    "CaptionProcessor",
    "QuestionProcessor",
]

# OpenAI-CLIP normalisation, applied after ToTensor (÷255) by every BLIP-2 image processor (docs/paper_map.md §6).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The characters LAVIS' text processors treat as punctuation: . ! " ( ) * # : ; ~  (docs/paper_map.md §6).
# Commas, apostrophes, '?' and '-' are deliberately NOT in the set.
_PUNCT = re.compile(r"[.!\"()*#:;~]")
_MULTI_SPACE = re.compile(r"\s{2,}")


def image_train_transform(
    size: int = 224, scale: tuple[float, float] = (0.5, 1.0), flip: bool = True
) -> transforms.Compose:
    """``blip2_image_train``: RandomResizedCrop(size, scale 0.5–1, bicubic) → h-flip → ToTensor → CLIP normalise.

    The aspect-ratio range is torchvision's default (3/4, 4/3), as in LAVIS. No RandAugment (docs/paper_map.md §6: that
    belongs to the older ``blip_image_train`` processor). Pre-training uses 224, caption/retrieval fine-tuning 364.

    Args:
        size: output side in pixels.
        scale: area fraction range of the random crop.
        flip: random horizontal flip (the paper's recipe; off where left/right carries meaning, e.g. the toy world).

    Returns:
        A transform mapping a PIL RGB image to a float tensor ``(3, size, size)``.
    """
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(p=0.5 if flip else 0.0),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def image_eval_transform(size: int = 224) -> transforms.Compose:
    """``blip_image_eval``: square bicubic resize to (size, size) — no aspect-preserving resize, no crop.

    See docs/paper_map.md §10.14.

    Args:
        size: output side in pixels.

    Returns:
        A transform mapping a PIL RGB image to a float tensor ``(3, size, size)``.
    """
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def _truncate_words(text: str, max_words: int) -> str:
    # LAVIS splits on single spaces (not arbitrary whitespace) when counting words.
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(text: str, max_words: int = 50, prompt: str = "") -> str:
    """LAVIS ``blip_caption``: ``prompt`` + normalised caption.

    Lower-case; each listed punctuation character becomes a space; runs of two or more whitespace characters collapse to
    one space; a trailing newline and surrounding spaces are stripped; the first ``max_words`` space-separated words are
    kept. The prompt (``"a photo of "`` for COCO caption fine-tuning, docs/paper_map.md §4.1) is prepended after
    normalisation and is not counted in ``max_words``.

    Args:
        text: raw caption.
        max_words: word limit.
        prompt: text prepended verbatim.

    Returns:
        The processed caption.
    """
    caption = _PUNCT.sub(" ", text.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return prompt + _truncate_words(caption, max_words)


def pre_question(text: str, max_words: int = 50) -> str:
    """LAVIS ``blip_question``: lower-case, listed punctuation deleted (not spaced), right-strip, ≤ max_words.

    Args:
        text: raw question.
        max_words: word limit.

    Returns:
        The processed question.
    """
    question = _PUNCT.sub("", text.lower()).rstrip(" ")
    return _truncate_words(question, max_words)


class CaptionProcessor:
    """Picklable callable wrapper of :func:`pre_caption` (datasets take a ``text_processor`` callable)."""

    def __init__(self, prompt: str = "", max_words: int = 50):
        self.prompt = prompt
        self.max_words = max_words

    def __call__(self, text: str) -> str:
        """Process one caption."""
        return pre_caption(text, max_words=self.max_words, prompt=self.prompt)

    def __repr__(self) -> str:
        return f"CaptionProcessor(prompt={self.prompt!r}, max_words={self.max_words})"


class QuestionProcessor:
    """Picklable callable wrapper of :func:`pre_question`."""

    def __init__(self, max_words: int = 50):
        self.max_words = max_words

    def __call__(self, text: str) -> str:
        """Process one question."""
        return pre_question(text, max_words=self.max_words)

    def __repr__(self) -> str:
        return f"QuestionProcessor(max_words={self.max_words})"
