"""Benchmark row ``featstore_read``: frozen features read from a disk store vs computed by the live tower.

The store (:mod:`blip2lib.featstore`) serves runs without image augmentation. This row builds a store of
``4 × vit_batch`` random images with the frozen ViT (ViT-g at 224 px on a GPU host, the tiny config with ``--tiny``),
then times, at batch ``vit_batch``:

* ``ours``        — features/s read from the store (memory-mapped rows stacked and copied to the device, as the
  loader and the engine do), rotating over the stored images;
* ``live_img_s``  — images/s of the live tower on the same batch (the cost the store removes);
* ``speedup``     — their ratio; ``build_img_s`` — images/s of the build itself (tower + shard writes).

The store is freshly written, so its pages are in the OS page cache: the read figure is memory-bound, an upper bound
for a store on a cold disk (ViT-g: 257 × 1408 fp16 = 0.69 MiB per image; a disk at 2 GB/s gives ~2900 images/s).

Not yet measured on a GPU; the command is ``python benchmarks/gpu.py --only featstore --out FILE.json`` (the row
also runs in the full benchmark). ``--tiny`` runs it on the CPU with the tiny config (a smoke run, not timing).
"""

from __future__ import annotations

import tempfile
import time

import torch

from blip2lib.featstore import FeatureStore
from blip2lib.featstore.build import write_features
from blip2lib.precision import set_vision_precision_
from blip2lib.vision import build_vision_tower, freeze_vision_, vision_features


def row_featstore(bench) -> dict:
    """The ``featstore_read`` row for ``bench`` (a ``benchmarks/gpu.py`` Bench: device, sizes, timing)."""
    cfg = bench.config(None)
    vision, dev, n = cfg.vision, bench.device, bench.sizes["vit_batch"]
    tower = freeze_vision_(build_vision_tower(vision)).to(dev)
    if bench.cuda:
        set_vision_precision_(tower, vision.precision, dev)
    dtype = next(tower.parameters()).dtype
    n_images = 4 * n
    g = torch.Generator().manual_seed(n_images)
    pixels = torch.randn(n_images, 3, vision.image_size, vision.image_size, generator=g)  # (4n, 3, S, S) on the host
    if bench.cuda:
        pixels = pixels.pin_memory()

    @torch.inference_mode()
    def tower_pass(px: torch.Tensor) -> torch.Tensor:
        with bench.amp(cfg):
            return vision_features(tower, px.to(dev, non_blocking=True).to(dtype))  # (b, N, Dv)

    bench.reset_memory()
    with tempfile.TemporaryDirectory(prefix="featstore_bench_") as root:
        t = time.perf_counter()
        items = [(f"img{i}", i) for i in range(n_images)]
        write_features(root, {"benchmark": "random pixels"}, items, lambda idx: (pixels[i] for i in idx), tower_pass,
                       shard_size=2 * n, batch_size=n)  # fmt: skip
        build_s = time.perf_counter() - t
        store = FeatureStore(root)
        store_mib = sum(sh.path.stat().st_size for sh in store.shards) / 2**20
        batches = [[f"img{i}" for i in range(b * n, (b + 1) * n)] for b in range(4)]
        turn = {"i": 0}

        def read() -> None:  # one loader batch: memory-mapped rows → (n, N, Dv) → device
            keys = batches[turn["i"] % 4]
            turn["i"] += 1
            feats = torch.stack([store[k] for k in keys])
            feats = feats.pin_memory() if bench.cuda else feats
            feats.to(dev, non_blocking=True)

        dt_read = bench.timed(read)
        batch_px = pixels[:n]
        dt_live = bench.timed(lambda: tower_pass(batch_px))
    return dict(row="featstore_read", unit="feat/s", ours=n / dt_read, live_img_s=n / dt_live,
                speedup=dt_live / dt_read, build_img_s=n_images / build_s, store_mib=store_mib,
                mem_ours=bench.peak_gib(), batch=n, feature_shape=list(store.feature_shape),
                feature_dtype=store.shards[0].dtype, cache="warm page cache")  # fmt: skip
