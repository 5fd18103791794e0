"""Stage-1 objectives of BLIP-2 (paper §3.1; docs/paper_map.md §2): ITC, ITM with hard negatives, ITG.

Pure functions, no process-group calls: the task gathers with ``blip2lib.dist`` and passes in the
local tensors, the gathered tensors and the rank. Every loss returns a plain scalar tensor; the task names them
``itc_loss`` / ``itm_loss`` / ``itg_loss`` and sums them with equal weights (docs/paper_map.md §2 "Total").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "itc_similarities",
    "itc_targets",
    "itc_loss",
    "positive_mask",
    "sample_hard_negatives",
    "build_itm_pairs",
    "itm_loss",
    "itm_accuracy",
    "itg_inputs",
    "itg_loss",
]

IGNORE_INDEX = -100  # label value skipped by F.cross_entropy (HF / LAVIS convention)


# ----------------------------------------------------------------------------------------------------------------
# ITC: image-text contrastive (docs/paper_map.md §2 ITC, §10.5)


def itc_similarities(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    image_feats_all: torch.Tensor,
    text_feat_all: torch.Tensor,
    temp: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled ITC logits of the local rows against the gathered (global) columns.

    ``s_i2t[b, j] = max_q <image_feats[b, q], text_feat_all[j]> / temp`` and ``s_t2i[b, j] = max_q <text_feat[b],
    image_feats_all[j, q]> / temp`` (docs/paper_map.md §2 ITC). The max over the queries is taken on the cosine *before*
    dividing by ``temp`` (the same thing for ``temp > 0``; it keeps the raw max-cosine that retrieval reuses,
    docs/paper_map.md §10.20). Written with einsum so B == 1 works (LAVIS's ``.squeeze()`` drops the batch axis there,
    docs/paper_map.md §10.16).

    Args:
        image_feats: local L2-normalised query features, (B, Q, E).
        text_feat: local L2-normalised text [CLS] features, (B, E).
        image_feats_all: query features gathered over ranks (no grad in LAVIS), (B*W, Q, E).
        text_feat_all: text features gathered over ranks, (B*W, E).
        temp: learnable temperature (scalar tensor or float; never clamped, docs/paper_map.md §10.5).

    Returns:
        ``(sim_i2t, sim_t2i)``, each (B, B*W): local images vs all texts, local texts vs all images.
    """
    sim_i2t = torch.einsum("bqe,je->bjq", image_feats, text_feat_all).amax(dim=-1)  # (B, BW, Q) -> (B, BW)
    sim_t2i = torch.einsum("be,jqe->bjq", text_feat, image_feats_all).amax(dim=-1)  # (B, BW, Q) -> (B, BW)
    return sim_i2t / temp, sim_t2i / temp


def itc_targets(batch: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Column of each local row's positive in the gathered axis: ``rank * B + arange(B)``, (B,).

    See docs/paper_map.md §2 ITC.
    """
    return rank * batch + torch.arange(batch, device=device)


def positive_mask(
    batch: int,
    n_all: int,
    rank: int,
    image_ids: torch.Tensor | None = None,
    image_ids_all: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (B, B*W) mask of positive pairs between local rows and gathered columns.

    Without image ids: the diagonal of the local block ``[:, rank*B : rank*B + B]``. With image ids (retrieval
    fine-tuning, docs/paper_map.md §4.3): every column whose image id equals the row's id (this includes the diagonal).
    """
    if image_ids is not None:
        if image_ids_all is None:
            raise ValueError("image_ids given without image_ids_all (gather them over ranks first)")
        return image_ids.reshape(-1, 1) == image_ids_all.reshape(1, -1)  # (B, BW)
    cols = torch.arange(n_all, device=device)
    return cols.unsqueeze(0) == itc_targets(batch, rank, device).unsqueeze(1)  # (B, BW)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits -> float32 for the softmax; float32/float64 pass through unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j target[b, j] * log_softmax(logits)[b, j]``."""
    return -(target * F.log_softmax(_upcast(logits), dim=1)).sum(dim=1).mean()


def itc_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    rank: int,
    label_smoothing: float = 0.1,
    image_ids: torch.Tensor | None = None,
    image_ids_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric ITC loss with label smoothing, ``½ [CE(s_i2t) + CE(s_t2i)]`` (docs/paper_map.md §2 ITC).

    One-hot form (stage-1 pre-training): the target of local row b is column ``rank*B + b``; ``F.cross_entropy``
    with ``label_smoothing=ε`` puts ``1 - ε + ε/N`` on it and ``ε/N`` on every other of the N = B*W columns.

    Image-id form (COCO retrieval fine-tuning, docs/paper_map.md §2 variant and §4.3; only for *integer* image indices,
    docs/paper_map.md §10.15): every column with the row's image id is a positive; target = ``(1-ε)·pos/|pos| + ε/N``
    and the loss is the mean over rows of ``-Σ target·log_softmax``, averaged over both directions. With all-distinct
    ids it equals the one-hot form.

    Args:
        sim_i2t: local images vs all texts, temperature-scaled, (B, B*W).
        sim_t2i: local texts vs all images, temperature-scaled, (B, B*W).
        rank: this process's rank (the local block's offset in the gathered axis).
        label_smoothing: ε (0.1 in BLIP-2).
        image_ids: optional integer image ids of the local rows, (B,).
        image_ids_all: the ids gathered over ranks, (B*W,); required with ``image_ids``.

    Returns:
        Scalar loss (mean over the B local rows; DDP's gradient average then gives the global-batch mean).
    """
    b, n = sim_i2t.shape
    if image_ids is None:
        targets = itc_targets(b, rank, sim_i2t.device)  # (B,)
        loss_i2t = F.cross_entropy(_upcast(sim_i2t), targets, label_smoothing=label_smoothing)
        loss_t2i = F.cross_entropy(_upcast(sim_t2i), targets, label_smoothing=label_smoothing)
        return (loss_i2t + loss_t2i) / 2
    pos = positive_mask(b, n, rank, image_ids, image_ids_all).to(_upcast(sim_i2t).dtype)  # (B, BW)
    target = (1 - label_smoothing) * pos / pos.sum(dim=1, keepdim=True) + label_smoothing / n  # (B, BW)
    return (_soft_ce(sim_i2t, target) + _soft_ce(sim_t2i, target)) / 2


# ----------------------------------------------------------------------------------------------------------------
# ITM: image-text matching with hard negatives from the global batch (docs/paper_map.md §2 ITM, §10.7)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    rank: int,
    image_ids: torch.Tensor | None = None,
    image_ids_all: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative per local row from ``softmax`` of the ITC logits with positives excluded.

    For each local text b a negative *image* is drawn from ``softmax(s_t2i[b])``; for each local image b a negative
    *text* from ``softmax(s_i2t[b])`` (docs/paper_map.md §2 ITM). Positives (local diagonal, or every same-image-id
    pair) get weight exactly 0: LAVIS HEAD fills them with -10000 before the softmax; we fill with -inf, which is
    bitwise the same in float32 whenever the logits are ≪ 10^4 in size (``exp(-10^4)`` underflows to 0) and stays exact
    for any temperature. The paper-time code (``softmax + 1e-4``, then zero the positive) differs by < 1e-4·N in each
    weight before renormalisation: practically equivalent. The inputs are not modified.

    Args:
        sim_i2t: temperature-scaled ITC logits, local images vs all texts, (B, B*W).
        sim_t2i: temperature-scaled ITC logits, local texts vs all images, (B, B*W).
        rank: this process's rank.
        image_ids: optional integer image ids of the local rows, (B,) (retrieval fine-tuning).
        image_ids_all: gathered image ids, (B*W,).
        generator: optional ``torch.Generator`` for reproducible draws (must live on the logits' device).

    Returns:
        ``(neg_image_idx, neg_text_idx)``, each (B,) long, indices into the gathered (B*W) axis.

    Raises:
        ValueError: if some row has no negative at all (e.g. global batch of 1, or one image id for the whole
            global batch); LAVIS would silently "sample" the positive and label it as a non-match.
    """
    b, n = sim_i2t.shape
    pos = positive_mask(b, n, rank, image_ids, image_ids_all, device=sim_i2t.device)  # (B, BW)
    if bool((~pos).sum(dim=1).eq(0).any()):
        raise ValueError("ITM hard negatives: a row has no negative column (global batch too small or one image id)")
    w_t2i = _upcast(sim_t2i).masked_fill(pos, float("-inf")).softmax(dim=1)  # (B, BW)
    w_i2t = _upcast(sim_i2t).masked_fill(pos, float("-inf")).softmax(dim=1)  # (B, BW)
    neg_image_idx = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)  # (B,) one image per text
    neg_text_idx = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)  # (B,) one text per image
    return neg_image_idx, neg_text_idx


def build_itm_pairs(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    text_ids_all: torch.Tensor,
    text_mask_all: torch.Tensor,
    image_embeds: torch.Tensor,
    image_embeds_all: torch.Tensor,
    neg_image_idx: torch.Tensor,
    neg_text_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out the 3B ITM pairs: texts ``[pos; pos; neg]``, images ``[pos; neg; pos]``, labels ``[1]*B + [0]*2B``.

    Args:
        text_ids: local token ids, (B, L).
        text_mask: local attention mask, (B, L).
        text_ids_all: token ids gathered over ranks (no grad), (B*W, L).
        text_mask_all: attention masks gathered over ranks, (B*W, L).
        image_embeds: local ``ln_vision`` outputs, (B, N, D).
        image_embeds_all: image embeds gathered *with* grad (docs/paper_map.md §2: gradients of negatives mined on other
            ranks return to their owner), (B*W, N, D).
        neg_image_idx: one negative image per local text, (B,), from :func:`sample_hard_negatives`.
        neg_text_idx: one negative text per local image, (B,).

    Returns:
        ``(pair_ids (3B, L), pair_mask (3B, L), pair_images (3B, N, D), labels (3B,) long)``.
    """
    b = text_ids.shape[0]
    pair_ids = torch.cat([text_ids, text_ids, text_ids_all[neg_text_idx]], dim=0)  # (3B, L)
    pair_mask = torch.cat([text_mask, text_mask, text_mask_all[neg_text_idx]], dim=0)  # (3B, L)
    pair_images = torch.cat([image_embeds, image_embeds_all[neg_image_idx], image_embeds], dim=0)  # (3B, N, D)
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(text_ids.device)  # (3B,)
    return pair_ids, pair_mask, pair_images, labels


def _query_mean(logits: torch.Tensor) -> torch.Tensor:
    """(3B, Q, 2) -> (3B, 2) by averaging the logits over queries; 2-D input passes through.

    See docs/paper_map.md §10.7.
    """
    return logits.mean(dim=1) if logits.dim() == 3 else logits


def itm_loss(itm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ITM cross-entropy, no label smoothing (docs/paper_map.md §2 ITM).

    Args:
        itm_logits: per-query 2-way logits (3B, Q, 2) — averaged over queries first, as LAVIS — or already
            averaged (3B, 2).
        labels: 1 = matched pair, 0 = negative, (3B,).

    Returns:
        Scalar loss (mean over the 3B pairs).
    """
    return F.cross_entropy(_upcast(_query_mean(itm_logits)), labels)


@torch.no_grad()
def itm_accuracy(itm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose argmax class (after the query average) equals the label; scalar tensor.

    Health check: with the standard 1:2 positive:negative layout of :func:`build_itm_pairs` a constant "no match"
    predictor already scores 2/3, so ITM has learned something only above that.
    """
    return (_query_mean(itm_logits).argmax(dim=-1) == labels).float().mean()


# ----------------------------------------------------------------------------------------------------------------
# ITG: image-grounded text generation (docs/paper_map.md §2 ITG, §10.6)


def itg_inputs(input_ids: torch.Tensor, pad_id: int, dec_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and labels for ITG: ``[CLS]`` at position 0 becomes ``[DEC]``; pads become -100.

    Position 0 keeps the ``[DEC]`` id in ``labels`` (as LAVIS); it is never a target because :func:`itg_loss`
    shifts by one. ``[SEP]`` stays a target (docs/paper_map.md §2 ITG).

    Args:
        input_ids: BERT ids ``[CLS] … [SEP] [PAD]…``, (B, L).
        pad_id: pad token id (0 for BERT).
        dec_id: ``[DEC]`` token id (30522 in BLIP-2, docs/paper_map.md §1.3).

    Returns:
        ``(decoder_ids (B, L), labels (B, L))``; the input is not modified.
    """
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = dec_id
    labels = decoder_ids.masked_fill(decoder_ids == pad_id, IGNORE_INDEX)  # (B, L)
    return decoder_ids, labels


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token ITG loss: ``logits[:, :-1]`` against ``labels[:, 1:]``, label smoothing 0.1.

    See docs/paper_map.md §2 ITG, §10.6.

    Args:
        logits: LM-head logits over the vocabulary, (B, L, V).
        labels: from :func:`itg_inputs`, -100 where ignored, (B, L).
        label_smoothing: ε (0.1 for the Q-Former ITG; the LLM losses of stage 2 have none).

    Returns:
        Scalar loss: mean over the non-ignored target tokens of *this* batch. Under DDP each rank averages over
        its own tokens, so the rank-average equals the global token mean only when ranks hold equally many
        tokens (LAVIS behaves the same way).
    """
    v = logits.shape[-1]
    shifted = _upcast(logits[:, :-1].reshape(-1, v))  # (B*(L-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B*(L-1),)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
