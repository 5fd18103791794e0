"""``torch.compile`` with the Inductor configuration this project needs (used by the benchmarks' ``--compile``)."""

from __future__ import annotations

from torch import nn

# Inductor options for ``torch.compile`` of the Q-Former (and whatever else the benchmarks compile). Upstream bug
# pytorch/pytorch#197077: with loop re-indexing after fusion (on by default) Inductor's
# ``tiling_utils.get_pw_red_splits`` asserts on a fused reduction whose pointwise epilogue iterates over exactly the
# reduction size, which aborts the compile; switching that pass off is the workaround given in the issue.
INDUCTOR_WORKAROUND = {"loop_reindexing_after_fusion": False}


def inductor_options() -> dict:
    """:data:`INDUCTOR_WORKAROUND` less the keys this PyTorch does not know (older releases lack the pass)."""
    import torch._inductor.config as inductor_config  # imported on use: it costs seconds at import time

    return {k: v for k, v in INDUCTOR_WORKAROUND.items() if hasattr(inductor_config, k)}


def compile_inplace(module: nn.Module, **kwargs) -> nn.Module:
    """``module.compile(...)`` in place (state-dict names unchanged) with the Inductor workaround applied.

    Args:
        module: e.g. the Q-Former or the vision tower.
        **kwargs: passed to ``torch.compile``; ``options`` are merged over :func:`inductor_options`. (``mode`` and
            ``options`` cannot be combined in ``torch.compile``: with ``mode`` the workaround is left out.)
    """
    if "mode" not in kwargs:
        kwargs["options"] = {**inductor_options(), **kwargs.get("options", {})}
    module.compile(**kwargs)
    return module
