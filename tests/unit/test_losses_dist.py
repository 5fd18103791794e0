"""Distributed scaling of the stage-1 losses (docs/paper_map.md §2): 2 gloo processes vs one process on the whole batch.

Scaling worked out here and checked below (W ranks, B rows each, single process = one rank with B*W rows):

* Losses. Each rank's ITC/ITM loss is a mean over its own rows against the *global* columns, so
  ``mean_r L_r == L_single`` exactly. ITG is a mean over each rank's own target tokens, so the same holds only when
  ranks hold equally many tokens (the data below is built that way; otherwise it is a mean of per-rank means).
* Gradients of per-rank features. ``L_single = (1/W) Σ_r L_r``, and the whole gradient of ``Σ_r L_r`` w.r.t. rank
  r's features arrives on rank r: ITC through the local rows only (gathered columns carry no grad on either side);
  ITM through the local positives plus ``all_gather_with_grad``'s backward, which all-reduce-SUMs the gradient of
  every rank's negatives and hands rank r its slice. Hence ``grad_r(feat_r) == W · grad_single(feat rows of r)``.
* Gradients of shared parameters. Rank r's parameter gradient holds the chain-rule terms through its own features,
  so ``Σ_r grad_r(θ) = W · grad_single(θ)`` and DDP's *average* over ranks equals the single-process gradient.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from blip2lib import dist
from blip2lib.losses import build_itm_pairs, itc_loss, itc_similarities, itg_inputs, itg_loss, itm_loss

W, B, Q, E, NV, D, L, V = 2, 2, 3, 8, 4, 5, 6, 13
DT = torch.float64
NEG_IMG = torch.tensor([2, 0, 1, 2])  # global hard-negative image per text: rows 0 and 2 cross ranks
NEG_TXT = torch.tensor([3, 2, 0, 2])  # global hard-negative text per image
IMAGE_IDS = torch.tensor([5, 8, 5, 9])  # image 0 and 2 are the same picture, on different ranks
# Non-pad lengths 4+3 on rank 0 and 5+2 on rank 1: equal target-token counts per rank (see module docstring).
TEXT_IDS = torch.tensor([[1, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0], [1, 3, 4, 5, 2, 0], [1, 2, 0, 0, 0, 0]])


def _data():
    g = torch.Generator().manual_seed(2024)
    return {
        "img": torch.randn(W * B, Q, E, generator=g, dtype=DT),
        "txt": torch.randn(W * B, E, generator=g, dtype=DT),
        "emb": torch.randn(W * B, NV, D, generator=g, dtype=DT),
        "lm": torch.randn(W * B, L, V, generator=g, dtype=DT),
        "theta_img": 1 + 0.1 * torch.randn(E, generator=g, dtype=DT),
        "theta_emb": 1 + 0.1 * torch.randn(D, generator=g, dtype=DT),
        "head": torch.randn(D, Q * 2, generator=g, dtype=DT),
        "tok_bias": torch.randn(V, 2, generator=g, dtype=DT),
    }


def _step(rank: int, b: int, detach_negatives: bool = False) -> dict:
    """One rank's losses and gradients (b rows); at world size 1 the dist helpers are identities."""
    d = _data()
    sl = slice(rank * b, rank * b + b)
    theta_img = d["theta_img"].clone().requires_grad_()  # shared parameters (DDP replicas)
    theta_emb = d["theta_emb"].clone().requires_grad_()
    head = d["head"].clone().requires_grad_()
    temp = torch.tensor(0.07, dtype=DT, requires_grad=True)
    theta_lm = torch.tensor(1.3, dtype=DT, requires_grad=True)

    # ITC: local features with grad, gathered ones without (docs/paper_map.md §2 ITC)
    img = F.normalize(d["img"][sl] * theta_img, dim=-1)  # (b, Q, E)
    txt = F.normalize(d["txt"][sl] * theta_img, dim=-1)  # (b, E)
    img.retain_grad()
    txt.retain_grad()
    img_all, txt_all = dist.all_gather_no_grad(img), dist.all_gather_no_grad(txt)
    s_i2t, s_t2i = itc_similarities(img, txt, img_all, txt_all, temp)
    ids_loc = IMAGE_IDS[sl]
    ids_all = dist.all_gather_no_grad(ids_loc)
    out = {
        "itc": itc_loss(s_i2t, s_t2i, rank),
        "itc_id": itc_loss(s_i2t, s_t2i, rank, image_ids=ids_loc, image_ids_all=ids_all),
    }

    # ITM: image embeds gathered WITH grad, fixed negatives, toy per-pair head giving (3b, Q, 2) logits
    emb = d["emb"][sl] * theta_emb  # (b, NV, D)
    emb.retain_grad()
    emb_all = dist.all_gather_with_grad(emb)  # (W*b, NV, D)
    if detach_negatives:  # what all_gather_no_grad would give: negatives send no gradient home
        emb_all = emb_all.detach()
    ids, mask = TEXT_IDS[sl], (TEXT_IDS[sl] != 0).long()
    ids_g, mask_g = dist.all_gather_no_grad(ids), dist.all_gather_no_grad(mask)
    pid, pmask, pimg, labels = build_itm_pairs(ids, mask, ids_g, mask_g, emb, emb_all, NEG_IMG[sl], NEG_TXT[sl])
    text_term = (d["tok_bias"][pid] * pmask[..., None]).sum(1)  # (3b, 2)
    logits = (pimg.mean(1) @ head).view(-1, Q, 2) + text_term[:, None, :]  # (3b, Q, 2)
    out["itm"] = itm_loss(logits, labels)

    # ITG: local only
    lm = d["lm"][sl] * theta_lm  # (b, L, V)
    lm.retain_grad()
    _, lm_labels = itg_inputs(ids, pad_id=0, dec_id=V - 1)
    out["itg"] = itg_loss(lm, lm_labels)

    (out["itc"] + out["itc_id"] + out["itm"] + out["itg"]).backward()
    out = {k: v.detach() for k, v in out.items()}
    out.update(g_img=img.grad, g_txt=txt.grad, g_emb=emb.grad, g_lm=lm.grad)
    out.update(g_theta_img=theta_img.grad, g_theta_emb=theta_emb.grad, g_head=head.grad, g_temp=temp.grad)
    out["g_theta_lm"] = theta_lm.grad
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=30)
    )
    try:
        res = _step(rank, B)
        res["allreduced_itc"] = dist.all_reduce_mean(res["itc"])  # what a logger would show
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=W, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(W)]


@pytest.fixture(scope="module")
def single():
    assert not dist.is_dist()
    return _step(0, W * B)


@pytest.mark.dist
@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["itc", "itc_id", "itm", "itg"])
def test_rank_mean_of_losses_equals_single_process(two_ranks, single, name):
    mean = sum(r[name] for r in two_ranks) / W
    assert abs(float(mean) - float(single[name])) < 1e-12
    assert float(two_ranks[0][name]) != pytest.approx(float(two_ranks[1][name]), rel=1e-6)  # non-trivial split
    if name == "itc":
        assert torch.allclose(two_ranks[0]["allreduced_itc"], mean, rtol=0, atol=1e-12)


@pytest.mark.dist
@pytest.mark.parametrize("name", ["g_img", "g_txt", "g_emb", "g_lm"])
def test_local_feature_grads_are_world_size_times_single(two_ranks, single, name):
    for r, res in enumerate(two_ranks):
        ref = single[name][r * B : r * B + B]
        torch.testing.assert_close(res[name] / W, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.dist
@pytest.mark.parametrize("name", ["g_theta_img", "g_theta_emb", "g_head", "g_temp", "g_theta_lm"])
def test_ddp_average_of_parameter_grads_equals_single(two_ranks, single, name):
    ddp = sum(r[name] for r in two_ranks) / W  # DDP all-reduce-averages parameter gradients
    torch.testing.assert_close(ddp, single[name], rtol=1e-10, atol=1e-12)


def test_negative_image_gradient_is_not_negligible(single):
    """The cross-rank negatives (images 1 and 2 in NEG_IMG rows 2 and 0) carry real gradient, so the g_emb equality
    above needs all_gather_with_grad's all-reduce (all_gather_no_grad would drop these terms)."""
    cut = _step(0, W * B, detach_negatives=True)
    for i in (1, 2):
        diff = (single["g_emb"][i] - cut["g_emb"][i]).abs().max()
        assert float(diff) > 1e-3 * float(single["g_emb"][i].abs().max())
    torch.testing.assert_close(cut["g_emb"][3], single["g_emb"][3])  # image 3 is nobody's negative


def test_world_size_one_gathers_are_identities_without_collectives(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("collective issued at world size 1")

    for fn in ("all_gather", "all_reduce", "all_gather_object", "broadcast_object_list"):
        monkeypatch.setattr(tdist, fn, boom)
    assert not dist.is_dist() and dist.get_rank() == 0 and dist.get_world_size() == 1
    x = torch.randn(3, 4, requires_grad=True)
    y = dist.all_gather_no_grad(x)
    assert torch.equal(y, x) and not y.requires_grad
    z = dist.all_gather_with_grad(x)
    assert z is x
    assert dist.all_reduce_sum(x) is x and dist.all_reduce_mean(x) is x
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(7) == 7
    # with world size 1 the ITC loss of the full batch only gets gradient through its rows (columns detached)
    img = F.normalize(torch.randn(2, 3, 4, dtype=DT), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(2, 4, dtype=DT), dim=-1).requires_grad_()
    s = itc_similarities(img, txt, dist.all_gather_no_grad(img), dist.all_gather_no_grad(txt), 0.1)
    itc_loss(*s, rank=dist.get_rank()).backward()
    assert img.grad is not None and txt.grad is not None
