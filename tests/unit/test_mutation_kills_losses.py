"""losses: outputs follow the inputs' device, clear errors (half-given image ids, no hard negative), ITM accuracy.

Written for the mutants that survived `make mutate` (docs/mutation.md): dropping a ``device=`` argument is invisible
on a CPU-only run, yet on a GPU it puts ITC targets / ITM labels on the CPU next to CUDA logits. The ``meta`` device
makes that observable without a GPU: a tensor built without the device lands on the CPU, and mixing it with meta
tensors raises.
"""

import pytest
import torch

from blip2lib.losses import build_itm_pairs, itc_loss, itc_targets, itm_accuracy, positive_mask, sample_hard_negatives

META = torch.device("meta")


def test_itc_targets_live_on_the_requested_device():
    t = itc_targets(3, 2, device=META)
    assert t.device == META
    assert t.shape == (3,)
    assert itc_targets(3, 2).tolist() == [6, 7, 8]  # rank * B + arange(B), on the default (CPU) device


def test_positive_mask_without_ids_lives_on_the_requested_device():
    mask = positive_mask(2, 6, 1, device=META)  # (B, B*W) = (2, 6), diagonal of the block at columns 2..3
    assert mask.device == META
    assert mask.shape == (2, 6) and mask.dtype == torch.bool


def test_itc_loss_one_hot_targets_follow_the_logits_device():
    # A target tensor left on the CPU would raise "Tensor on device meta is not on the expected device cpu".
    sim = torch.empty(2, 4, device=META)  # (B, B*W)
    loss = itc_loss(sim, sim, rank=1)
    assert loss.device == META and loss.shape == ()


def test_itm_labels_follow_the_text_ids_device():
    b, length, n, d = 2, 5, 3, 4
    ids = torch.zeros(b, length, dtype=torch.long, device=META)  # (B, L)
    ids_all = torch.zeros(2 * b, length, dtype=torch.long, device=META)  # (B*W, L)
    emb = torch.zeros(b, n, d, device=META)  # (B, N, D)
    emb_all = torch.zeros(2 * b, n, d, device=META)  # (B*W, N, D)
    neg = torch.tensor([1, 0], device=META)
    pair_ids, pair_mask, pair_images, labels = build_itm_pairs(ids, ids, ids_all, ids_all, emb, emb_all, neg, neg)
    assert labels.device == META and labels.dtype == torch.long and labels.shape == (3 * b,)
    assert pair_ids.shape == (3 * b, length) and pair_images.shape == (3 * b, n, d)


def test_positive_mask_names_the_missing_gathered_ids():
    with pytest.raises(ValueError, match=r"^image_ids given without image_ids_all \(gather them over ranks first\)$"):
        positive_mask(2, 4, 0, image_ids=torch.tensor([0, 1]))


def test_hard_negative_sampling_names_a_row_without_negatives():
    sim = torch.zeros(1, 1)  # one image, one text over all ranks: the only column is the positive
    with pytest.raises(ValueError) as err:
        sample_hard_negatives(sim, sim, rank=0)
    assert str(err.value) == (
        "ITM hard negatives: a row has no negative column (global batch too small or one image id)"
    )


def test_itm_accuracy_averages_queries_then_takes_the_argmax():
    # (P, Q, 2) logits: pair 0 votes "match" on average (mean [0, 1]); pair 1 "no match" (mean [0, -1]) although its
    # first query and its max say "match"; labels 1, 1 -> 1/2 (first query or max over queries would give 1)
    logits = torch.tensor([[[0.0, 3.0], [0.0, -1.0]], [[0.0, 1.0], [0.0, -3.0]]])
    assert itm_accuracy(logits, torch.tensor([1, 1])).item() == 0.5
    assert itm_accuracy(logits[:, 0], torch.tensor([1, 0])).item() == 0.5  # (P, 2): the raw argmax, [1, 1]


def test_hard_negative_check_is_per_row():
    # image ids: row 0 (id 7) matches every gathered column (ids 7, 7), row 1 (id 8) matches none; one row without a
    # negative is enough to refuse (the other row's negatives do not count for it)
    sim = torch.zeros(2, 2)
    ids, ids_all = torch.tensor([7, 8]), torch.tensor([7, 7])
    with pytest.raises(ValueError, match="^ITM hard negatives: a row has no negative column"):
        sample_hard_negatives(sim, sim, rank=0, image_ids=ids, image_ids_all=ids_all)
