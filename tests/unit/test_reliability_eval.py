"""Reliability of evaluation: no answer of another model reused, duplicate ids refused, duplicate captions counted.

Each test reproduces a failure found by an attack run and pins the fix (the drivers and the command line in
``blip2lib/evaluate``).
"""

import json

import numpy as np
import torch
import yaml
from PIL import Image

from blip2lib.config import tiny_config
from blip2lib.data import FORMATS
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
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"data_root": str(tmp_path / "data"), "split": "vqa_val_eval", "batch_size": 2,
                                    "num_beams": 2, "max_new_tokens": 3, "progress": False, **kw}))  # fmt: skip
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
