"""Frozen-module precision: LAVIS's partial fp16 ViT, whole-cast towers, and an LLM's own autocast region.

Training autocast (params ``amp``) wraps the whole task; frozen modules may need another policy inside it. LAVIS's
(see ``docs/fidelity.md``), which the paper recipes use:

* Frozen ViT, ``vit_precision: fp16_lavis`` (default of the paper towers): LAVIS's ``convert_weights_to_fp16`` halves
  only Linear/Conv weights and biases, and every ViT call sits in ``maybe_autocast()`` (fp16 on a GPU) — so
  LayerNorm and softmax run in fp32 and EVA's residual stream stays fp32. :func:`lavis_half_`.
* ``vit_precision: fp16`` / ``bf16``: the whole tower is cast and runs in its own dtype OUTSIDE autocast — faster
  (no per-call casts, half-size activations), LayerNorm inputs and the residual stream in low precision.
* ``fp32``: untouched, runs under the caller's autocast (a trained tower always: LAVIS fine-tunes it in fp32 under
  the runner's fp16 autocast).
* Frozen bf16 LLM (FlanT5): LAVIS runs the T5 call in ``maybe_autocast(dtype=torch.bfloat16)`` nested in the
  runner's fp16 autocast (fp16 overflows T5's activations). :func:`autocast_region_` gives a module that region.
  An fp16 LLM (OPT) runs under the training autocast: fp16 in LAVIS's recipe, bf16 when ``amp: bf16``.

Everything here is a no-op policy on a CPU: :func:`set_vision_precision_` keeps fp32 there, and the tests exercise
the same functions with bf16 under CPU autocast.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .options import VIT_PRECISIONS

__all__ = ["VIT_PRECISIONS", "lavis_half_", "set_vision_precision_", "precision_context", "autocast_region_"]

_VIT_DTYPES = {"fp16_lavis": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def precision_context(tower: nn.Module, device_type: str) -> contextlib.AbstractContextManager:
    """The tower's autocast policy (set by :func:`set_vision_precision_`): its own autocast, none, or the caller's."""
    policy = getattr(tower, "precision_policy", None)
    if policy is None:  # fp32 / trained tower: whatever autocast the caller runs (LAVIS fine-tuning)
        return contextlib.nullcontext()
    kind, dtype = policy
    if kind == "autocast":  # fp16_lavis: LAVIS's maybe_autocast() around the tower, whatever the caller runs
        return torch.autocast(device_type, dtype=dtype)
    return torch.autocast(device_type, enabled=False)  # whole cast: its own dtype, no per-call casts


def lavis_half_(tower: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """LAVIS ``convert_weights_to_fp16`` on our timm tower, in place; the tower then runs under ``dtype`` autocast.

    Halved: every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` weight and bias (patch conv, fused qkv, attention
    projection, MLP). Kept fp32: LayerNorms, ``cls_token``, ``pos_embed``, EVA's ``q_bias`` / ``v_bias`` (plain
    parameters in LAVIS too) and the zero ``k_bias`` buffer; under autocast the fp32 qkv bias is cast per call, as in
    LAVIS's ``F.linear(x, qkv.weight, cat(q_bias, 0, v_bias))``.

    Arch details that keep LAVIS's arithmetic (a CLIP tower is told apart by its ``norm_pre``, CLIP's ``ln_pre``):

    * EVA: attention takes timm's explicit path (``q * scale @ kᵀ``, softmax, ``@ v``) as LAVIS's EVA ``Attention``
      (under autocast the scores come out fp16 and the softmax runs in fp32); the stream stays fp32 because the fp32
      CLS token and pos-embed promote the fp16 patch embeddings.
    * CLIP: LAVIS casts ``class_embedding`` / ``positional_embedding`` to the fp16 patch dtype and its LayerNorm
      returns its input's dtype, so its whole residual stream is fp16. Here ``cls_token`` / ``pos_embed`` are stored
      in ``dtype`` (the values LAVIS casts at every call) and each LayerNorm's output is cast back to its input's
      dtype. LAVIS's ``attn.in_proj_weight`` / ``in_proj_bias`` stay fp32 only because ``nn.MultiheadAttention``
      holds them as bare parameters; our fused ``qkv`` is a Linear and is halved — the matmul sees the same fp16
      values under autocast. Attention stays fused: torch >= 2's ``nn.MultiheadAttention(need_weights=False)`` uses
      scaled-dot-product attention as well.

    Args:
        tower: Frozen module from :func:`blip2lib.vision.build_vision_tower`, in fp32.
        dtype: Low-precision dtype (fp16 in LAVIS; bf16 lets CPU tests run the same code).

    Returns:
        The same module, with ``precision_policy = ("autocast", dtype)`` (read by :func:`precision_context`).
    """
    for m in tower.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
    if not isinstance(getattr(tower, "norm_pre", nn.Identity()), nn.Identity):  # CLIP
        tower.cls_token.data = tower.cls_token.data.to(dtype)
        tower.pos_embed.data = tower.pos_embed.data.to(dtype)
        for m in tower.modules():
            if isinstance(m, nn.LayerNorm) and not getattr(m, "_keeps_input_dtype", False):
                m.register_forward_hook(_output_in_input_dtype)
                m._keeps_input_dtype = True
    else:
        for m in tower.modules():
            if hasattr(m, "fused_attn"):  # timm EvaAttention
                m.fused_attn = False
    tower.precision_policy = ("autocast", dtype)
    return tower


def _output_in_input_dtype(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: LAVIS CLIP's LayerNorm computes in fp32 and returns its input's dtype."""
    return out.to(args[0].dtype)


def set_vision_precision_(tower: nn.Module, precision: str, device: torch.device | str) -> nn.Module:
    """Apply a ``vit_precision`` mode to a fp32 tower already on ``device`` (see the module docstring).

    Only a frozen tower (``is_frozen``, :func:`blip2lib.vision.freeze_vision_`) on a GPU changes; any other keeps
    fp32 and no policy.

    Args:
        tower: Module from :func:`blip2lib.vision.build_vision_tower`.
        precision: ``"fp16_lavis"``, ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        device: The tower's device.

    Returns:
        The same module.
    """
    if precision not in _VIT_DTYPES:
        raise ValueError(f"vit_precision must be one of {VIT_PRECISIONS}, got {precision!r}")
    if torch.device(device).type != "cuda" or not getattr(tower, "is_frozen", False) or precision == "fp32":
        return tower
    if precision == "fp16_lavis":
        return lavis_half_(tower, torch.float16)
    tower.to(dtype=_VIT_DTYPES[precision])
    tower.precision_policy = ("own", _VIT_DTYPES[precision])
    return tower


def autocast_region_(module: nn.Module, dtype: torch.dtype, device_type: str) -> nn.Module:
    """Run every call of ``module`` — and of its encoder, for an encoder–decoder — under ``autocast(dtype)``.

    The region nests inside whatever autocast the caller runs and overrides it for the module's forward (LAVIS's
    ``maybe_autocast(dtype=torch.bfloat16)`` around the T5). The encoder is hooked too because transformers'
    ``generate`` calls it directly. Implemented with forward hooks (``always_call``: the region is left even when
    the forward raises), so state dicts and ``save_pretrained`` are unchanged. Calling it again is a no-op.

    Args:
        module: A transformers model (or any module).
        dtype: The region's autocast dtype.
        device_type: ``"cuda"`` or ``"cpu"``.

    Returns:
        The same module.
    """
    encoder = module.get_encoder() if getattr(getattr(module, "config", None), "is_encoder_decoder", False) else None
    for m in (module, encoder):
        if m is None or getattr(m, "_autocast_region", None) is not None:
            continue
        stack: list = []

        def enter(mod, args, kwargs, _stack=stack):
            ctx = torch.autocast(device_type, dtype=dtype)
            ctx.__enter__()
            _stack.append(ctx)

        def leave(mod, args, kwargs, out, _stack=stack):
            _stack.pop().__exit__(None, None, None)

        m.register_forward_pre_hook(enter, with_kwargs=True)
        m.register_forward_hook(leave, with_kwargs=True, always_call=True)
        m._autocast_region = dtype
    return module
