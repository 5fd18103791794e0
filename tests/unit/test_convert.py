"""Key maps, config mapping, load reports/errors, our training checkpoints and the convert CLI.

See docs/paper_map.md §8.
"""

import json
from pathlib import Path

import pytest
import torch

import blip2lib.convert
from blip2lib.checkpoint import CheckpointError, save_training_state
from blip2lib.config import config_to_dict, tiny_config
from blip2lib.convert import (
    config_from_hf,
    group_keys,
    hf_to_ours,
    lavis_to_ours,
    ours_to_hf,
    ours_to_lavis,
)
from blip2lib.convert.__main__ import main
from blip2lib.model import Blip2, Blip2QFormerModel
from blip2lib.pretrained import LoadError, from_pretrained, save_pretrained_hf

transformers = pytest.importorskip("transformers")


def test_lavis_keys_hand_examples():
    v = tiny_config().vision
    t = torch.zeros(1)
    lav = {
        "Qformer.bert.embeddings.LayerNorm.weight": t,
        "Qformer.bert.embeddings.position_ids": t,
        "Qformer.bert.embeddings.word_embeddings.weight": t,
        "Qformer.bert.encoder.layer.0.attention.self.query.weight": t,
        "Qformer.bert.encoder.layer.0.attention.output.dense.weight": t,
        "Qformer.bert.encoder.layer.2.crossattention.self.key.bias": t,
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias": t,
        "Qformer.cls.predictions.transform.dense.weight": t,
        "vision_proj.bias": t,
        "t5_proj.weight": t,
        "opt_model.lm_head.weight": t,
        "weird.key": t,
    }
    ours, dropped = lavis_to_ours(lav, v)
    assert dropped == ["Qformer.bert.embeddings.position_ids"]
    assert sorted(ours) == sorted([
        "qformer.layernorm.weight", "embeddings.word_embeddings.weight",
        "qformer.encoder.layer.0.attention.attention.query.weight",
        "qformer.encoder.layer.0.attention.output.dense.weight",
        "qformer.encoder.layer.2.crossattention.attention.key.bias",
        "qformer.encoder.layer.1.output_query.LayerNorm.bias", "cls.predictions.transform.dense.weight",
        "vision_projection.bias", "language_projection.weight", "language_model.lm_head.weight",
        "weird.key"])  # fmt: skip
    back = ours_to_lavis({k: t for k in ours if not k.startswith("language_")}, "t5")
    assert set(back) == {k for k in lav if k not in ("Qformer.bert.embeddings.position_ids", "t5_proj.weight",
                                                     "opt_model.lm_head.weight")}  # fmt: skip
    assert ours_to_lavis({"language_projection.bias": t}, "opt") == {"opt_proj.bias": t}


def test_hf_vision_keys_qkv_bias_and_post_layernorm():
    model = Blip2QFormerModel(tiny_config())
    sd = model.state_dict()
    hf, dropped = ours_to_hf(sd, model.config.vision)
    assert sorted({k.split(".")[0] for k in dropped}) == ["cls", "temp"]
    qb, vb = sd["vision_model.blocks.1.attn.q_bias"], sd["vision_model.blocks.1.attn.v_bias"]
    bias = hf["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    assert torch.equal(bias, torch.cat([qb, torch.zeros_like(qb), vb]))  # [q, 0, v] (docs/paper_map.md §8.3)
    assert torch.equal(hf["vision_model.post_layernorm.weight"], sd["ln_vision.weight"])
    assert "vision_model.embeddings.class_embedding" in hf and "embeddings.word_embeddings.weight" in hf
    again = hf_to_ours(hf, model.config.vision)
    assert set(again) == set(sd) - set(dropped) and all(torch.equal(again[k], sd[k]) for k in again)


def test_config_from_hf_eps_t5_and_retrieval():
    hf = {
        "architectures": ["Blip2ForConditionalGeneration"],
        "num_query_tokens": 32,
        "vision_config": {"hidden_size": 1408, "layer_norm_eps": 1e-6, "image_size": 364},
        "qformer_config": {"vocab_size": 30522, "cross_attention_frequency": 2},
        "text_config": {"model_type": "t5", "is_encoder_decoder": True, "d_model": 2048, "dense_act_fn": "gelu"},
    }
    cfg, kind = config_from_hf(hf)
    assert kind == "stage2" and cfg.vision.ln_vision_eps == 1e-6 and cfg.vision.image_size == 364  # not LAVIS 1e-5
    assert cfg.llm.family == "t5" and cfg.llm.hidden_size == 2048 and cfg.llm.exact_gelu
    assert not cfg.qformer.use_text_input and cfg.qformer.encoder_hidden_size == 1408
    cfg, kind = config_from_hf(
        {"architectures": ["Blip2ForImageTextRetrieval"], "qformer_config": {"vocab_size": 30523}}
    )
    assert kind == "retrieval" and cfg.llm is None and cfg.qformer.use_text_input and cfg.qformer.dec_token_id == 30522


def test_group_keys():
    assert group_keys(["temp", "itm_head.bias", "qformer.x", "vision_model.a"]) == {
        "heads": ["itm_head.bias", "temp"],
        "qformer": ["qformer.x"],
        "vision_model": ["vision_model.a"],
    }


@pytest.fixture
def opt_model():
    return Blip2(tiny_config("opt")).eval()


def _hf_dir(tmp_path, model):
    save_pretrained_hf(model, tmp_path / "hf", check=False)
    return tmp_path / "hf"


def test_hf_tied_head_and_embedding_rows_from_shapes(tmp_path, opt_model):
    d = _hf_dir(tmp_path, opt_model)
    from safetensors.torch import load_file

    assert "language_model.lm_head.weight" not in load_file(d / "model.safetensors")  # stored once, tied
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["image_token_index"] == 98  # no tokenizer → last row of the 99-row table
    model, rep = from_pretrained(d, return_report=True)
    lm = model.language_model
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    assert "language_model.lm_head.weight" in rep.expected and not rep.missing
    assert lm.get_input_embeddings().weight.shape[0] == 99


def test_missing_and_unexpected_keys_are_errors(tmp_path, opt_model):
    d = _hf_dir(tmp_path, opt_model)
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    del sd["qformer.encoder.layer.0.crossattention.attention.key.weight"]
    sd["qformer.extra.weight"] = torch.zeros(1)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LoadError, match=r"crossattention\.attention\.key\.weight.*qformer\.extra\.weight"):
        from_pretrained(d)
    model, rep = from_pretrained(d, strict=False, return_report=True)
    assert rep.missing == {"qformer": ["qformer.encoder.layer.0.crossattention.attention.key.weight"]}
    assert rep.unexpected == {"qformer": ["qformer.extra.weight"]}


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_missing_checkpoint_path_is_named_plainly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint 'runs/x/opt' does not exist \(relative paths start at "):
        from_pretrained("runs/x/opt", config=tiny_config())


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": {"x": _Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(LoadError, match="weights_only"):
        from_pretrained(tmp_path / "evil.pth", config=tiny_config())


def test_lavis_stage2_without_llm_path_is_an_error(tmp_path):
    sd = {
        "query_tokens": torch.zeros(1, 32, 768),
        "opt_proj.weight": torch.zeros(2560, 768),
        "visual_encoder.cls_token": torch.zeros(1, 1, 1408),
        "visual_encoder.pos_embed": torch.zeros(1, 257, 1408),
    }
    torch.save({"model": sd}, tmp_path / "s2.pth")
    with pytest.raises(LoadError, match="llm_path"):
        from_pretrained(tmp_path / "s2.pth")


def _training_ckpt(tmp_path, model, vision_file="", llm_dir=""):
    config = {"model": config_to_dict(model.config), "stage": "stage2" if hasattr(model, "language_model") else
              "stage1", "parent": "", "vision_weights": vision_file, "llm_path": llm_dir, "bert_dir": ""}  # fmt: skip
    return save_training_state(tmp_path / "ckpts", model=model, optimizer=None, scheduler_state=None, scaler=None,
                               step=3, data_state=None, extra=None, config=config)  # fmt: skip


def test_training_checkpoint_round_trip(tmp_path, opt_model):
    torch.save(opt_model.vision_model.state_dict(), tmp_path / "vit.pth")  # LAVIS EVA names = timm names
    opt_model.language_model.save_pretrained(tmp_path / "llm")
    with torch.no_grad():
        opt_model.query_tokens.add_(1.0)  # a trained tensor differs from any fresh init
    ck = _training_ckpt(tmp_path, opt_model, str(tmp_path / "vit.pth"), str(tmp_path / "llm"))
    back, rep = from_pretrained(tmp_path / "ckpts", return_report=True)  # run dir → newest ckpt
    pix = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(back.soft_prompt(pix), opt_model.soft_prompt(pix))
    assert rep.source == "training" and not rep.missing
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256"):
        from_pretrained(ck)


def test_training_checkpoint_without_frozen_sources_is_an_error(tmp_path):
    model = Blip2QFormerModel(tiny_config())
    ck = _training_ckpt(tmp_path, model)
    with pytest.raises(LoadError, match="vision_weights"):
        from_pretrained(ck)


def test_failed_check_writes_nothing(tmp_path, opt_model, monkeypatch):
    import blip2lib.convert as conv

    monkeypatch.setattr(conv, "compare_to_hf", lambda *a, **k: {"logits": 1.0, "eps_effect": 0.0})
    with pytest.raises(ValueError, match="nothing written"):
        save_pretrained_hf(opt_model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
    save_pretrained_hf(opt_model, tmp_path / "ok", check=False)
    with pytest.raises(FileExistsError):
        save_pretrained_hf(opt_model, tmp_path / "ok")


@pytest.mark.slow
def test_cli_hf_to_lavis_and_back(tmp_path, capsys):
    model = Blip2QFormerModel(tiny_config()).eval()
    save_pretrained_hf(model, tmp_path / "hf", check=False)
    assert main(["hf-to-lavis", str(tmp_path / "hf"), "--out", str(tmp_path / "m.pth")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert max(v for k, v in out["max_abs"].items() if k != "eps_effect") <= 1e-5
    sd = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in sd and "visual_encoder.cls_token" in sd
    # Back to transformers needs our config (tiny head counts are not in a LAVIS file): use the library call.
    back = from_pretrained(tmp_path / "m.pth", config=model.config)
    diffs = save_pretrained_hf(back, tmp_path / "hf2")
    assert max(v for k, v in diffs.items() if k != "eps_effect") <= 1e-5


def test_convert_library_never_imports_the_loaders():
    """One-way imports: ``blip2lib.pretrained`` uses the key maps of ``blip2lib.convert``, never the reverse.

    Every import statement of the conversion library (module level or inside functions) is read from its syntax tree;
    none may name the loaders. The command line (``blip2lib.convert.__main__``) is the one place that uses both.
    """
    import ast

    package = Path(blip2lib.convert.__file__).parent  # __init__.py re-exports mapping.py's names lazily
    tree = ast.Module(body=[*ast.parse((package / "__init__.py").read_text()).body,
                            *ast.parse((package / "mapping.py").read_text()).body], type_ignores=[])  # fmt: skip
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert "..config" in imported and "..vision" in imported  # the walk sees the real imports
    assert not {m for m in imported if m.endswith("pretrained")}, imported
    cli = ast.parse((package / "__main__.py").read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "pretrained" and n.level == 2 for n in ast.walk(cli))


def test_save_pretrained_methods_write_what_the_functions_write(tmp_path, opt_model):
    """``model.save_pretrained`` is the function under a method name: same bytes, and the export loads back."""
    import safetensors.torch

    from blip2lib.pretrained import save_lavis

    opt_model.save_pretrained(tmp_path / "m_hf", check=False)
    save_pretrained_hf(opt_model, tmp_path / "f_hf", check=False)
    a = safetensors.torch.load_file(tmp_path / "m_hf" / "model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "f_hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = from_pretrained(tmp_path / "m_hf")
    ours, theirs = opt_model.state_dict(), back.state_dict()
    shared = ours.keys() & theirs.keys()
    assert len(shared) >= len(ours) - 2  # at most the tied/derived buffers differ by name
    assert all(torch.equal(theirs[k], ours[k]) for k in shared)

    qf = Blip2QFormerModel(tiny_config()).eval()
    qf.save_pretrained(tmp_path / "m.pth", format="lavis", check=False)
    save_lavis(qf, tmp_path / "f.pth", check=False)
    a, b = (torch.load(tmp_path / n, weights_only=True)["model"] for n in ("m.pth", "f.pth"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in a
    with pytest.raises(ValueError, match="format must be 'transformers' or 'lavis'"):
        qf.save_pretrained(tmp_path / "x", format="onnx")
    assert not (tmp_path / "x").exists()
