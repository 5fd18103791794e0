"""AdamW parameter groups, layer-wise LR decay for a trainable ViT, and the two warmup + cosine LR schedules.

Two weight-decay rules exist in LAVIS and both are here. Two recipes exist for the learning rate (see
``docs/fidelity.md``): the paper's (per-step cosine, layer-wise LR decay of Tables 7–9 applied) and LAVIS's code
(``linear_warmup_cosine_lr``: warmup inside epoch 0, then one cosine value per epoch; it overwrites every group's
``lr`` and so never reads ``lr_scale``). ``LRSchedule(mode="lavis_epoch")`` plus ``apply_lr(...,
apply_layer_decay=False)`` reproduce LAVIS; the defaults are the paper's.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .options import LR_SCHEDULES

log = logging.getLogger(__name__)

__all__ = [
    "NO_DECAY_RULES",
    "LR_SCHEDULES",
    "vit_layer_id",
    "param_groups",
    "build_optimizer",
    "LRSchedule",
    "apply_lr",
]

NO_DECAY_RULES = ("paper", "lavis_head")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Sub-module names (inside the timm tower) that sit before block 0: EVA and CLIP towers (docs/paper_map.md §1.2).
# ``norm_pre`` is CLIP's ``ln_pre``, which LAVIS' clip_vit ``get_num_layer`` also puts at layer 0.
_EMBED_NAMES = ("cls_token", "pos_embed", "mask_token", "reg_token")
_EMBED_PREFIXES = ("patch_embed.", "norm_pre.")


def vit_layer_id(sub_name: str, depth: int) -> int:
    """Layer id of a ViT parameter for layer-wise LR decay (docs/paper_map.md §7: LAVIS ``get_num_layer``).

    Args:
        sub_name: Parameter name inside the tower (``vision_model.`` prefix removed), timm key names.
        depth: Number of blocks built in the tower (39 for EVA ViT-g, 23 for CLIP ViT-L in BLIP-2).

    Returns:
        0 for patch/cls/pos embeddings and ``norm_pre``; ``k + 1`` for ``blocks.{k}.*``; ``depth + 1`` for anything
        else (our towers have no such parameter; LAVIS' EVA would give it ``depth``, i.e. the last block's id).
    """
    if sub_name in _EMBED_NAMES or sub_name.startswith(_EMBED_PREFIXES):
        return 0
    m = _BLOCK.match(sub_name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def _no_decay(name: str, p: torch.Tensor, rule: str) -> bool:
    """Whether ``p`` is excluded from weight decay under ``rule`` (docs/paper_map.md §7)."""
    if rule == "paper":
        # Paper-time runner: ndim < 2 (so the 0-D ``temp`` too) or "bias"/"ln"/"bn" anywhere in the name.
        return p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
    if rule == "lavis_head":
        # HEAD ``get_optimizer_params``: exactly 1-D or a ``.bias`` suffix; the 0-D ``temp`` IS decayed.
        return p.ndim == 1 or name.endswith(".bias")
    raise ValueError(f"no_decay_rule must be one of {NO_DECAY_RULES}, got {rule!r}")


def _infer_depth(model: nn.Module, vit_prefix: str) -> int:
    """Number of ViT blocks, read from ALL parameter names (frozen ones included) as max block index + 1."""
    names = [n[len(vit_prefix) :] for n, _ in model.named_parameters() if n.startswith(vit_prefix)]
    ids = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    return max(ids) + 1 if ids else 0


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_layer_decay: float = 1.0,
    vit_prefix: str = "vision_model.",
    vit_depth: int | None = None,
    no_decay_rule: str = "paper",
) -> list[dict]:
    """AdamW parameter groups: decay / no-decay split and per-layer ViT groups (docs/paper_map.md §7).

    Only parameters with ``requires_grad`` are included (frozen towers never reach the optimizer). Non-ViT
    parameters land in ``"decay"`` / ``"no_decay"`` with ``lr_scale`` 1; trainable ViT parameters land in
    ``"vit_layer_{id}_{decay|no_decay}"`` with ``lr_scale = lr_layer_decay ** (depth + 1 - id)`` (ids from
    :func:`vit_layer_id`), so the last block trains at ``lr * lr_layer_decay`` and the patch embedding at
    ``lr * lr_layer_decay ** (depth + 1)``.

    The default rule ``"paper"`` is the issue's "no weight decay on 1-D parameters and biases" in its paper-time
    LAVIS form (ndim < 2 or name contains ``bias``/``ln``/``bn``): the 0-D ITC temperature ``temp`` gets NO decay.
    ``"lavis_head"`` (1-D or name ends in ``.bias``) decays ``temp``. Both keep decay on ``query_tokens`` and
    embedding tables.

    Args:
        model: Module whose ``named_parameters`` are grouped (tied parameters appear once).
        weight_decay: Decay for the decay groups (0.05 in every BLIP-2 recipe).
        lr_layer_decay: Per-layer factor for the ViT (paper Tables 7–9: 1, 0.95 or 0.9; docs/paper_map.md §4).
        vit_prefix: Name prefix of the vision tower.
        vit_depth: Blocks in the tower; inferred from parameter names when None.
        no_decay_rule: ``"paper"`` or ``"lavis_head"``.

    Returns:
        Non-empty groups, each ``{"params", "param_names", "group_name", "weight_decay", "lr_scale"}``, in a
        deterministic order (first appearance in ``named_parameters``) so optimizer state dicts line up on resume.
    """
    if no_decay_rule not in NO_DECAY_RULES:
        raise ValueError(f"no_decay_rule must be one of {NO_DECAY_RULES}, got {no_decay_rule!r}")
    depth = vit_depth if vit_depth is not None else _infer_depth(model, vit_prefix)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = _no_decay(name, p, no_decay_rule)
        kind = "no_decay" if nd else "decay"
        if name.startswith(vit_prefix):
            layer = vit_layer_id(name[len(vit_prefix) :], depth)
            gname, scale = f"vit_layer_{layer}_{kind}", lr_layer_decay ** (depth + 1 - layer)
        else:
            gname, scale = kind, 1.0
        g = groups.setdefault(
            gname,
            {"params": [], "param_names": [], "group_name": gname, "weight_decay": 0.0 if nd else weight_decay,
             "lr_scale": scale},
        )  # fmt: skip
        g["params"].append(p)
        g["param_names"].append(name)
    out = list(groups.values())
    log.info("param groups: %s", {g["group_name"]: len(g["params"]) for g in out})
    return out


def build_optimizer(
    groups: list[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``groups``; betas default to the paper's pre-training (0.9, 0.98), LAVIS yamls use 0.999.

    See docs/paper_map.md §7.

    Args:
        groups: Output of :func:`param_groups` (extra keys such as ``lr_scale`` are kept in the groups).
        lr: Initial learning rate (the schedule overwrites it every step via :func:`apply_lr`).
        betas: Adam betas.
        eps: Adam epsilon (PyTorch default 1e-8, as LAVIS).
        fused: Use the fused kernel; None → True when every parameter is a floating CPU or CUDA tensor (one kernel
            over all tensors: on a CPU 10× faster than the per-tensor loop for the toy Q-Former's ~170 tensors).

    Returns:
        The optimizer.
    """
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup then cosine decay; stateless, ``schedule(step) -> lr`` for the 0-based optimizer step.

    ``mode="step"`` (the paper's description, §3.4): linear from ``warmup_lr`` (step 0) to ``peak_lr`` (step
    ``warmup_steps``), then cosine from ``peak_lr`` to ``min_lr`` (reached at ``total_steps`` and held after).

    ``mode="lavis_epoch"`` is LAVIS's ``linear_warmup_cosine_lr``. LAVIS calls it before EVERY micro-batch ``i`` of
    epoch ``e`` (``i`` restarts at 0 each epoch) and AdamW reads the rate at ``optimizer.step()``, so an optimizer
    step uses the value of its LAST micro-batch ``m = step * grad_accum + grad_accum - 1``, with ``e, i =
    divmod(m, steps_per_epoch)``. Epoch 0: ``min(peak, warmup_lr + (peak - warmup_lr) * i / max(warmup_steps, 1))``
    (a warmup longer than the epoch never completes); epoch ``e >= 1``: the constant ``min_lr + (peak - min_lr) *
    (1 + cos(pi * e / max_epoch)) / 2`` — the last epoch never reaches ``min_lr``. In this mode ``steps_per_epoch``
    and ``warmup_steps`` count micro-batches (LAVIS iterations) and the run must be whole epochs whose length is a
    multiple of ``grad_accum`` (LAVIS carries a partial accumulation over the epoch end; we refuse it instead).

    Attributes:
        peak_lr: Peak (LAVIS ``init_lr``) learning rate.
        total_steps: Optimizer steps of the run.
        warmup_steps: Warmup length (optimizer steps; micro-batches in ``lavis_epoch``).
        warmup_lr: Learning rate at step 0.
        min_lr: Final learning rate of the cosine.
        mode: ``"step"`` or ``"lavis_epoch"``.
        steps_per_epoch: Micro-batches per epoch and rank (LAVIS ``iters_per_epoch``); required for ``lavis_epoch``.
        grad_accum: Micro-batches per optimizer step (``lavis_epoch`` only; the ``step`` mode ignores it).
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    mode: str = "step"
    steps_per_epoch: int | None = None
    grad_accum: int = 1

    def __post_init__(self):
        if self.mode not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.mode!r}")
        if self.mode != "lavis_epoch":
            return
        spe, acc = self.steps_per_epoch, self.grad_accum
        if not spe or spe < 1 or acc < 1:
            raise ValueError(
                f"lr_schedule lavis_epoch needs steps_per_epoch >= 1 and grad_accum >= 1, got {spe}, {acc}"
            )
        if spe % acc:
            raise ValueError(f"lr_schedule lavis_epoch: steps_per_epoch {spe} is not a multiple of grad_accum {acc}")
        micro = self.total_steps * acc  # micro-batches of the whole run
        if micro < spe or micro % spe:
            raise ValueError(
                f"lr_schedule lavis_epoch: steps × grad_accum = {micro} micro-batches is not a whole number (>= 1) "
                f"of epochs of steps_per_epoch = {spe}; set steps to max_epoch × {spe // acc}"
            )

    def __call__(self, step: int) -> float:
        """Learning rate for (0-based) optimizer step ``step``."""
        peak, lo = self.peak_lr, self.min_lr
        if self.mode == "lavis_epoch":
            micro = step * self.grad_accum + self.grad_accum - 1  # LAVIS: the last micro-batch's rate is used
            epoch, i = divmod(micro, self.steps_per_epoch)
            if epoch == 0:
                return min(peak, self.warmup_lr + (peak - self.warmup_lr) * i / max(self.warmup_steps, 1))
            max_epoch = self.total_steps * self.grad_accum // self.steps_per_epoch
            return lo + (peak - lo) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch))
        if step < self.warmup_steps:
            return self.warmup_lr + (peak - self.warmup_lr) * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return lo + (peak - lo) * 0.5 * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        """The configuration (the schedule has no other state); plain types, safe for ``weights_only`` loading."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def apply_lr(optimizer: torch.optim.Optimizer, lr: float, apply_layer_decay: bool = True) -> None:
    """Set every group's ``lr``: ``lr * lr_scale`` (paper, default) or ``lr`` for all groups (LAVIS).

    Args:
        optimizer: Optimizer whose groups may carry ``lr_scale`` (missing → 1).
        lr: Scheduled base learning rate.
        apply_layer_decay: False reproduces LAVIS, whose schedulers set every group's ``lr`` to the same value and
            never read ``lr_scale`` (its ``lr_layer_decay`` yaml key builds the groups and then has no effect).
    """
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0) if apply_layer_decay else lr
