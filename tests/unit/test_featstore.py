"""Disk-backed frozen-feature store (blip2lib/featstore): exact features, same training, misuse refused, resumable."""

import contextlib
import json
import os
import random
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from blip2lib.assemble import build_model_and_task
from blip2lib.config import tiny_config
from blip2lib.featstore import FeatureStore, FeatureStoreError, run_identity
from blip2lib.featstore.__main__ import main as cli
from blip2lib.featstore.build import build_store, write_features
from blip2lib.toy.synthetic import WORDS, SyntheticImageText
from blip2lib.train import TrainParams, train
from blip2lib.vision import build_vision_tower, freeze_vision_, vision_features

torch.set_num_threads(2)


def _tower(dtype=torch.float32):
    torch.manual_seed(0)
    tower = build_vision_tower(tiny_config(image_size=28).vision)
    return freeze_vision_(tower).to(dtype)


def _images(n=10, seed=0):
    return torch.rand(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _identity(tower):
    return run_identity(tower, "fp32", 28, "bf16", "resize(28)", torch.device("cpu"))


def _write(out, tower, images, dtype=torch.float32, **kw):
    items = [(f"img{i}", i) for i in range(len(images))]
    with torch.no_grad():
        return write_features(out, _identity(tower), items, lambda idx: (images[i] for i in idx),
                              lambda px: vision_features(tower, px.to(dtype)), **kw)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_returns_the_towers_outputs_bit_for_bit(tmp_path, dtype):
    tower, images = _tower(dtype), _images(10)
    summary = _write(tmp_path / "s", tower, images, dtype, shard_size=4, batch_size=3)  # shards of 4, 4, 2
    assert summary == {"images": 10, "bad": 0, "shards": 3, "written": 10, "seconds": summary["seconds"]}
    with torch.no_grad():
        want = vision_features(tower, images.to(dtype))  # (10, 17, 32): all ten in one pass, not the build's threes
    store = FeatureStore(tmp_path / "s")
    assert store.feature_shape == (17, 32) and len(store) == 10
    for i in range(10):
        got = store[f"img{i}"]
        assert got.dtype == dtype and torch.equal(got, want[i]), i
    # the shard is a plain safetensors file: the library reads the same rows
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "s" / "shard-00001.safetensors")["features"], want[4:8])


def test_reads_are_memory_mapped_one_row_at_a_time(tmp_path):
    tower, images = _tower(), _images(64)
    _write(tmp_path / "s", tower, images, shard_size=64, batch_size=64)
    store = FeatureStore(tmp_path / "s")
    row_bytes = 17 * 32 * 4
    assert isinstance(store.shards[0].rows(), np.memmap) and store.shards[0].rows().shape == (64, 17, 32)
    tracemalloc.start()  # numpy reports its allocations to tracemalloc; a memory map allocates nothing
    row = store["img40"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * row_bytes < 64 * row_bytes // 16  # one row copied, never the 64-row shard
    with torch.no_grad():
        assert torch.equal(row, vision_features(tower, images[40:41])[0])


def test_interrupted_build_continues_and_overwrites_nothing(tmp_path):
    tower, images = _tower(), _images(10)
    calls = {"n": 0}

    def flaky(px):  # the third tower pass (the third shard: one pass per shard here) dies
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        with torch.no_grad():
            return vision_features(tower, px)

    items, out = [(f"img{i}", i) for i in range(10)], tmp_path / "s"

    def load(indices):
        return (images[i] for i in indices)

    with pytest.raises(KeyboardInterrupt):
        write_features(out, _identity(tower), items, load, flaky, shard_size=4, batch_size=4)
    with pytest.raises(FeatureStoreError, match="the build has not finished; run the same build command again"):
        FeatureStore(out)
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*")}
    assert sorted(first) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (out / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # what a kill during save_file leaves
    summary = write_features(out, _identity(tower), items, load, flaky, shard_size=4, batch_size=4)
    assert summary["written"] == 2 and summary["images"] == 10 and not list(out.glob("*.tmp"))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-0000[01]*")} == first
    with torch.no_grad():
        want = vision_features(tower, images)
    store = FeatureStore(out)
    assert all(torch.equal(store[f"img{i}"], want[i]) for i in range(10))
    # a second tower's build into the same folder, and a folder that is not a store, are refused
    other = _tower()
    torch.nn.init.zeros_(other.patch_embed.proj.bias)
    with pytest.raises(FeatureStoreError, match=r"holds a store of another tower or transform \(differs in weights"):
        write_features(out, _identity(other), items, load, flaky)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no store.json"):
        write_features(tmp_path / "junk", _identity(tower), items, load, flaky)


def _caption_data(root, n_images=8):
    """``n_images`` random PNGs with two captions each, as a COCO-style caption annotation file."""
    (root / "images").mkdir(parents=True)
    rng, anns = np.random.default_rng(0), []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        for c in range(2):
            words = " ".join(WORDS[(i * 3 + c + k) % 20] for k in range(3 + c))
            anns.append({"image": f"im{i}.png", "caption": words, "image_id": f"im{i}"})
    (root / "train.json").write_text(json.dumps(anns))
    return {"train_data": "train.json", "data_root": str(root), "images_root": "images"}


def _params(stage, **kw):
    base = dict(stage=stage, model="tiny", llm="opt", train_data="synthetic", val_data="", steps=3, batch_size=8,
                warmup_steps=1, image_size=28, max_txt_len=12, progress=False, augment="none")  # fmt: skip
    return TrainParams(**{**base, **kw})


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "log.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
@pytest.mark.parametrize("stage,data", [("stage1", "captions"), ("stage2", "synthetic")])
def test_training_from_the_store_gives_the_live_losses(tmp_path, stage, data):
    kw = _caption_data(tmp_path / "data") if data == "captions" else {}
    live = train(_params(stage, **kw), tmp_path / "live")
    build_store(_params(stage, **kw), tmp_path / "store", shard_size=5, batch_size=4)
    stored = train(_params(stage, feature_store=str(tmp_path / "store"), **kw), tmp_path / "stored")
    assert len(_losses(tmp_path / "live")) == 3
    assert _losses(tmp_path / "stored") == _losses(tmp_path / "live")  # the same floats: the same features
    assert stored.model.vision_cache.stats() == {"reads": 3 * 8}  # every training image came from the store
    assert live.summary["step"] == stored.summary["step"] == 3
    # pixels (validation images) still run the tower, through the same hook
    model, px = stored.model, torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        hooked = model.encode_vision(px)
        model.vision_cache = None
        assert torch.equal(hooked, model.encode_vision(px))


def test_store_refuses_another_tower_size_augmentation_or_images(tmp_path):
    out = tmp_path / "store"
    build_store(_params("stage1"), out, shard_size=100)
    with pytest.raises(FeatureStoreError, match=r"built for another vision tower or transform \(weights_sha256: store"):
        train(_params("stage1", seed=7, feature_store=str(out)), tmp_path / "r1")  # another random tiny tower
    with pytest.raises(FeatureStoreError, match=r"image_size: store 28 vs run 35.*transform: store"):
        train(_params("stage1", image_size=35, feature_store=str(out)), tmp_path / "r2")
    with pytest.raises(FeatureStoreError, match=r"augment='paper' draws a new crop/flip .* needs augment: none"):
        train(_params("stage1", augment="paper", feature_store=str(out)), tmp_path / "r3")
    with pytest.raises(FeatureStoreError, match=r"augment='paper'"):
        build_store(_params("stage1", augment="paper"), tmp_path / "s2")
    from blip2lib.data import image_eval_transform, image_train_transform
    from blip2lib.featstore import refuse_random_transform

    with pytest.raises(FeatureStoreError, match=r"transform is random \(RandomResizedCrop.*; RandomHorizontalFlip"):
        refuse_random_transform(image_train_transform(28, flip=True), "x")  # defence behind the augment check
    refuse_random_transform(image_eval_transform(28), "x")  # resize + normalise: fixed
    with pytest.raises(FeatureStoreError, match="no store.json"):
        train(_params("stage1", feature_store=str(tmp_path / "nothing")), tmp_path / "r4")
    # an id whose pixels differ from the stored image's, and an image the store never saw
    store = FeatureStore(out)
    shard = store.shards[0]
    from blip2lib.featstore import StoreDataset

    class Shifted(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.full((3, 28, 28), 0.5), "text_input": "x", "image_id": shard.keys[i] if i else "new"}

    ds = StoreDataset(Shifted(), store)
    with pytest.raises(FeatureStoreError, match=r"image 'new' is not in feature_store .* built from other training"):
        ds[0]
    assert shard.sums[1] != pytest.approx(0.5 * 3 * 28 * 28)  # the stored image is not the constant one
    with pytest.raises(FeatureStoreError, match=rf"image_id '{shard.keys[1]}': pixels differ from the image stored"):
        ds[1]


def test_cli_build_info_and_user_errors(tmp_path, capsys):
    import yaml

    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"stage": "stage1", "model": "tiny", "train_data": "synthetic", "image_size": 28,
                                      "augment": "none", "max_txt_len": 12}))  # fmt: skip
    assert cli(["build", str(params), "--out", str(tmp_path / "s"), "--shard-size", "100", "-q"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 256
    assert cli(["info", str(tmp_path / "s")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["shards"] == 3 and info["feature_shape"] == [17, 32]
    params.write_text(params.read_text().replace("augment: none", "augment: paper"))
    assert cli(["build", str(params), "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: featstore build: augment='paper'")
    assert not (tmp_path / "s2").exists()
    assert os.path.isdir(tmp_path / "s")


class _Recorder:
    """A vision hook that runs the tower as the model would and keeps what it returned."""

    active = True

    def __init__(self):
        self.seen = []

    def batch(self, image_ids):
        return contextlib.nullcontext()

    def features(self, x, compute):
        out = compute(x)
        self.seen.append(out.detach().clone())
        return out


GPU = pytest.mark.gpu


@pytest.mark.parametrize(
    "device,vit_precision,amp",
    [("cpu", "", "bf16"), pytest.param("cuda", "fp16", "bf16", marks=GPU),
     pytest.param("cuda", "fp16_lavis", "fp16", marks=GPU), pytest.param("cuda", "bf16", "bf16", marks=GPU),
     pytest.param("cuda", "fp32", "bf16", marks=GPU)],  # fp32 tower: it runs under the training autocast
)  # fmt: skip
def test_stored_rows_are_what_the_training_model_computes(tmp_path, device, vit_precision, amp):
    params = _params("stage1", vit_precision=vit_precision, amp=amp, num_workers=2)  # workers decode for the build
    build_store(params, tmp_path / "s", shard_size=100, batch_size=8, device=device)
    store = FeatureStore(tmp_path / "s")
    random.seed(params.seed)  # what train() seeds before it builds the model
    torch.manual_seed(params.seed)
    np.random.seed(params.seed)
    model, _, _ = build_model_and_task(params, torch.device(device))
    model.vision_cache = recorder = _Recorder()
    data = SyntheticImageText(256, 28, seed=params.seed)  # the run's training set (train_data: synthetic)
    pixels = torch.stack([data[i]["image"] for i in range(8)]).to(device)  # the build's first batch of 8
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with torch.no_grad(), torch.autocast(device, dtype=low, enabled=device == "cuda"):  # the engine's autocast
        model.encode_vision(pixels)
    live = recorder.seen[0]  # (8, 17, 32) in the tower's output dtype
    for i in range(8):
        row = store[f"synthetic_{i}"]
        assert row.dtype == live.dtype and torch.equal(row.to(device), live[i]), i
