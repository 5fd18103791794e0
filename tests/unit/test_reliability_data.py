"""Bad data is skipped and counted or refused when the dataset is built, with a message naming file and line / key.

Issue 23 items 5, 6, 7, 10, 15, 16: broken shard members, empty answer / caption lists, files that are not UTF-8,
16-bit greyscale images, cache budgets, streaming readers' memory.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from blip2lib.data import (
    AnnotationError,
    BadSampleLog,
    Collate,
    ManifestDataset,
    RetrievalEvalDataset,
    VQADataset,
    load_annotations,
    make_shard_dataset,
)
from blip2lib.data.images import load_image, to_rgb


def _png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]) -> bytes:
    """Write a plain tar of ``(name, data)`` members (no webdataset writer: the bytes are exactly ours)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# item 5: WebDataset shards


def test_broken_shard_captions_are_skipped_counted_and_named(tmp_path):
    shard = tmp_path / "s.tar"
    _tar(shard, [("ok0.png", _png()), ("ok0.txt", b"a red circle"),
                 ("badjson.png", _png()), ("badjson.json", b'{"captions": ["x",'),
                 ("listjson.png", _png()), ("listjson.json", b'["a", "b"]'),
                 ("latin1.png", _png()), ("latin1.txt", "caf\xe9".encode("latin-1")),
                 ("ok1.png", _png()), ("ok1.json", b'{"caption": "a blue square"}')])  # fmt: skip
    log = BadSampleLog()
    loader = DataLoader(make_shard_dataset([str(shard)], bad_log=log), batch_size=5, collate_fn=Collate(log))
    (batch,) = list(loader)
    assert batch["text_input"] == ["a red circle", "a blue square"]
    assert log.absorb(batch) == 3 and log.total == 3
    reasons = dict(log.paths)
    assert set(reasons) == {f"{shard}:badjson", f"{shard}:listjson", f"{shard}:latin1"}
    assert reasons[f"{shard}:badjson"].startswith(".json member is not valid UTF-8 JSON (Expecting value")
    assert reasons[f"{shard}:listjson"] == ".json member must be an object with 'captions' or 'caption', got a list"
    assert reasons[f"{shard}:latin1"] == ".txt member is not UTF-8 (byte 3: unexpected end of data)"


def test_truncated_shard_warns_and_counts(tmp_path, caplog):
    """6 samples, the tar cut inside the 5th sample's image: 4 samples read, the cut sample and the break counted."""
    shard = tmp_path / "t.tar"
    members = [(f"k{i}.{ext}", _png(i) if ext == "png" else f"caption {i}".encode()) for i in range(6)
               for ext in ("png", "txt")]  # fmt: skip
    data = _tar(shard, members)
    cut = data.index(b"k4.png") + 512 + 40  # header block of k4.png, then 40 bytes of its data
    shard.write_bytes(data[:cut])
    log = BadSampleLog()
    samples = list(make_shard_dataset([str(shard)], bad_log=log))
    assert [s["key"] for s in samples if s is not None] == ["k0", "k1", "k2", "k3"]
    assert sum(s is None for s in samples) == 1  # the break (k4's image never arrived whole, so no k4 sample)
    (where, reason), *rest = log.drain()
    assert where == str(shard) and not rest
    assert reason == "unreadable tar data, rest of the shard skipped (ReadError: unexpected end of data)"
    assert f"skipping unreadable sample {shard} (unreadable tar data" in caplog.text
    batch = Collate(log)(samples)
    assert batch["n_bad"] == 1 and batch["batch_size"] == 4


# ---------------------------------------------------------------------------------------------------------------
# item 6: empty answer / caption lists are refused when the dataset is built


def test_empty_vqa_answers_and_retrieval_captions_fail_at_construction(tmp_path):
    vqa = tmp_path / "vqa.json"
    entry = {"question_id": 1, "question": "what?", "answer": ["red", "red"], "image": "a.png"}
    vqa.write_text(json.dumps([entry, {**entry, "question_id": 2, "answer": []}]))
    with pytest.raises(AnnotationError) as err:
        VQADataset(tmp_path, [vqa])
    assert str(err.value) == f"{vqa}: entry 1: field 'answer' should be a non-empty list of strings, got []"
    ret = tmp_path / "ret.json"
    ret.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}, {"image": "b.png", "caption": ["y"]},
                               {"image": "c.png", "caption": []}]))  # fmt: skip
    with pytest.raises(AnnotationError) as err:
        RetrievalEvalDataset(tmp_path, [ret])
    assert str(err.value) == f"{ret}: entry 2: field 'caption' should be a non-empty list of strings, got []"
    ret.write_text(json.dumps([{"image": "a.png", "caption": ["x", "z"]}]))
    assert RetrievalEvalDataset(tmp_path, [ret]).text == ["x", "z"]  # non-empty lists still load


# ---------------------------------------------------------------------------------------------------------------
# item 7: files that are not UTF-8 name the file and the line


def test_non_utf8_annotation_and_manifest_files_name_file_and_line(tmp_path):
    bad = "caf\xe9".encode("latin-1")  # é in Latin-1: 0xe9, then a byte that cannot continue it
    js = tmp_path / "ann.json"
    js.write_bytes(b'[\n {"image": "a.png", "caption": "ok"},\n {"image": "b.png", "caption": "' + bad + b'"}\n]\n')
    col = len(b' {"image": "b.png", "caption": "caf') + 1
    with pytest.raises(AnnotationError) as err:
        load_annotations(js)
    assert str(err.value) == f"{js}:3: not UTF-8 text (byte 0xe9 at column {col}); re-save the file as UTF-8"
    jl = tmp_path / "ann.jsonl"
    jl.write_bytes(b'{"image": "a.png", "text": "ok"}\n\n{"image": "b.png", "text": "' + bad + b'"}\n')
    for reader in (load_annotations, ManifestDataset):
        with pytest.raises(AnnotationError) as err:
            reader(jl)
        col = len(b'{"image": "b.png", "text": "caf') + 1
        assert str(err.value).startswith(f"{jl}:3: not UTF-8 text (byte 0xe9 at column {col})")
    csv = tmp_path / "m.csv"
    csv.write_bytes(b'image,text\na.png,ok\nb.png,"two\nlines"\nc.png,' + bad + b"\n")
    with pytest.raises(AnnotationError) as err:
        ManifestDataset(csv)
    assert str(err.value).startswith(f"{csv}:5: not UTF-8 text (byte 0xe9 at column 10)")


# ---------------------------------------------------------------------------------------------------------------
# item 10: 16-bit greyscale


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    wide = (np.arange(64, dtype=np.int64).reshape(8, 8) * 1040).astype(np.uint16)  # 0 … 65520
    expected = np.floor(wide.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # v/257 rounded (no .5 ties here)
    path = tmp_path / "grey16.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (8, 8, 3) and (rgb == expected[..., None]).all()
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9  # what PIL alone does
    big = Image.frombytes("I;16B", (8, 8), wide.astype(">u2").tobytes())
    as_int = Image.fromarray(wide.astype(np.int32))
    assert as_int.mode == "I"
    for img in (big, as_int):
        assert (np.asarray(to_rgb(img)) == expected[..., None]).all()
    grey8 = Image.fromarray(expected)  # 8-bit modes are untouched
    assert (np.asarray(to_rgb(grey8))[..., 0] == expected).all()


# ---------------------------------------------------------------------------------------------------------------
# item 16: memory of large annotation files and manifests

# Runs in a fresh interpreter so that RSS belongs to this measurement alone: writes N generated entries, builds the
# dataset, prints bytes per entry (RSS kept, RSS peak, file), then forks a "DataLoader worker" that reads every
# entry and prints the private memory it dirtied per entry (a list of dicts would be copied into it as it is read).
_MEASURE = r"""
import ctypes, gc, json, os, sys
from pathlib import Path
from blip2lib.data import ManifestDataset, VQAEvalDataset
def status(key):
    with open("/proc/self/smaps_rollup" if key == "Private_Dirty" else "/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
def settle():  # what the program holds, not what the allocator kept after a free (varies with the host's load)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
root, kind, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if kind == "manifest":
    path, rows = root / "m.jsonl", ({"image": f"images/{i:09d}.jpg", "text": f"a photo of thing {i} by a red car"}
                                    for i in range(n))
else:
    path = root / ("vqa.json" if kind == "vqa_json" else "vqa.jsonl")
    rows = ({"question_id": i, "question": f"What colour is object {i} on the table?", "dataset": "vqa",
             "image": f"val2014/COCO_val2014_{i:012d}.jpg", "answer": ["red", "blue", "red", "two", "yes"] * 2}
            for i in range(n))
if sys.argv[4] == "write":  # a process of its own: its memory must not count in the measurement's peak
    with open(path, "w") as f:
        if kind == "vqa_json":
            json.dump(list(rows), f)
        else:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    sys.exit(0)
gc.collect()  # no trim here: the build may reuse what the imports freed, as it would in a real run
rss0, anon0 = status("VmRSS"), status("RssAnon")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: the imports' own peak must not count
ds = ManifestDataset(path) if kind == "manifest" else VQAEvalDataset(root, [path])
peak = status("VmHWM")
settle()  # kept: anonymous memory only (code pages first touched while building do not count)
out = {"kept": (status("RssAnon") - anon0) / n, "peak": (max(peak, rss0) - rss0) / n, "file": path.stat().st_size / n}
read, write = os.pipe()
if os.fork() == 0:
    dirty0 = status("Private_Dirty")
    for i in range(len(ds)):
        ds.entry(i) if kind == "manifest" else ds.annotation[i]
    os.write(write, str((status("Private_Dirty") - dirty0) / n).encode())
    os._exit(0)
os.wait()
out["worker_dirty"] = float(os.read(read, 64))
del ds
settle()
import tracemalloc  # the live bytes the dataset holds, exact: RSS also counts memory the allocator keeps after frees
tracemalloc.start()
ds = ManifestDataset(path) if kind == "manifest" else VQAEvalDataset(root, [path])
gc.collect()
out["live"] = tracemalloc.get_traced_memory()[0] / n
print(json.dumps(out))
"""


def _measure(tmp_path, kind: str, n: int) -> dict:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for step in ("write", "measure"):
        proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), kind, str(n), step], env=env, text=True,
                              capture_output=True, timeout=120, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_caption_manifest_memory_is_8_bytes_a_row(tmp_path):
    """10M-caption manifest budget: 12 bytes a row kept and at the peak (≤ 120 MB), ~0 per DataLoader worker."""
    m = _measure(tmp_path, "manifest", 100_000)
    assert m["live"] <= 9, m  # the int64 offset array (8 bytes a row); rows are re-read from the file
    assert m["kept"] <= 12 and m["peak"] <= 12, m
    assert m["worker_dirty"] <= 8, m


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vqa_jsonl", "vqa_json"])
def test_vqa_evaluation_memory_per_question(tmp_path, kind):
    """200k-question budget: live ≤ 1.5× the file (~70 MB), RSS kept ≤ 3×; peak ≤ 3× the file streamed from JSONL,
    ≤ 4 KB a question (≤ 800 MB) from a JSON list (parsed whole); a forked worker reading every entry dirties ≤ 64 B
    each."""
    m = _measure(tmp_path, kind, 30_000)
    assert m["live"] <= 1.5 * m["file"], m  # one compact copy of the entries, plus the offsets
    assert m["kept"] <= 3 * m["file"], m  # RSS: what the allocator keeps after the parse varies with the host's load
    assert m["peak"] <= (3 * m["file"] if kind == "vqa_jsonl" else 4096), m
    assert m["worker_dirty"] <= 64, m


# ---------------------------------------------------------------------------------------------------------------
# item 15: image / feature caches: shared by DataLoader workers, capped by cache_max_gib


def _caption_files(root, n: int) -> None:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "ann.json").write_text(json.dumps([{"image": f"{i}.png", "caption": "a photo"} for i in range(n)]))


def _cache_params(root, **kw):
    from blip2lib.train import TrainParams

    base = dict(stage="stage1", model="tiny", train_data="ann.json", data_root=str(root), images_root="images",
                cache_images=True, augment="none", batch_size=4, num_workers=2, image_size=16)  # fmt: skip
    return TrainParams(**{**base, **kw})


def test_cache_images_decodes_each_image_once_across_workers_and_epochs(tmp_path, monkeypatch):
    import torch

    import blip2lib.data.readers as readers_mod
    from blip2lib.assemble import build_data
    from blip2lib.data import image_eval_transform

    _caption_files(tmp_path, 12)
    decodes = tmp_path / "decodes.txt"  # appended by whichever process decodes (forked workers inherit the patch)
    real = readers_mod.load_image

    def counting(path, log=None):
        with open(decodes, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        return real(path, log)

    monkeypatch.setattr(readers_mod, "load_image", counting)
    data = build_data(_cache_params(tmp_path), {}, torch.device("cpu"))
    seen = [b for epoch in range(3) for b in data["loader_factory"](12 * epoch)]  # 3 epochs, fresh workers each
    assert len(seen) == 9 and sum(b["batch_size"] for b in seen) == 36
    lines = decodes.read_text().splitlines()
    assert len(lines) == 12 and len({ln.split()[1] for ln in lines}) == 12  # once per image, not 36 (or 24)
    assert len({ln.split()[0] for ln in lines}) == 2  # decoded in the two workers, then read from shared memory
    cache = data["dataset"].image_cache
    assert int(cache.decoded) == 12 and len(cache) == 12
    tf = image_eval_transform(16)
    for i in (0, 7, 11):
        want = tf(Image.open(tmp_path / "images" / f"{i}.png").convert("RGB"))
        assert torch.equal(cache[f"{i}.png"], want)


def test_caches_over_budget_are_refused_with_the_numbers(tmp_path):
    import torch

    from blip2lib.assemble import build_data
    from blip2lib.config import tiny_config
    from blip2lib.featcache import VisionFeatureCache

    _caption_files(tmp_path, 12)
    per_image = 3 * 16 * 16 * 4  # float32 (3, 16, 16)
    budget = 11.5 * per_image / 2**30
    with pytest.raises(ValueError) as err:
        build_data(_cache_params(tmp_path, cache_max_gib=budget), {}, torch.device("cpu"))
    need = 12 * per_image / 2**30
    said = (f"cache_images: 12 distinct images of (3, 16, 16) float32 need {need:.2f} GiB, over the cache_max_gib "
            f"budget of {budget:.2f} GiB; turn cache_images off or raise cache_max_gib")  # fmt: skip
    assert str(err.value) == said
    vision = tiny_config(image_size=16).vision
    feat = 12 * ((16 // vision.patch_size) ** 2 + 1) * vision.width * 4  # (tokens, width) float32 per image
    params = _cache_params(tmp_path, cache_images=False, cache_vision_features=True, cache_max_gib=0.99 * feat / 2**30)
    with pytest.raises(ValueError, match=r"^cache_vision_features: 12 distinct training images need about"):
        build_data(params, {"config": tiny_config(image_size=16)}, torch.device("cpu"))
    cache = VisionFeatureCache(max_bytes=2.5 * 5 * 8 * 4)  # room for 2 images of (5, 8) float32 features
    with cache.batch([1, 2]):
        cache.features(torch.ones(2, 3, 4, 4), lambda x: torch.zeros(x.shape[0], 5, 8))
    with cache.batch([3]), pytest.raises(MemoryError, match=r"^cache_vision_features: 3 images × 0.00 MiB"):
        cache.features(torch.full((1, 3, 4, 4), 2.0), lambda x: torch.zeros(x.shape[0], 5, 8))


def test_shared_image_cache_checks_dev_shm_first(monkeypatch):
    import blip2lib.data.images as images_mod
    from blip2lib.data import SharedImageCache

    monkeypatch.setattr(images_mod, "shm_free_bytes", lambda: 1000)
    with pytest.raises(ValueError, match=r"^cache_images: 0.00 GiB of shared memory needed .* /dev/shm has 0.00 GiB"):
        SharedImageCache(["a", "b"], (3, 16, 16), 2**30)  # 6 KiB > 1000 bytes free
    cache = SharedImageCache(["a", "b", "a"], (3, 16, 16), 2**30, shared=False)  # one process: no /dev/shm needed
    assert len(cache.slot) == 2 and len(cache) == 0 and "a" not in cache


def test_each_rank_resumes_at_its_own_data_position(tmp_path, monkeypatch):
    """Item 2 with several ranks: a rank that passed over an empty batch is 2 samples ahead; the checkpoint keeps
    every rank's position and each rank resumes at its own (simulated ranks: the collectives are patched)."""
    import torch

    from blip2lib import dist, engine

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return {"loss": (self.w * batch["x"]).sum()}

    calls = []

    def factory(position):
        calls.append(position)
        while True:
            yield {"batch_size": 2, "n_bad": 0, "x": torch.ones(2)}

    def run(rank: int, steps: int) -> dict:
        calls.clear()
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        task = Task()
        return engine.run_loop(task, factory, torch.optim.SGD(task.parameters(), lr=0.1), lambda s: 0.1, steps=steps,
                               log_path=None, ckpt_dir=tmp_path / "ck", ckpt_every=3, progress=False)  # fmt: skip

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, obj + 2 if isinstance(obj, int) else obj])
    assert run(0, 3)["position"] == 6 and calls == [0]
    # a longer run resumes at step 3: rank 0 at its 6 samples, rank 1 at the 8 it had reached
    for rank, want in ((0, 6), (1, 8)):
        out = run(rank, 4)
        assert calls == [want] and out["position"] == want + 2 and out["resumed_from"].endswith("ckpt-3")
        if rank == 0:
            shutil.rmtree(tmp_path / "ck" / "ckpt-4")  # rank 0's end-of-run save: resume rank 1 from ckpt-3 too
