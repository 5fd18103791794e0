"""Optimizer groups and LR schedule edges that the mutation pass of blip2lib/optim.py showed unpinned.

See docs/mutation.md. Expected values come from the definitions in the docstrings: the no-decay rules, the layer
scale ``lr_layer_decay ** (depth + 1 - id)``, the warmup that ends exactly at the peak, the cosine that reaches
``min_lr`` at ``total_steps``, and the ``lavis_epoch`` run-length checks.
"""

import logging
import math

import pytest
import torch
from torch import nn

from blip2lib.optim import LRSchedule, _no_decay, build_optimizer, param_groups


def _named(**shapes) -> nn.Module:
    """A module whose parameters have the given dotted names and shapes."""
    root = nn.Module()
    for dotted, shape in shapes.items():
        *path, leaf = dotted.split("__")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return root


def test_no_decay_names():
    w2 = torch.zeros(2, 2)
    assert _no_decay("enc.bn1.weight", w2, "paper")  # "bn" anywhere in the name, even for a 2-D tensor
    assert not _no_decay("enc.fc.weight", w2, "paper")
    assert _no_decay("enc.proj.bias", w2, "lavis_head")  # a ".bias" suffix, even for a 2-D tensor
    assert not _no_decay("enc.biased", w2, "lavis_head")
    with pytest.raises(ValueError, match=r"^no_decay_rule must be one of \('paper', 'lavis_head'\), got 'x'$"):
        _no_decay("w", w2, "x")


def test_tower_without_blocks_and_default_layer_decay():
    # no "blocks.k." parameter: depth 0, so the patch embedding (id 0) gets d ** 1 and the final norm (id depth + 1
    # = 1) gets d ** 0
    model = _named(vision_model__patch_embed__weight=(2, 2), vision_model__norm__weight=(2, 2))
    scales = {g["group_name"]: g["lr_scale"] for g in param_groups(model, 0.05, lr_layer_decay=0.5)}
    assert scales == {"vit_layer_0_decay": 0.5, "vit_layer_1_decay": 1.0}
    model = _named(vision_model__blocks__0__weight=(2, 2), vision_model__patch_embed__weight=(2, 2))
    assert {g["lr_scale"] for g in param_groups(model, 0.05)} == {1.0}  # the default factor is 1


def test_param_groups_are_logged(caplog):
    model = _named(fc__weight=(2, 2), fc__bias=(2,), head__weight=(3, 2))
    with caplog.at_level(logging.INFO, logger="blip2lib.optim"):
        param_groups(model, 0.05)
    assert [r.getMessage() for r in caplog.records] == ["param groups: {'decay': 2, 'no_decay': 1}"]


def test_build_optimizer_settings():
    groups = param_groups(_named(fc__weight=(2, 2)), 0.05)
    opt = build_optimizer(groups, lr=0.25, eps=1e-6)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["eps"], opt.defaults["fused"]) == (0.25, 1e-6, True)
    # fused only for floating tensors, and never for an empty parameter list
    ints = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    assert build_optimizer([{"params": [ints]}], lr=0.1).defaults["fused"] is None
    assert build_optimizer([{"params": []}], lr=0.1).defaults["fused"] is None


def test_step_schedule_edges():
    # warmup ends exactly at the peak: 0.2 + (0.9 - 0.2) is not 0.9 in floating point, the cosine start is
    assert 0.2 + (0.9 - 0.2) != 0.9
    sched = LRSchedule(peak_lr=0.9, total_steps=3, warmup_steps=2, warmup_lr=0.2)
    assert sched(2) == 0.9
    # one step after the warmup is the last one: min_lr is reached at total_steps
    assert sched(3) == 0.0


def test_lavis_epoch_run_length_checks():
    # one micro-batch per epoch is a valid epoch length; a run of exactly one epoch is valid
    one = LRSchedule(peak_lr=1.0, total_steps=3, warmup_steps=1, mode="lavis_epoch", steps_per_epoch=1)
    assert one(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)), abs=1e-15)  # epoch 1 of 3
    single = LRSchedule(peak_lr=1.0, total_steps=2, warmup_steps=4, mode="lavis_epoch", steps_per_epoch=4,
                        grad_accum=2)  # fmt: skip
    assert single(0) == 0.25  # micro-batch 1 of the warmup of 4
    with pytest.raises(ValueError, match=r"needs steps_per_epoch >= 1 and grad_accum >= 1, got 4, 0$"):
        LRSchedule(peak_lr=1.0, total_steps=4, mode="lavis_epoch", steps_per_epoch=4, grad_accum=0)
    with pytest.raises(ValueError, match=r"set steps to max_epoch × 2$"):
        LRSchedule(peak_lr=1.0, total_steps=3, mode="lavis_epoch", steps_per_epoch=4, grad_accum=2)
