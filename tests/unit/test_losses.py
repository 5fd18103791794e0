"""Stage-1 losses (docs/paper_map.md §2) against independent brute-force loops and hand-worked limits.

Everything runs in float64 so that tolerances can be tight; the "gathered" tensors are faked by slicing a global
batch (rank r of W holds rows r*B .. r*B+B-1), in the spirit of open_clip's monkeypatched loss tests.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from blip2lib.losses import (
    build_itm_pairs,
    itc_loss,
    itc_similarities,
    itc_targets,
    itg_inputs,
    itg_loss,
    itm_accuracy,
    itm_loss,
    sample_hard_negatives,
)

DT = torch.float64


def _feats(n, q, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, q, e, generator=g, dtype=DT), dim=-1)
    txt = F.normalize(torch.randn(n, e, generator=g, dtype=DT), dim=-1)
    return img, txt


def _loop_sims(img_loc, txt_loc, img_all, txt_all, temp):
    """s_i2t[b][j] = max_q cos(img_loc[b,q], txt_all[j]) / temp, written as plain Python loops."""
    b_, n, q_ = img_loc.shape[0], img_all.shape[0], img_loc.shape[1]
    i2t = [[0.0] * n for _ in range(b_)]
    t2i = [[0.0] * n for _ in range(b_)]
    for b in range(b_):
        for j in range(n):
            i2t[b][j] = max(float((img_loc[b, q] * txt_all[j]).sum()) for q in range(q_)) / temp
            t2i[b][j] = max(float((txt_loc[b] * img_all[j, q]).sum()) for q in range(q_)) / temp
    return torch.tensor(i2t, dtype=DT), torch.tensor(t2i, dtype=DT)


def _loop_soft_ce(logits, target_rows):
    """Mean over rows of -sum_j t[j] * log softmax(logits[row])[j], with an explicit log-sum-exp per row."""
    total = 0.0
    for row, t in zip(logits.tolist(), target_rows):
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        total += -sum(tj * (x - lse) for tj, x in zip(t, row))
    return total / len(target_rows)


def _smoothed_rows(pos_cols, n, eps=0.1):
    """Target rows: (1-eps)/|pos| on each positive column, plus eps/n everywhere."""
    return [[(1 - eps) * (j in p) / len(p) + eps / n for j in range(n)] for p in pos_cols]


# ---------------------------------------------------------------------------------------------------------- ITC


@pytest.mark.parametrize("b,w,rank", [(3, 2, 1), (1, 1, 0), (1, 3, 2)])
def test_itc_similarities_match_triple_loop(b, w, rank):
    img_all, txt_all = _feats(b * w, 4, 5)
    sl = slice(rank * b, rank * b + b)
    temp = torch.tensor(0.07, dtype=DT)
    i2t, t2i = itc_similarities(img_all[sl], txt_all[sl], img_all, txt_all, temp)
    assert i2t.shape == t2i.shape == (b, b * w)  # B == 1 keeps its batch axis (docs/paper_map.md §10.16)
    ref_i2t, ref_t2i = _loop_sims(img_all[sl], txt_all[sl], img_all, txt_all, 0.07)
    torch.testing.assert_close(i2t, ref_i2t, rtol=0, atol=1e-12)
    torch.testing.assert_close(t2i, ref_t2i, rtol=0, atol=1e-12)


def test_itc_similarities_max_before_temperature_and_grad_to_temp():
    img, txt = _feats(2, 3, 4)
    temp = torch.tensor(0.5, dtype=DT, requires_grad=True)
    i2t, _ = itc_similarities(img, txt, img, txt, temp)
    raw = torch.einsum("bqe,je->bjq", img, txt).amax(-1)
    torch.testing.assert_close(i2t, raw / 0.5, rtol=0, atol=1e-12)
    i2t.sum().backward()
    assert temp.grad is not None and float(temp.grad) == pytest.approx(-float(raw.sum()) / 0.25, rel=1e-12)


def test_itc_targets_offset_by_rank():
    assert itc_targets(3, 0).tolist() == [0, 1, 2]
    assert itc_targets(3, 1).tolist() == [3, 4, 5]
    assert itc_targets(1, 5).tolist() == [5]


def test_itc_loss_matches_smoothed_ce_loop_rank1_of_2():
    b, w, rank = 3, 2, 1
    img_all, txt_all = _feats(b * w, 4, 8, seed=1)
    sl = slice(rank * b, rank * b + b)
    i2t, t2i = itc_similarities(img_all[sl], txt_all[sl], img_all, txt_all, 0.1)
    n = b * w
    rows = _smoothed_rows([{rank * b + k} for k in range(b)], n)  # 0.9 + 0.1/N on the positive, 0.1/N elsewhere
    ref = 0.5 * (_loop_soft_ce(i2t, rows) + _loop_soft_ce(t2i, rows))
    assert float(itc_loss(i2t, t2i, rank)) == pytest.approx(ref, rel=1e-12)
    # the rank offset matters: rank 0's targets on the same logits give a different loss
    assert float(itc_loss(i2t, t2i, 0)) != pytest.approx(ref, rel=1e-3)


def test_itc_rank_average_equals_global_single_process_loss():
    b, w = 2, 3
    img_all, txt_all = _feats(b * w, 4, 8, seed=2)
    full = itc_loss(*itc_similarities(img_all, txt_all, img_all, txt_all, 0.07), rank=0)
    per_rank = [
        itc_loss(*itc_similarities(img_all[r * b : r * b + b], txt_all[r * b : r * b + b], img_all, txt_all, 0.07), r)
        for r in range(w)
    ]
    assert float(sum(per_rank) / w) == pytest.approx(float(full), rel=1e-12)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_itc_loss_all_equal_logits_is_log_n(n):
    s = torch.full((n, n), 3.0, dtype=DT)
    assert float(itc_loss(s, s.clone(), rank=0)) == pytest.approx(math.log(n), rel=1e-12)
    ids = torch.tensor([0] * n)
    assert float(itc_loss(s, s.clone(), 0, image_ids=ids, image_ids_all=ids)) == pytest.approx(math.log(n), rel=1e-12)


def _orthonormal_sims(n, temp):
    """Image b's queries are e_b and directions orthogonal to all texts; text j = e_j: cos = identity."""
    e = torch.eye(2 * n, dtype=DT)
    img = torch.stack([torch.stack([e[b], e[n + b], e[n + (b + 1) % n]]) for b in range(n)])  # (N, 3, 2N)
    txt = e[:n]  # (N, 2N)
    return itc_similarities(img, txt, img, txt, temp)


def test_itc_loss_orthonormal_pairs_closed_form_and_smoothing_floor():
    n, eps = 4, 0.1
    hi, lo = 1 - eps + eps / n, eps / n  # smoothed target on the positive / each negative
    entropy_floor = -hi * math.log(hi) - (n - 1) * lo * math.log(lo)  # min over logits of CE = H(target)
    temp_star = 1 / math.log(hi / lo)  # softmax(logit gap 1/temp) == target exactly here

    def closed(a):  # logit a on the positive, 0 on the N-1 negatives
        lse = math.log(math.exp(a) + n - 1)
        return -hi * (a - lse) - (n - 1) * lo * (0 - lse)

    for temp in (1.0, temp_star, 0.05, 0.01):
        got = float(itc_loss(*_orthonormal_sims(n, temp), rank=0))
        assert got == pytest.approx(closed(1 / temp), rel=1e-12)
    assert float(itc_loss(*_orthonormal_sims(n, temp_star), 0)) == pytest.approx(entropy_floor, rel=1e-12)
    assert entropy_floor == pytest.approx(0.0721144 + 0.2766660, abs=1e-6)  # by hand: .925 ln(1/.925) + .075 ln 40
    # with smoothing the loss does NOT go to 0 as temp -> 0: it grows like eps*(N-1)/N / temp
    assert float(itc_loss(*_orthonormal_sims(n, 1e-3), 0)) == pytest.approx(eps * (n - 1) / n * 1e3, rel=1e-2)
    # without smoothing it does tend to 0 (the limit)
    assert float(itc_loss(*_orthonormal_sims(n, 1e-2), 0, label_smoothing=0.0)) < 1e-40
    assert float(itc_loss(*_orthonormal_sims(n, 1e-2), 0, label_smoothing=0.0)) >= 0


def test_itc_image_id_variant_distinct_ids_equal_one_hot():
    b, w, rank = 3, 2, 1
    img_all, txt_all = _feats(b * w, 4, 8, seed=3)
    sl = slice(rank * b, rank * b + b)
    i2t, t2i = itc_similarities(img_all[sl], txt_all[sl], img_all, txt_all, 0.07)
    ids_all = torch.tensor([17, 3, 9, 40, 5, 11])
    got = itc_loss(i2t, t2i, rank, image_ids=ids_all[sl], image_ids_all=ids_all)
    assert float(got) == pytest.approx(float(itc_loss(i2t, t2i, rank)), rel=1e-12)


def test_itc_image_id_variant_duplicates_match_loop():
    b, w, rank = 3, 2, 0
    img_all, txt_all = _feats(b * w, 4, 8, seed=4)
    sl = slice(rank * b, rank * b + b)
    i2t, t2i = itc_similarities(img_all[sl], txt_all[sl], img_all, txt_all, 0.1)
    ids_all = torch.tensor([7, 7, 2, 2, 7, 9])  # row 0 and 1 share 3 columns with id 7; row 2 has columns 2, 3
    pos = [{j for j in range(b * w) if ids_all[j] == ids_all[rank * b + k]} for k in range(b)]
    assert pos == [{0, 1, 4}, {0, 1, 4}, {2, 3}]
    rows = _smoothed_rows(pos, b * w)
    ref = 0.5 * (_loop_soft_ce(i2t, rows) + _loop_soft_ce(t2i, rows))
    got = itc_loss(i2t, t2i, rank, image_ids=ids_all[sl], image_ids_all=ids_all)
    assert float(got) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="image_ids_all"):
        itc_loss(i2t, t2i, rank, image_ids=ids_all[sl])


# ---------------------------------------------------------------------------------------------- hard negatives


def _draw_counts(i2t, t2i, rank, draws, **kw):
    g = torch.Generator().manual_seed(123)
    b, n = i2t.shape
    c_img, c_txt = torch.zeros(b, n), torch.zeros(b, n)
    rows = torch.arange(b)
    for _ in range(draws):
        ni, nt = sample_hard_negatives(i2t, t2i, rank, generator=g, **kw)
        assert ni.shape == nt.shape == (b,) and ni.dtype == torch.long
        c_img[rows, ni] += 1
        c_txt[rows, nt] += 1
    return c_img / draws, c_txt / draws


def _expected_weights(s, pos_cols):
    """softmax over the non-positive columns of each row, computed with Python floats."""
    out = []
    for row, p in zip(s.tolist(), pos_cols):
        ex = [0.0 if j in p else math.exp(x) for j, x in enumerate(row)]
        out.append([x / sum(ex) for x in ex])
    return torch.tensor(out)


def test_hard_negatives_never_positive_and_follow_softmax_rank1():
    b, w, rank, draws = 3, 2, 1, 4000
    g = torch.Generator().manual_seed(5)
    i2t = torch.randn(b, b * w, generator=g, dtype=DT) * 1.5
    t2i = torch.randn(b, b * w, generator=g, dtype=DT) * 1.5
    i2t[torch.arange(b), rank * b + torch.arange(b)] = 50.0  # huge positive logits: still must never be drawn
    t2i[torch.arange(b), rank * b + torch.arange(b)] = 50.0
    before = (i2t.clone(), t2i.clone())
    f_img, f_txt = _draw_counts(i2t, t2i, rank, draws)
    assert torch.equal(i2t, before[0]) and torch.equal(t2i, before[1])  # inputs untouched
    pos = [{rank * b + k} for k in range(b)]
    for k in range(b):
        assert f_img[k, rank * b + k] == 0 and f_txt[k, rank * b + k] == 0
    # Frequencies of 4000 draws: std of each is sqrt(p(1-p)/4000) <= 0.0079; 5 sigma (+1e-3) cannot fail by chance
    # for this fixed generator and is far below the differences a wrong mask or wrong direction would cause.
    for freq, s in ((f_img, t2i), (f_txt, i2t)):  # negative images come from s_t2i, negative texts from s_i2t
        p = _expected_weights(s, pos).float()
        tol = 5 * (p * (1 - p) / draws).sqrt() + 1e-3
        assert bool(((freq - p).abs() <= tol).all()), (freq, p)


def test_hard_negatives_rank_offset_excludes_only_own_block_diagonal():
    b, w = 2, 2
    s = torch.zeros(b, b * w, dtype=DT)
    s[0, 0] = s[1, 1] = 6.0  # rank-0 diagonal: a negative for rank 1, and by far the hardest one
    f_img, f_txt = _draw_counts(s, s.clone(), rank=1, draws=300)
    assert f_img[0, 0] > 0.9 and f_img[1, 1] > 0.9 and f_txt[0, 0] > 0.9
    f_img0, _ = _draw_counts(s, s.clone(), rank=0, draws=300)
    assert f_img0[0, 0] == 0 and f_img0[1, 1] == 0


def test_hard_negatives_image_id_variant_never_same_image():
    b, w, rank, draws = 3, 2, 0, 3000
    ids_all = torch.tensor([7, 7, 2, 2, 7, 9])
    g = torch.Generator().manual_seed(6)
    s = torch.randn(b, b * w, generator=g, dtype=DT)
    s[:, 4] = 8.0  # column 4 is same-id for rows 0, 1 (never drawn) and the hardest negative for row 2
    f_img, f_txt = _draw_counts(s, s.clone(), rank, draws, image_ids=ids_all[:b], image_ids_all=ids_all)
    pos = [{0, 1, 4}, {0, 1, 4}, {2, 3}]
    for k, p in enumerate(pos):
        assert all(f_img[k, j] == 0 and f_txt[k, j] == 0 for j in p)
    p = _expected_weights(s, pos).float()
    tol = 5 * (p * (1 - p) / draws).sqrt() + 1e-3
    assert bool(((f_img - p).abs() <= tol).all()) and bool(((f_txt - p).abs() <= tol).all())


def test_hard_negatives_deterministic_with_generator_and_guards():
    s = torch.randn(4, 8, dtype=DT)
    a = sample_hard_negatives(s, s.flip(1), 1, generator=torch.Generator().manual_seed(9))
    b = sample_hard_negatives(s, s.flip(1), 1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), 0)  # global batch of one
    ids = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), 0, image_ids=ids, image_ids_all=ids)


def test_hard_negative_draws_equal_lavis_minus_10000_law_and_paper_variant_differs():
    """The sampler draws exactly what ``multinomial`` draws from LAVIS's -10000-filled softmax with the same generator
    state (identical weights give identical draws), over 2 x 64 x 20 draws; the paper-time ``softmax + 1e-4`` law,
    a different distribution by up to 1e-4 per column, changes some of those draws (so the comparison can fail)."""
    b, rank, trials = 64, 1, 20
    g = torch.Generator().manual_seed(7)
    i2t = torch.randn(b, 2 * b, generator=g) * 10  # float32 as in training; (B=64, BW=128), rank 1
    t2i = torch.randn(b, 2 * b, generator=g) * 10
    pos = torch.zeros(b, 2 * b, dtype=torch.bool)
    pos[torch.arange(b), rank * b + torch.arange(b)] = True  # rank 1: positives at columns 64..127

    def lavis(s):
        return s.masked_fill(pos, -10000.0).softmax(1)

    def paper(s):
        w = (s.softmax(1) + 1e-4).masked_fill(pos, 0)
        return w / w.sum(1, keepdim=True)

    def draws(law, seed):  # negative images from s_t2i first, then negative texts from s_i2t (the sampler's order)
        gen = torch.Generator().manual_seed(seed)
        return (torch.multinomial(law(t2i), 1, generator=gen).squeeze(1),
                torch.multinomial(law(i2t), 1, generator=gen).squeeze(1))  # fmt: skip

    paper_differs = 0
    for seed in range(trials):
        ours = sample_hard_negatives(i2t, t2i, rank, generator=torch.Generator().manual_seed(seed))
        want = draws(lavis, seed)
        assert torch.equal(ours[0], want[0]) and torch.equal(ours[1], want[1]), seed
        alt = draws(paper, seed)
        paper_differs += int((alt[0] != want[0]).sum() + (alt[1] != want[1]).sum())
    assert paper_differs > 0
    # the paper-time law is still close: < 1e-4 * N in every weight before the draw
    assert float((paper(i2t) - lavis(i2t)).abs().max()) < 1e-4 * 2 * b


# ------------------------------------------------------------------------------------------------------- ITM


def test_build_itm_pairs_layout_and_gradient_route():
    b, w, rank, ln, nv, d = 2, 2, 1, 5, 3, 4
    ids_all = torch.arange(b * w * ln).reshape(b * w, ln)  # row r holds r*L .. r*L+L-1
    mask_all = (torch.arange(b * w * ln).reshape(b * w, ln) % 3 != 0).long()
    emb_all = torch.randn(b * w, nv, d, dtype=DT, requires_grad=True)
    sl = slice(rank * b, rank * b + b)
    neg_img, neg_txt = torch.tensor([0, 1]), torch.tensor([3, 0])
    pid, pmask, pimg, labels = build_itm_pairs(
        ids_all[sl], mask_all[sl], ids_all, mask_all, emb_all[sl], emb_all, neg_img, neg_txt
    )
    assert pid.shape == pmask.shape == (3 * b, ln) and pimg.shape == (3 * b, nv, d)
    assert torch.equal(pid, torch.cat([ids_all[[2, 3]], ids_all[[2, 3]], ids_all[[3, 0]]]))
    assert torch.equal(pmask, torch.cat([mask_all[[2, 3]], mask_all[[2, 3]], mask_all[[3, 0]]]))
    assert torch.equal(pimg, torch.cat([emb_all[[2, 3]], emb_all[[0, 1]], emb_all[[2, 3]]]))
    assert labels.tolist() == [1, 1, 0, 0, 0, 0] and labels.dtype == torch.long
    pimg.sum().backward()  # each local image is used twice (pos, pos-image-with-neg-text), each negative once
    assert emb_all.grad[:, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


def test_itm_loss_averages_logits_over_queries_then_plain_ce():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 5, 2, generator=g, dtype=DT)  # (3B, Q, 2)
    labels = torch.tensor([1, 1, 0, 0, 0, 0])
    ref = 0.0
    for i in range(6):
        l0 = sum(float(logits[i, q, 0]) for q in range(5)) / 5
        l1 = sum(float(logits[i, q, 1]) for q in range(5)) / 5
        m = max(l0, l1)
        ref += -((l1 if labels[i] else l0) - m - math.log(math.exp(l0 - m) + math.exp(l1 - m)))
    ref /= 6
    assert float(itm_loss(logits, labels)) == pytest.approx(ref, rel=1e-12)
    assert float(itm_loss(logits.mean(1), labels)) == pytest.approx(ref, rel=1e-12)  # pre-averaged (3B, 2)
    # averaging probabilities or per-query losses would differ: the loss is convex, so per-query CE is larger
    per_query = F.cross_entropy(logits.reshape(-1, 2), labels.repeat_interleave(5))
    assert float(per_query) > ref + 1e-3


def test_itm_accuracy_and_constant_predictor_baseline():
    labels = torch.tensor([1, 1, 0, 0, 0, 0])
    const_neg = torch.tensor([[2.0, -1.0]]).repeat(6, 1)
    assert float(itm_accuracy(const_neg, labels)) == pytest.approx(2 / 3)  # the constant "no match" baseline
    perfect = F.one_hot(labels, 2).double()[:, None, :].repeat(1, 4, 1)  # (3B, Q, 2)
    assert float(itm_accuracy(perfect, labels)) == 1.0


# ------------------------------------------------------------------------------------------------------- ITG


def test_itg_inputs_dec_replaces_cls_and_pads_ignored():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0]])
    before = ids.clone()
    dec, labels = itg_inputs(ids, pad_id=0, dec_id=30522)
    assert torch.equal(ids, before)
    assert dec.tolist() == [[30522, 7, 8, 102, 0, 0], [30522, 9, 102, 0, 0, 0]]
    assert labels.tolist() == [[30522, 7, 8, 102, -100, -100], [30522, 9, 102, -100, -100, -100]]


def _loop_itg(logits, labels, eps=0.1):
    b, n, v = logits.shape
    total, count = 0.0, 0
    for i in range(b):
        for t in range(n - 1):  # position t predicts token t+1
            y = int(labels[i, t + 1])
            if y == -100:
                continue
            row = logits[i, t].tolist()
            m = max(row)
            lse = m + math.log(sum(math.exp(x - m) for x in row))
            total += -sum(((1 - eps) * (j == y) + eps / v) * (x - lse) for j, x in enumerate(row))
            count += 1
    return total / count


def test_itg_loss_matches_shifted_smoothed_ce_loop():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 3, 4, 5, 102]])
    _, labels = itg_inputs(ids, pad_id=0, dec_id=11)
    v = 12
    logits = torch.randn(2, 6, v, generator=torch.Generator().manual_seed(10), dtype=DT)
    labels = labels.clamp(max=v - 1).masked_fill(labels == -100, -100)  # keep ids inside the toy vocabulary
    ref = _loop_itg(logits, labels)
    assert float(itg_loss(logits, labels)) == pytest.approx(ref, rel=1e-12)
    assert float(itg_loss(logits, labels, label_smoothing=0.0)) == pytest.approx(_loop_itg(logits, labels, 0.0))
    # 3 + 5 = 8 targets: [SEP] is one of them, the [DEC] at position 0 is not
    assert int((labels[:, 1:] != -100).sum()) == 8


def test_itg_loss_ignores_pads_dec_position_and_last_logit():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 3, 4, 5, 102]])
    _, labels = itg_inputs(ids, pad_id=0, dec_id=11)
    labels = labels.masked_fill(labels > 11, 10)
    logits = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(11), dtype=DT)
    base = float(itg_loss(logits, labels))
    noise = 100 * torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(13), dtype=DT)
    changed = logits.clone()  # (a constant shift would be invisible to softmax anyway: use per-class noise)
    changed[0, 3:] += noise[0, 3:]  # positions whose next token is a pad (and the final position)
    changed[1, 5] += noise[1, 5]  # last position has no next token
    assert float(itg_loss(changed, labels)) == pytest.approx(base, rel=1e-12)
    relabel = labels.clone()
    relabel[:, 0] = 3  # whatever sits at position 0 ([DEC]) is never a target
    assert float(itg_loss(logits, relabel)) == pytest.approx(base, rel=1e-12)
    moved = logits.clone()
    moved[0, 2] += noise[0, 2]  # position 2 predicts [SEP]: a real target
    assert float(itg_loss(moved, labels)) != pytest.approx(base, rel=1e-6)


def test_half_precision_logits_are_upcast():
    s = torch.randn(3, 6, generator=torch.Generator().manual_seed(12))
    got = itc_loss(s.bfloat16(), s.bfloat16(), 1)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(itc_loss(s.bfloat16().float(), s.bfloat16().float(), 1)), rel=1e-6)


def test_itg_rank_mean_is_token_weighted_only_with_equal_counts():
    """Documented DDP caveat: each rank averages over its own tokens (3 vs 5 targets here)."""
    ids = torch.tensor([[1, 7, 8, 2, 0, 0], [1, 9, 3, 4, 5, 2]])
    _, labels = itg_inputs(ids, pad_id=0, dec_id=11)
    logits = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(14), dtype=DT)
    full, r0, r1 = (float(itg_loss(logits[s], labels[s])) for s in (slice(0, 2), slice(0, 1), slice(1, 2)))
    assert full == pytest.approx((3 * r0 + 5 * r1) / 8, rel=1e-12)
    assert (r0 + r1) / 2 != pytest.approx(full, rel=1e-6)
