"""Image features prepared once for the Q-Former's cross-attention (a training-step speed lever, issue 22).

Two savings, both leaving the numbers where they were (docs/fidelity.md, "Training-step levers"):

* one cast of the image features to the autocast dtype per step, instead of one inside every key/value projection
  of every cross-attention layer and pass;
* with a row ``index``, each layer projects S distinct images to keys/values once and gathers them for the B rows
  (the 3B ITM pairs of stage 1 use only B images in one process), instead of projecting B copies;
* with ``kv`` (:meth:`blip2lib.qformer.Blip2QFormer.image_keys_values`), those keys/values are computed once per
  step and read by every pass over the same images (stage 1's query pass and, in one process, its ITM pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class CrossInput(NamedTuple):
    """Image features for the cross-attention layers, prepared once and shared by every layer (and pass).

    ``states`` (S, N, Dv) in the Q-Former's dtype receives the gradients; ``low`` is ``states`` cast ONCE to the
    autocast dtype (detached; ``None`` outside autocast), which the K/V projections read instead of casting the same
    activations again in every layer; ``index`` (B,) long picks the image row of each batch row (``None``: row b is
    image b). With ``index`` each layer projects the S images to keys/values once and gathers them for the B rows
    (the 3B ITM pairs reuse B images), instead of projecting B copies.
    """

    states: torch.Tensor
    low: torch.Tensor | None = None
    index: torch.Tensor | None = None
    kv: tuple | None = None  # per Q-Former layer: its (k, v) of the S images, each (S, nh, N, hd), or None

    def project(self, key: nn.Module, value: nn.Module, heads: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values of the S images, each (S, nh, N, hd)."""
        return heads(key(self.use())), heads(value(self.use()))

    @property
    def batch(self) -> int:
        """Number of batch rows B this input serves."""
        return self.states.shape[0] if self.index is None else self.index.shape[0]

    def use(self) -> torch.Tensor:
        """The K/V projection input: ``low`` behind a per-use cast node (see :class:`_SharedCast`), else ``states``."""
        return self.states if self.low is None else _SharedCast.apply(self.states, self.low)

    def keys_values(
        self, key: nn.Module, value: nn.Module, heads: Callable, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's image keys and values for the B rows: those in ``kv`` or projected on the S images, gathered.

        Args:
            key: the layer's key projection (Dv → H).
            value: the layer's value projection.
            heads: (S, N, H) → (S, nh, N, hd) head split.
            layer: the layer's index in the Q-Former (its entry in ``kv``).

        Returns:
            ``(k, v)``, each (B, nh, N, hd).
        """
        pre = None if self.kv is None else self.kv[layer]
        k, v = self.project(key, value, heads) if pre is None else pre  # (S, nh, N, hd)
        if self.index is None:
            return k, v
        return _GatherRows.apply(k, self.index), _GatherRows.apply(v, self.index)  # (B, nh, N, hd)


class _SharedCast(torch.autograd.Function):
    """Forward: the precomputed cast ``low`` (no new cast). Backward: the gradient cast to ``states``' dtype.

    One node per use, so each use's half-precision gradient is cast to fp32 on its own and the uses are summed in
    fp32, exactly as when every projection cast its input itself under autocast (only the forward casts are saved).
    """

    @staticmethod
    def forward(ctx, states: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = states.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward sums repeated rows in fp32 (one rounding to a half dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)  # (B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        acc_dtype = torch.promote_types(grad.dtype, torch.float32)
        acc = grad.new_zeros((ctx.rows, *grad.shape[1:]), dtype=acc_dtype)  # (S, ...)
        return acc.index_add_(0, index, grad.to(acc_dtype)).to(grad.dtype), None


def cross_input(states: torch.Tensor, dtype: torch.dtype, index: torch.Tensor | None = None) -> CrossInput:
    """Prepare image features for cross-attention: ``states`` in ``dtype`` plus, under autocast, ONE cast.

    Args:
        states: image features (S, N, Dv) (``ln_vision`` outputs).
        dtype: the Q-Former's weight dtype (fp32 master weights).
        index: optional (B,) long image row per batch row.
    """
    states = states.to(dtype)
    dev = states.device.type
    low = None
    if (
        torch.amp.is_autocast_available(dev)
        and torch.is_autocast_enabled(dev)
        and torch.get_autocast_dtype(dev) != dtype
    ):
        low = states.detach().to(torch.get_autocast_dtype(dev))  # what every K/V Linear would cast to
    return CrossInput(states, low, index)
