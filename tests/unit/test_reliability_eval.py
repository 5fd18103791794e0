"""Reliability of evaluation: no answer of another model reused, duplicate ids refused, duplicate captions counted.

Each test reproduces a failure found by an attack run and pins the fix (the drivers and the command line in
``blip2lib/evaluate``).
"""

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from blip2lib.config import tiny_config
from blip2lib.data import FORMATS, AnnotationError, QuestionProcessor, VQAEvalDataset, image_eval_transform
from blip2lib.evaluate import VQADecoding, run_vqa
from blip2lib.evaluate.__main__ import main
from blip2lib.model import Blip2
from blip2lib.pretrained import save_pretrained_hf
from blip2lib.toy.synthetic import tiny_llm_tokenizer

torch.set_num_threads(1)

QUESTIONS = ["What colour is the dog?", "How many cats?", "What is on the mat?"]


def _vqa_split(root, qids=(100, 101, 102)):
    """A ``vqa_val_eval`` file in the FORMATS layout with one random 28-px image per question."""
    entries = []
    for i, qid in enumerate(qids):
        img = f"val2014/COCO_val2014_{i:012d}.jpg"
        (root / "coco/images/val2014").mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (28, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "coco/images" / img)
        entries.append({"question_id": qid, "question": QUESTIONS[i % 3], "image": img, "answer": ["red"] * 10})
    path = root / FORMATS["vqa_val_eval"]["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def _checkpoint(path, seed):
    """A transformers directory of a tiny OPT model with random weights of spread (different seeds answer apart)."""
    torch.manual_seed(seed)
    model = Blip2(tiny_config("opt"), tokenizer=tiny_llm_tokenizer("opt"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("vision_model") and "layernorm" not in n.lower():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_pretrained_hf(model.eval(), path, check=False)
    return path


def _params(tmp_path, name, **kw):
    values = {"data_root": str(tmp_path / "data"), "split": "vqa_val_eval", "batch_size": 2, "progress": False}
    if kw.get("split", "vqa_val_eval") == "vqa_val_eval":
        values.update(num_beams=2, max_new_tokens=3)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**values, **kw}))
    return path


def _answers(folder):
    return json.loads((folder / "predictions.json").read_text())


# ---- item 1: the prediction cache is keyed on everything that changes an answer ----


def test_second_checkpoint_into_same_out_dir_generates_its_own_answers(tmp_path):
    _vqa_split(tmp_path / "data")
    a, b = _checkpoint(tmp_path / "A", seed=1), _checkpoint(tmp_path / "B", seed=2)
    shared = tmp_path / "shared"
    assert main(["vqa", "--params", str(_params(tmp_path, "a", checkpoint=str(a), out_dir=str(shared)))]) == 0
    a_answers = _answers(shared)
    assert main(["vqa", "--params", str(_params(tmp_path, "b", checkpoint=str(b), out_dir=str(shared)))]) == 0
    res = json.loads((shared / "result.json").read_text())
    # was: generated_this_run 0, from_cache 3 -- A's answers under B's name
    assert res["timing"]["from_cache"] == 0 and res["timing"]["generated_this_run"] == 3
    assert res["config"]["identity"]["checkpoint"]["path"] == str(b.resolve())
    assert res["cache"]["key"]["identity"]["checkpoint"]["path"] == str(b.resolve())
    changed = res["cache"]["superseded"]["changed"]
    assert "identity.checkpoint.path" in changed and "weights_sha256_sampled" in changed
    # B's answers are exactly those of B evaluated into a fresh folder
    assert main(["vqa", "--params", str(_params(tmp_path, "b2", checkpoint=str(b), out_dir=str(tmp_path / "f")))]) == 0
    assert _answers(shared) == _answers(tmp_path / "f") != a_answers
    # A's cache and results were moved aside, not deleted, and still name A
    moved = tmp_path / "shared" / res["cache"]["superseded"]["moved_to"]
    old = json.loads((moved / "result.json").read_text())
    assert old["config"]["identity"]["checkpoint"]["path"] == str(a.resolve()) and _answers(moved) == a_answers
    assert (moved / "predictions.0.jsonl").is_file() and not (shared / "superseded").exists()
    # the same checkpoint again reuses everything
    assert main(["vqa", "--params", str(_params(tmp_path, "b3", checkpoint=str(b), out_dir=str(shared)))]) == 0
    again = json.loads((shared / "result.json").read_text())
    assert again["timing"]["from_cache"] == 3 and again["cache"]["superseded"] is None


def test_changed_annotation_file_image_size_or_seed_supersedes_the_cache(tmp_path):
    ann = _vqa_split(tmp_path / "data")
    out = tmp_path / "o"

    def run(**kw):
        assert main(["vqa", "--params", str(_params(tmp_path, "p", checkpoint="tiny", out_dir=str(out), **kw))]) == 0
        return json.loads((out / "result.json").read_text())

    assert run()["timing"]["generated_this_run"] == 3
    entries = json.loads(ann.read_text())
    entries[1]["question"] = "How many dogs?"  # same length, same ids: only the content changed
    ann.write_text(json.dumps(entries))
    res = run()
    assert res["timing"]["from_cache"] == 0
    assert {"data.annotations_sha256", "identity.ann_file.sha256"} <= set(res["cache"]["superseded"]["changed"])
    res = run(seed=7)  # "tiny" is a random model: the seed makes it
    assert res["timing"]["from_cache"] == 0 and "identity.checkpoint.seed" in res["cache"]["superseded"]["changed"]
    res = run(seed=7, image_size=35)
    assert res["timing"]["from_cache"] == 0 and "image_size" in res["cache"]["superseded"]["changed"]
    assert len(list(out.glob("superseded-*"))) == 3


# ---- item 4: a repeated question id is an error naming the id and the file; shared captions are counted ----


def test_duplicate_question_id_is_refused_before_generation(tmp_path, capsys):
    ann = _vqa_split(tmp_path / "data", qids=(100, 101, 101))  # was: n_predicted 2 of 3, complete: true
    out = tmp_path / "o"
    assert main(["vqa", "--params", str(_params(tmp_path, "p", checkpoint="tiny", out_dir=str(out)))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {ann.resolve()}: question_id 101 appears 2 times (entries 1 and 2, counted from 0); "
                   "each must appear once, or one answer would overwrite the other")  # fmt: skip
    assert not out.exists()  # nothing generated
    ds = VQAEvalDataset(tmp_path / "data/coco/images", ann, image_eval_transform(28), QuestionProcessor())
    model = Blip2(tiny_config("opt"), tokenizer=tiny_llm_tokenizer("opt"))
    with pytest.raises(AnnotationError, match=r"^VQAEvalDataset annotations: question_id 101 appears 2 times"):
        run_vqa(model, ds, VQADecoding(prompt="{}", max_new_tokens=1), 2, out, "v", progress=False)


def test_duplicate_question_id_in_official_annotations_names_that_file(tmp_path, capsys):
    _vqa_split(tmp_path / "data")
    gt = tmp_path / "data/official.json"
    rows = [{"question_id": q, "answers": [{"answer": "red"}] * 10} for q in (100, 101, 102, 102)]
    gt.write_text(json.dumps({"annotations": rows}))
    path = _params(tmp_path, "p", checkpoint="tiny", out_dir=str(tmp_path / "o"), annotations="official.json")
    assert main(["vqa", "--params", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {gt}: question_id 102 appears 2 times (entries 2 and 3,")


def test_same_caption_on_two_images_is_warned_about_and_counted(tmp_path, caplog):
    root = tmp_path / "data"
    captions = [["a red dog", "a dog on grass"], ["A red dog.", "two cats"], ["a blue square", "a square"]]
    entries = []
    for i, caps in enumerate(captions):
        img = f"img{i}.jpg"
        (root / "flickr30k/images").mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (28, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "flickr30k/images" / img)
        entries.append({"image": img, "caption": caps})
    ann = root / FORMATS["flickr30k_test"]["file"]
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(entries))
    path = _params(tmp_path, "r", checkpoint="tiny", out_dir=str(tmp_path / "o"), split="flickr30k_test", k=2)
    with caplog.at_level(logging.WARNING, logger="blip2lib.evaluate.integrity"):
        assert main(["retrieval", "--params", str(path)]) == 0
    res = json.loads((tmp_path / "o/result.json").read_text())
    # "A red dog." becomes "a red dog" under blip_caption: one text shared by images 0 and 1, two captions
    shared = {"texts": 1, "captions_affected": 2, "examples": [{"caption": "a red dog", "images": [0, 1]}]}
    assert res["counts"]["duplicate_captions"] == shared
    assert any("1 caption text(s) belong to more than one image" in r.getMessage() and str(ann.resolve()) in
               r.getMessage() for r in caplog.records)  # fmt: skip
