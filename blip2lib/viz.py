"""Report figures: loss and validation curves, caption/VQA galleries, retrieval examples, attention maps (D8).

Every function returns a small :class:`matplotlib.figure.Figure` built without pyplot (no global figure state, no
double display in notebooks); :func:`show` displays one as a PNG at a fixed dpi so a report stays well under 2 MB.

Legibility: a report shows a PNG at its natural size (one PNG pixel per CSS pixel) whenever the page is wide enough,
so every text is sized in PNG pixels (``FONT_PX`` and up, via :func:`_pt`) and every figure is at most ``MAX_WIDTH_PX``
wide, which fits the report column of a browser window 800 px wide. :func:`show` records the smallest text of the
figure (``min_font_px``) and an alternative text in the output's metadata; the report puts them on the ``<img>``
(``data-min-font-px``, ``alt``), where a browser test checks the rendered size.
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
FONT_PX = 12  # smallest text of any figure, in PNG pixels: ≥ 11 CSS px when shown at natural size
MAX_WIDTH_PX = 720  # widest figure: a report column is 739 CSS px in an 800 px window, so no figure is scaled down
_INCH = 1.7  # side of one image tile in retrieval examples and attention maps, in inches
_TILE_INCH = 2.2  # side of one image tile in a caption / VQA gallery: 4 columns × 176 px = 704 px ≤ MAX_WIDTH_PX


def _pt(px: float, dpi: int = DPI) -> float:
    """Font size in points that renders ``px`` pixels tall in a PNG saved at ``dpi``."""
    return px * 72.0 / dpi


def _ticks(ax) -> None:
    """Tick labels at the legible size (their default, 10 pt, is 11.1 px at 80 dpi: too close to the floor)."""
    ax.tick_params(labelsize=_pt(FONT_PX))


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
    ax.set_xlabel("step", fontsize=_pt(FONT_PX + 1))
    ax.set_ylabel("loss", fontsize=_pt(FONT_PX + 1))
    ax.set_title("training loss by term", fontsize=_pt(FONT_PX + 2))
    _ticks(ax)
    if log_y:
        ax.set_yscale("log")
    if terms:
        ax.legend(fontsize=_pt(FONT_PX))
    ax.grid(alpha=0.3)
    fig.set_label(f"Training loss against optimizer step: {', '.join(terms) or 'no loss terms logged'}.")
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
    fig = Figure(figsize=(min(3 * len(keys), MAX_WIDTH_PX / DPI), 2.6), dpi=DPI, layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        steps, values = _series(evals, key)
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("step", fontsize=_pt(FONT_PX + 1))
        ax.set_title(key, fontsize=_pt(FONT_PX + 1))
        _ticks(ax)
        ax.grid(alpha=0.3)
    fig.set_label(f"Validation metrics against step, one panel each: {', '.join(keys)}.")
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
                  ncols: int = 4, wrap: int | None = None) -> Figure:  # fmt: skip
    """A grid of images with a caption under each (captioning and VQA galleries).

    Captions are ``FONT_PX`` pixels tall and at most 4 lines; tiles are ``_TILE_INCH`` wide, so 4 columns stay within
    ``MAX_WIDTH_PX`` and the report shows them unscaled. The figure's label (the ``alt`` text of the report's image)
    lists every title and caption.

    Args:
        images: PIL images, ``(H, W, C)`` arrays or ``(C, H, W)`` tensors.
        captions: one text per image (e.g. "pred: … / ref: …" or "question → answer").
        titles: optional short title above each image (image id, model name, verdict).
        ncols: images per row (at most 4 keep the figure within ``MAX_WIDTH_PX``).
        wrap: characters per caption line; default what fits a tile at ``FONT_PX`` (about 0.6 em per character).

    Returns:
        A figure with one axes per image.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    ncols = max(1, min(ncols, len(images)))
    nrows = max(1, math.ceil(len(images) / ncols))
    if wrap is None:
        wrap = max(8, int(_TILE_INCH * DPI / (0.6 * FONT_PX)) - 2)  # 176 px tile → 22 characters and a margin
    # (rows × (tile + 4 caption lines + a title line)) in inches; constrained layout shrinks the tiles to fit the text
    fig = Figure(figsize=(ncols * _TILE_INCH, nrows * (_TILE_INCH + 5.5 * FONT_PX * 1.25 / DPI)), dpi=DPI,
                 layout="constrained")  # fmt: skip
    for i, (img, cap) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(_to_hwc(img), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(_wrap(cap, wrap), fontsize=_pt(FONT_PX))
        if titles is not None:
            ax.set_title(titles[i], fontsize=_pt(FONT_PX + 1))
    items = [f"{t}: {c}" if titles is not None else c for t, c in zip(titles or captions, captions)]
    fig.set_label(f"{len(images)} images with their captions: " + "; ".join(items) + ".")
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
    # the query text sits left of its row: 2.2 in hold 20 characters at FONT_PX
    fig = Figure(figsize=(k * _INCH + 2.2, len(queries) * _INCH), dpi=DPI, layout="constrained")
    for q, (text, imgs, ok) in enumerate(zip(queries, ranked_images, hits)):
        for j in range(k):
            ax = fig.add_subplot(len(queries), k, q * k + j + 1)
            ax.imshow(_to_hwc(imgs[j]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set(color="tab:green" if ok[j] else "tab:red", linewidth=3)
            ax.set_title(f"#{j + 1}", fontsize=_pt(FONT_PX))
            if j == 0:
                ax.set_ylabel(_wrap(text, 20), fontsize=_pt(FONT_PX), rotation=0, ha="right", va="center")
    rows = [f"{text}: " + ", ".join("hit" if h else "miss" for h in ok[:k]) for text, ok in zip(queries, hits)]
    fig.set_label(f"Top-{k} images retrieved per query (green frame: a match): " + "; ".join(rows) + ".")
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
        ax.set_title("image" if i == 0 else f"query {i - 1}", fontsize=_pt(FONT_PX))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.set_label(f"An image and the cross-attention maps of {maps.shape[0]} queries over it.")
    return fig


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def min_font_px(fig: Figure, dpi: int = DPI) -> float:
    """The height in PNG pixels of the smallest visible, non-empty text of a rendered figure (ticks included).

    Call after :func:`to_png` (tick labels exist once the figure is drawn). ``inf`` for a figure without text.
    """
    from matplotlib.text import Text

    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * dpi / 72.0 if sizes else math.inf


def alt_text(fig: Figure) -> str:
    """The figure's alternative text: its label (set by every figure function here), else its axes titles."""
    if fig.get_label():
        return fig.get_label()
    titles = [t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel()) if t]
    return "Figure: " + ("; ".join(titles) if titles else f"{len(fig.axes)} panel(s)") + "."


def png_output(fig: Figure, dpi: int = DPI, alt: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """A figure as PNG bytes and the ``image/png`` metadata that :func:`show` publishes with it.

    Returns:
        ``(png, {"alt": alt or alt_text(fig), "min_font_px": min_font_px(fig, dpi)})``; ``min_font_px`` is
        rounded to 0.01 px and left out for a figure without text.
    """
    png = to_png(fig, dpi)
    meta: dict[str, Any] = {"alt": alt or alt_text(fig)}
    smallest = min_font_px(fig, dpi)
    if math.isfinite(smallest):  # (JSON has no infinity)
        meta["min_font_px"] = round(smallest, 2)
    return png, meta


def show(fig: Figure, dpi: int = DPI, alt: str | None = None) -> None:
    """Display a figure in the notebook as a PNG (the executed notebook and the report embed it).

    The output's ``image/png`` metadata carries ``alt`` (default :func:`alt_text`) and ``min_font_px``
    (:func:`min_font_px`); the report writes them on the ``<img>`` (``alt``, ``data-min-font-px``).
    """
    from IPython.display import Image, display

    png, meta = png_output(fig, dpi, alt)
    display(Image(data=png, metadata=meta))
