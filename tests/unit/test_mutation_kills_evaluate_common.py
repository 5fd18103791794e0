"""The shared machinery of the evaluation drivers (blip2lib/evaluate/drivers_common.py), pinned piece by piece.

The mutation pass (docs/mutation.md) showed these unpinned: the shard bounds, the collate's index lists, the result
JSON's environment block, the cache file's layout on disk (meta line, newline after a cut tail, fsync per batch),
the DataLoader and progress-bar settings, the autocast dtype, the stats and the merge of ranks. Every expected value
is written out by hand from the definition in the module docstring; the stub model answers with the pixel value of
each image, so which item was generated is visible in its text.
"""

import json
import logging
import os
import platform
from importlib import metadata

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from blip2lib.data.images import BadSampleLog
from blip2lib.evaluate import drivers_common as dc

META = {"task": "vqa", "split": "val", "n_items": 5, "decoding": {"num_beams": (1, 2)}}
META_JSON = {"task": "vqa", "split": "val", "n_items": 5, "decoding": {"num_beams": [1, 2]}}  # tuple -> JSON list


class Images(Dataset):
    """``n`` items; image ``i`` is a (3, 2, 2) tensor filled with ``i``; items in ``bad`` are unreadable (None)."""

    def __init__(self, n, bad=(), bad_log=None, question=False):
        self.n, self.bad, self.question = n, set(bad), question
        if bad_log is not None:  # a dataset need not have the attribute at all
            self.bad_log = bad_log

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            if hasattr(self, "bad_log"):
                self.bad_log.record(f"img{i}.jpg", "broken")
            return None
        item = {"image": torch.full((3, 2, 2), float(i)), "image_id": 10 + i}
        if self.question:
            item["text_input"] = f"q{i}"
        return item


class Echo(nn.Module):
    """``generate`` answers ``"<prompt>:<pixel value>"`` per image and records how it was called."""

    def __init__(self, embeddings=None, on_call=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.embeddings, self.on_call, self.calls = embeddings, on_call, []

    def generate(self, pixel_values, prompts, **kw):
        amp = torch.is_autocast_enabled("cpu")
        self.calls.append({"prompts": list(prompts), "kw": kw, "shape": tuple(pixel_values.shape),
                           "grad": torch.is_grad_enabled(), "training": self.training,
                           "amp": torch.get_autocast_dtype("cpu") if amp else None})  # fmt: skip
        if self.on_call is not None:
            self.on_call(len(self.calls))
        return [f"{p}:{int(x[0, 0, 0])}" for p, x in zip(prompts, pixel_values)]


def prompts(batch):
    return ["P"] * batch["batch_size"]


def record(batch, j):
    return {"id": int(batch["image_id"][j])}


def run(model, ds, out, meta=META, batch_size=2, **kw):
    return dc.generation_pass(model, ds, out, meta, batch_size, prompts, record, {"num_beams": 3}, progress=False, **kw)


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# sharding, subset, collate, device


def test_shard_range_bounds_by_hand():
    # [r*N//W, (r+1)*N//W): 10 items over 3 ranks -> 0..3, 3..6, 6..10; 2 over 4 -> 0, 0, 1, 1 items
    assert [dc.shard_range(10, r, 3) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    assert [dc.shard_range(2, r, 4) for r in range(4)] == [range(0, 0), range(0, 1), range(1, 1), range(1, 2)]
    assert dc.shard_range(7, 0, 1) == range(0, 7)


def test_indexed_subset_and_collate_keep_dataset_indices():
    ds = Images(6, bad={4})
    sub = dc.IndexedSubset(ds, (5, 4, 1))
    assert len(sub) == 3 and sub[0][0] == 5 and sub[1] == (4, None) and float(sub[2][1]["image"][0, 0, 0]) == 1.0
    log = BadSampleLog()
    ds.bad_log = log
    batch = dc.IndexedCollate(log)([sub[0], sub[1], sub[2]])
    assert batch["index"] == [5, 1] and batch["bad_index"] == [4] and batch["batch_size"] == 2
    assert batch["bad_samples"] == [("img4.jpg", "broken")] and batch["image_id"].tolist() == [15, 11]
    assert dc.IndexedCollate().bad_log is None


def test_model_device_is_the_first_parameters_and_cpu_without_any():
    assert dc.model_device(nn.Module()) == torch.device("cpu")
    assert dc.model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


# ----------------------------------------------------------------------------------------------------------------
# environment block of result.json


class ThreeTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Linear(1, 1).half()
        self.qformer = nn.Linear(1, 1).to(torch.bfloat16)
        self.language_model = "not a module"  # skipped: only modules are asked for a dtype


def test_environment_info_fields(monkeypatch):
    def version(name):
        if name == "timm":
            raise metadata.PackageNotFoundError(name)
        return f"v-{name}"

    monkeypatch.setattr(metadata, "version", version)
    info = dc.environment_info(ThreeTowers(), "bf16")
    assert info == {
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers":
                     "v-transformers", "timm": None, "tokenizers": "v-tokenizers", "pycocoevalcap": "v-pycocoevalcap",
                     "blip2lib": "v-blip2lib", "cuda": torch.version.cuda},
        "device": "cpu",
        "precision": {"autocast": "bf16", "vision_model": "float16", "qformer": "bfloat16"},
        "world_size": 1,
    }  # fmt: skip
    assert list(info["versions"]) == ["python", "torch", "transformers", "timm", "tokenizers", "pycocoevalcap",
                                      "blip2lib", "cuda"]  # fmt: skip
    assert dc.environment_info(nn.Module())["precision"] == {"autocast": "off"}
    llm_only = nn.Module()
    llm_only.vision_model = nn.ReLU()  # a tower without parameters: no entry
    llm_only.language_model = nn.Linear(1, 1).double()
    assert dc.environment_info(llm_only)["precision"] == {"autocast": "off", "language_model": "float64"}


def test_environment_info_names_a_cuda_device(monkeypatch):
    asked = []
    monkeypatch.setattr(dc, "model_device", lambda m: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: asked.append(d) or "Fake GPU")
    info = dc.environment_info(nn.Module())
    assert (info["device"], info["device_name"], asked) == ("cuda:1", "Fake GPU", [torch.device("cuda", 1)])


# ----------------------------------------------------------------------------------------------------------------
# the cache files


def test_load_cache_reads_every_rank_file_and_skips_cut_lines(tmp_path, caplog):
    meta_line = json.dumps({"meta": META_JSON})
    (tmp_path / "predictions.0.jsonl").write_text(
        f'{meta_line}\n{{"index": "3", "id": 13, "text": "a"}}\n{{"index": 0, "te\n{{"index": 1, "bad": "x"}}\n'
    )
    (tmp_path / "predictions.1.jsonl").write_text(f'{meta_line}\n{{"index": 4, "id": 14, "text": "b"}}\n')
    (tmp_path / "predictions.json").write_text('{"index": 2, "text": "not a cache file"}\n')
    (tmp_path / "predictions.2.txt").write_text('{"index": 2, "text": "not a cache file"}\n')
    with caplog.at_level(logging.WARNING, logger=dc.__name__):
        got = dc.load_cache(tmp_path, META)  # the tuple in META compares equal to the JSON list on disk
    assert got == {3: {"index": "3", "id": 13, "text": "a"}, 1: {"index": 1, "bad": "x"},
                   4: {"index": 4, "id": 14, "text": "b"}}  # fmt: skip
    assert caplog.messages == [f"{tmp_path / 'predictions.0.jsonl'}:3: ignoring an unreadable (truncated) cache line"]
    assert dc.load_cache(tmp_path / "missing", META) == {}


def test_load_cache_refuses_another_recipe_with_the_file_named(tmp_path):
    path = tmp_path / "predictions.0.jsonl"
    path.write_text(json.dumps({"meta": {"task": "caption"}}) + "\n")
    want = (f"{path} holds predictions made under another cache key (changed: task); use a fresh out_dir or move "
            "the predictions.*.jsonl files away to start over")  # fmt: skip
    with pytest.raises(dc.CacheMismatchError) as err:
        dc.load_cache(tmp_path, {"task": "vqa"})
    assert str(err.value) == want and err.value.changed == ["task"]


def test_cache_file_layout_meta_first_then_rows(tmp_path):
    out = tmp_path / "new" / "folder"  # created with its parents
    records, stats = run(Echo(), Images(3, bad={1}), out)
    rows = [{"index": 0, "id": 10, "text": "P:0"}, {"index": 1, "bad": "<unknown>: sample was None"},
            {"index": 2, "id": 12, "text": "P:2"}]  # fmt: skip
    assert lines(out / "predictions.0.jsonl") == [{"meta": META_JSON}, rows[1], rows[0], rows[2]]
    assert records == {0: rows[0], 1: rows[1], 2: rows[2]}
    assert (stats["generated_this_run"], stats["from_cache"]) == (2, 0)


def test_empty_cache_file_gets_the_meta_line(tmp_path):
    (tmp_path / "predictions.0.jsonl").write_text("")
    run(Echo(), Images(1), tmp_path)
    assert lines(tmp_path / "predictions.0.jsonl") == [{"meta": META_JSON}, {"index": 0, "id": 10, "text": "P:0"}]


@pytest.mark.parametrize("tail", ['{"index": 1, "te', ""])
def test_resume_appends_after_a_cut_tail_on_a_new_line(tmp_path, tail):
    head = json.dumps({"meta": META_JSON}) + "\n" + json.dumps({"index": 0, "id": 10, "text": "old"}) + "\n"
    path = tmp_path / "predictions.0.jsonl"
    path.write_text(head + tail)
    model = Echo()
    records, stats = run(model, Images(2), tmp_path)
    assert path.read_text() == head + (tail + "\n" if tail else "") + '{"index": 1, "id": 11, "text": "P:1"}\n'
    assert records == {0: {"index": 0, "id": 10, "text": "old"}, 1: {"index": 1, "id": 11, "text": "P:1"}}
    assert [c["prompts"] for c in model.calls] == [["P"]]
    assert (stats["generated_this_run"], stats["from_cache"]) == (1, 1)


def test_each_batch_is_flushed_and_fsynced_before_the_next(tmp_path, monkeypatch):
    path = tmp_path / "predictions.0.jsonl"
    seen, synced = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    run(Echo(on_call=lambda n: seen.append(len(path.read_text().splitlines()))), Images(3), tmp_path)
    # nothing is on disk before the first batch's flush (the meta line waits in the buffer); meta + the two rows of
    # batch 1 are on disk while batch 2 is generated
    assert seen == [0, 3]
    assert len(synced) == 2 and all(isinstance(fd, int) for fd in synced)


# ----------------------------------------------------------------------------------------------------------------
# the generation loop


def test_loop_settings_modes_and_bad_sample_reasons(tmp_path, monkeypatch):
    loaders = []

    def loader(*args, **kw):
        loaders.append(kw)
        return DataLoader(*args, **kw)

    monkeypatch.setattr(dc, "DataLoader", loader)
    log = BadSampleLog()
    model = Echo().train()
    records, _ = run(model, Images(4, bad={0, 1}, bad_log=log), tmp_path)  # num_workers: the default, 0
    kw = loaders[0]
    assert (kw["batch_size"], kw["shuffle"], kw["num_workers"], kw["pin_memory"]) == (2, False, 0, False)
    assert isinstance(kw["collate_fn"], dc.IndexedCollate) and kw["collate_fn"].bad_log is log
    # batch 1 = two unreadable images: no generate call; their reasons come from the shared log
    assert [records[i] for i in (0, 1)] == [{"index": i, "bad": f"img{i}.jpg: broken"} for i in (0, 1)]
    assert log.total == 2 and log.paths == [("img0.jpg", "broken"), ("img1.jpg", "broken")]
    assert model.calls == [{"prompts": ["P", "P"], "kw": {"num_beams": 3}, "shape": (2, 3, 2, 2), "grad": False,
                            "training": False, "amp": None}]  # fmt: skip
    assert model.training  # train mode restored


@pytest.mark.parametrize(("autocast", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), (None, None)])
def test_autocast_dtype(tmp_path, autocast, dtype):
    model = Echo().eval()
    run(model, Images(1), tmp_path, autocast=autocast)
    assert model.calls[0]["amp"] == dtype and not model.training  # an eval-mode model stays in eval mode


def test_questions_enter_only_a_model_with_embeddings(tmp_path):
    with_emb, without = Echo(embeddings=nn.Identity()), Echo()
    run(with_emb, Images(2, question=True), tmp_path / "a")
    run(without, Images(2, question=True), tmp_path / "b")
    assert with_emb.calls[0]["kw"] == {"num_beams": 3, "questions": ["q0", "q1"]}
    assert without.calls[0]["kw"] == {"num_beams": 3}
    no_question = Echo(embeddings=nn.Identity())
    run(no_question, Images(1), tmp_path / "c")
    assert no_question.calls[0]["kw"] == {"num_beams": 3}


class Bar:
    """Stands in for tqdm: records its arguments, updates and close."""

    made: list = []

    def __init__(self, **kw):
        self.kw, self.updates, self.closed = kw, [], False
        Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


@pytest.mark.parametrize(("rank", "progress", "meta", "desc", "disable"), [
    (0, True, META, "vqa val", False), (0, False, META, "vqa val", True), (1, True, {}, "eval", True)])  # fmt: skip
def test_shard_log_line_and_progress_bar(tmp_path, monkeypatch, caplog, rank, progress, meta, desc, disable):
    import tqdm.auto

    Bar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(dc.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dc.dist, "get_world_size", lambda: 2)
    model = Echo()
    progress_kw = {} if progress else {"progress": False}  # the default is a bar
    with caplog.at_level(logging.INFO, logger=dc.__name__):
        records, stats = dc.generation_pass(model, Images(5, bad={3}), tmp_path, meta, 2, prompts, record, {},
                                            **progress_kw)  # fmt: skip
    # rank 0 of 2 owns items 0, 1; rank 1 owns 2, 3, 4 (3 is unreadable)
    mine = [0, 1] if rank == 0 else [2, 3, 4]
    assert sorted(records) == mine and (tmp_path / f"predictions.{rank}.jsonl").exists()
    assert caplog.messages == [f"rank {rank}/2: {len(mine)} items, 0 cached, {len(mine)} to generate"]
    (bar,) = Bar.made
    assert bar.kw == {"total": len(mine), "unit": "item", "desc": desc, "disable": disable} and bar.closed
    assert bar.updates == ([2] if rank == 0 else [2, 1])  # kept + unreadable items per batch
    assert stats["generated_this_run"] == len(mine) - (rank == 1)


def test_stats_timing(tmp_path, monkeypatch):
    ticks = iter([100.0, 102.5])
    monkeypatch.setattr(dc.time, "perf_counter", lambda: next(ticks))
    _, stats = run(Echo(), Images(4), tmp_path / "a")
    assert stats == {"generated_this_run": 4, "from_cache": 0, "wall_s": 2.5, "items_per_s": 1.6, "superseded": None}
    ticks = iter([10.0, 10.0123])  # under a second: 3 decimals kept
    monkeypatch.setattr(dc.time, "perf_counter", lambda: next(ticks))
    _, stats = run(Echo(), Images(4), tmp_path / "b")
    assert (stats["wall_s"], stats["items_per_s"]) == (0.012, 325.203)  # 4 / 0.0123 = 325.2033
    monkeypatch.setattr(dc.time, "perf_counter", lambda: 7.0)  # no measurable time: no rate
    _, stats = run(Echo(), Images(4), tmp_path / "a")
    assert stats == {"generated_this_run": 0, "from_cache": 4, "wall_s": 0.0, "items_per_s": None, "superseded": None}


# ----------------------------------------------------------------------------------------------------------------
# merging ranks, result files


def test_gather_records_merges_sorted_and_sums(monkeypatch):
    s0 = {"generated_this_run": 2, "from_cache": 1, "wall_s": 1.5}
    s1 = {"generated_this_run": 3, "from_cache": 0, "wall_s": 4.0}
    parts = [({2: {"index": 2}, 0: {"index": 0}}, s0), ({1: {"index": 1}}, s1)]
    monkeypatch.setattr(dc.dist, "all_gather_object", lambda obj: parts)
    rows, total = dc.gather_records({}, {})
    assert rows == [{"index": 0}, {"index": 1}, {"index": 2}]
    assert total == {"generated_this_run": 5, "from_cache": 1, "wall_s": 4.0, "per_rank": [s0, s1], "superseded": None}


def test_write_json_is_indented_with_str_fallback(tmp_path):
    path = dc.write_json({"a": [1, tmp_path.name]}, tmp_path / "x" / "y" / "r.json")
    assert path == tmp_path / "x" / "y" / "r.json"
    assert path.read_text() == '{\n  "a": [\n    1,\n    "' + tmp_path.name + '"\n  ]\n}'
    assert json.loads(dc.write_json({"p": tmp_path}, tmp_path / "p.json").read_text()) == {"p": str(tmp_path)}


def test_pinned_memory_on_a_cuda_model(tmp_path, monkeypatch):
    loaders = []

    def loader(*args, **kw):
        loaders.append(kw)
        raise LookupError("stop before any tensor moves to the GPU")

    monkeypatch.setattr(dc, "model_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(dc, "DataLoader", loader)
    with pytest.raises(LookupError):
        run(Echo(), Images(1), tmp_path)
    assert loaders[0]["pin_memory"] is True
