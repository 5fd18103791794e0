"""The single training entry point on tiny models: every stage runs, stage hand-off, exact resume."""

import json

import pytest
import torch

from blip2lib import tasks as tasks_mod
from blip2lib.train import TrainParams, train

torch.set_num_threads(2)


def _params(stage, **kw):
    base = dict(
        stage=stage,
        model="tiny",
        train_data="synthetic",
        val_data="synthetic",
        val_images=8,
        steps=4,
        batch_size=4,
        warmup_steps=1,
        image_size=28,
        max_txt_len=12,
        progress=False,
        ckpt_every=2,
        eval_every=2,
        freeze_vit=stage in ("stage1", "stage2"),
    )
    base.update(kw)
    return TrainParams(**base)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_then_stage2_handoff(tmp_path):
    r1 = train(_params("stage1"), tmp_path / "s1")
    log = [json.loads(x) for x in (tmp_path / "s1" / "log.jsonl").read_text().splitlines()]
    log = [rec for rec in log if "loss" in rec]  # eval records are interleaved
    assert [rec["step"] for rec in log] == [1, 2, 3, 4] and all("itc_loss" in rec and "lr" in rec for rec in log)
    val = [json.loads(line) for line in (tmp_path / "s1" / "val.jsonl").read_text().splitlines()]
    assert {"val_txt_r1_itc", "val_img_r5_itm_itc", "val_itm_acc"} <= set(val[0])
    r2 = train(_params("stage2", llm="opt", init_from=str(tmp_path / "s1")), tmp_path / "s2")
    init = r2.summary["init"]
    # docs/paper_map.md §3.4: the query path comes from stage 1; text FFN, word embeddings and heads are dropped; the
    # projection starts fresh
    assert any(k.startswith("qformer.encoder.layer.0.crossattention") for k in r1.model.state_dict())
    assert "temp" in init["dropped"] and "itm_head.weight" in init["dropped"]
    assert any(k.startswith("embeddings.word_embeddings") for k in init["dropped"])
    assert any(".intermediate.dense" in k for k in init["dropped"])
    assert set(init["fresh"]) == {"language_projection.weight", "language_projection.bias"}
    s1 = r1.model.state_dict()
    assert torch.equal(r2.model.query_tokens.detach(), s1["query_tokens"]) is False  # trained further in stage 2
    v = [json.loads(line) for line in (tmp_path / "s2" / "val.jsonl").read_text().splitlines()]
    assert {"val_lm_loss", "val_lm_loss_shuffled", "val_caption_diversity"} <= set(v[-1])


@pytest.mark.parametrize("stage,llm", [("caption_ft", "t5"), ("vqa_ft", "opt"), ("retrieval_ft", "opt")])
def test_finetune_stages_run(tmp_path, stage, llm):
    r = train(_params(stage, llm=llm, steps=2, prompt="a photo of" if stage == "caption_ft" else ""), tmp_path)
    assert r.summary["step"] == 2 and torch.isfinite(torch.tensor(r.summary["last"]["loss"]))
    vit_trainable = any(p.requires_grad for p in r.model.vision_model.parameters())
    assert vit_trainable  # fine-tuning unfreezes the ViT (fp32, docs/paper_map.md §4)
    assert next(r.model.vision_model.parameters()).dtype == torch.float32


def test_killed_run_resumes_exactly(tmp_path, monkeypatch):
    full = train(_params("stage1", steps=6, eval_every=0, val_data=""), tmp_path / "full")
    calls = {"n": 0}
    original = tasks_mod.Stage1Task.forward

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # dies during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    monkeypatch.setattr(tasks_mod.Stage1Task, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_params("stage1", steps=6, eval_every=0, val_data=""), tmp_path / "killed")
    monkeypatch.setattr(tasks_mod.Stage1Task, "forward", original)
    resumed = train(_params("stage1", steps=6, eval_every=0, val_data=""), tmp_path / "killed")
    assert resumed.summary["resumed_from"] is not None
    a, b = _trainable(full.model), _trainable(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x).get("loss") for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x).get("loss") for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert la == lb


def test_unknown_stage_is_rejected():
    with pytest.raises(ValueError, match="stage must be one of"):
        train(_params("stage3"))
    with pytest.raises(ValueError, match="text_padding must be max_length or longest"):
        train(_params("stage1", text_padding="right"))


def test_text_padding_reaches_the_stage1_task(tmp_path):
    from blip2lib.assemble import build_model_and_task

    _, task, _ = build_model_and_task(_params("stage1", steps=1, text_padding="longest"), torch.device("cpu"))
    assert task.text_padding == "longest"


def test_vqa_finetune_takes_query_path_from_stage2_and_text_path_from_stage1(tmp_path):
    train(_params("stage1", steps=2), tmp_path / "s1")
    train(_params("stage2", llm="opt", steps=2, init_from=str(tmp_path / "s1")), tmp_path / "s2")
    r = train(_params("vqa_ft", llm="opt", steps=1, init_from=f"{tmp_path / 's2'},{tmp_path / 's1'}"), tmp_path / "v")
    init = r.summary["init"]
    # only the ViT (trained in fine-tuning, loaded from its own tower file) is not in the two checkpoints
    assert len(init["files"]) == 2 and all(k.startswith("vision_model.") for k in init["fresh"])
    assert "language_projection.weight" in init["keys"] and "embeddings.word_embeddings.weight" in init["keys"]
    assert any(".intermediate.dense" in k for k in init["keys"])  # the text FFN comes from stage 1


# ---------------------------------------------------------------------------------------------------------------
# tar-shard training data (paper §3.4 web data) and TensorBoard


def _write_shards(folder, n=14, bad=(5,)):
    """``n`` random 28-px JPEG samples with captions over the tiny vocabulary; ``bad`` indices hold broken bytes."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from blip2lib.toy.synthetic import WORDS

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(folder / "part-%04d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(buf, format="JPEG")
            words = [WORDS[j] for j in rng.integers(0, len(WORDS) - 4, 4)]
            sink.write({"__key__": f"k{i:03d}", "jpg": b"\xff\xd8 broken" if i in bad else buf.getvalue(),
                        "txt": " ".join(words)})  # fmt: skip
    return sorted(p.name for p in folder.glob("*.tar"))


def _shard_params(root, **kw):
    base = dict(train_data="shards/part-{0000..0002}.tar", data_root=str(root), shard_epoch_samples=12,
                shuffle_buffer=4, steps=7, eval_every=0, val_data="", augment="none")  # fmt: skip
    return _params("stage1", **{**base, **kw})


def test_shard_training_resumes_exactly_across_epochs(tmp_path, monkeypatch):
    assert _write_shards(tmp_path / "shards") == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]
    # 12 samples per epoch, batch 4: 3 steps per epoch, so 7 steps cross two epoch boundaries
    full = train(_shard_params(tmp_path), tmp_path / "full")
    recs = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["position"] for r in recs] == [4 * (i + 1) for i in range(7)]
    assert full.summary["bad_samples"] >= 1  # the broken JPEG was drawn (resampled shards) and skipped, not fatal
    calls = {"n": 0}
    original = tasks_mod.Stage1Task.forward

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # dies in step 6: last checkpoint at step 4, mid-way through the second epoch
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    monkeypatch.setattr(tasks_mod.Stage1Task, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_shard_params(tmp_path), tmp_path / "killed")
    monkeypatch.setattr(tasks_mod.Stage1Task, "forward", original)
    resumed = train(_shard_params(tmp_path), tmp_path / "killed")
    assert resumed.summary["resumed_from"].endswith("ckpt-4")
    a, b = _trainable(full.model), _trainable(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lb = [json.loads(x) for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs] == [r["loss"] for r in lb]


def test_shard_epochs_differ_and_bad_params_are_named(tmp_path):
    from blip2lib.assemble import build_data, is_shard_spec

    _write_shards(tmp_path / "shards", bad=())
    assert is_shard_spec("a/{000..009}.tar") and is_shard_spec("x.tar, y.tar") and not is_shard_spec("ann.json")
    data = build_data(_shard_params(tmp_path), {}, torch.device("cpu"))
    texts = [t for batch in data["loader_factory"](0) for t in batch["text_input"]]
    again = [t for batch in data["loader_factory"](12) for t in batch["text_input"]]  # the next epoch
    assert len(texts) == len(again) == 12 and texts != again
    resumed = [t for batch in data["loader_factory"](8) for t in batch["text_input"]]
    assert resumed == texts[8:]  # a position inside an epoch continues that epoch's stream exactly
    # two DataLoader workers: 12 // 2 workers = 6 -> 4 whole-batch samples each, so an epoch is 8 samples
    two = build_data(_shard_params(tmp_path, num_workers=2), {}, torch.device("cpu"))["loader_factory"]
    texts2 = [t for batch in two(0) for t in batch["text_input"]]
    assert len(texts2) == 8 and [t for batch in two(4) for t in batch["text_input"]] == texts2[4:]
    with pytest.raises(ValueError, match="set shard_epoch_samples"):
        build_data(_shard_params(tmp_path, shard_epoch_samples=0), {}, torch.device("cpu"))
    with pytest.raises(ValueError, match="stage retrieval_ft needs annotation files"):
        p = _shard_params(tmp_path)
        p.stage = "retrieval_ft"
        build_data(p, {}, torch.device("cpu"))


def test_tensorboard_mirrors_the_jsonl_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_params("stage1", steps=4, tensorboard=True), tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    steps = [r for r in recs if "loss" in r]
    for key in ("loss", "itc_loss", "itm_loss", "itg_loss", "lr", "samples_per_s"):
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps]
    evals = [r for r in recs if "eval" in r]
    assert [e.step for e in acc.Scalars("val/val_txt_r1_itc")] == [r["step"] for r in evals] == [0, 2, 4]
    assert acc.Scalars("val/val_itm_acc")[-1].value == pytest.approx(evals[-1]["eval"]["val_itm_acc"], rel=1e-6)
    assert "train/skipped" not in tags  # booleans are not plotted


def test_missing_shards_are_named_not_retried_forever(tmp_path):
    from blip2lib.assemble import build_data

    _write_shards(tmp_path / "shards", n=5)  # only part-0000.tar exists
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shards missing: .*part-0001.tar, .*part-0002.tar"):
        build_data(_shard_params(tmp_path), {}, torch.device("cpu"))


@pytest.mark.parametrize("stage,kw", [("stage1", {}), ("stage2", {"llm": "opt"})])
def test_vision_feature_cache_trains_the_same_losses(tmp_path, stage, kw):
    """Frozen ViT + fixed images: cached features give the uncached run's losses (the tower runs once per image)."""
    runs = {}
    for cache in (False, True):
        run = tmp_path / str(cache)
        params = _params(stage, steps=6, batch_size=64, augment="none", cache_vision_features=cache, **kw)
        result = train(params, run)  # 384 samples of a 256-image synthetic set: the second epoch hits the cache
        runs[cache] = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines() if '"loss"' in x]
        if cache:
            stats = result.model.vision_cache.stats()
    assert len(runs[True]) == 6 and runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert stats == {"images": 256, "hits": 6 * 64 - 256, "misses": 256}
    with pytest.raises(ValueError, match="cache_vision_features needs a frozen ViT and fixed images"):
        train(_params(stage, augment="paper", cache_vision_features=True, **kw), tmp_path / "bad")
