"""Disk-backed frozen-feature store: the frozen ViT's output written once per image, read back by the data loader.

The store itself is :mod:`blip2lib.featstore.store` (layout, identity checks, memory-mapped reads) and the resumable
build is :mod:`blip2lib.featstore.build`; ``python -m blip2lib.featstore build PARAMS.yaml --out DIR`` runs it.
Both import torch, so their names are imported here on first use (PEP 562): ``--help`` stays instant and
``from blip2lib.featstore import FeatureStore`` works as usual.
"""

from __future__ import annotations

import importlib

__all__ = [
    "FeatureStore",
    "FeatureStoreError",
    "StoreDataset",
    "StoreFeatures",
    "attach",
    "check_params",
    "open_for_run",
    "run_identity",
    "store_keys",
]


def __getattr__(name: str):
    """Import :mod:`.store` on first access of one of its names and cache the name here."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    store = importlib.import_module(".store", __name__)
    if not hasattr(store, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(store, name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
