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
    # spec §3.4: the query path comes from stage 1; text FFN, word embeddings and heads are dropped; projection fresh
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
    assert vit_trainable  # fine-tuning unfreezes the ViT (fp32, spec §4)
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


def test_vqa_finetune_takes_query_path_from_stage2_and_text_path_from_stage1(tmp_path):
    train(_params("stage1", steps=2), tmp_path / "s1")
    train(_params("stage2", llm="opt", steps=2, init_from=str(tmp_path / "s1")), tmp_path / "s2")
    r = train(_params("vqa_ft", llm="opt", steps=1, init_from=f"{tmp_path / 's2'},{tmp_path / 's1'}"), tmp_path / "v")
    init = r.summary["init"]
    # only the ViT (trained in fine-tuning, loaded from its own tower file) is not in the two checkpoints
    assert len(init["files"]) == 2 and all(k.startswith("vision_model.") for k in init["fresh"])
    assert "language_projection.weight" in init["keys"] and "embeddings.word_embeddings.weight" in init["keys"]
    assert any(".intermediate.dense" in k for k in init["keys"])  # the text FFN comes from stage 1
