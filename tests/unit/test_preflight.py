"""Preflight (blip2lib.workbook.preflight): every problem of the params files at once, before any kernel starts.

The weight files written here have the real formats and key names (LAVIS ``.pth`` with ``{"model": ...}``, the bare
``eva_vit_g.pth`` / ``clip_vit_L.pth`` layouts with their 40th / 24th block, a transformers directory) and the real
full-size shapes, on one-element storages expanded with stride 0: ``torch.save`` keeps the view, so each file is a
few KB while its header says, e.g., (4224, 1408). The key lists are written out below from the LAVIS definitions,
not taken from blip2lib.
"""

import json
import shutil

import pytest
import torch
import yaml

from blip2lib.workbook import preflight as pf
from blip2lib.workbook import preflight_data as pd
from blip2lib.workbook import preflight_weights as pw
from blip2lib.workbook.preflight import check
from blip2lib.workbook.run import REPO_ROOT
from blip2lib.workbook.runner import main, variant_params


def _save(path, shapes: dict, wrap: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}  # full shape, one stored element
    torch.save({"model": sd} if wrap else sd, path)


def eva_vit_g(blocks: int = 40, w: int = 1408, mlp: int = 6144) -> dict:
    """LAVIS eva_vit_g.pth: EVA-CLIP ViT-g/14 at 224 px (16 × 16 patches + CLS), 40 blocks."""
    s = {"cls_token": (1, 1, w), "pos_embed": (1, 257, w), "patch_embed.proj.weight": (w, 3, 14, 14),
         "patch_embed.proj.bias": (w,)}  # fmt: skip
    for i in range(blocks):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                  b + "attn.q_bias": (w,), b + "attn.v_bias": (w,), b + "attn.proj.weight": (w, w),
                  b + "attn.proj.bias": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                  b + "mlp.fc1.weight": (mlp, w), b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (w, mlp),
                  b + "mlp.fc2.bias": (w,)})  # fmt: skip
    return s


def clip_vit_l(blocks: int = 24, w: int = 1024) -> dict:
    """LAVIS clip_vit_L.pth: OpenAI CLIP ViT-L/14 at 224 px, 24 residual blocks."""
    s = {"class_embedding": (w,), "positional_embedding": (257, w), "conv1.weight": (w, 3, 14, 14),
         "ln_pre.weight": (w,), "ln_pre.bias": (w,)}  # fmt: skip
    for i in range(blocks):
        r = f"transformer.resblocks.{i}."
        s.update({r + "attn.in_proj_weight": (3 * w, w), r + "attn.in_proj_bias": (3 * w,),
                  r + "attn.out_proj.weight": (w, w), r + "attn.out_proj.bias": (w,), r + "ln_1.weight": (w,),
                  r + "ln_1.bias": (w,), r + "mlp.c_fc.weight": (4 * w, w), r + "mlp.c_fc.bias": (4 * w,),
                  r + "mlp.c_proj.weight": (w, 4 * w), r + "mlp.c_proj.bias": (w,), r + "ln_2.weight": (w,),
                  r + "ln_2.bias": (w,)})  # fmt: skip
    return s


def lavis_stage2(family: str = "opt", llm_width: int = 2560, vit: int = 1408) -> dict:
    """LAVIS blip2_pretrained_<llm>.pth: query-only Q-Former (12 layers, cross-attention every 2nd), projection."""
    s = {"query_tokens": (1, 32, 768), "ln_vision.weight": (vit,), "ln_vision.bias": (vit,),
         "Qformer.bert.embeddings.LayerNorm.weight": (768,), "Qformer.bert.embeddings.LayerNorm.bias": (768,),
         "Qformer.bert.embeddings.position_ids": (1, 512), f"{family}_proj.weight": (llm_width, 768),
         f"{family}_proj.bias": (llm_width,)}  # fmt: skip
    for i in range(12):
        layer = f"Qformer.bert.encoder.layer.{i}."
        for att in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            kv = vit if att == "crossattention" else 768
            a = layer + att
            s.update({f"{a}.self.query.weight": (768, 768), f"{a}.self.query.bias": (768,),
                      f"{a}.self.key.weight": (768, kv), f"{a}.self.key.bias": (768,),
                      f"{a}.self.value.weight": (768, kv), f"{a}.self.value.bias": (768,),
                      f"{a}.output.dense.weight": (768, 768), f"{a}.output.dense.bias": (768,),
                      f"{a}.output.LayerNorm.weight": (768,), f"{a}.output.LayerNorm.bias": (768,)})  # fmt: skip
        q = layer + "intermediate_query.dense."
        o = layer + "output_query."
        s.update({q + "weight": (3072, 768), q + "bias": (3072,), o + "dense.weight": (768, 3072),
                  o + "dense.bias": (768,), o + "LayerNorm.weight": (768,), o + "LayerNorm.bias": (768,)})  # fmt: skip
    return s


def lavis_retrieval(grid: int = 26) -> dict:
    """LAVIS blip2_finetune_coco.pth: stage-1 Q-Former with its text path and heads, and its own fine-tuned 364-px
    ViT-g (39 blocks: LAVIS builds the tower without the 40th) under ``visual_encoder.``."""
    s = {k: v for k, v in lavis_stage2().items() if not k.startswith("opt_proj")}
    s.update({f"visual_encoder.{k}": v for k, v in eva_vit_g(blocks=39).items()})
    s["visual_encoder.pos_embed"] = (1, grid * grid + 1, 1408)
    s.update({"Qformer.bert.embeddings.word_embeddings.weight": (30523, 768),
              "Qformer.bert.embeddings.position_embeddings.weight": (512, 768)})  # fmt: skip
    for i in range(12):
        f = f"Qformer.bert.encoder.layer.{i}."
        s.update({f + "intermediate.dense.weight": (3072, 768), f + "intermediate.dense.bias": (3072,),
                  f + "output.dense.weight": (768, 3072), f + "output.dense.bias": (768,),
                  f + "output.LayerNorm.weight": (768,), f + "output.LayerNorm.bias": (768,)})  # fmt: skip
    c = "Qformer.cls.predictions."
    s.update({c + "bias": (30523,), c + "transform.dense.weight": (768, 768), c + "transform.dense.bias": (768,),
              c + "transform.LayerNorm.weight": (768,), c + "transform.LayerNorm.bias": (768,),
              c + "decoder.weight": (30523, 768), c + "decoder.bias": (30523,), "vision_proj.weight": (256, 768),
              "vision_proj.bias": (256,), "text_proj.weight": (256, 768), "text_proj.bias": (256,),
              "itm_head.weight": (2, 768), "itm_head.bias": (2,), "temp": ()})  # fmt: skip
    return s


# OPT-2.7b's published config, cut to 2 layers (the check compares widths; the layer count only costs build time).
OPT = dict(model_type="opt", hidden_size=2560, ffn_dim=10240, word_embed_proj_dim=2560, num_hidden_layers=2,
           num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
           bos_token_id=2, eos_token_id=2, pad_token_id=1)  # fmt: skip


def _folder(path, config: dict, files=("tokenizer_config.json", "vocab.json", "model.safetensors")) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for f in files:
        (path / f).write_text("{}")


def _params(root, notebook: str, values: dict, name: str = "paper_test"):
    path = root / "params" / notebook / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A repository root with real-format weights and a miniature data_root (images are empty files)."""
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # Java present unless a test says not
    w = tmp_path / "weights"
    _save(w / "eva_vit_g.pth", eva_vit_g(), wrap=False)
    _save(w / "clip_vit_L.pth", clip_vit_l(), wrap=False)
    _save(w / "blip2_pretrained_opt2.7b.pth", lavis_stage2())
    _folder(w / "opt-2.7b", OPT)
    _folder(w / "bert-base-uncased", {"model_type": "bert", "hidden_size": 768}, ("vocab.txt", "model.safetensors"))
    ann = tmp_path / "data" / "coco" / "annotations"
    ann.mkdir(parents=True)
    (tmp_path / "data" / "coco" / "images" / "val2014").mkdir(parents=True)
    (tmp_path / "data" / "coco" / "images" / "val2014" / "a.jpg").write_bytes(b"")
    vqa = [{"question_id": 1, "question": "what?", "answer": ["x"] * 10, "image": "val2014/a.jpg"}]
    (ann / "vqa_val_eval.json").write_text(json.dumps(vqa))
    karpathy = [{"image": "val2014/a.jpg", "caption": ["a b", "c d"]}]
    (ann / "coco_karpathy_val.json").write_text(json.dumps(karpathy))
    (ann / "coco_karpathy_test.json").write_text(json.dumps(karpathy))
    gt = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a b", "id": 1}]}
    (ann / "coco_karpathy_test_gt.json").write_text(json.dumps(gt))
    (tmp_path / "data" / "shards").mkdir()
    for i in range(2):
        (tmp_path / "data" / "shards" / f"p-{i:03d}.tar").write_bytes(b"")
    return tmp_path


def _errors(problems) -> list[tuple[str, str]]:
    return [(p.key, p.message) for p in problems if p.level == "error"]


def test_real_format_files_pass(tree):
    table = _params(tree, "41_zeroshot_vqa", {
        "checkpoints": {"vitg_opt2.7b": {"checkpoint": "weights/blip2_pretrained_opt2.7b.pth",
                                         "llm_path": "weights/opt-2.7b"}},
        "vision_weights": "weights/eva_vit_g.pth", "bert_dir": "weights/bert-base-uncased", "data_root": "data",
        "split": "vqa_val_eval"})  # fmt: skip
    stage1 = _params(tree, "10_stage1_pretrain", {
        "model": "vitg", "vision_weights": "weights/eva_vit_g.pth", "bert_dir": "weights/bert-base-uncased",
        "data_root": "data", "train_data": "shards/p-{000..001}.tar", "shard_epoch_samples": 8,
        "val_data": "coco/annotations/coco_karpathy_val.json", "images_root": "coco/images"})  # fmt: skip
    stage2 = _params(tree, "20_stage2_pretrain", {  # the LLM folder resolves under the root, not the cwd
        "model": "vitg_opt2.7b", "vision_weights": "weights/eva_vit_g.pth", "llm_path": "weights/opt-2.7b",
        "bert_dir": "weights/bert-base-uncased"})  # fmt: skip
    assert _errors(check([table, stage1, stage2], root=tree, hardware=False)) == []


def test_one_call_lists_every_problem(tree, monkeypatch):
    """Missing LLM folder, ViT-L file for a ViT-g checkpoint, malformed split file, no Java: one list, one call."""
    (tree / "data" / "coco" / "annotations" / "coco_karpathy_test.json").write_text(json.dumps([{"caption": ["x"]}]))
    path = _params(tree, "42_captioning", {
        "checkpoints": {
            "vitg_opt2.7b": {"checkpoint": "weights/blip2_pretrained_opt2.7b.pth", "llm_path": "weights/opt-2.7b",
                             "vision_weights": "weights/clip_vit_L.pth"},
            "vitg_opt6.7b": {"checkpoint": "weights/blip2_pretrained_opt2.7b.pth", "llm_path": "weights/opt-6.7b"}},
        "vision_weights": "weights/eva_vit_g.pth", "bert_dir": "weights/bert-base-uncased", "data_root": "data",
        "metrics": ["BLEU", "CIDEr", "METEOR"]})  # fmt: skip
    monkeypatch.setattr(shutil, "which", lambda name: None)
    errors = _errors(check([path], root=tree, hardware=False))
    assert [k for k, _ in errors] == ["checkpoints.vitg_opt2.7b.vision_weights", "checkpoints.vitg_opt6.7b.llm_path",
                                      "split", "metrics"]  # fmt: skip
    vit, llm, split, java = (m for _, m in errors)
    assert "holds a CLIP ViT (width 1024, 24 blocks)" in vit and "reads vision width 1408 (EVA ViT-g)" in vit
    assert llm == f"LLM folder weights/opt-6.7b does not exist ({tree / 'weights' / 'opt-6.7b'})"
    assert "FORMATS['coco_karpathy_test']" in split and "entry 0: missing field 'image'" in split
    assert java.startswith("Java is not on PATH") and "METEOR asked here" in java
    text = "\n".join(str(p) for p in check([path], root=tree, hardware=False))
    assert all(line.startswith("params/42_captioning/paper_test.yaml: ") for line in text.splitlines())


def test_vit_l_file_where_vit_g_is_configured(tree):
    path = _params(tree, "10_stage1_pretrain", {"model": "vitg", "vision_weights": "weights/clip_vit_L.pth",
                                                "bert_dir": "weights/bert-base-uncased"})  # fmt: skip
    [(key, message)] = _errors(check([path], root=tree, hardware=False))
    assert key == "vision_weights"
    assert (
        "holds a CLIP ViT (width 1024, 24 blocks); model 'vitg' needs the EVA ViT (width 1408, 39 blocks used)"
        in message
    )
    # CLIP names never map onto EVA's: every tower key is missing (4 top-level + 13 per block, 39 blocks built), every
    # file key unexpected (5 top-level + 12 per block, 24 blocks).
    assert f"{4 + 39 * 13} keys missing (blocks.0.attn.proj.bias," in message
    assert f"{5 + 24 * 12} unexpected keys (class_embedding, conv1.weight, ln_pre.bias" in message


def test_llm_of_the_wrong_width_for_the_projection(tree):
    shutil.rmtree(tree / "weights" / "opt-2.7b")
    _folder(tree / "weights" / "opt-2.7b", {**OPT, "hidden_size": 4096, "word_embed_proj_dim": 4096})
    path = _params(tree, "41_zeroshot_vqa", {"checkpoints": {"m": "weights/blip2_pretrained_opt2.7b.pth"},
                                             "llm_path": "weights/opt-2.7b",
                                             "vision_weights": "weights/eva_vit_g.pth"})  # fmt: skip
    [(key, message)] = _errors(check([path], root=tree, hardware=False))
    assert key == "llm_path (row m)"
    assert message.endswith(
        "holds a opt LLM of width 4096; blip2_pretrained_opt2.7b.pth (opt_proj) projects to width 2560"
    )


@pytest.mark.parametrize("variant", ["smoke", "toy"])
def test_every_smoke_and_toy_params_file_passes(variant, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    problems = check(variant_params(variant), root=REPO_ROOT, runs=tmp_path / "runs")
    assert _errors(problems) == []
    if variant == "toy":  # upstream run folders of the same run-all are pending, not missing
        note = "runs/10_stage1_pretrain/toy does not exist yet: produced by params/10_stage1_pretrain/toy.yaml"
        assert any(p.key == "init_from" and p.message.startswith(note) for p in problems)


def test_upstream_run_outside_the_batch_is_an_error(tmp_path):
    problems = check([REPO_ROOT / "params/31_finetune_retrieval/toy.yaml"], root=REPO_ROOT, runs=tmp_path / "runs")
    assert _errors(problems) == [("init_from", "parent run runs/10_stage1_pretrain/toy does not exist: produced by "
                                  "params/10_stage1_pretrain/toy.yaml, which has not run (run it first, or run / "
                                  "check both together)")]  # fmt: skip


def test_large_annotation_file_is_validated_by_its_prefix(tree, monkeypatch):
    monkeypatch.setattr(pd, "FULL_PARSE_BYTES", 10)
    monkeypatch.setattr(pd, "PREFIX_ENTRIES", 2)
    good = {"question_id": 1, "question": "q", "answer": ["a"], "image": "val2014/a.jpg"}
    ann = tree / "data" / "coco" / "annotations" / "vqa_val_eval.json"
    path = _params(tree, "41_zeroshot_vqa", {"data_root": "data"})
    ann.write_text(json.dumps([good, good, {"question": 3}]))  # the bad third entry is beyond the prefix
    [note] = [p for p in check([path], root=tree, hardware=False) if p.key == "split"]
    assert (
        note.level == "note"
        and note.message == f"{ann}: 0 MB, validated its first 2 entries against FORMATS['vqa_val_eval']"
    )
    ann.write_text(json.dumps([good, {"question": 3}, good]))
    [(key, message)] = _errors(check([path], root=tree, hardware=False))
    assert key == "split" and f"{ann}: entry 1: missing field 'question_id'" in message


def test_check_command_exits_2_and_run_starts_no_kernel(tree, capsys):
    path = _params(tree, "41_zeroshot_vqa", {"checkpoints": {"m": "weights/none.pth"}, "data_root": "data"})
    (tree / "notebooks").mkdir()
    (tree / "notebooks" / "41_zeroshot_vqa.ipynb").write_text("{}")  # never opened: preflight stops the run first
    assert main(["check", str(path), "--root", str(tree), "--no-hardware"]) == 2
    out = capsys.readouterr()
    assert "paper_test.yaml: checkpoints.m: checkpoint weights/none.pth does not exist" in out.err
    assert "preflight: 1 params files, 1 problem(s)" in out.out
    assert main(["check", str(path), "--root", str(tree), "--no-hardware", "-p", "data_root=nodata"]) == 2
    assert "paper_test.yaml: data_root: data folder nodata does not exist" in capsys.readouterr().err  # -p checked
    assert main(["run", str(path), "--root", str(tree), "--no-progress"]) == 2
    assert "preflight found 1 problem(s)" in capsys.readouterr().err and not (tree / "runs").exists()


class _Fake(torch.nn.Module):
    """10 frozen ViT, 6 frozen LLM and 5 trainable Q-Former parameters; ViT fp16_lavis, LLM fp16."""

    def __init__(self):
        super().__init__()
        self.vision_model = torch.nn.Linear(3, 2, bias=True).requires_grad_(False)  # 6 + 2 = 8
        self.vision_model.extra = torch.nn.Parameter(torch.zeros(2), requires_grad=False)  # 10 in all
        self.language_model = torch.nn.Linear(2, 2, bias=True).requires_grad_(False)  # 6
        self.qformer = torch.nn.Linear(4, 1, bias=True)  # 5, trainable
        vision, llm = type("V", (), {"precision": "fp16_lavis"}), type("L", (), {"precision": "fp16"})
        self.config = type("C", (), {"vision": vision, "llm": llm})


def test_gpu_memory_estimate_and_count(monkeypatch, tmp_path):
    assert pw.estimate_bytes(_Fake(), train=True) == 5 * 16 + 10 * 2 + 6 * 2  # Adam: weight, grad, 2 moments in fp32
    assert pw.estimate_bytes(_Fake(), train=False) == 5 * 4 + 10 * 2 + 6 * 2
    ctx = pf._Ctx("p.yaml", tmp_path, tmp_path / "runs", set(), True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pw.check_gpus(ctx, 1, [_Fake()])  # one process without CUDA: a CPU run, fine
    pw.check_gpus(ctx, 2, [_Fake()])
    assert [str(p) for p in ctx.problems] == ["p.yaml: num_gpus: 2 GPUs asked, but CUDA is not available on this "
                                              "machine (torch.cuda.is_available() is False)"]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 100}))
    ctx.problems.clear()
    pw.check_gpus(ctx, 2, [_Fake()], train=True)
    assert [(p.level, p.message) for p in ctx.problems] == [
        ("error", "2 GPUs asked, this machine has 1"),
        (
            "error",
            "about 0.0 GiB per process for weights and optimizer state (activations come on top), GPU has 0.0 GiB",
        ),
    ]


def test_a_dropped_tensor_or_a_changed_shape_is_named(tree):
    lavis = lavis_stage2()
    del lavis["Qformer.bert.encoder.layer.3.output_query.dense.weight"]
    lavis["opt_proj.bias"] = (2048,)
    _save(tree / "weights" / "blip2_pretrained_opt2.7b.pth", lavis)
    eva = eva_vit_g()
    del eva["blocks.38.mlp.fc2.bias"]  # block 38 is the last one used (block 39 is dropped)
    _save(tree / "weights" / "eva_vit_g.pth", eva, wrap=False)
    path = _params(tree, "41_zeroshot_vqa", {"checkpoints": {"m": "weights/blip2_pretrained_opt2.7b.pth"},
                                             "llm_path": "weights/opt-2.7b",
                                             "vision_weights": "weights/eva_vit_g.pth"})  # fmt: skip
    errors = _errors(check([path], root=tree, hardware=False))
    assert [k for k, _ in errors] == ["checkpoints.m", "vision_weights (row m)"]
    assert errors[0][1].endswith("does not fit the architecture inferred from it: 1 shape mismatches (e.g. "
                                 "language_projection.bias: file (2048,) vs model (2560,)); 1 keys missing "
                                 "(qformer.encoder.layer.3.output_query.dense.weight)")  # fmt: skip
    assert errors[1][1].endswith(": 1 keys missing (blocks.38.mlp.fc2.bias)")


def _hf_dir(path, num_query_tokens: int = 4) -> None:
    """A tiny ``Blip2ForConditionalGeneration`` saved by transformers itself (hub layout) with an OPT tokenizer."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from blip2lib.toy.synthetic import tiny_llm_tokenizer

    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            vocab_size=100, max_position_embeddings=64),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=99, word_embed_proj_dim=32, max_position_embeddings=128),
        num_query_tokens=num_query_tokens,
    )  # fmt: skip
    Blip2ForConditionalGeneration(cfg).save_pretrained(path)
    tiny_llm_tokenizer("opt").save_pretrained(path)


def test_transformers_directory_is_checked_against_its_config(tree):
    _hf_dir(tree / "weights" / "blip2-tiny")
    path = _params(tree, "41_zeroshot_vqa", {"checkpoints": {"hf": "weights/blip2-tiny"}})
    assert _errors(check([path], root=tree, hardware=False)) == []
    config = json.loads((tree / "weights" / "blip2-tiny" / "config.json").read_text())
    (tree / "weights" / "blip2-tiny" / "config.json").write_text(json.dumps({**config, "num_query_tokens": 8}))
    (tree / "weights" / "blip2-tiny" / "tokenizer.json").unlink()
    (tree / "weights" / "blip2-tiny" / "tokenizer_config.json").unlink()
    errors = _errors(check([path], root=tree, hardware=False))
    assert [k for k, _ in errors] == ["checkpoints.hf", "checkpoints.hf"]
    assert errors[0][1].endswith("has no tokenizer files: the evaluation tokenizes with the checkpoint's own tokenizer")
    assert errors[1][1].endswith("does not fit the architecture of its config.json: 1 shape mismatches (e.g. "
                                 "query_tokens: file (1, 4, 32) vs model (1, 8, 32))")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-step tiny stage-1 run (our training checkpoint format, frozen towers under frozen/)."""
    from blip2lib.train import TrainParams, train

    root = tmp_path_factory.mktemp("repo")
    train(TrainParams(model="tiny", train_data="synthetic", image_size=28, steps=1, batch_size=2, max_txt_len=12,
                      warmup_steps=1, progress=False, eval_at_start=False),
          root / "runs/10_stage1_pretrain/paper_x")  # fmt: skip
    return root


def test_our_run_folders_as_rows_and_parents(tiny_run, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    run = "runs/10_stage1_pretrain/paper_x"
    table = _params(tiny_run, "44_retrieval", {"checkpoints": {"r": run}})
    vqa = _params(tiny_run, "41_zeroshot_vqa", {"checkpoints": {"r": run}})
    child = _params(tiny_run, "31_finetune_retrieval", {"model": "vitl", "init_from": run, "train_data": "synthetic"})
    errors = _errors(check([table, vqa, child], root=tiny_run, hardware=False))
    ck = tiny_run / run / "checkpoints" / "ckpt-1"
    assert errors[0] == ("checkpoints.r", f"{ck} holds a stage1 model; vqa needs a stage-2 model")
    assert [k for k, _ in errors[1:]] == ["vision_weights", "bert_dir", "init_from"]  # vitl needs its files; shapes
    assert (
        errors[3][1].startswith(f"{ck / 'model.safetensors'}: ")
        and "shape mismatches with the configured model" in errors[3][1]
    )
    (tiny_run / run / "frozen" / "vision.safetensors").rename(tiny_run / "moved.safetensors")
    try:
        [(key, message)] = _errors(check([table], root=tiny_run, hardware=False))
    finally:
        (tiny_run / "moved.safetensors").rename(tiny_run / run / "frozen" / "vision.safetensors")
    assert key == "checkpoints.r (manifest)"
    assert message.startswith(f"ViT file {tiny_run / run / 'frozen' / 'vision.safetensors'} does not exist")


@pytest.mark.slow
def test_toy_run_folders_pass(tmp_path):
    """What `make demo` hands on: toy stage-1 / stage-2 runs (the tiny toy world) as table rows and parent runs."""
    from blip2lib.train import TrainParams, train

    common = dict(model="toy", toy_world="tiny", train_data="toy", steps=1, batch_size=2, warmup_steps=1,
                  progress=False, eval_at_start=False, image_size=64, augment="none")  # fmt: skip
    train(TrainParams(stage="stage1", **common), tmp_path / "runs/10_stage1_pretrain/toy")
    train(TrainParams(stage="stage2", init_from=str(tmp_path / "runs/10_stage1_pretrain/toy"), **common),
          tmp_path / "runs/20_stage2_pretrain/toy/opt")  # fmt: skip
    paths = [
        _params(tmp_path, "44_retrieval", {"checkpoints": {"stage1": "runs/10_stage1_pretrain/toy"}}, "toy"),
        _params(tmp_path, "41_zeroshot_vqa", {"checkpoints": {"opt": "runs/20_stage2_pretrain/toy/opt"}}, "toy"),
        _params(tmp_path, "31_finetune_retrieval", {"model": "toy", "init_from": "runs/10_stage1_pretrain/toy"}, "toy"),
    ]
    assert check(paths, root=tmp_path) == []
    (tmp_path / "runs/20_stage2_pretrain/toy/opt/checkpoints/ckpt-1/manifest.json").unlink()  # incomplete checkpoint
    run = tmp_path / "runs/20_stage2_pretrain/toy/opt"
    assert _errors(check(paths, root=tmp_path)) == [
        (
            "checkpoints.opt",
            f"{run} holds no model.safetensors and no complete checkpoint (ckpt-<step>/ with manifest.json)",
        )
    ]


@pytest.mark.gpu
def test_gpu_memory_estimate_against_this_gpu(tmp_path):
    """On a CUDA host: the stage-1 ViT-g preset's estimate is compared with the real device's memory."""
    from blip2lib.config import PRESETS
    from blip2lib.model import Blip2QFormerModel

    model = Blip2QFormerModel(PRESETS["vitg"], device="meta")
    ctx = pf._Ctx("p.yaml", tmp_path, tmp_path / "runs", set(), True)
    pw.check_gpus(ctx, 1, [model], train=True)
    have = torch.cuda.get_device_properties(0).total_memory / 2**30
    [problem] = ctx.problems
    assert problem.level == "note" and problem.message.endswith(f"GPU has {have:.1f} GiB")


def test_missing_checkpoints_the_notebook_tolerates_are_notes(tree):
    explore = _params(tree, "00_explore", {"checkpoint": "weights/none", "missing_ok": True})
    parity = _params(tree, "50_parity", {"checkpoints": ["tiny-opt", "weights/none"], "skip_missing": True})
    strict = _params(tree, "50_parity", {"checkpoints": ["weights/none"]}, "strict")
    assert [(p.params, p.level, p.key, p.message) for p in check([explore, parity, strict], root=tree)] == [
        ("params/00_explore/paper_test.yaml", "note", "checkpoint",
         "weights/none does not exist: the notebook falls back to a random tiny model"),
        ("params/50_parity/paper_test.yaml", "note", "checkpoints[1]",
         "weights/none does not exist: the notebook skips it (skip_missing)"),
        ("params/50_parity/strict.yaml", "error", "checkpoints[0]",
         f"checkpoint weights/none does not exist ({tree / 'weights' / 'none'})"),
    ]  # fmt: skip


def test_overrides_and_the_notebook_name_are_applied(tree):
    """A run's ``-p`` overrides are what gets checked; a file outside params/ names its notebook."""
    path = tree / "elsewhere" / "mine.yaml"
    path.parent.mkdir()
    path.write_text("notebook: 41_zeroshot_vqa\ndata_root: data\n")
    assert _errors(check([path], root=tree, notebooks=["41_zeroshot_vqa"])) == []
    errors = _errors(check([path], root=tree, notebooks=["41_zeroshot_vqa"], overrides={"data_root": "nodata"}))
    assert errors == [("data_root", f"data folder nodata does not exist ({tree / 'nodata'})")]


def test_retrieval_file_with_its_own_vit(tree):
    _save(tree / "weights" / "blip2_finetune_coco.pth", lavis_retrieval())
    files = {"checkpoint": "weights/blip2_finetune_coco.pth"}
    values = {"vision_weights": "weights/eva_vit_g.pth", "bert_dir": "weights/bert-base-uncased", "data_root": "data",
              "split": "coco_karpathy_val"}  # fmt: skip
    path = _params(tree, "44_retrieval", {"checkpoints": {"vitg": files}, **values})
    assert _errors(check([path], root=tree, hardware=False)) == []
    path = _params(tree, "44_retrieval", {"checkpoints": {"vitl": files}, **values})  # a row named for ViT-L
    assert _errors(check([path], root=tree, hardware=False)) == [
        ("checkpoints.vitl.checkpoint", "row 'vitl' names a ViT of width 1024; blip2_finetune_coco.pth is built on "
                                        "width 1408")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_paper_file_passes_on_the_rehearsal_tree(tmp_path):
    """Every ``paper_*`` file, as the rehearsal runs it (its copy + ``model_scale: rehearsal``), on its tree.

    Skipped until ``blip2lib.rehearsal`` (the dress rehearsal's tree builder) is in the checkout.
    """
    rehearsal = pytest.importorskip("blip2lib.rehearsal.run")
    copies = rehearsal.build_tree(tmp_path, rehearsal.paper_params())
    problems = check(copies, root=tmp_path)
    assert len(copies) == len(list(REPO_ROOT.glob("params/*/paper_*.yaml")))
    assert [str(p) for p in problems if p.level == "error"] == []
