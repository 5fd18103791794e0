"""WebDataset shards: written with ShardWriter, read through DataLoader workers, split by rank, resampled."""

import io
import json
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from blip2lib.data import BadSampleLog, Collate, image_eval_transform, make_shard_dataset, write_shards


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (10, 7), (20 * i % 256, 50, 90)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """3 shards × 4 samples: s03 has two captions (json), s07 a corrupt image."""
    pattern = str(tmp_path / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as sink:
        for i in range(12):
            sample = {"__key__": f"s{i:02d}", "jpg": _jpeg(i), "txt": f"caption {i}"}
            if i == 3:
                sample["json"] = json.dumps({"captions": ["first of 3", "second of 3"]})
            if i == 7:
                sample["jpg"] = b"\xff\xd8 definitely not a jpeg"
            sink.write(sample)
    urls = sorted(str(p) for p in tmp_path.glob("shard-*.tar"))
    assert len(urls) == 3
    return urls


def test_each_sample_once_per_epoch_with_two_workers(shards):
    log = BadSampleLog()
    ds = make_shard_dataset(shards, image_eval_transform(8), bad_log=log, rank=0, world_size=1)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collate(log))
    for _epoch in range(2):
        keys = Counter()
        for batch in loader:
            log.absorb(batch)
            if batch["batch_size"]:
                assert batch["image"].shape == (batch["batch_size"], 3, 8, 8)
                keys.update(batch["key"])
                for key, text in zip(batch["key"], batch["text_input"]):
                    expected = {"first of 3", "second of 3"} if key == "s03" else {f"caption {int(key[1:])}"}
                    assert text in expected
        assert keys == Counter({f"s{i:02d}": 1 for i in range(12) if i != 7})
    assert log.total == 2  # the corrupt s07, once per epoch
    assert log.paths[0][0].endswith("shard-000001.tar:s07")


def test_non_resampled_rank_split_is_a_partition(shards):
    seen = []
    for rank in range(2):
        ds = make_shard_dataset(shards, rank=rank, world_size=2)
        seen.append({s["key"] for s in ds if s is not None})
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == {f"s{i:02d}" for i in range(12) if i != 7}
    assert seen[1] == {"s04", "s05", "s06"}  # shard 1 (s04–s07, s07 corrupt) goes to rank 1


def test_resampled_across_two_fake_ranks(shards):
    def stream(rank, workers):
        ds = make_shard_dataset(shards, resampled=True, epoch_samples=10, seed=5, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda s: s)
        return [s["key"] if s is not None else None for s in loader]

    valid = {f"s{i:02d}" for i in range(12)} | {None}
    r0, r1 = stream(0, 0), stream(1, 0)
    assert len(r0) == len(r1) == 10 and set(r0) <= valid and set(r1) <= valid
    assert r0 == stream(0, 0)  # deterministic per (seed, rank, worker)
    assert r0 != r1  # ranks draw different shard streams
    two = stream(0, 2)
    assert len(two) == 20  # epoch_samples is per worker
    with pytest.raises(ValueError, match="epoch_samples"):
        make_shard_dataset(shards, resampled=True)


def test_write_shards_roundtrip(tmp_path):
    items = [(f"k{i}", Image.new("RGB", (6, 6), (i * 30, 0, 0)), [f"a{i}", f"b{i}"]) for i in range(5)]
    urls = write_shards(items, str(tmp_path / "out" / "%04d.tar"), maxcount=2)
    assert [u.rsplit("/", 1)[-1] for u in urls] == ["0000.tar", "0001.tar", "0002.tar"]
    got = {s["key"]: s["text_input"] for s in make_shard_dataset(urls, text_processor=str.upper, rank=0, world_size=1)}
    assert set(got) == {f"k{i}" for i in range(5)}
    assert all(got[f"k{i}"] in {f"A{i}", f"B{i}"} for i in range(5))
