"""Checkpoint conversion: key maps and configs between our BLIP-2, transformers and LAVIS, a numerical check, a CLI.

The key maps, configs and the numerical check live in ``mapping.py`` (they import torch); their names are imported
from it on first use (PEP 562), so ``from blip2lib.convert import lavis_to_ours`` works as before and ``python -m
blip2lib.convert --help`` stays instant. The command line is ``__main__.py``.
"""

from __future__ import annotations

import importlib

CHECK_TOL = 1e-4  # conversion bar of the transformers script (fp32 logits allclose atol 1e-4; docs/paper_map.md §8.3)

# Names of mapping.py read from this package: the public API and the three helpers blip2lib.pretrained uses.
_LAZY = (
    "GROUPS", "HF_ABSENT", "LAVIS_EXPECTED_UNUSED", "check_inputs", "compare_to_hf", "config_from_hf", "group_keys",
    "hf_config_dict", "hf_outputs", "hf_to_ours", "lavis_to_ours", "load_hf_reference", "module_group",
    "ours_outputs", "ours_to_hf", "ours_to_lavis", "set_attn_implementation",
    "_dedup_tied", "_image_token", "_write_processor",
)  # fmt: skip

__all__ = ["CHECK_TOL", *(n for n in _LAZY if not n.startswith("_"))]


def __getattr__(name: str):
    """Import ``mapping`` on first access of one of its names and cache the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".mapping", __name__), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
