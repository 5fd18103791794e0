"""Report figures: loss and validation curves, caption/VQA galleries, retrieval examples, attention maps (D8).

Every function returns a small :class:`matplotlib.figure.Figure` built without pyplot (no global figure state, no
double display in notebooks); :func:`show` displays one as a PNG at a fixed dpi so a report stays well under 2 MB.
Curves read the JSONL log written by :func:`blip2lib.engine.run_loop`: one ``{"step", "loss", "<term>_loss", "lr",
...}`` record per optimizer step and ``{"step", "eval": {...}}`` records after each evaluation.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DPI = 80  # 80 dpi × ~6 in wide figures ≈ 40–120 kB PNGs
_INCH = 1.7  # side of one image tile in a gallery, in inches


def read_log(log_path: str | Path) -> tuple[list[dict], list[dict]]:
    """Split a ``log.jsonl`` into training records and evaluation records (``{"step", **eval}``)."""
    train, evals = [], []
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "eval" in rec:
            evals.append({"step": rec["step"], **rec["eval"]})
        else:
            train.append(rec)
    return train, evals


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]  # skipped (non-finite) steps leave a gap, not a spike
    return [s for s, _ in pts], [v for _, v in pts]


def loss_curves(log_path: str | Path, terms: Sequence[str] | None = None, log_y: bool = False) -> Figure:
    """Training loss per term (``loss`` and every ``*_loss``) against optimizer step, on one axes.

    Args:
        log_path: the run's ``log.jsonl``.
        terms: loss keys to plot; default every key that is ``loss`` or ends in ``_loss``, in log order.
        log_y: logarithmic y axis.

    Returns:
        A figure with one axes and one line per term.
    """
    train, _ = read_log(log_path)
    if terms is None:
        terms = [k for k in dict.fromkeys(k for r in train for k in r) if k == "loss" or k.endswith("_loss")]
    fig = Figure(figsize=(6, 3), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for key in terms:
        steps, values = _series(train, key)
        ax.plot(steps, values, label=key, linewidth=1.8 if key == "loss" else 1.0)
    ax.set(xlabel="step", ylabel="loss", title="training loss by term")
    if log_y:
        ax.set_yscale("log")
    if terms:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def val_curves(log_path: str | Path, keys: Sequence[str]) -> Figure:
    """Validation metrics against step, one small axes per key (metrics have different scales).

    Args:
        log_path: the run's ``log.jsonl``.
        keys: metric names inside the ``eval`` records, e.g. ``["txt_r1", "img_r1"]``.

    Returns:
        A figure with ``len(keys)`` axes, one line each.
    """
    _, evals = read_log(log_path)
    fig = Figure(figsize=(min(3 * len(keys), 9), 2.6), dpi=DPI, layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        steps, values = _series(evals, key)
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
    return fig


def _to_hwc(image: Any) -> np.ndarray:
    """PIL image, ``(H, W, C)`` / ``(H, W)`` array or ``(C, H, W)`` tensor → float ``(H, W, C|1)`` in [0, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) → (H, W, C)
    arr = arr.astype(np.float32)
    if arr.max(initial=0.0) > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def image_gallery(images: Sequence[Any], captions: Sequence[str], titles: Sequence[str] | None = None,
                  ncols: int = 4, wrap: int = 28) -> Figure:  # fmt: skip
    """A grid of images with a caption under each (captioning and VQA galleries).

    Args:
        images: PIL images, ``(H, W, C)`` arrays or ``(C, H, W)`` tensors.
        captions: one text per image (e.g. "pred: … / ref: …" or "Q: … A: …").
        titles: optional short title above each image (image id, verdict).
        ncols: images per row.
        wrap: characters per caption line.

    Returns:
        A figure with one axes per image.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    ncols = max(1, min(ncols, len(images)))
    nrows = max(1, math.ceil(len(images) / ncols))
    fig = Figure(figsize=(ncols * _INCH, nrows * (_INCH + 0.7)), dpi=DPI, layout="constrained")
    for i, (img, cap) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(_to_hwc(img), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(_wrap(cap, wrap), fontsize=7)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:4])


def retrieval_examples(queries: Sequence[str], ranked_images: Sequence[Sequence[Any]],
                       hits: Sequence[Sequence[bool]], k: int = 3) -> Figure:  # fmt: skip
    """Text→image retrieval: one row per query, its top-``k`` images framed green (correct) or red.

    Args:
        queries: query captions.
        ranked_images: per query, images in ranked order (at least ``k``).
        hits: per query, whether each ranked image is a ground-truth match.
        k: images shown per query.

    Returns:
        A figure with ``len(queries) * k`` axes.
    """
    fig = Figure(figsize=(k * _INCH + 1.5, len(queries) * _INCH), dpi=DPI, layout="constrained")
    for q, (text, imgs, ok) in enumerate(zip(queries, ranked_images, hits)):
        for j in range(k):
            ax = fig.add_subplot(len(queries), k, q * k + j + 1)
            ax.imshow(_to_hwc(imgs[j]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set(color="tab:green" if ok[j] else "tab:red", linewidth=3)
            ax.set_title(f"#{j + 1}", fontsize=7)
            if j == 0:
                ax.set_ylabel(_wrap(text, 22), fontsize=7, rotation=0, ha="right", va="center")
    return fig


def attention_maps(image: Any, attn: Any, ncols: int = 4, alpha: float = 0.55) -> Figure:
    """The image, then one cross-attention map per query overlaid on it.

    Args:
        image: the input image (PIL, ``(H, W, C)`` array or ``(C, H, W)`` tensor).
        attn: ``(Q, h, w)`` attention over the patch grid (e.g. a Q-Former cross-attention layer averaged over
            heads and reshaped); each map is normalised to [0, 1] and stretched to the image size.
        ncols: axes per row.
        alpha: opacity of the heat map.

    Returns:
        A figure with ``1 + Q`` axes.
    """
    img = _to_hwc(image)
    maps = np.asarray(attn.detach().cpu().float().numpy() if hasattr(attn, "detach") else attn, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"attn must be (Q, h, w), got shape {maps.shape}")
    n = 1 + maps.shape[0]
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(ncols * _INCH, nrows * _INCH), dpi=DPI, layout="constrained")
    extent = (0, img.shape[1], img.shape[0], 0)  # stretch the (h, w) grid over the (H, W) image
    for i in range(n):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img, interpolation="nearest", extent=extent)
        if i > 0:
            m = maps[i - 1]
            m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)  # (h, w) in [0, 1]
            ax.imshow(m, cmap="magma", alpha=alpha, extent=extent, interpolation="bilinear")
        ax.set_title("image" if i == 0 else f"query {i - 1}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig: Figure, dpi: int = DPI) -> None:
    """Display a figure in the notebook as a PNG (the executed notebook and the report embed it)."""
    from IPython.display import Image, display

    display(Image(data=to_png(fig, dpi)))
