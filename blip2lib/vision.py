"""Frozen image encoders: EVA-CLIP ViT-g/14 and OpenAI CLIP ViT-L/14, both built from timm classes.

See docs/paper_map.md §1.2.

The towers are plain timm modules (``timm.models.eva.Eva`` / ``timm.models.vision_transformer.VisionTransformer``)
instantiated directly from a :class:`~blip2lib.config.VisionConfig` — never through ``timm.create_model`` with
pretrained weights, so nothing is ever downloaded. Their state-dict keys are timm's; the functions at the bottom map
foreign checkpoints (LAVIS ``eva_vit_g.pth`` / ``clip_vit_L.pth`` / fine-tuned BLIP-2 ``.pth``, and transformers'
``Blip2VisionModel``) onto those keys, in the style of timm's ``checkpoint_filter_fn``.

What BLIP-2 uses is :func:`vision_features`: ALL tokens including CLS, taken from the raw residual stream of the
last BUILT block (39 of EVA's 40, 23 of CLIP's 24; no final norm, no head). For an S×S image that is
``N = (S / 14)^2 + 1`` tokens: 257 at 224 px, 677 at 364 px, 1226 at 490 px (docs/paper_map.md §1.1).

Precision (``VisionConfig.precision``, params key ``vit_precision``): a frozen tower on a GPU runs in LAVIS's
partial fp16 (default), whole fp16 / bf16, or fp32 — see :mod:`blip2lib.precision`. On a CPU, and whenever the tower
is trained, it stays fp32 under the caller's autocast. :func:`vision_features` enters the tower's autocast policy.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import types
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm import __version__ as timm_version
from timm.layers import LayerNorm, QuickGELU
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import VisionConfig
from .precision import _VIT_DTYPES as _DTYPES
from .precision import VIT_PRECISIONS, precision_context

log = logging.getLogger(__name__)


_K_BIAS_TOL = 1e-6  # EVA has no key bias; an HF qkv.bias k-slice above this cannot be represented


# ----------------------------------------------------------------------------------------------------------------
# Construction and forward


def build_vision_tower(cfg: VisionConfig, device: torch.device | str | None = None) -> nn.Module:
    """Build the image encoder described by ``cfg`` with random weights (no download, no pretrained config).

    ``cfg.arch == "eva"`` → timm ``Eva`` shaped as LAVIS' EVA-CLIP ViT-g (docs/paper_map.md §1.2): patch conv with bias,
    CLS + learned absolute pos-embed, pre-norm blocks with fused ``qkv.weight`` and separate ``q_bias`` / ``v_bias``
    (timm keeps a zero, non-persistent, non-trainable ``k_bias`` buffer), exact-erf GELU MLP, LayerNorm eps
    ``cfg.ln_eps``, no layer-scale, no RoPE, no relative position bias, no final norm, no pooling, no head.

    ``cfg.arch == "clip"`` → timm ``VisionTransformer`` shaped as OpenAI CLIP ViT-L/14 minus its last block: patch
    conv without bias, CLS + pos-embed, ``norm_pre`` (CLIP's ``ln_pre``), fused qkv with bias, QuickGELU, eps
    ``cfg.ln_eps`` (1e-5), no ``ln_post``, no projection.

    Args:
        cfg: Vision configuration; ``depth`` is the number of blocks BUILT (39 / 23 for the paper's towers).
        device: Where to allocate; ``"meta"`` gives shapes only (full-size parameter counts cost no memory — note a
            meta tower's non-persistent EVA ``k_bias`` buffer must be re-zeroed after ``to_empty``).

    Returns:
        The timm module; pass it to :func:`vision_features`.
    """
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    norm = partial(LayerNorm, eps=cfg.ln_eps)
    common = dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=0,
        global_pool="",
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_hidden / cfg.width,
        qkv_bias=True,
        class_token=True,
        drop_path_rate=cfg.drop_path_rate,
        norm_layer=norm,
        init_values=None,
    )
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if cfg.arch == "eva":
            tower = Eva(
                **common,
                qkv_fused=True,
                swiglu_mlp=False,
                scale_mlp=False,
                scale_attn_inner=False,
                attn_type="eva",
                use_abs_pos_emb=True,
                use_rot_pos_emb=False,
                use_post_norm=False,
                use_pre_transformer_norm=False,
                use_post_transformer_norm=False,
                use_fc_norm=False,
                **_device_kwarg(Eva, device),
            )
        elif cfg.arch == "clip":
            tower = VisionTransformer(
                **common, pre_norm=True, final_norm=False, fc_norm=False, act_layer=QuickGELU,
                **_device_kwarg(VisionTransformer, device),
            )  # fmt: skip
        else:
            raise ValueError(f"unknown vision arch {cfg.arch!r} (expected 'eva' or 'clip')")
    # timm derives the hidden width as int(width * mlp_ratio); the ViT-g value 6144 must come out exactly.
    got = tower.blocks[0].mlp.fc1.out_features
    if got != cfg.mlp_hidden:
        raise ValueError(f"MLP hidden {got} != cfg.mlp_hidden {cfg.mlp_hidden} (width {cfg.width})")
    return tower


def _device_kwarg(cls: type, device: torch.device | str | None) -> dict:
    """``{"device": device}`` where timm's model takes it (timm >= 1.0.21, our lower bound).

    An older timm that a host has preinstalled (a GPU image, say) still builds on a real device under the
    ``torch.device`` context alone; only meta-device builds need the keyword.
    """
    if "device" in inspect.signature(cls.__init__).parameters:
        return {"device": device}
    if device is not None and torch.device(device).type == "meta":  # old timm calls .item() on a meta linspace
        raise RuntimeError(f"building a vision tower on the meta device needs timm >= 1.0.21 (found {timm_version})")
    return {}


def vision_features(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """All tokens of the last built block, CLS first, with no final norm (docs/paper_map.md §1.2, §10.1).

    Args:
        tower: A module from :func:`build_vision_tower`.
        pixel_values: (B, 3, S, S) images, CLIP-normalised, in the tower's dtype; S must equal ``cfg.image_size``.

    Returns:
        (B, N, Dv) with N = (S / 14)^2 + 1 (257 at 224 px).
    """
    # timm's forward_features = patch_embed → (+CLS, +pos) → norm_pre → blocks (checkpointed if enabled) → norm;
    # `norm` is nn.Identity here, so this is the raw residual stream of the last block.
    with precision_context(tower, pixel_values.device.type):
        return tower.forward_features(pixel_values)  # (B, N, Dv)


# ----------------------------------------------------------------------------------------------------------------
# Freezing, precision, grad checkpointing


def _disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement ``train`` for a frozen tower: stays in eval whatever ``mode`` is (LAVIS ``disabled_train``)."""
    return self


def freeze_vision_(tower: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze ``tower`` in place: no grads, pinned to eval mode, optionally cast.

    See docs/paper_map.md §1.2 ``freeze_vit``.

    ``train`` is overridden on the instance, so a later ``parent.train()`` (which calls ``child.train(mode)``)
    cannot switch dropout / drop-path back on. The tower is marked ``is_frozen = True``.

    Args:
        tower: Module from :func:`build_vision_tower`.
        dtype: Cast the WHOLE tower (parameters and buffers) to this dtype; None keeps it. The GPU policies
            (LAVIS's partial cast among them) are applied later by :func:`set_vision_precision_`.

    Returns:
        The same module.
    """
    tower.requires_grad_(False)
    if dtype is not None:
        tower.to(dtype=dtype)
    nn.Module.train(tower, False)
    tower.train = types.MethodType(_disabled_train, tower)
    tower.is_frozen = True
    return tower


def vision_dtype(cfg: VisionConfig, device: torch.device | str) -> torch.dtype:
    """Low-precision dtype of the tower's matmuls: ``cfg.precision``'s only for a frozen tower on a GPU, else fp32."""
    if cfg.precision not in _DTYPES:
        raise ValueError(f"vit_precision must be one of {VIT_PRECISIONS}, got {cfg.precision!r}")
    if torch.device(device).type != "cuda" or not cfg.freeze:
        return torch.float32
    return _DTYPES[cfg.precision]


def set_grad_checkpointing(tower: nn.Module, enable: bool = True) -> None:
    """Per-block activation checkpointing for a trained tower (LAVIS ``use_grad_checkpoint``), via timm's API.

    timm checkpoints every block; LAVIS' CLIP tower only checkpoints blocks > 12 (same result, more recompute).
    """
    tower.set_grad_checkpointing(enable)


# ----------------------------------------------------------------------------------------------------------------
# Position-embedding resize


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int, align_corners: bool) -> torch.Tensor:
    """Bicubically resize a square (1, 1 + G*G, D) pos-embed to (1, 1 + new_grid^2, D), CLS entry kept.

    See docs/paper_map.md §1.2.

    LAVIS resizes EVA with ``align_corners=False`` and CLIP with ``align_corners=True``; used for 364 px (grid 26)
    and 490 px (grid 35) from the 224-px (grid 16) files. Computed in fp32, returned in the input dtype.

    Args:
        pos_embed: (1, 1 + G*G, D) table; row 0 is the CLS position.
        new_grid: Target patches per side (image_size // patch_size).
        align_corners: ``F.interpolate`` flag (False for EVA, True for CLIP).

    Returns:
        (1, 1 + new_grid^2, D); the input itself when G == new_grid.
    """
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    old_grid = math.isqrt(n)
    if old_grid * old_grid != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, G*G, D)
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=align_corners)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)  # (1, G'*G', D)
    return torch.cat([cls_pos, grid], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Foreign checkpoints → timm keys (and our keys ⇄ transformers' Blip2VisionModel)

_BLOCK = re.compile(r"^(blocks|transformer\.resblocks)\.(\d+)\.")
_CLIP_BLOCK_RENAMES = {  # LAVIS / OpenAI CLIP block sub-keys → timm ViT block sub-keys
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_TOP_RENAMES = {
    "conv1.weight": "patch_embed.proj.weight",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
}


def _strip_visual_encoder(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tower keys from either a bare ViT file or a whole BLIP-2 checkpoint (``visual_encoder.`` prefix)."""
    pre = "visual_encoder."
    if any(k.startswith(pre) for k in sd):
        return {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    if any(k.startswith(("Qformer.", "query_tokens", "ln_vision.")) for k in sd):
        raise ValueError(
            "this BLIP-2 checkpoint holds no 'visual_encoder.*' keys: pre-training checkpoints do not "
            "store the frozen ViT (docs/paper_map.md §8.1, LAVIS#128); load eva_vit_g.pth / clip_vit_L.pth instead"
        )
    return dict(sd)


def _lavis_to_timm(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map LAVIS tower keys to timm keys; also return the (source) keys of blocks dropped because i ≥ cfg.depth."""
    out, dropped = {}, []
    grid = cfg.image_size // cfg.patch_size
    for k, v in _strip_visual_encoder(sd).items():
        m = _BLOCK.match(k)
        if m and int(m.group(2)) >= cfg.depth:
            dropped.append(k)  # e.g. EVA-CLIP-g's 40th block: BLIP-2 uses the 39th block's output
            continue
        if cfg.arch == "eva":
            out[k] = v  # LAVIS' EVA module names equal timm Eva's
        elif m:
            sub = k[m.end() :]
            out[f"blocks.{m.group(2)}.{_CLIP_BLOCK_RENAMES.get(sub, sub)}"] = v
        elif k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)  # (D,) → (1, 1, D)
        elif k == "positional_embedding":
            out["pos_embed"] = v.reshape(1, *v.shape[-2:])  # (N, D) → (1, N, D)
        else:
            out[_CLIP_TOP_RENAMES.get(k, k)] = v  # unknown keys (ln_post, proj) pass through → reported unexpected
    if "pos_embed" in out and out["pos_embed"].shape[1] != grid * grid + 1:
        log.info("resizing pos_embed %s to grid %d", tuple(out["pos_embed"].shape), grid)
        out["pos_embed"] = interpolate_pos_embed(out["pos_embed"], grid, align_corners=cfg.arch == "clip")
    if dropped:
        log.info("dropped %d keys of vision blocks >= depth %d", len(dropped), cfg.depth)
    return out, dropped


def vision_state_dict_from_lavis(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """LAVIS vision-tower keys → our timm keys (docs/paper_map.md §8.1).

    Accepts the bare ViT files (``eva_vit_g.pth``, ``clip_vit_L.pth``: no prefix) and whole fine-tuned BLIP-2
    checkpoints (``visual_encoder.*``; other keys ignored). Blocks with index ≥ ``cfg.depth`` are dropped (the EVA
    file has 40), and ``pos_embed`` is resized to ``cfg.image_size`` when its grid differs (EVA align_corners=False,
    CLIP True). CLIP names (``class_embedding``, ``conv1``, ``ln_pre``, ``transformer.resblocks.{i}.*``) are renamed
    to timm's ViT names; keys with no counterpart (``ln_post``, ``proj``) are passed through unchanged.

    Args:
        sd: LAVIS state dict.
        cfg: Target tower configuration.

    Returns:
        A state dict for ``build_vision_tower(cfg).load_state_dict(..., strict=False)``.
    """
    return _lavis_to_timm(sd, cfg)[0]


def _require_eva(cfg: VisionConfig) -> None:
    if cfg.arch != "eva":
        raise NotImplementedError(
            "transformers' Blip2VisionModel only has the EVA layout (exact GELU, no ln_pre, fused qkv with a q/k/v "
            "bias vector); the CLIP ViT-L tower (QuickGELU, ln_pre, bias-free patch conv) has no HF BLIP-2 "
            "equivalent, so ViT-L models cannot be exported to / imported from transformers"
        )


_HF_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TOP_RENAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}


def vision_state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Our timm EVA keys → transformers ``Blip2VisionModel`` keys WITHOUT the ``vision_model.`` prefix.

    See docs/paper_map.md §8.3.

    ``q_bias`` / ``v_bias`` become one ``self_attn.qkv.bias = cat[q_bias, zeros, v_bias]``. HF's
    ``post_layernorm`` is our ``ln_vision`` (outside the tower) and is not produced here.

    Args:
        sd: ``tower.state_dict()`` of an EVA tower.
        cfg: Its configuration (arch must be "eva").

    Returns:
        HF-named tensors (the same tensor objects where no concatenation is needed).

    Raises:
        NotImplementedError: for arch "clip".
        ValueError: on a key with no HF counterpart.
    """
    _require_eva(cfg)
    out = {}
    for k, v in sd.items():
        if k in _HF_TOP_RENAMES:
            out[_HF_TOP_RENAMES[k]] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|q_bias|v_bias)$", k)
        if m is None:
            raise ValueError(f"no transformers counterpart for vision key {k!r}")
        i, mod, leaf = m.groups()
        pre = f"encoder.layers.{i}."
        if leaf == "q_bias":
            q, vb = v, sd[f"blocks.{i}.attn.v_bias"]
            out[pre + "self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), vb])  # (3D,), k slice zero
        elif leaf == "v_bias":
            continue  # consumed with q_bias
        elif mod in _HF_BLOCK_RENAMES:
            out[f"{pre}{_HF_BLOCK_RENAMES[mod]}.{leaf}"] = v
        else:
            raise ValueError(f"no transformers counterpart for vision key {k!r}")
    return out


def vision_state_dict_from_hf(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`vision_state_dict_to_hf`: transformers ``Blip2VisionModel`` keys → our timm EVA keys.

    Keys may carry the ``vision_model.`` prefix (a whole HF BLIP-2 state dict: only those keys are used) or not.
    ``post_layernorm.*`` is skipped — it is our ``ln_vision``, owned by the model, not the tower. Layers with index
    ≥ ``cfg.depth`` are dropped and a differently sized ``position_embedding`` is resized (align_corners=False).

    Args:
        sd: HF state dict.
        cfg: Target tower configuration (arch must be "eva").

    Returns:
        Our timm-named state dict.

    Raises:
        NotImplementedError: for arch "clip".
        ValueError: if a layer's k-bias slice is not ~0 (max-abs > 1e-6; EVA has no key bias), or a key is unknown.
    """
    _require_eva(cfg)
    pre = "vision_model."
    if any(k.startswith(pre) for k in sd):
        sd = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    inv_top = {v: k for k, v in _HF_TOP_RENAMES.items()}
    inv_blk = {v: k for k, v in _HF_BLOCK_RENAMES.items()}
    out = {}
    for k, v in sd.items():
        if k.startswith("post_layernorm."):
            continue
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m is None or m.group(2) not in inv_blk:
            raise ValueError(f"no timm counterpart for transformers vision key {k!r}")
        i, mod, leaf = m.groups()
        if int(i) >= cfg.depth:
            continue
        if mod == "self_attn.qkv" and leaf == "bias":
            q, kb, vb = v.chunk(3)  # (D,) each, rows ordered q, k, v
            err = kb.abs().max().item() if kb.numel() else 0.0
            if err > _K_BIAS_TOL:
                raise ValueError(
                    f"encoder.layers.{i}.self_attn.qkv.bias has a non-zero key-bias slice (max-abs "
                    f"{err:.3g}); EVA's attention has no k bias, so it cannot be represented"
                )
            out[f"blocks.{i}.attn.q_bias"], out[f"blocks.{i}.attn.v_bias"] = q, vb
        else:
            out[f"blocks.{i}.{inv_blk[mod]}.{leaf}"] = v
    grid = cfg.image_size // cfg.patch_size
    if "pos_embed" in out and out["pos_embed"].shape[1] != grid * grid + 1:
        out["pos_embed"] = interpolate_pos_embed(out["pos_embed"], grid, align_corners=False)
    return out


def load_vision_weights(
    tower: nn.Module, path_or_sd: str | Path | Mapping[str, torch.Tensor], cfg: VisionConfig
) -> tuple[list[str], list[str]]:
    """Load LAVIS vision weights (file or state dict) into ``tower`` with ``strict=False`` (docs/paper_map.md §8.1).

    Files: ``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True, map_location="cpu")``.
    ``{"model": sd}`` (LAVIS checkpoints) and ``{"state_dict": sd}`` wrappers are unwrapped. Keys go through
    :func:`vision_state_dict_from_lavis`.

    Args:
        tower: Module from :func:`build_vision_tower` (not on the meta device).
        path_or_sd: Checkpoint path or an already loaded state dict.
        cfg: The tower's configuration.

    Returns:
        ``(missing, unexpected)`` key lists; ``unexpected`` includes the source keys of blocks dropped because
        their index ≥ ``cfg.depth`` (e.g. ``blocks.39.*`` from ``eva_vit_g.pth``, expected).
    """
    from .checkpoint import shape_mismatches
    from .pretrained import LoadError, _read_tensors

    sd = path_or_sd
    source = str(sd) if isinstance(sd, (str, Path)) else "vision state dict"
    if isinstance(sd, (str, Path)):  # a truncated or pickled-code file: LoadError naming it
        sd = _read_tensors(Path(sd))
    for wrapper in ("model", "state_dict"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
            break
    mapped, dropped = _lavis_to_timm(sd, cfg)
    bad = shape_mismatches(tower.state_dict(), mapped)  # load_state_dict would say only "size mismatch", unnamed
    if bad:
        raise LoadError(f"{source}: vision weights do not fit the {cfg.arch} tower (width {cfg.width}, image size "
                        f"{cfg.image_size}): mis-shaped {bad}")  # fmt: skip
    res = tower.load_state_dict(mapped, strict=False)
    missing, unexpected = list(res.missing_keys), list(res.unexpected_keys) + dropped
    if missing or unexpected:
        log.info(
            "vision weights: %d missing, %d unexpected (%d from dropped blocks)",
            len(missing),
            len(unexpected),
            len(dropped),
        )
    return missing, unexpected
