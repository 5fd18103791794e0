"""Stage-0 image-only pretraining of the toy world's frozen ViT, and its linear probe.

The tower is built by the same code path as the paper's towers (``blip2lib.vision.build_vision_tower`` with an EVA
``VisionConfig``: 64 px, 8-px patches → 64 patch tokens + CLS). Objective — dense supervision of WHERE and WHAT: every
patch token is classified into the (shape, colour, size) of the object covering it (or background) and into its own
column and row, and the mean of each slot's patch tokens into that slot's object class (or empty). An early feasibility
probe of the toy world found that a pooled/CLS-only objective leaves the patch tokens — which is all the Q-Former's
cross-attention reads (docs/paper_map.md §1.3) — much less informative (84% slot accuracy); per-patch targets keep them
rich. Why the column/row targets (version 9): without them the tokens of object patches forgot where they are (a linear
probe read an object patch's column 16% of the time, chance 12.5%), so the Q-Former could not tell left from right —
stage-1 ITG and stage-2 OPT captions got 4 and 5 of 128 val scenes' object lists right, mostly in the wrong order. With
them: 99.9% column read-out, the WHAT probe unchanged (slot accuracy 100%), same training time.

The probe: fresh linear heads over each frozen patch token, trained on train-split images and scored on test-split
images (both decoded from the JPEGs on disk); a slot's objects are read off its 16 patches, and each object patch's
column from a fifth head (:func:`linear_probe`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..vision import build_vision_tower, vision_features
from . import world

log = logging.getLogger(__name__)

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)  # docs/paper_map.md §6 (OpenAI-CLIP values)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
GRID = world.IMAGE_SIZE // 8  # 8 × 8 patches


def vit_config(width: int = 64, depth: int = 3) -> VisionConfig:
    """The toy EVA tower (built blocks = ``depth``; BLIP-2 reads the last built block's output).

    See docs/paper_map.md §1.2.
    """
    return VisionConfig(arch="eva", image_size=world.IMAGE_SIZE, patch_size=8, width=width, depth=depth,
                        num_heads=4, mlp_hidden=4 * width, ln_eps=1e-6, precision="fp32", freeze=True)  # fmt: skip


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 → (N, 3, 64, 64) CLIP-normalised float, the eval transform at 64 px.

    See docs/paper_map.md §6.
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def image_pool(num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scenes over all combinations, rendered and JPEG round-tripped like the files on disk.

    Returns:
        ``(images (N, 64, 64, 3) uint8, patch_labels (N, 8, 8), slot_labels (N, 4))``.
    """
    rng = np.random.default_rng([seed, 31])
    imgs, patches, slots = [], [], []
    for i in range(num_images):
        scene = world.sample_scene(rng, i, "any")
        image, labels = world.render(scene, rng)
        imgs.append(world.decode(world.jpeg_bytes(image)))
        patches.append(labels)
        slots.append(scene.slot_labels())
    return np.stack(imgs), np.stack(patches), np.asarray(slots)


def slot_view(patches: torch.Tensor) -> torch.Tensor:
    """(B, 64, C) per-patch values in raster order → (B, 4, 16, C): each slot's patches (2 columns × 8 rows)."""
    b, _, c = patches.shape
    grid = patches.reshape(b, GRID, world.NUM_SLOTS, GRID // world.NUM_SLOTS, c)  # (B, row, slot, col, C)
    return grid.permute(0, 2, 1, 3, 4).reshape(b, world.NUM_SLOTS, -1, c)


def slot_tokens(feats: torch.Tensor) -> torch.Tensor:
    """(B, 1 + 64, D) tower output → (B, 4, 16, D): each slot's patch tokens."""
    return slot_view(feats[:, 1:])


def patch_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row of each patch token in raster order: two (64,) tensors in ``[0, 8)``."""
    i = torch.arange(GRID * GRID)
    return i % GRID, i // GRID


class _Heads(nn.Module):
    """Pretraining heads (discarded after training): LayerNorm (like BLIP-2's ln_vision) + three linear classifiers."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.patch = nn.Linear(width, world.NUM_CLASSES)
        self.slot = nn.Linear(width, world.NUM_CLASSES)
        self.where = nn.Linear(width, 2 * GRID)  # column logits, then row logits

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.norm(feats)  # (B, 65, D)
        # (B, 64, C), (B, 4, C), (B, 64, 2 * GRID)
        return self.patch(h[:, 1:]), self.slot(slot_tokens(h).mean(2)), self.where(h[:, 1:])


def train_vit(
    images: np.ndarray,
    patch_labels: np.ndarray,
    slot_labels: np.ndarray,
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 2e-3,
    tick: Callable[[], None] | None = None,
    **cfg,
) -> nn.Module:
    """Pretrain the tower on per-patch (what + where) and per-slot classification; returns the tower in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 32])
    vcfg = vit_config(**cfg)
    tower = build_vision_tower(vcfg)
    heads = _Heads(vcfg.width)
    params = list(tower.parameters()) + list(heads.parameters())
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98), fused=True)
    ptarget, starget = torch.from_numpy(patch_labels).flatten(1), torch.from_numpy(slot_labels)  # (N, 64), (N, 4)
    col, row = (p.repeat(batch) for p in patch_positions())  # (batch * 64,) each, raster order per image
    tower.train()
    for step in range(steps):
        idx = rng.integers(len(images), size=batch)
        patch_logits, slot_logits, where = heads(vision_features(tower, to_pixels(images[idx])))
        where = where.flatten(0, 1)  # (batch * 64, 2 * GRID)
        loss = (
            F.cross_entropy(patch_logits.flatten(0, 1), ptarget[idx].flatten())
            + F.cross_entropy(slot_logits.flatten(0, 1), starget[idx].flatten())
            + F.cross_entropy(where[:, :GRID], col)
            + F.cross_entropy(where[:, GRID:], row)
        )
        warm = 30
        f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
        for g in optim.param_groups:
            g["lr"] = lr * max(f, 0.02)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        if tick:
            tick()
        if step % 100 == 0:
            log.info("vit step %d loss %.4f", step, loss.item())
    return tower.eval()


@torch.no_grad()
def features(tower: nn.Module, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Frozen tower output for uint8 images: (N, 65, D)."""
    return torch.cat([vision_features(tower, to_pixels(images[s : s + batch])) for s in range(0, len(images), batch)])


def _factors(c: torch.Tensor) -> list[torch.Tensor]:
    """Class (0 = empty, else 1 + (shape * 4 + colour) * 2 + size) → [occupied, shape, colour, size]."""
    k = (c - 1).clamp(min=0)
    return [(c > 0).long(), k // (len(world.COLOURS) * 2), (k // 2) % len(world.COLOURS), k % 2]


def linear_probe(
    train_feats: torch.Tensor,
    train_patches: np.ndarray,
    test_feats: torch.Tensor,
    test_patches: np.ndarray,
    test_slots: np.ndarray,
    seed: int,
    steps: int = 500,
) -> dict:
    """Linear read-out of each LayerNorm-ed frozen patch token (what and where), and the slots it implies.

    Four linear heads (occupied?, shape, colour, size of the object covering the patch, labels from
    :func:`world.patch_labels`) rather than one 25-way head, so the probe can name a (colour, shape) pair it never
    saw together — needed on the ``novel`` split. A slot's prediction uses no learned weights: empty when none of
    its 16 patches reads as an object, else the argmax of each attribute's logits summed over those that do.
    Why per patch: a small object fills one patch, so a probe over a slot's pooled or concatenated tokens has to
    learn each of the 16 positions separately (measured: 88% occupancy from a mean-pooled slot with patches 100%
    right). A fifth head reads each object patch's column (of 8): the Q-Former's only source of left and right.
    :func:`fit_probe` + :func:`probe_accuracy`, for several test sets of one fit.

    Returns:
        In % on the test images: ``patch_accuracy`` (all four factors right), ``slot_accuracy`` (emptiness and, if
        occupied, all three attributes right), ``column_accuracy`` over object patches, ``shape/colour/size_accuracy``
        over occupied slots.
    """
    return probe_accuracy(fit_probe(train_feats, train_patches, seed, steps), test_feats, test_patches, test_slots)


def _flat(f: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(f[:, 1:], f.shape[-1:]).flatten(0, 1)  # (N*64, D)


def fit_probe(train_feats: torch.Tensor, train_patches: np.ndarray, seed: int, steps: int = 500) -> nn.ModuleList:
    """The five linear heads of :func:`linear_probe`, fitted full-batch on the training patches."""
    torch.manual_seed(seed)
    xtr = _flat(train_feats)
    ytr = _factors(torch.from_numpy(train_patches).flatten())
    ytr.append(patch_positions()[0].repeat(len(train_feats)))  # each patch's column
    sizes = (2, len(world.SHAPES), len(world.COLOURS), 2, GRID)
    heads = nn.ModuleList(nn.Linear(xtr.shape[1], n) for n in sizes)
    optim = torch.optim.Adam(heads.parameters(), lr=2e-2)
    obj_tr = ytr[0] == 1
    with torch.enable_grad():
        for _ in range(steps):  # full batch; attribute and column heads only learn from object patches
            loss = F.cross_entropy(heads[0](xtr), ytr[0])
            loss = loss + sum(F.cross_entropy(h(xtr[obj_tr]), y[obj_tr]) for h, y in zip(heads[1:], ytr[1:]))
            optim.zero_grad()
            loss.backward()
            optim.step()
    return heads


def probe_accuracy(heads: nn.ModuleList, test_feats: torch.Tensor, test_patches: np.ndarray,
                   test_slots: np.ndarray) -> dict:  # fmt: skip
    """Accuracies of fitted probe ``heads`` on one test set (see :func:`linear_probe`)."""
    xte = _flat(test_feats)
    yte = _factors(torch.from_numpy(test_patches).flatten())
    with torch.no_grad():
        logits = [h(xte) for h in heads]  # (N*64, C) each
    pred = [z.argmax(-1) for z in logits]
    col_ok = (pred[4] == patch_positions()[0].repeat(len(test_feats)))[yte[0] == 1]  # object patches only
    patch_ok = (pred[0] == yte[0]) & ((yte[0] == 0) | ((pred[1] == yte[1]) & (pred[2] == yte[2]) & (pred[3] == yte[3])))
    n = len(test_feats)
    is_obj = slot_view(pred[0].view(n, -1, 1).float())  # (N, 4, 16, 1)
    occupied = is_obj.amax((2, 3)) > 0  # (N, 4)
    attrs = [(slot_view(z.view(n, GRID * GRID, -1)) * is_obj).sum(2) for z in logits[1:4]]  # (N, 4, C) each
    ys = _factors(torch.from_numpy(test_slots))  # (N, 4) each
    right = [occupied.long() == ys[0]] + [a.argmax(-1) == y for a, y in zip(attrs, ys[1:])]
    occ = ys[0] == 1
    slot_ok = right[0] & (~occ | (right[1] & right[2] & right[3]))
    acc = {"patch_accuracy": patch_ok.float().mean(), "slot_accuracy": slot_ok.float().mean(),
           "column_accuracy": col_ok.float().mean()}  # fmt: skip
    for i, name in enumerate(("shape", "colour", "size"), start=1):
        acc[f"{name}_accuracy"] = (right[i] & occupied)[occ].float().mean()
    return {k: round(100 * v.item(), 2) for k, v in acc.items()}
