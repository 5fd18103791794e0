"""The dress rehearsal: the size override, tiny files in the released formats, data checks, the driver's tree."""

import json
import math

import pytest
import torch
import yaml

from blip2lib.config import PRESETS as P
from blip2lib.config import REHEARSAL_RUN, ParamsError, scaled_config
from blip2lib.pretrained import LoadError, from_pretrained
from blip2lib.rehearsal import data as rdata
from blip2lib.rehearsal import run as rrun
from blip2lib.rehearsal import weights as rw
from blip2lib.workbook import run as run_mod
from blip2lib.workbook.schemas import Stage2Params, ZeroShotVQAParams
from blip2lib.workbook.summary import build_index, index_folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A rehearsal weights folder with one file of every format the stage-1 / stage-2 / caption paths read."""
    root = tmp_path_factory.mktemp("rehearsal")
    for name in (
        "eva_vit_g.pth",
        "clip_vit_L.pth",
        "bert-base-uncased",
        "opt-2.7b",
        "flan-t5-xl",
        "blip2_pretrained_vitL.pth",
        "blip2_pretrained_opt2.7b.pth",
        "blip2_caption_flant5xl.pth",
    ):
        rw.write_weight(root, f"weights/{name}")
    return root / "weights"


# ---- the one size override ------------------------------------------------------------------------------------


def test_override_replaces_exactly_the_run_length_keys():
    given = {
        "model": "vitg_opt2.7b",
        "steps": 80000,
        "batch_size": 95,
        "num_gpus": 16,
        "num_workers": 8,
        "lr": 1e-4,
        "image_size": 490,
        "init_from": "runs/10_stage1_pretrain/paper_vitg",
        "amp": "fp16",
    }
    full = Stage2Params.from_dict(given)
    small = Stage2Params.from_dict({**given, "model_scale": "rehearsal"})
    assert (full.steps, full.batch_size, full.num_gpus, full.num_workers) == (80000, 95, 16, 8)
    assert (small.steps, small.batch_size, small.num_gpus, small.num_workers) == (2, 2, 1, 0)
    assert (small.ckpt_every, small.eval_every, small.warmup_steps, small.val_images) == (0, 0, 1, 2)
    changed = {k for k, v in small.to_dict().items() if v != full.to_dict()[k]}
    assert changed == {"model_scale"} | (set(REHEARSAL_RUN) & set(full.to_dict())) - {
        k for k in REHEARSAL_RUN if getattr(full, k, None) == REHEARSAL_RUN[k]
    }
    assert (small.lr, small.image_size, small.init_from, small.amp) == (1e-4, 490, given["init_from"], "fp16")


def test_override_reaches_table_params_and_rejects_unknown_scales():
    p = ZeroShotVQAParams.from_dict({"batch_size": 64, "model_scale": "rehearsal", "split": "gqa_testdev"})
    assert (p.batch_size, p.split) == (2, "gqa_testdev")
    with pytest.raises(ParamsError, match="'model_scale' must be one of"):
        ZeroShotVQAParams.from_dict({"model_scale": "small"}, source="x.yaml")


def test_rehearsal_config_keeps_families_and_shrinks_sizes():
    for full in P.values():
        small = scaled_config(full, "rehearsal")
        assert small.vision.arch == full.vision.arch and small.vision.patch_size == 14
        assert small.qformer.encoder_hidden_size == small.vision.width
        assert small.qformer.use_text_input == full.qformer.use_text_input
        assert (small.llm is None) == (full.llm is None)
        if full.llm is not None:
            assert small.llm.family == full.llm.family
            assert small.llm.hf_config["vocab_size"] == full.llm.hf_config["vocab_size"]  # the real token ids
    assert scaled_config(P["vitg"], "full") is P["vitg"]


# ---- tiny files in the released formats ------------------------------------------------------------------------


def test_vision_files_keep_the_dropped_block_and_224px_table(tree):
    eva = torch.load(tree / "eva_vit_g.pth", weights_only=True)
    built = scaled_config(P["vitg"], "rehearsal").vision.depth
    assert {int(k.split(".")[1]) for k in eva if k.startswith("blocks.")} == set(range(built + 1))
    assert eva["pos_embed"].shape == (1, (224 // 14) ** 2 + 1, 32)  # the real file: (1, 257, 1408)
    assert {"cls_token", "patch_embed.proj.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= set(eva)
    clip = torch.load(tree / "clip_vit_L.pth", weights_only=True)
    depth = scaled_config(P["vitl"], "rehearsal").vision.depth
    assert {int(k.split(".")[2]) for k in clip if k.startswith("transformer.resblocks.")} == set(range(depth + 1))
    assert clip["positional_embedding"].shape == (257, 24) and "conv1.weight" in clip
    assert "transformer.resblocks.0.attn.in_proj_weight" in clip


def test_lavis_files_have_the_released_layout(tree):
    ck = torch.load(tree / "blip2_pretrained_opt2.7b.pth", weights_only=True)
    assert list(ck) == ["model"]
    sd = ck["model"]
    assert not any(k.startswith("visual_encoder.") for k in sd)  # pre-training files: ViT from eva_vit_g.pth
    assert not any(k.startswith(("opt_model.", "Qformer.cls.")) for k in sd)
    assert "Qformer.bert.embeddings.word_embeddings.weight" not in sd  # stage 2: query path only
    assert sd["opt_proj.weight"].shape == (32, 32) and sd["query_tokens"].shape == (1, 4, 32)
    assert sd["Qformer.bert.embeddings.position_ids"].tolist() == [list(range(64))]
    cap = torch.load(tree / "blip2_caption_flant5xl.pth", weights_only=True)["model"]
    assert cap["visual_encoder.pos_embed"].shape == (1, (364 // 14) ** 2 + 1, 32)  # 677 as in the real file
    assert "t5_proj.weight" in cap


def test_lavis_files_load_at_rehearsal_scale_only(tree):
    kw = {"vision_weights": str(tree / "eva_vit_g.pth"), "bert_dir": str(tree / "bert-base-uncased"),
          "llm_path": str(tree / "opt-2.7b")}  # fmt: skip
    model, report = from_pretrained(tree / "blip2_pretrained_opt2.7b.pth", model_scale="rehearsal",
                                    return_report=True, **kw)  # fmt: skip
    assert (report.missing, report.unexpected) == ({}, {})
    dropped = [k for k, why in report.expected.items() if why.startswith("vision block")]
    assert dropped and all(k.startswith("eva_vit_g.pth:blocks.2.") for k in dropped)
    assert model.config.llm.family == "opt" and model.config.vision.image_size == 224
    with pytest.raises(LoadError, match="vision width 32 matches no full preset"):
        from_pretrained(tree / "blip2_pretrained_opt2.7b.pth", **kw)
    clip = from_pretrained(
        tree / "blip2_pretrained_vitL.pth",
        model_scale="rehearsal",
        vision_weights=str(tree / "clip_vit_L.pth"),
        bert_dir=str(tree / "bert-base-uncased"),
    )
    assert clip.config.vision.arch == "clip" and clip.config.qformer.vocab_size == 30523


def test_bert_dir_puts_special_tokens_at_the_real_ids(tree):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tree / "bert-base-uncased", local_files_only=True)
    assert len(tok) == 30522
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0, 100, 101, 102, 103]  # fmt: skip
    assert tok("a red circle")["input_ids"][0] == 101 and tok("a red circle")["input_ids"][-1] == 102
    cfg = json.loads((tree / "bert-base-uncased" / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["model_type"]) == (30522, 32, "bert")


def test_llm_dirs_keep_the_real_vocabulary_and_ids(tree):
    opt = json.loads((tree / "opt-2.7b" / "config.json").read_text())
    assert (opt["model_type"], opt["vocab_size"], opt["bos_token_id"], opt["pad_token_id"]) == ("opt", 50272, 2, 1)
    t5 = json.loads((tree / "flan-t5-xl" / "config.json").read_text())
    assert (t5["model_type"], t5["vocab_size"], t5["decoder_start_token_id"], t5["eos_token_id"]) == ("t5", 32128, 0, 1)


def test_hub_dir_is_what_transformers_loads(tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    path = rw.write_weight(tmp_path, "weights/Salesforce/blip2-itm-vit-g-coco")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vision_config"]["image_size"] == 364 and cfg["num_query_tokens"] == 4
    assert (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists()
    assert isinstance(Blip2ForImageTextRetrieval.from_pretrained(path), Blip2ForImageTextRetrieval)


def test_unknown_weight_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match="weights/blip2_mystery.pth: no released file"):
        rw.kind_of("weights/blip2_mystery.pth")
    assert [rw.kind_of(n) for n in ("weights/eva_vit_g.pth", "weights/Salesforce/blip2-opt-2.7b", "weights/opt-6.7b",
                                    "weights/bert-base-uncased", "weights/blip2_finetune_coco.pth")] == [
        "vision", "hub", "llm", "bert", "lavis"]  # fmt: skip


# ---- data and the tree ------------------------------------------------------------------------------------------


def test_data_problems_name_params_file_and_key(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "vqa_train.json").write_text("[]")
    values = {"split": "gqa_testdev", "transfer_split": "nocaps_vall", "train_data": "coco/annotations/vqa_train.json",
              "val_data": "coco/annotations/missing.json", "images_root": "coco/images"}  # fmt: skip
    got = rdata.data_problems(tmp_path, values, "41/paper_x.yaml")
    assert got == [
        f"41/paper_x.yaml: key 'split': {tmp_path}/gqa/annotations/testdev_balanced_questions.json does not exist",
        "41/paper_x.yaml: key 'transfer_split': 'nocaps_vall' is no blip2lib.data.FORMATS key",
        f"41/paper_x.yaml: key 'val_data': {tmp_path}/coco/annotations/missing.json does not exist",
        f"41/paper_x.yaml: key 'images_root': {tmp_path}/coco/images is not a folder",
    ]


def test_shard_pattern_is_one_shard_and_hard_links(tmp_path):
    import tarfile

    rdata.write_base(tmp_path)
    names = rdata.write_shards(tmp_path, "shards/p-{00000..00011}.tar")
    assert [n.name for n in names] == [f"p-{i:05d}.tar" for i in range(12)]
    assert len({n.stat().st_ino for n in names}) == 1
    members = tarfile.open(names[0]).getnames()
    n_captions = len(json.loads((tmp_path / "coco/annotations/coco_karpathy_train.json").read_text()))
    assert len(members) == 3 * n_captions and sorted(members[:3]) == ["s000000.jpg", "s000000.json", "s000000.txt"]


def _write(root, rel, values):
    path = root / "params" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def test_only_adds_the_runs_a_file_reads_transitively(tmp_path):
    a = _write(tmp_path, "10_stage1_pretrain/paper_a.yaml", {"model": "vitg"})
    b = _write(tmp_path, "20_stage2_pretrain/paper_b.yaml", {"init_from": "runs/10_stage1_pretrain/paper_a"})
    c = _write(tmp_path, "43_vqa_finetuned/paper_c.yaml", {"checkpoints": {"m": "runs/20_stage2_pretrain/paper_b/"}})
    _write(tmp_path, "44_retrieval/paper_d.yaml", {"checkpoints": {"m": "weights/blip2_finetune_coco.pth"}})
    assert rrun.paper_params(tmp_path, "43_*") == [a, b, c]
    assert len(rrun.paper_params(tmp_path)) == 4


def test_weight_names_are_found_in_nested_values():
    values = {"vision_weights": "weights/eva_vit_g.pth", "checkpoints": {"a": {"checkpoint": "weights/x.pth",
              "llm_path": "weights/opt-2.7b/"}, "b": "runs/x/y"}, "list": ["weights/bert-base-uncased"]}  # fmt: skip
    assert rrun.weight_names(values) == {"weights/eva_vit_g.pth", "weights/x.pth", "weights/opt-2.7b",
                                         "weights/bert-base-uncased"}  # fmt: skip


def test_tree_links_the_notebooks_and_copies_no_params(tmp_path, monkeypatch):
    src = tmp_path / "repo"
    (src / "notebooks").mkdir(parents=True)
    f = _write(src, "44_retrieval/paper_d.yaml", {"split": "flickr30k_test"})
    seen = {}
    monkeypatch.setattr(rdata, "write_data", lambda root, named: seen.update({root: named}))
    rrun.build_tree(tmp_path / "out", [f], src)
    assert (tmp_path / "out" / "notebooks").resolve() == src / "notebooks"
    assert seen == {tmp_path / "out" / "data": {"44_retrieval/paper_d.yaml": {"split": "flickr30k_test"}}}
    assert not (tmp_path / "out" / "params").exists()  # the repository's files run as they are


# ---- verdicts and the index -------------------------------------------------------------------------------------


def test_rehearsal_runs_never_get_a_paper_verdict(tmp_path):
    targets = tmp_path / "t.yaml"
    targets.write_text(
        yaml.safe_dump({"targets": [{"id": "t1", "table": "T", "row": "r", "column": "c", "value": 65.0}]})
    )
    run = run_mod.Run(dir=tmp_path, params={"model_scale": "rehearsal"}, env={})
    table = run_mod.compare_to_paper({"a": 65.0}, {"a": "t1", "b": "t1"}, path=targets, run=run, show=False)
    assert list(table["verdict"]) == ["rehearsal", "not measured"]  # at the paper's value: still no "match"
    full = run_mod.Run(dir=tmp_path, params={"model_scale": "full"}, env={})
    assert list(run_mod.compare_to_paper({"a": 65.0}, {"a": "t1"}, path=targets, run=full, show=False)["verdict"]) == [
        "match"]  # fmt: skip


def test_glob_index_lists_every_variant_with_its_rows(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    for nb, variant, metric in (("41_zeroshot_vqa", "paper_gqa", "m_vqa_acc"), ("44_retrieval", "paper_coco", "r1")):
        d = runs / nb / variant
        d.mkdir(parents=True)
        row = {"metric": metric, "target": f"{variant} cell", "reproduced": 1.5, "paper / goal": 40.0,
               "verdict": "rehearsal"}  # fmt: skip
        (d / "metrics.json").write_text(json.dumps({"metrics": {}, "comparison": [row]}))
        (d / "status.json").write_text(json.dumps({"status": "ok"}))
        (reports / variant).mkdir(parents=True)
        (reports / variant / f"{nb}.html").write_text("<html></html>")
    assert index_folder("paper_*") == "paper" and index_folder("toy") == "toy"
    page = build_index(runs, reports, "paper_*").read_text()
    assert page.count("paper_gqa cell") == 1 and page.count("paper_coco cell") == 1
    assert 'href="../paper_gqa/41_zeroshot_vqa.html"' in page and 'href="../paper_coco/44_retrieval.html"' in page
    assert math.isclose(float(page.split('<td class="n">')[-2].split("<")[0]), 1.5)


def test_rehearse_orders_by_reads_skips_readers_of_a_failure_and_summarises_last(tmp_path, monkeypatch):
    from blip2lib.workbook import runner

    src = tmp_path / "repo"
    _write(src, "10_stage1_pretrain/paper_a.yaml", {"model": "vitg"})
    _write(src, "20_stage2_pretrain/paper_b.yaml", {"init_from": "runs/10_stage1_pretrain/paper_a"})
    _write(src, "20_stage2_pretrain/paper_c.yaml", {"model": "vitg_opt2.7b"})
    _write(src, "90_summary/paper_summary.yaml", {"variant": "paper_*"})

    order = []

    def fake_run(path, **kw):
        assert path.parent.parent == src / "params" and kw["overrides"] == {"model_scale": "rehearsal"}
        assert kw["root"] == (tmp_path / "out").resolve()
        order.append(f"{path.parent.name}/{path.stem}")
        if path.stem == "paper_a":
            raise runner.RunFailed("a broke\ndetails")

    monkeypatch.setattr(rrun, "build_tree", lambda out, files, root: None)  # weights and data: own tests
    monkeypatch.setattr(runner, "run", fake_run)
    result = rrun.rehearse(tmp_path / "out", root=src)
    assert order == ["10_stage1_pretrain/paper_a", "20_stage2_pretrain/paper_c", "90_summary/paper_summary"]
    assert result["failed"] == {"10_stage1_pretrain/paper_a": "a broke"}
    assert result["skipped"] == ["20_stage2_pretrain/paper_b"]
    assert result["ok"] == ["20_stage2_pretrain/paper_c", "90_summary/paper_summary"]


def test_ci_subset_covers_every_notebook_and_format_cheaply(tmp_path):
    _write(tmp_path, "10_stage1_pretrain/paper_g.yaml", {"vision_weights": "weights/eva_vit_g.pth"})
    _write(tmp_path, "10_stage1_pretrain/paper_l.yaml", {"vision_weights": "weights/clip_vit_L.pth"})
    _write(tmp_path, "20_stage2_pretrain/paper_l.yaml", {"init_from": "runs/10_stage1_pretrain/paper_l"})
    _write(tmp_path, "41_zeroshot_vqa/paper_lavis.yaml", {"checkpoints": {"m": "weights/blip2_pretrained_opt2.7b.pth"}})
    _write(tmp_path, "41_zeroshot_vqa/paper_hub.yaml", {"checkpoints": {"m": "weights/blip2-opt-2.7b"}})
    _write(tmp_path, "41_zeroshot_vqa/paper_run.yaml", {"checkpoints": {"m": "runs/20_stage2_pretrain/paper_l"}})
    picks = rrun.ci_subset(tmp_path)
    # paper_run adds nothing paper_l's chain and the two weight files do not already touch
    assert sorted(picks) == ["10_stage1_pretrain/paper_g", "20_stage2_pretrain/paper_l", "41_zeroshot_vqa/paper_hub",
                             "41_zeroshot_vqa/paper_lavis"]  # fmt: skip


def test_nocaps_val_holds_all_three_domains(tmp_path):
    rdata.write_base(tmp_path)
    entries = json.loads((tmp_path / "nocaps/annotations/nocaps_val.json").read_text())
    domains = [e["domain"] for e in entries]
    assert sorted(set(domains)) == ["in-domain", "near-domain", "out-domain"]
    assert [domains.count(d) for d in ("in-domain", "near-domain", "out-domain")] == [2, 2, 2]


def test_rehearsal_stand_ins_only_under_the_rehearsal_scale(tmp_path, monkeypatch, caplog):
    """A paper-step checkpoint a 2-step run never wrote: the newest one stands in (logged); OK-VQA without spaCy is
    scored unlemmatised. At full scale neither happens: the real run meets the missing file / the install hint."""
    from blip2lib.checkpoint import save_training_state
    from blip2lib.evaluate import vqa as vqa_mod
    from blip2lib.evaluate.__main__ import SCHEMAS, rehearsal_stand_ins

    ckpts = tmp_path / "run" / "checkpoints"
    model = torch.nn.Linear(2, 2)
    for step in (1, 2):
        save_training_state(ckpts, model=model, optimizer=None, scheduler_state=None, scaler=None, step=step,
                            data_state={"position": step}, extra=None, config={}, keep_last=0)  # fmt: skip
    want = str(ckpts / "ckpt-16000")

    def params(**kw):
        values = {"checkpoint": want, "data_root": str(tmp_path), "split": "okvqa_val_eval", "out_dir": str(tmp_path)}
        return SCHEMAS["vqa"].from_dict({**values, **kw})

    def no_spacy(*a, **k):
        raise vqa_mod.LemmatizerUnavailable("no spaCy")

    monkeypatch.setattr(vqa_mod, "load_lemmatizer", no_spacy)
    full = rehearsal_stand_ins(params())
    assert full.checkpoint == want and full.lemmatize is None  # a real run is left alone
    with caplog.at_level("WARNING"):
        reh = rehearsal_stand_ins(params(model_scale="rehearsal"), "f.yaml")
    assert reh.checkpoint == str(ckpts / "ckpt-2") and reh.lemmatize is False
    assert "f.yaml: rehearsal: " in caplog.text and "ckpt-2 stands in" in caplog.text
    assert "scored unlemmatised" in caplog.text
    kept = rehearsal_stand_ins(params(model_scale="rehearsal", lemmatize=True, checkpoint=str(ckpts / "ckpt-1")))
    assert kept.checkpoint == str(ckpts / "ckpt-1") and kept.lemmatize is True  # explicit choices are kept
    for task, split in (("caption", "coco_karpathy_test"), ("retrieval", "flickr30k_test")):  # no lemmatize key
        other = SCHEMAS[task].from_dict({"checkpoint": want, "data_root": str(tmp_path), "split": split,
                                         "out_dir": str(tmp_path), "model_scale": "rehearsal"})  # fmt: skip
        assert rehearsal_stand_ins(other).checkpoint == str(ckpts / "ckpt-2")
