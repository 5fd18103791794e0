"""The evaluation command line (blip2lib/evaluate/__main__.py): params checks, model and data set-up, driver calls.

The mutation pass (docs/mutation.md) showed these unpinned: the exact error messages, the device choice, the
model loader's fallbacks and messages, which reader each split gets, how recipe overrides are labelled, every
argument handed to the three drivers, and the exit codes and printout of ``main``. The drivers themselves are
replaced by recorders here (they have their own tests), so each test checks only what the command line decides.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import blip2lib
from blip2lib.config import ParamsError
from blip2lib.data import (
    FORMATS,
    CaptionEvalDataset,
    GQAEvalDataset,
    NoCapsDataset,
    RetrievalEvalDataset,
    VQAEvalDataset,
)
from blip2lib.evaluate import __main__ as cli
from blip2lib.evaluate.caption import ALL_METRICS, CaptionDecoding
from blip2lib.evaluate.retrieval import FUSIONS
from blip2lib.evaluate.vqa import VQADecoding
from blip2lib.generation import LENGTH_RULES
from blip2lib.model import Blip2, Blip2QFormerModel

SRC = "p.yaml"


def vqa(**kw):
    return cli.VQAParams(**{"data_root": "/d", "out_dir": "/o", "split": "vqa_val_eval", **kw})


# ----------------------------------------------------------------------------------------------------------------
# checks


@pytest.mark.parametrize(("params", "message"), [
    (vqa(family="llama"), f"{SRC}: key 'family' must be one of ['opt', 't5'], got 'llama'"),
    (vqa(recipe="hf"), f"{SRC}: key 'recipe' must be one of ['paper', 'lavis'], got 'hf'"),
    (vqa(autocast="fp32"), f"{SRC}: key 'autocast' must be one of ['', 'fp16', 'bf16'], got 'fp32'"),
    (vqa(length_rule="x"), f"{SRC}: key 'length_rule' must be one of {[None, *LENGTH_RULES]}, got 'x'"),
    (cli.RetrievalParams(data_root="/d", out_dir="/o", split="flickr30k_test", fusion="sum"),
     f"{SRC}: key 'fusion' must be one of {list(FUSIONS)}, got 'sum'"),
    (vqa(data_root=""), f"{SRC}: key 'data_root' is required (folder laid out as blip2lib/data/README.md)"),
    (vqa(out_dir=""), f"{SRC}: key 'out_dir' is required"),
    (vqa(split="vqa_val"), f"{SRC}: key 'split' must be a blip2lib.data.FORMATS key (or set ann_file and "
                           "images_root), got 'vqa_val'"),
    (vqa(split="x", ann_file="a.json"), f"{SRC}: key 'split' must be a blip2lib.data.FORMATS key (or set ann_file "
                                        "and images_root), got 'x'"),
    (cli.CaptionParams(data_root="/d", out_dir="/o", split="nocaps_val", metrics=["BLEU", "WER"]),
     f"{SRC}: key 'metrics': unknown metrics ['WER']; choose pycocoevalcap result names ['Bleu_1', 'Bleu_2', "
     f"'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE'] or scorer groups {list(ALL_METRICS)}"),
])  # fmt: skip
def test_check_messages(params, message, monkeypatch):
    monkeypatch.setattr(cli, "build_dataset", lambda *a: pytest.fail("checks come before reading anything"))
    with pytest.raises(ParamsError) as err:
        cli.run_params("vqa", params, SRC)
    assert str(err.value) == message


@pytest.mark.parametrize("params", [
    vqa(family="t5", recipe="lavis", autocast="bf16", length_rule="lavis_head"), vqa(autocast="fp16", out_dir="",
    run_dir="/r"), vqa(split="mine", ann_file="a.json", images_root="im"),
    cli.RetrievalParams(data_root="/d", out_dir="/o", split="flickr30k_test", fusion="itm"),
    cli.CaptionParams(data_root="/d", out_dir="/o", split="nocaps_val", metrics=["BLEU", "CIDEr"])])  # fmt: skip
def test_valid_params_pass_the_checks(params, monkeypatch):
    monkeypatch.setattr(cli, "build_dataset", lambda *a: (_ for _ in ()).throw(LookupError("read")))
    with pytest.raises(LookupError, match="read"):
        cli.run_params("vqa", params, SRC)


def test_device_choice(monkeypatch):
    assert cli._device("cpu") == torch.device("cpu") and cli._device("cuda:2") == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert cli._device("auto") == torch.device("cuda", 3)


# ----------------------------------------------------------------------------------------------------------------
# model loading


def test_tiny_models_are_seeded_and_sized():
    model, tok = cli.load_model(vqa(family="t5", seed=3), "vqa")
    torch.manual_seed(3)
    again, _ = cli.load_model(vqa(family="t5", seed=3), "vqa")
    assert isinstance(model, Blip2) and tok is None and model.family == "t5" and model.tokenizer is not None
    assert model.config.vision.image_size == 28
    assert model.tokenizer.convert_ids_to_tokens(0) == "<pad>"  # T5 conventions
    opt, _ = cli.load_model(vqa(family="opt"), "caption")
    assert opt.tokenizer.convert_ids_to_tokens(0) == "<s>"  # OPT conventions
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = cli.load_model(vqa(family="t5", seed=4), "vqa")
    assert not torch.equal(model.query_tokens, other.query_tokens)
    qf, bert = cli.load_model(vqa(image_size=56), "retrieval")
    assert isinstance(qf, Blip2QFormerModel) and qf.config.vision.image_size == 56
    assert bert("a dog").input_ids[0] == bert.cls_token_id


def test_from_pretrained_lookup(monkeypatch):
    from blip2lib import pretrained

    monkeypatch.delattr(blip2lib, "from_pretrained", raising=False)
    assert cli._from_pretrained() is pretrained.from_pretrained
    marker = object()
    monkeypatch.setattr(blip2lib, "from_pretrained", marker, raising=False)
    assert cli._from_pretrained() is marker
    monkeypatch.delattr(blip2lib, "from_pretrained")
    monkeypatch.setitem(sys.modules, "blip2lib.pretrained", None)  # an installation without pretrained.py
    assert cli._from_pretrained() is None
    monkeypatch.setattr(cli, "_from_pretrained", lambda: None)
    with pytest.raises(ParamsError, match="^<params>: checkpoint '/ck'"):  # no source given
        cli.load_model(vqa(checkpoint="/ck"), "vqa")
    with pytest.raises(ParamsError) as err:
        cli.load_model(vqa(checkpoint="/ck"), "vqa", SRC)
    assert str(err.value) == (
        f"{SRC}: checkpoint '/ck': loading from a path needs blip2lib.from_pretrained (blip2lib/pretrained.py), "
        "which this installation does not have; use checkpoint: tiny, or call blip2lib.evaluate.run_vqa / "
        "run_caption / run_retrieval on an in-memory model"
    )


class FakeBlip2(Blip2):
    def __init__(self, tokenizer="llm-tok"):  # no weights: only the type and the tokenizer matter here
        torch.nn.Module.__init__(self)
        self.tokenizer = tokenizer


class FakeQFormer(Blip2QFormerModel):
    def __init__(self, **toks):
        torch.nn.Module.__init__(self)
        self.__dict__.update(toks)


def _loader(monkeypatch, model):
    calls = []
    monkeypatch.setattr(cli, "_from_pretrained", lambda: lambda *a, **kw: calls.append((a, kw)) or model)
    return calls


def test_checkpoint_loading_arguments_and_tokenizers(monkeypatch):
    calls = _loader(monkeypatch, FakeBlip2())
    assert cli.load_model(vqa(checkpoint="/ck", llm_path="/llm", bert_dir="/bert"), "vqa", SRC)[1] is None
    cli.load_model(vqa(checkpoint="/ck", image_size=364, vision_weights="/vit"), "caption", SRC)
    assert calls == [(("/ck",), {"image_size": None, "model_scale": "full", "llm_path": "/llm", "bert_dir": "/bert"}),
                     (("/ck",), {"image_size": 364, "model_scale": "full", "vision_weights": "/vit"})]  # fmt: skip
    _loader(monkeypatch, FakeQFormer(qformer_tokenizer="qf-tok", tokenizer="other"))
    assert cli.load_model(vqa(checkpoint="/ck"), "retrieval", SRC)[1] == "qf-tok"
    _loader(monkeypatch, FakeQFormer(tokenizer="bert-tok"))
    assert cli.load_model(vqa(checkpoint="/ck"), "retrieval", SRC)[1] == "bert-tok"


@pytest.mark.parametrize(("model", "task", "message"), [
    (FakeBlip2(), "retrieval", f"{SRC}: checkpoint '/ck' holds a FakeBlip2; retrieval needs a Blip2QFormerModel "
                               "(stage-1 / retrieval model)"),
    (FakeQFormer(), "vqa", f"{SRC}: checkpoint '/ck' holds a FakeQFormer; vqa needs a Blip2 (stage-2 model)"),
    (FakeQFormer(), "retrieval", f"{SRC}: the checkpoint has no Q-Former tokenizer; set bert_dir"),
    (FakeBlip2(tokenizer=None), "caption", f"{SRC}: the checkpoint has no LLM tokenizer; set llm_path"),
])  # fmt: skip
def test_checkpoint_loading_messages(monkeypatch, model, task, message):
    _loader(monkeypatch, model)
    with pytest.raises(ParamsError) as err:
        cli.load_model(vqa(checkpoint="/ck"), task, SRC)
    assert str(err.value) == message


# ----------------------------------------------------------------------------------------------------------------
# datasets


def _data(root, key, entries, images):
    path = root / FORMATS[key]["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    for rel in images:
        (root / FORMATS[key]["images_root"] / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / FORMATS[key]["images_root"] / rel)


@pytest.mark.parametrize(("task", "split", "entry", "cls"), [
    ("vqa", "vqa_val_eval", {"question_id": 1, "question": "What IS it?", "answer": ["a"], "image": "i.jpg"},
     VQAEvalDataset),
    ("vqa", "gqa_testdev", {"question_id": "g1", "question": "What IS it?", "answer": "a", "image": "i.jpg"},
     GQAEvalDataset),
    ("caption", "coco_karpathy_test", {"image": "i.jpg", "caption": ["x"]}, CaptionEvalDataset),
    ("caption", "nocaps_val", {"image": "i.jpg", "img_id": 3, "domain": "in-domain"}, NoCapsDataset),
    ("retrieval", "flickr30k_test", {"image": "i.jpg", "caption": ["A Dog, running!"]}, RetrievalEvalDataset),
])  # fmt: skip
def test_reader_per_split(tmp_path, task, split, entry, cls):
    _data(tmp_path, split, [entry], ["i.jpg"])
    ds = cli.build_dataset(cli.EvalParams(data_root=str(tmp_path), split=split), task, 20)
    assert type(ds) is cls and ds.root == tmp_path / FORMATS[split]["images_root"]
    assert ds[0]["image"].shape == (3, 20, 20)
    if task == "vqa":
        assert ds[0]["text_input"] == "what is it?"  # the question processor is set
    if task == "retrieval":
        assert ds.text == ["a dog, running"]  # blip_caption: lower case, "!" dropped (commas stay)


def test_reader_paths_can_be_overridden(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "q.json").write_text(json.dumps([{"image": "i.jpg", "caption": ["x"]}]))
    p = cli.EvalParams(data_root=str(tmp_path), split="coco_karpathy_test", ann_file="mine/q.json", images_root="im")
    ds = cli.build_dataset(p, "caption", 20)
    assert ds.root == tmp_path / "im" and [(a["image"], a["caption"]) for a in ds.annotation] == [("i.jpg", ["x"])]


# ----------------------------------------------------------------------------------------------------------------
# what run_params hands to the drivers


class Model:
    def __init__(self, family="opt"):
        self.family, self.config, self.placed = family, SimpleNamespace(vision=SimpleNamespace(image_size=44)), []

    def place(self, device):
        self.placed.append(device)


@pytest.fixture
def drivers(monkeypatch):
    """Recorders for load_model, build_dataset and the three drivers; returns the call log."""
    log = {}
    model = Model()
    ds = SimpleNamespace(transform="224 px")  # built before the model; re-sized to the model's 44 px afterwards
    monkeypatch.setattr(cli, "load_model", lambda p, task, src: log.update(load=(task, src)) or (model, "tok"))
    monkeypatch.setattr(cli, "build_dataset", lambda p, task, size: log.update(data=(task, size)) or ds)
    monkeypatch.setattr(cli, "run_identity", lambda p: {"of": p.split})
    for name in ("run_vqa", "run_caption", "run_retrieval"):
        monkeypatch.setattr(cli, name, lambda *a, _n=name, **kw: log.update(driver=(_n, a, kw)) or {"ok": _n})
    log["model"], log["ds"] = model, ds
    return log


COMMON = {"batch_size": 16, "num_workers": 0, "progress": True}


def common(split):
    return {**COMMON, "identity": {"of": split}}


def test_retrieval_arguments(drivers):
    p = cli.RetrievalParams(data_root="/d", run_dir="/r", split="flickr30k_test", k=7, fusion="itc", text_max_len=9,
                            itm_batch_size=5, batch_size=3, num_workers=2, progress=False, device="cpu")  # fmt: skip
    assert cli.run_params("retrieval", p, SRC) == {"ok": "run_retrieval"}
    assert drivers["load"] == ("retrieval", SRC) and drivers["data"] == ("retrieval", 224)
    assert drivers["model"].placed == [torch.device("cpu")] and drivers["ds"].transform.transforms[0].size == (44, 44)
    assert drivers["driver"] == ("run_retrieval", (drivers["model"], drivers["ds"], "tok"), {
        "k": 7, "fusion": "itc", "text_max_len": 9, "out_dir": Path("/r"), "split_name": "flickr30k_test",
        "itm_batch_size": 5, "batch_size": 3, "num_workers": 2, "progress": False,
        "identity": {"of": "flickr30k_test"}})  # fmt: skip


def test_vqa_arguments_and_recipe_overrides(drivers):
    cli.run_params("vqa", vqa(split="okvqa_val_eval", num_beams=2, annotations="ann.json", autocast="bf16"), SRC)
    paper = VQADecoding.paper("opt")
    want = VQADecoding(**{**paper.__dict__, "num_beams": 2, "source": f"{paper.source}, overridden by {SRC}"})
    assert drivers["driver"] == ("run_vqa", (drivers["model"], drivers["ds"], want), {
        "out_dir": Path("/o"), "split_name": "okvqa_val_eval", "annotations": Path("/d/ann.json"), "gqa": False,
        "lemmatize": True, "autocast": "bf16", "pipeline": "auto", "decode_engine": "auto",
        **common("okvqa_val_eval")})  # fmt: skip
    cli.run_params("vqa", vqa(split="gqa_testdev", recipe="lavis", num_beams=5, lemmatize=False), SRC)
    _, (_, _, decoding), kw = drivers["driver"]
    assert decoding == VQADecoding.lavis_head("opt")  # the recipe's own value: not labelled as overridden
    assert (kw["annotations"], kw["gqa"], kw["lemmatize"], kw["autocast"]) == (None, True, False, None)
    cli.run_params("vqa", vqa(lemmatize=True, prompt="Q: {} A:", length_rule="lavis_head", min_new_tokens=2), SRC)
    _, (_, _, decoding), kw = drivers["driver"]
    assert (decoding.prompt, decoding.length_rule, decoding.min_new_tokens) == ("Q: {} A:", "lavis_head", 2)
    assert kw["lemmatize"] and not kw["gqa"]


def test_caption_arguments_and_ground_truth_choice(drivers):
    cp = {"data_root": "/d", "out_dir": "/o", "metrics": ["BLEU"]}
    cli.run_params("caption", cli.CaptionParams(split="coco_karpathy_test", **cp), SRC)
    assert drivers["driver"] == ("run_caption", (drivers["model"], drivers["ds"], CaptionDecoding.paper(),
                                                 Path("/d") / FORMATS["coco_karpathy_test_gt"]["file"]),
                                 {"out_dir": Path("/o"), "split_name": "coco_karpathy_test", "metrics": ("BLEU",),
                                  "autocast": None, "decode_engine": "auto",
                                  **common("coco_karpathy_test")})  # fmt: skip
    cli.run_params("caption", cli.CaptionParams(split="nocaps_test", recipe="lavis", repetition_penalty=1.5, **cp))
    lavis = CaptionDecoding.lavis_head()
    want = CaptionDecoding(**{**lavis.__dict__, "repetition_penalty": 1.5,
                              "source": f"{lavis.source}, overridden by <params>"})  # fmt: skip
    assert drivers["driver"][1][2:] == (want, None)  # no nocaps_test_gt: nothing to score
    cli.run_params("caption", cli.CaptionParams(split="coco_karpathy_test", autocast="fp16", **cp), SRC)
    assert drivers["driver"][2]["autocast"] == "fp16"
    for gt_file, gt in (("none", None), ("g/gt.json", Path("/d/g/gt.json"))):
        cli.run_params("caption", cli.CaptionParams(split="coco_karpathy_test", gt_file=gt_file, **cp), SRC)
        assert drivers["driver"][1][3] == gt
    keys = dict(num_beams=2, max_new_tokens=9, min_new_tokens=3, length_penalty=0.5, prompt="", length_rule="new")
    cli.run_params("caption", cli.CaptionParams(split="nocaps_val", **keys, **cp), SRC)
    dec = drivers["driver"][1][2]
    got = (dec.num_beams, dec.max_new_tokens, dec.min_new_tokens, dec.length_penalty, dec.prompt, dec.length_rule)
    assert got == (2, 9, 3, 0.5, "a photo of", "new")  # an empty prompt is no override: the recipe's stays


# ----------------------------------------------------------------------------------------------------------------
# main


def test_main_exit_codes_printout_and_cleanup(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"data_root": "/d", "out_dir": "/o", "split": "vqa_val_eval", "num_beams": 2}))
    seen, cleaned = [], []
    monkeypatch.setattr(cli, "run_params", lambda task, p, src: seen.append((task, p, src)) or {
        "metrics": {"overall": 1.5}, "counts": {"n": 2}, "config": "not printed"})  # fmt: skip
    timeouts = []
    monkeypatch.setattr(cli.dist, "init_distributed", lambda timeout_s: timeouts.append(timeout_s) or True)
    monkeypatch.setattr(cli.dist, "cleanup", lambda: cleaned.append(1))
    assert cli.main(["vqa", "--params", str(path)]) == 0
    assert seen == [("vqa", vqa(num_beams=2), str(path))] and cleaned == [1] and timeouts == [1800.0]
    assert capsys.readouterr().out == json.dumps({"metrics": {"overall": 1.5}, "counts": {"n": 2}}, indent=2) + "\n"
    monkeypatch.setattr(cli, "run_params", lambda task, p, src: {"metrics": {"file": Path("/r/x.json")}})
    assert cli.main(["vqa", "--params", str(path)]) == 0  # anything JSON cannot write is printed as text
    assert json.loads(capsys.readouterr().out) == {"metrics": {"file": "/r/x.json"}, "counts": {}}
    monkeypatch.setattr(cli.dist, "is_main", lambda: False)  # other ranks print nothing
    assert cli.main(["vqa", "--params", str(path)]) == 0 and capsys.readouterr().out == ""
    path.write_text("num_beam: 2\n")
    monkeypatch.setattr(cli.dist, "init_distributed", lambda timeout_s: False)
    assert cli.main(["caption", "--params", str(path)]) == 2 and cleaned == [1, 1, 1]  # not started: no cleanup
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: unknown key 'num_beam' for CaptionParams") and err.endswith("\n")


def test_main_argument_parsing(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["vqa"])
    assert exit_.value.code == 2 and "the following arguments are required: --params" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert (
        out.startswith("usage: python -m blip2lib.evaluate [-h] --params PARAMS") and "{caption,retrieval,vqa}" in out
    )
    assert "  --params PARAMS       flat YAML params file\n" in out
    assert "Command line: ``python -m blip2lib.evaluate" in out
