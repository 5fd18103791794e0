"""Disk-backed frozen-feature store: the frozen ViT's output written once per image, read back by the data loader.

The store itself is :mod:`blip2lib.featstore.store` (layout, identity checks, memory-mapped reads) and the resumable
build is :mod:`blip2lib.featstore.build`; ``python -m blip2lib.featstore build PARAMS.yaml --out DIR`` runs it.
Both import torch, so their names are imported here on first use (PEP 562): ``--help`` stays instant and
``from blip2lib.featstore import FeatureStore`` works as usual.
"""

from __future__ import annotations

from ..lazy import lazy_exports

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


# every name from .store; refuse_random_transform is used by the build and the tests without being in __all__
_LAZY = {name: "store" for name in [*__all__, "refuse_random_transform"]}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
