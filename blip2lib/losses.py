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
    "missing_negative",
    "sample_hard_negatives",
    "build_itm_texts",
    "itm_pair_images",
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
def missing_negative(
    sim_i2t: torch.Tensor,
    rank: int,
    image_ids: torch.Tensor | None = None,
    image_ids_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """0-dim bool tensor on the logits' device: does some local row have no negative column at all?

    Computed without reading it on the host, so a training step can carry it to logging time instead of stalling
    the device (the task turns it into a NaN ITM loss, which the training loop's non-finite guard skips and counts).

    Args:
        sim_i2t: ITC logits, local images vs all texts, (B, B*W) (only the shape and device are used).
        rank: this process's rank.
        image_ids: optional integer image ids of the local rows, (B,).
        image_ids_all: gathered image ids, (B*W,).
    """
    b, n = sim_i2t.shape
    pos = positive_mask(b, n, rank, image_ids, image_ids_all, device=sim_i2t.device)  # (B, BW)
    return pos.all(dim=1).any()  # a row whose every column is a positive


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    rank: int,
    image_ids: torch.Tensor | None = None,
    image_ids_all: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check: bool = True,
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
        check: raise on a row without negatives (reads a flag on the host: a device sync). ``False`` (the training
            step) never reads it: such a row draws from its unmasked softmax instead and the caller reports
            :func:`missing_negative` itself.

    Returns:
        ``(neg_image_idx, neg_text_idx)``, each (B,) long, indices into the gathered (B*W) axis.

    Raises:
        ValueError: with ``check``, if some row has no negative at all (e.g. global batch of 1, or one image id for
            the whole global batch); LAVIS would silently "sample" the positive and label it as a non-match.
    """
    b, n = sim_i2t.shape
    pos = positive_mask(b, n, rank, image_ids, image_ids_all, device=sim_i2t.device)  # (B, BW)
    if check and bool(pos.all(dim=1).any()):
        raise ValueError("ITM hard negatives: a row has no negative column (global batch too small or one image id)")
    if not check:  # a row of only positives would give NaN weights: un-mask it (its loss is poisoned by the caller)
        pos = pos & ~pos.all(dim=1, keepdim=True)  # (B, BW)
    w_t2i = _upcast(sim_t2i).masked_fill(pos, float("-inf")).softmax(dim=1)  # (B, BW)
    w_i2t = _upcast(sim_i2t).masked_fill(pos, float("-inf")).softmax(dim=1)  # (B, BW)
    neg_image_idx = _draw_one(w_t2i, generator)  # (B,) one image per text
    neg_text_idx = _draw_one(w_i2t, generator)  # (B,) one text per image
    return neg_image_idx, neg_text_idx


def _draw_one(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row drawn with probability ``weights`` (rows sum to 1), (R, C) -> (R,).

    On CUDA this is the exponential race ``argmax(w / q)``, ``q ~ Exp(1)``: the very computation (and generator use)
    of ``torch.multinomial``'s one-sample path, without the validity checks that some PyTorch releases read on the
    host inside it (a device sync per call). Elsewhere ``torch.multinomial`` itself (the same draws).
    """
    if weights.device.type != "cuda":
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return _exponential_race(weights, generator)


def _exponential_race(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``argmax(w / q)`` per row with ``q ~ Exp(1)``: row r picks column c with probability ``w[r, c]``, (R,)."""
    q = torch.empty_like(weights).exponential_(1, generator=generator)  # (R, C)
    return (weights / q).argmax(dim=1)


def build_itm_texts(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    text_ids_all: torch.Tensor,
    text_mask_all: torch.Tensor,
    neg_text_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text side of the 3B ITM pairs: ids/masks ``[pos; pos; neg]`` and labels ``[1]*B + [0]*2B`` (built on device).

    Returns:
        ``(pair_ids (3B, L), pair_mask (3B, L), labels (3B,) long)``.
    """
    b = text_ids.shape[0]
    pair_ids = torch.cat([text_ids, text_ids, text_ids_all[neg_text_idx]], dim=0)  # (3B, L)
    pair_mask = torch.cat([text_mask, text_mask, text_mask_all[neg_text_idx]], dim=0)  # (3B, L)
    labels = (torch.arange(3 * b, device=text_ids.device) < b).long()  # (3B,): no host tensor copied in the step
    return pair_ids, pair_mask, labels


def itm_pair_images(
    image_embeds: torch.Tensor, image_embeds_all: torch.Tensor, neg_image_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image side of the 3B ITM pairs as (distinct images, row index) instead of 3B copies.

    ``source[index]`` equals the ``pair_images`` of :func:`build_itm_pairs` (images ``[pos; neg; pos]``), so the
    Q-Former can project each image's cross-attention keys/values once and gather them per pair. In one process
    (``image_embeds_all is image_embeds``) the negatives are local rows: S = B. Otherwise S = 2B (local images, then
    the B negatives gathered from the global batch, which keep their gradient path to their owners).

    Args:
        image_embeds: local ``ln_vision`` outputs, (B, N, D).
        image_embeds_all: the gathered ones (with grad), (B*W, N, D), or ``image_embeds`` itself at world size 1.
        neg_image_idx: one negative image per local text, (B,), indices into the gathered axis.

    Returns:
        ``(source (S, N, D), index (3B,) long)``.
    """
    b = image_embeds.shape[0]
    local = torch.arange(b, device=neg_image_idx.device)  # (B,)
    if image_embeds_all is image_embeds:
        return image_embeds, torch.cat([local, neg_image_idx, local])  # S = B
    source = torch.cat([image_embeds, image_embeds_all[neg_image_idx]], dim=0)  # (2B, N, D)
    return source, torch.cat([local, local + b, local])


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
    pair_ids, pair_mask, labels = build_itm_texts(text_ids, text_mask, text_ids_all, text_mask_all, neg_text_idx)
    pair_images = torch.cat([image_embeds, image_embeds_all[neg_image_idx], image_embeds], dim=0)  # (3B, N, D)
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
