"""Caption scoring: our numbers equal a direct pycocoevalcap run (COCO objects + PTB tokenizer).

See docs/paper_map.md §5.2.

The tokenizer runs a Java subprocess (~1 s per call here); METEOR restarts Java and loads its paraphrase table
(~30 s on the shared 2-core machine), so the METEOR comparison is marked slow.
"""

import dataclasses
import json
import subprocess

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

from blip2lib.evaluate import caption
from blip2lib.evaluate.caption import (
    CaptionDecoding,
    JavaNotFoundError,
    coco_caption_scores,
    nocaps_breakdown,
    write_nocaps_submission,
)

OBJECTS = ["dog", "cat", "man", "woman", "bus", "pizza"]
PLACES = ["on the grass", "in a kitchen", "near a road", "at the beach", "in a city street"]
DOMAINS = {
    101: "in-domain",
    102: "in-domain",
    103: "near-domain",
    104: "near-domain",
    105: "out-domain",
    106: "out-domain",
}


def _fixture():
    """6 images x 5 references (COCO format, NoCaps-style domains) and predictions with punctuation and case."""
    images, anns = [], []
    for n, obj in enumerate(OBJECTS):
        img_id = 101 + n
        images.append({"id": img_id, "file_name": f"{img_id}.jpg", "domain": DOMAINS[img_id]})
        for r, place in enumerate(PLACES):
            text = f"A {obj} {'sitting' if r % 2 else 'standing'} {place}."
            anns.append({"id": len(anns) + 1, "image_id": img_id, "caption": text})
    preds = {
        101: "A dog standing on the grass.",  # equals a reference
        102: "a cat, sitting in a kitchen",
        103: "A MAN near the road!",
        104: "two women at a beach",
        105: "a red bus driving down a city street",
        106: "a plate of food on a table",
    }
    return {"images": images, "annotations": anns}, preds


def _direct(gt, preds, tmp_path, scorers):
    """What LAVIS's coco_caption_eval does: COCO + loadRes, PTB-tokenise imgToAnns, run the scorers (x100)."""
    ann_file, res_file = tmp_path / "gt.json", tmp_path / "res.json"
    ann_file.write_text(json.dumps({**gt, "info": {}, "licenses": []}))
    res_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in preds.items()]))
    coco = COCO(str(ann_file))
    res = coco.loadRes(str(res_file))
    ids = res.getImgIds()
    tok = PTBTokenizer()
    g = tok.tokenize({i: coco.imgToAnns[i] for i in ids})
    r = tok.tokenize({i: res.imgToAnns[i] for i in ids})
    out = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(g, r)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            out[name] = 100 * value
    return out, g, r


FAST = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]


def test_scores_equal_direct_pycocoevalcap(tmp_path):
    gt, preds = _fixture()
    ours = coco_caption_scores(preds, gt, metrics=("BLEU", "ROUGE_L", "CIDEr"))
    ref, _, _ = _direct(gt, preds, tmp_path, FAST)
    for name, value in ref.items():
        assert ours[name] == value, name  # exact: same tokenizer, same scorer, same x100
    assert ours["unit"] == "percent" and ours["n_images"] == 6
    assert "METEOR" not in ours and "SPICE" not in ours  # explicitly skipped
    assert 1.0 < ours["CIDEr"] and ours["Bleu_1"] <= 100.0  # percent scale, not 0-1
    # the JSON path form gives the same numbers
    path = tmp_path / "gt_copy.json"
    path.write_text(json.dumps(gt))
    assert coco_caption_scores(preds, path, metrics=("CIDEr",))["CIDEr"] == ref["CIDEr"]


def test_prediction_equal_to_a_reference_scores_full_bleu():
    gt, _ = _fixture()
    preds = {101 + n: f"A {obj} standing on the grass." for n, obj in enumerate(OBJECTS)}  # reference 0 each
    res = coco_caption_scores(preds, gt, metrics=("BLEU",))
    for n in range(1, 5):  # all n-gram precisions 1 and brevity penalty 1 (closest reference has equal length)
        assert res[f"Bleu_{n}"] == pytest.approx(100.0, abs=1e-4)


@pytest.mark.slow
def test_meteor_equals_direct_call(tmp_path):
    from pycocoevalcap.meteor.meteor import Meteor

    gt, preds = _fixture()
    ours = coco_caption_scores(preds, gt, metrics=("METEOR",))
    ref, _, _ = _direct(gt, preds, tmp_path, [(Meteor(), ["METEOR"])])
    assert ours["METEOR"] == ref["METEOR"] and 0 < ours["METEOR"] < 100


def test_spice_unavailable_is_none_with_reason(monkeypatch):
    gt, preds = _fixture()
    monkeypatch.setattr(caption, "spice_models_available", lambda: (False, "stanford-corenlp-3.6.0.jar is missing"))
    res = coco_caption_scores(preds, gt, metrics=("CIDEr", "SPICE"))
    assert res["SPICE"] is None and res["SPICE_status"] == "not computed: stanford-corenlp-3.6.0.jar is missing"
    assert res["CIDEr"] > 0


def test_spice_crash_is_none_with_reason(monkeypatch):
    import pycocoevalcap.spice.spice as spice_mod

    class Boom:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(caption, "spice_models_available", lambda: (True, "ok"))
    monkeypatch.setattr(spice_mod, "Spice", Boom)
    gt, preds = _fixture()
    res = coco_caption_scores(preds, gt, metrics=("SPICE",))
    assert res["SPICE"] is None and res["SPICE_status"].startswith("not computed: SPICE failed (CalledProcessError")


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    gt, preds = _fixture()
    with pytest.raises(JavaNotFoundError, match="Java was not found on PATH") as err:
        coco_caption_scores(preds, gt, metrics=("CIDEr",))
    assert "apt-get install default-jre-headless" in str(err.value)


def test_id_checks_and_subset(tmp_path):
    gt, preds = _fixture()
    with pytest.raises(ValueError, match="1 predicted image ids have no references"):
        coco_caption_scores({**preds, 999: "x"}, gt, metrics=("CIDEr",))
    part = {i: preds[i] for i in (101, 102, 103)}
    with pytest.raises(ValueError, match="3 reference images have no prediction"):
        coco_caption_scores(part, gt, metrics=("CIDEr",))
    ours = coco_caption_scores(part, gt, metrics=("CIDEr",), allow_subset=True)
    ref, _, _ = _direct(gt, part, tmp_path, [(Cider(), ["CIDEr"])])  # loadRes restricts to the predicted ids
    assert ours["CIDEr"] == ref["CIDEr"] and ours["n_images"] == 3
    with pytest.raises(ValueError, match="unknown metrics"):
        coco_caption_scores(preds, gt, metrics=("BLEU-4",))


def test_nocaps_breakdown_per_domain_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(caption, "spice_models_available", lambda: (False, "offline"))  # keep it fast everywhere
    gt, preds = _fixture()
    ours = nocaps_breakdown(preds, gt)  # domains read from gt["images"]; default metrics CIDEr + SPICE
    _, g, r = _direct(gt, preds, tmp_path, [])
    for name in ("in-domain", "near-domain", "out-domain"):
        ids = [i for i in sorted(DOMAINS) if DOMAINS[i] == name]
        cider, _ = Cider().compute_score({i: g[i] for i in ids}, {i: r[i] for i in ids})  # its own corpus
        assert ours[name]["CIDEr"] == 100 * cider and ours[name]["n_images"] == 2
        assert ours[name]["SPICE"] is None and ours[name]["SPICE_status"] == "not computed: offline"
    assert ours["overall"]["CIDEr"] == coco_caption_scores(preds, gt, metrics=("CIDEr",))["CIDEr"]
    assert ours["unit"] == "percent"
    explicit = nocaps_breakdown(preds, gt, domains=DOMAINS, metrics=("CIDEr",))
    assert explicit["out-domain"]["CIDEr"] == ours["out-domain"]["CIDEr"]
    with pytest.raises(ValueError, match="needs a domain"):
        nocaps_breakdown(preds, gt, domains={**DOMAINS, 106: "far-domain"}, metrics=("CIDEr",))


def test_nocaps_submission_format(tmp_path):
    path = write_nocaps_submission({"12": "a dog", 3: "a cat"}, tmp_path / "out" / "nocaps_val.json")
    assert json.loads(path.read_text()) == [{"image_id": 3, "caption": "a cat"}, {"image_id": 12, "caption": "a dog"}]


def test_caption_decoding_recipes():
    paper, head = CaptionDecoding.paper(), CaptionDecoding.lavis_head()
    assert (paper.num_beams, paper.min_new_tokens, paper.max_new_tokens) == (5, 8, 30)
    assert (paper.repetition_penalty, paper.length_penalty, paper.prompt) == (1.0, 1.0, "a photo of")
    assert (head.repetition_penalty, head.length_penalty) == (1.15, 0.0)
    assert head.num_beams == 5 and head.max_new_tokens == 30 and head.min_new_tokens == 8
    assert paper.generate_kwargs()["min_new_tokens"] == 8 and paper.generate_kwargs()["do_sample"] is False
    # lengths: paper = generated tokens (generate's default rule, not passed); LAVIS = counted as LAVIS HEAD does
    assert paper.length_rule == "new" and "length_rule" not in paper.generate_kwargs()
    assert head.length_rule == "lavis_head" and head.generate_kwargs() == {
        "num_beams": 5,
        "max_new_tokens": 30,
        "min_new_tokens": 8,
        "repetition_penalty": 1.15,
        "length_penalty": 0.0,
        "length_rule": "lavis_head",
        "do_sample": False,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.num_beams = 1
