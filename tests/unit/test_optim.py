"""Parameter groups, layer-wise LR decay and LR schedules against hand-worked values.

See docs/paper_map.md §7, §4, §10.9.
"""

import math

import pytest
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from blip2lib.optim import LRSchedule, apply_lr, build_optimizer, param_groups, vit_layer_id


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class FakeViT(nn.Module):
    """timm-style names: cls_token, pos_embed, patch_embed.proj, norm_pre (CLIP), blocks.{k}, plus an 'other'."""

    def __init__(self, depth=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 4, 2)
        self.norm_pre = nn.LayerNorm(4)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.other = nn.Linear(4, 4, bias=False)  # neither embedding nor block → id depth + 1


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = FakeViT()
        self.ln_vision = nn.LayerNorm(4)
        self.query_tokens = nn.Parameter(torch.zeros(1, 2, 4))
        self.proj = nn.Linear(4, 4)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.ln_table = nn.Parameter(torch.zeros(2, 4))  # 2-D, "ln" in name: rules disagree
        self.bias_table = nn.Parameter(torch.zeros(2, 4))  # 2-D, "bias" in name but not a ".bias" suffix
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.vision_model.blocks[2].requires_grad_(False)  # a frozen last block must not change the depth


def _membership(groups):
    return {n: (g["group_name"], g["weight_decay"], g["lr_scale"]) for g in groups for n in g["param_names"]}


# lr_scale = 0.9 ** (depth + 1 - id) with depth 3, worked by hand
S0, S1, S2, S4 = 0.6561, 0.729, 0.81, 1.0


def _expected(rule):
    wd = 0.05
    head = rule == "lavis_head"
    return {
        "vision_model.cls_token": ("vit_layer_0_decay", wd, S0),
        "vision_model.pos_embed": ("vit_layer_0_decay", wd, S0),
        "vision_model.patch_embed.proj.weight": ("vit_layer_0_decay", wd, S0),
        "vision_model.patch_embed.proj.bias": ("vit_layer_0_no_decay", 0.0, S0),
        "vision_model.norm_pre.weight": ("vit_layer_0_no_decay", 0.0, S0),
        "vision_model.norm_pre.bias": ("vit_layer_0_no_decay", 0.0, S0),
        "vision_model.blocks.0.fc.weight": ("vit_layer_1_decay", wd, S1),
        "vision_model.blocks.0.fc.bias": ("vit_layer_1_no_decay", 0.0, S1),
        "vision_model.blocks.0.norm.weight": ("vit_layer_1_no_decay", 0.0, S1),
        "vision_model.blocks.0.norm.bias": ("vit_layer_1_no_decay", 0.0, S1),
        "vision_model.blocks.1.fc.weight": ("vit_layer_2_decay", wd, S2),
        "vision_model.blocks.1.fc.bias": ("vit_layer_2_no_decay", 0.0, S2),
        "vision_model.blocks.1.norm.weight": ("vit_layer_2_no_decay", 0.0, S2),
        "vision_model.blocks.1.norm.bias": ("vit_layer_2_no_decay", 0.0, S2),
        "vision_model.other.weight": ("vit_layer_4_decay", wd, S4),
        "ln_vision.weight": ("no_decay", 0.0, 1.0),
        "ln_vision.bias": ("no_decay", 0.0, 1.0),
        "query_tokens": ("decay", wd, 1.0),
        "proj.weight": ("decay", wd, 1.0),
        "proj.bias": ("no_decay", 0.0, 1.0),
        "temp": ("decay", wd, 1.0) if head else ("no_decay", 0.0, 1.0),
        "ln_table": ("decay", wd, 1.0) if head else ("no_decay", 0.0, 1.0),
        "bias_table": ("decay", wd, 1.0) if head else ("no_decay", 0.0, 1.0),
    }


@pytest.mark.parametrize("rule", ["paper", "lavis_head"])
def test_param_groups_exact_membership(rule):
    model = Tiny()
    groups = param_groups(model, 0.05, lr_layer_decay=0.9, no_decay_rule=rule)
    got = _membership(groups)
    exp = _expected(rule)
    assert got.keys() == exp.keys()  # frozen params (frozen.*, blocks.2.*) are excluded
    for n, (g, wd, s) in exp.items():
        assert got[n][:2] == (g, wd), n
        assert got[n][2] == pytest.approx(s, rel=1e-12), n
    # the tensors in each group are the named ones, each exactly once
    named = dict(model.named_parameters())
    for g in groups:
        assert all(p is named[n] for p, n in zip(g["params"], g["param_names"], strict=True))
    assert sum(len(g["params"]) for g in groups) == len(exp)


def test_param_groups_explicit_depth_and_default_rule():
    groups = param_groups(Tiny(), 0.05, lr_layer_decay=0.5, vit_depth=5)
    got = _membership(groups)
    assert got["vision_model.blocks.1.fc.weight"][2] == 0.5**4  # 5 + 1 - 2
    assert got["vision_model.cls_token"][2] == 0.5**6
    assert got["temp"][1] == 0.0  # default rule is the paper rule: 0-D temp not decayed


def test_param_groups_rejects_unknown_rule():
    with pytest.raises(ValueError, match="no_decay_rule"):
        param_groups(Tiny(), 0.05, no_decay_rule="bogus")


@pytest.mark.parametrize("arch", ["eva", "clip"])
def test_layer_ids_on_timm_towers(arch):
    kw = dict(img_size=28, patch_size=7, embed_dim=16, depth=2, num_heads=2, num_classes=0, global_pool="")
    if arch == "eva":
        tower = Eva(**kw, use_abs_pos_emb=True, use_rot_pos_emb=False, use_fc_norm=False)
    else:
        tower = VisionTransformer(**kw, pre_norm=True, final_norm=False, fc_norm=False)
    ids = {n: vit_layer_id(n, 2) for n, _ in tower.named_parameters() if not n.startswith(("norm.", "head"))}
    for n, i in ids.items():
        if n.startswith("blocks."):
            assert i == int(n.split(".")[1]) + 1, n
        else:  # cls_token, pos_embed, patch_embed.*, norm_pre.* (CLIP ln_pre)
            assert i == 0, n
    assert "cls_token" in ids and "patch_embed.proj.weight" in ids
    assert (arch == "clip") == ("norm_pre.weight" in ids)


def test_build_optimizer_keeps_group_keys():
    groups = param_groups(Tiny(), 0.05, lr_layer_decay=0.9)
    opt = build_optimizer(groups, lr=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 and g["fused"]  # fused kernel on CPU tensors too
    assert not build_optimizer(param_groups(Tiny(), 0.05), lr=1e-4, fused=False).param_groups[0]["fused"]
    assert [g["lr_scale"] for g in opt.param_groups] == [g["lr_scale"] for g in groups]


def test_schedule_step_mode_hand_values():
    s = LRSchedule(peak_lr=1e-4, total_steps=110, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    assert s(0) == pytest.approx(1e-6, rel=1e-12)
    assert s(5) == pytest.approx(1e-6 + 99e-6 * 0.5, rel=1e-12)
    assert s(10) == pytest.approx(1e-4, rel=1e-12)  # warmup end = peak
    assert s(35) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + 2**-0.5), rel=1e-12)  # quarter of the cosine
    assert s(60) == pytest.approx(5.5e-5, rel=1e-12)  # midpoint
    assert s(110) == pytest.approx(1e-5, rel=1e-12)  # end
    assert s(500) == pytest.approx(1e-5, rel=1e-12)  # held after the end


def test_schedule_lavis_epoch_mode_hand_values():
    # caption_coco_ft.yaml-like: init 1e-5, warmup_lr 1e-8, 1000 warmup steps, min 0, 5 epochs of 500 iterations.
    s = LRSchedule(peak_lr=1e-5, total_steps=2500, warmup_steps=1000, warmup_lr=1e-8, min_lr=0.0,
                   mode="lavis_epoch", steps_per_epoch=500)  # fmt: skip
    assert s(0) == pytest.approx(1e-8, rel=1e-12)
    assert s(250) == pytest.approx(1e-8 + (1e-5 - 1e-8) * 0.25, rel=1e-12)
    assert s(499) == pytest.approx(1e-8 + (1e-5 - 1e-8) * 0.499, rel=1e-12)  # warmup never completes
    cos36 = (1 + 5**0.5) / 4  # cos(pi/5)
    assert s(500) == pytest.approx(0.5e-5 * (1 + cos36), rel=1e-12)  # epoch 1, constant within the epoch
    assert s(999) == s(500)
    assert s(1000) == pytest.approx(0.5e-5 * (1 + math.cos(2 * math.pi / 5)), rel=1e-12)
    assert s(2499) == pytest.approx(0.5e-5 * (1 - cos36), rel=1e-12)  # last epoch never reaches min_lr
    short = LRSchedule(peak_lr=1e-4, total_steps=300, warmup_steps=100, warmup_lr=0.0, mode="lavis_epoch",
                       steps_per_epoch=100)  # fmt: skip
    assert short(50) == pytest.approx(5e-5) and short(99) == pytest.approx(9.9e-5)
    zero = LRSchedule(peak_lr=1e-4, total_steps=300, warmup_lr=1e-6, mode="lavis_epoch", steps_per_epoch=100)
    assert zero(0) == 1e-6 and zero(1) == 1e-4  # LAVIS max(warmup_steps, 1) quirk
    with pytest.raises(ValueError):
        LRSchedule(peak_lr=1e-4, total_steps=10, mode="lavis_epoch")


def test_apply_lr_with_and_without_layer_decay():
    ps = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    opt = torch.optim.AdamW([{"params": [ps[0]], "lr_scale": 0.5}, {"params": [ps[1]], "lr_scale": 1.0},
                             {"params": [ps[2]]}], lr=1.0)  # fmt: skip
    apply_lr(opt, 2e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 2e-4, 2e-4]
    apply_lr(opt, 2e-4, apply_layer_decay=False)  # LAVIS: lr_scale ignored (docs/paper_map.md §10.9)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-4, 2e-4]


# ---- LAVIS's linear_warmup_cosine_lr over whole runs, against a re-implementation of its runner loop ----


def lavis_run_lrs(init_lr, min_lr, warmup_lr, warmup_steps, max_epoch, iters_per_epoch, accum):
    """The LR each optimizer step uses in LAVIS: ``lr_scheduler.step(cur_epoch, cur_step=i)`` before every
    micro-batch ``i`` (``base_task._train_inner_loop``), ``optimizer.step()`` when ``(i + 1) % accum == 0``."""
    used, lr = [], None
    for epoch in range(max_epoch):
        for i in range(iters_per_epoch):
            if epoch == 0:  # optims.warmup_lr_schedule
                lr = min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / max(warmup_steps, 1))
            else:  # optims.cosine_lr_schedule
                lr = (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr
            if (i + 1) % accum == 0:
                used.append(lr)
    return used


@pytest.mark.parametrize(
    ("warmup", "max_epoch", "iters", "accum"),
    [
        (5, 4, 12, 1),  # warmup inside epoch 0, then constant epochs
        (30, 3, 12, 1),  # warmup longer than an epoch: never reaches init_lr
        (5, 4, 12, 2),  # grad accumulation: the last micro-batch's LR is the one used
        (7, 3, 12, 3),
        (0, 2, 6, 1),  # warmup 0: LAVIS's max(warmup_steps, 1) gives warmup_lr at i = 0, init_lr after
    ],
)
def test_lavis_epoch_equals_lavis_runner_over_a_whole_run(warmup, max_epoch, iters, accum):
    want = lavis_run_lrs(1e-4, 1e-5, 1e-6, warmup, max_epoch, iters, accum)
    s = LRSchedule(1e-4, max_epoch * iters // accum, warmup_steps=warmup, warmup_lr=1e-6, min_lr=1e-5,
                   mode="lavis_epoch", steps_per_epoch=iters, grad_accum=accum)  # fmt: skip
    got = [s(k) for k in range(s.total_steps)]
    assert len(got) == len(want) and got == pytest.approx(want, rel=1e-12, abs=0)
    per_epoch = iters // accum
    for e in range(1, max_epoch):  # constant within every epoch after the first
        assert len(set(got[e * per_epoch : (e + 1) * per_epoch])) == 1
    assert min(got[per_epoch:]) > 1e-5  # the last epoch is cos(pi (E-1)/E): min_lr is never reached
    if warmup >= iters:
        assert max(got) < 1e-4  # a warmup longer than epoch 0 never completes


def test_lavis_epoch_validation_names_the_key():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        LRSchedule(1e-4, 100, mode="lavis")
    with pytest.raises(ValueError, match="not a multiple of grad_accum"):
        LRSchedule(1e-4, 100, mode="lavis_epoch", steps_per_epoch=10, grad_accum=3)
    with pytest.raises(ValueError, match="whole number"):
        LRSchedule(1e-4, 25, mode="lavis_epoch", steps_per_epoch=10)  # 2.5 epochs
    with pytest.raises(ValueError, match="whole number"):
        LRSchedule(1e-4, 5, mode="lavis_epoch", steps_per_epoch=10)  # less than one epoch


def test_lavis_run_ignores_lr_scale_every_step():
    model = nn.Module()
    model.vision_model, model.head = FakeViT(depth=3), nn.Linear(4, 2)
    groups = param_groups(model, 0.05, lr_layer_decay=0.9)
    assert {round(g["lr_scale"], 6) for g in groups} == {1.0, 0.9, 0.81, 0.729, 0.6561}  # 0.9 ** (4 - id)
    opt = build_optimizer(groups, lr=1.0)
    s = LRSchedule(1e-5, 10, warmup_steps=3, warmup_lr=1e-8, mode="lavis_epoch", steps_per_epoch=5)
    for k, want in enumerate(lavis_run_lrs(1e-5, 0.0, 1e-8, 3, 2, 5, 1)):
        apply_lr(opt, s(k), apply_layer_decay=False)
        assert [g["lr"] for g in opt.param_groups] == [want] * len(groups)  # LAVIS: one value for every group
