"""Image-text retrieval scoring (docs/paper_map.md §4.3 inference / score fusion, §5.3 metrics, §10.8).

Two pieces a driver combines:

* ``rerank_scores``: ITC similarities over all pairs -> top-k candidates per row -> ITM on those pairs only (batched
  calls to a caller-supplied ``itm_fn``) -> fused score; every non-candidate entry is -100 (LAVIS
  ``compute_sim_matrix``). Fusion is a named parameter (user need 18): ``"itm+itc"`` (LAVIS code, default),
  ``"itm"`` (paper text: "re-rank by ITM"), ``"itc"`` (ITC only on the same candidates).
* ``recall_at_k``: R@1/5/10 in percent; image->text rank = best rank among the image's captions.

Sharding (user need 33): rows are split over ranks with LAVIS's ``step = N // W + 1``. Unlike LAVIS, whose merged
matrices carry a ``(W-1) * -100`` offset (harmless for ranking), each rank leaves the rows it does not own at 0
before ``all_reduce_sum``, so the merged matrices equal the single-process ones exactly.

Tie rule (``recall_at_k``): LAVIS ranks with ``np.argsort(score)[::-1]``, whose order among equal scores depends on
numpy's (unstable) sort and is not reproducible. We default to the *pessimistic* rule: a ground truth ties behind
every non-ground-truth item with the same score, i.e. ``rank = #{higher} + #{equal, not ground truth}``. It can only
lower recall vs LAVIS when ties exist, and it gives a constant (collapsed) score matrix ~0 recall instead of an
arbitrary one. ``ties="optimistic"`` (``rank = #{higher}``) gives the other bound. With continuous model scores there
are no ties and every rule, LAVIS's included, gives the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from blip2lib import dist

__all__ = ["FUSIONS", "NEG_FILL", "shard_rows", "candidate_scores", "rerank_scores", "ranks", "recall_at_k"]

logger = logging.getLogger(__name__)

FUSIONS = ("itm+itc", "itm", "itc")
NEG_FILL = -100.0  # score of pairs outside the top-k (LAVIS)
# itm_fn(image_idx (P,), text_idx (P,)) -> ITM positive-class logits (P,), mean over queries (docs/paper_map.md §4.3
# step 4)
ItmFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row: (P, L) → (P, L') with L' the batch's longest text.

    Exact for the Q-Former: padded keys are masked out of attention and no output reads a padded position, so
    ``padding="max_length"`` (LAVIS, docs/paper_map.md §10.8) keeps its results while a batch of short captions runs
    shorter.
    """
    used = mask.any(0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return ids[:, :length], mask[:, :length]


def shard_rows(n_rows: int, rank: int, world_size: int) -> range:
    """Rows of ``rank``: LAVIS's ``step = n // W + 1``, ``[rank*step, min(n, rank*step + step))``."""
    step = n_rows // world_size + 1
    start = min(n_rows, rank * step)
    return range(start, min(n_rows, start + step))


def candidate_scores(
    sim: torch.Tensor,
    rows: Sequence[int],
    pair_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    k: int,
    fusion: str,
    batch_size: int,
) -> torch.Tensor:
    """Fused scores of ``rows`` of one direction: top-k by ``sim``, score the candidates, -100 elsewhere.

    Args:
        sim: ITC similarity of this direction, (R, C) (rows = queries, columns = candidates).
        rows: the row indices this process handles.
        pair_fn: ``pair_fn(row_idx (P,), col_idx (P,)) -> (P,)`` ITM logits; unused for ``fusion="itc"``.
        k: candidates per row (clamped to C).
        fusion: one of ``FUSIONS``.
        batch_size: pairs per ``pair_fn`` call.

    Returns:
        (len(rows), C) fused scores, ``NEG_FILL`` outside each row's top-k.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    out = torch.full((len(rows_t), sim.shape[1]), NEG_FILL, dtype=sim.dtype, device=sim.device)  # (r, C)
    if len(rows_t) == 0:
        return out
    k = min(k, sim.shape[1])
    top_sim, top_idx = sim[rows_t.to(sim.device)].topk(k, dim=1)  # (r, k)
    if fusion == "itc":
        return out.scatter_(1, top_idx, top_sim)
    row_idx = rows_t.to(sim.device).repeat_interleave(k)  # (r*k,)
    col_idx = top_idx.reshape(-1)  # (r*k,)
    logits = []
    with torch.no_grad():
        for s in range(0, row_idx.numel(), batch_size):
            part = pair_fn(row_idx[s : s + batch_size], col_idx[s : s + batch_size])
            logits.append(part.reshape(-1).to(device=sim.device, dtype=sim.dtype))
    itm = torch.cat(logits).view(-1, k)  # (r, k)
    fused = itm + top_sim if fusion == "itm+itc" else itm  # docs/paper_map.md §4.3 step 4 / paper text
    return out.scatter_(1, top_idx, fused)


@torch.no_grad()
def rerank_scores(
    sim_itc: torch.Tensor,
    itm_fn: ItmFn | None,
    k: int = 128,
    fusion: str = "itm+itc",
    batch_size: int = 256,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage retrieval scores (docs/paper_map.md §4.3 "Inference / score fusion").

    Args:
        sim_itc: raw ITC cosine (max over queries, no temperature), (N_img, N_txt).
        itm_fn: ``itm_fn(image_idx (P,), text_idx (P,)) -> (P,)`` ITM positive logits for those pairs; may be None
            for ``fusion="itc"``.
        k: candidates per image (texts) and per text (images); paper/LAVIS ``k_test = 128``; clamped to N.
        fusion: ``"itm+itc"`` (LAVIS, default), ``"itm"`` (paper text) or ``"itc"``.
        batch_size: pairs per ``itm_fn`` call.
        rank: this process's rank for the row split; default ``blip2lib.dist.get_rank()``.
        world_size: number of row shards; default ``blip2lib.dist.get_world_size()`` (1: all rows, no collective).

    Returns:
        ``(score_i2t (N_img, N_txt), score_t2i (N_txt, N_img))``, identical on every rank after the merge.
    """
    if fusion != "itc" and itm_fn is None:
        raise ValueError(f"fusion={fusion!r} needs an itm_fn")
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    n_img, n_txt = sim_itc.shape
    logger.info("rerank: %d images x %d texts, k=%d, fusion=%s, rank %d/%d", n_img, n_txt, k, fusion, rank, world_size)

    def t2i_fn(txt_idx: torch.Tensor, img_idx: torch.Tensor) -> torch.Tensor:
        return itm_fn(img_idx, txt_idx)

    results = []
    for sim, fn in ((sim_itc, itm_fn), (sim_itc.t(), t2i_fn)):  # image->text, then text->image
        rows = shard_rows(sim.shape[0], rank, world_size)
        # rows owned by other ranks stay 0, so the sum below is exact (contiguous for the collective)
        full = torch.zeros(sim.shape, dtype=sim.dtype, device=sim.device)  # (R, C)
        if len(rows):
            full[rows.start : rows.stop] = candidate_scores(sim, rows, fn, k, fusion, batch_size)
        results.append(dist.all_reduce_sum(full))
    return results[0], results[1]


def ranks(scores: torch.Tensor, positives: Sequence[Sequence[int]], ties: str = "pessimistic") -> torch.Tensor:
    """0-based rank of the best-ranked positive per row.

    Args:
        scores: (R, C) scores, higher is better.
        positives: for each row, the list of correct column indices (at least one).
        ties: ``"pessimistic"`` (positives sort after tied non-positives) or ``"optimistic"`` (before everything
            tied).

    Returns:
        (R,) long tensor of ranks (0 = top).
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    scores = torch.as_tensor(scores)
    out = torch.empty(scores.shape[0], dtype=torch.long)
    for r in range(scores.shape[0]):
        row = scores[r]
        pos = torch.as_tensor(list(positives[r]), dtype=torch.long)
        if pos.numel() == 0:
            raise ValueError(f"row {r} has no ground-truth column")
        best = row[pos].max()  # the best positive decides the rank (other positives can never precede it)
        rank = (row > best).sum()
        if ties == "pessimistic":
            is_pos = torch.zeros_like(row, dtype=torch.bool)
            is_pos[pos] = True
            rank = rank + ((row == best) & ~is_pos).sum()
        out[r] = rank
    return out


def recall_at_k(
    score_i2t: torch.Tensor,
    txt2img: Sequence[int],
    img2txt: Sequence[Sequence[int]],
    score_t2i: torch.Tensor | None = None,
    ties: str = "pessimistic",
) -> dict[str, float | str]:
    """Retrieval recalls in percent (docs/paper_map.md §5.3, LAVIS ``_report_metrics``).

    Args:
        score_i2t: (N_img, N_txt) image->text scores.
        txt2img: image index of every text.
        img2txt: caption indices of every image.
        score_t2i: (N_txt, N_img) text->image scores; default ``score_i2t.T`` (ITC-only / symmetric scores).
            After ``rerank_scores`` the two matrices differ: pass both.
        ties: see ``ranks`` (module docstring).

    Returns:
        ``txt_r1/5/10`` (image->text), ``img_r1/5/10`` (text->image), ``txt_r_mean``, ``img_r_mean``, ``r_mean``,
        ``agg_metrics`` (= ``txt_r_mean``, LAVIS's model-selection metric) and ``"unit": "percent"``.
    """
    score_i2t = torch.as_tensor(score_i2t)
    score_t2i = score_i2t.t() if score_t2i is None else torch.as_tensor(score_t2i)
    if len(img2txt) != score_i2t.shape[0] or len(txt2img) != score_t2i.shape[0]:
        raise ValueError("img2txt / txt2img lengths must match the score matrix rows")
    r_txt = ranks(score_i2t, img2txt, ties).double()
    r_img = ranks(score_t2i, [[i] for i in txt2img], ties).double()
    out: dict[str, float | str] = {}
    for name, r in (("txt", r_txt), ("img", r_img)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float((r < k).sum()) / len(r)
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    out["unit"] = "percent"
    return out
