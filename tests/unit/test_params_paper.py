"""The ``paper_*`` params files describe real runs: every row names its own files, metric names are accepted.

What is pinned here:

* per-row ``checkpoints`` mappings are validated when params are loaded (unknown key → the file, row and key, with
  the nearest valid key);
* the caption evaluator accepts pycocoevalcap's result names (``Bleu_4`` ...) as well as its scorer groups, and
  computes the same numbers for both spellings;
* every ``paper_*`` file loads with its notebook's schema, every row names the checkpoint, vision tower file and LLM
  directory its model needs (read from the model name, independently of the params files), paper-target ids exist;
* the README's "paper path" table equals the one generated from the params files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2lib.config import ParamsError
from blip2lib.workbook.runner import load_params
from blip2lib.workbook.schemas import CaptioningParams, ZeroShotVQAParams

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# per-row checkpoint mappings


def _write(tmp_path: Path, notebook: str, text: str) -> Path:
    path = tmp_path / "params" / notebook / "paper_x.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_row_with_unknown_key_names_file_row_key_and_nearest(tmp_path):
    row = "checkpoints:\n  vitg_opt2.7b: {checkpoint: a.pth, llm_dir: weights/opt-2.7b}\n"
    path = _write(tmp_path, "41_zeroshot_vqa", row)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: key 'checkpoints': row 'vitg_opt2.7b': unknown key 'llm_dir'")
    assert "did you mean 'llm_path'?" in msg
    assert "['checkpoint', 'vision_weights', 'llm_path', 'bert_dir']" in msg


def test_row_key_far_from_every_valid_key_gets_no_suggestion():
    with pytest.raises(ParamsError, match=r"unknown key 'zzz' \(valid keys: "):
        ZeroShotVQAParams.from_dict({"checkpoints": {"m": {"checkpoint": "a", "zzz": "b"}}}, "f.yaml")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"llm_path": "weights/opt-2.7b"}, r"f\.yaml: key 'checkpoints': row 'm' names no 'checkpoint'"),
        ({"checkpoint": "a", "llm_path": 3}, r"row 'm': key 'llm_path' must be a string, got 3"),
        (7, r"row 'm' must be a path or a mapping of \['checkpoint', 'vision_weights', 'llm_path', 'bert_dir'\]"),
    ],
)
def test_malformed_rows_are_refused(row, match):
    with pytest.raises(ParamsError, match=match):
        ZeroShotVQAParams.from_dict({"checkpoints": {"m": row}}, "f.yaml")


def test_rows_mix_plain_paths_and_mappings():
    rows = {"a": "runs/x", "b": {"checkpoint": "b.pth", "vision_weights": "v.pth", "llm_path": "l", "bert_dir": "d"}}
    assert ZeroShotVQAParams.from_dict({"checkpoints": rows}, "f.yaml").checkpoints == rows


# ---------------------------------------------------------------------------------------------------------------
# caption metric names


def test_caption_params_accept_result_names_and_groups():
    names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert CaptioningParams.from_dict({"metrics": names}, "c.yaml").metrics == names
    groups = ["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert CaptioningParams.from_dict({"metrics": groups}, "c.yaml").metrics == groups


def test_caption_params_unknown_metric_names_it_and_the_choices():
    with pytest.raises(ParamsError) as err:
        CaptioningParams.from_dict({"metrics": ["Bleu_4", "BLEU-4"]}, "c.yaml")
    msg = str(err.value)
    assert msg.startswith("c.yaml: key 'metrics': unknown metrics ['BLEU-4']")
    assert "['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE']" in msg
    assert "['BLEU', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE']" in msg


def test_evaluator_params_accept_result_names():
    from blip2lib.evaluate.__main__ import SCHEMAS, _check

    p = SCHEMAS["caption"].from_dict({"metrics": ["Bleu_4", "CIDEr"], "data_root": "d", "out_dir": "o",
                                      "split": "coco_karpathy_test"}, "e.yaml")  # fmt: skip
    _check(p, "e.yaml")
    p = SCHEMAS["caption"].from_dict({"metrics": ["Bleu4"], "data_root": "d", "out_dir": "o",
                                      "split": "coco_karpathy_test"}, "e.yaml")  # fmt: skip
    with pytest.raises(ParamsError, match=r"e\.yaml: key 'metrics': unknown metrics \['Bleu4'\]"):
        _check(p, "e.yaml")


def test_metric_groups_order_and_mapping():
    from blip2lib.evaluate.caption import metric_groups

    assert metric_groups(["SPICE", "Bleu_4", "CIDEr", "Bleu_1"]) == ("BLEU", "CIDEr", "SPICE")
    assert metric_groups(["ROUGE_L", "METEOR", "BLEU"]) == ("BLEU", "METEOR", "ROUGE_L")
    assert metric_groups([]) == ()


def test_result_names_score_like_groups():
    """``Bleu_4`` runs the BLEU scorer: the numbers equal pycocoevalcap's own on the PTB-tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from blip2lib.evaluate.caption import coco_caption_scores

    refs = {1: ["a dog on the grass.", "a brown dog runs on grass"], 2: ["a cat in a kitchen", "the cat sits inside"],
            3: ["a man near a road", "a person walks by the road"]}  # fmt: skip
    preds = {1: "A dog on the grass!", 2: "a cat sitting in the kitchen", 3: "a red bus"}
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in preds})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in preds})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    ours = coco_caption_scores(preds, refs, metrics=("Bleu_4", "CIDEr"))
    assert ours["Bleu_4"] == pytest.approx(100 * bleu[3], abs=1e-9)
    assert ours["Bleu_1"] == pytest.approx(100 * bleu[0], abs=1e-9)  # the scorer reports all four orders
    assert ours["CIDEr"] == pytest.approx(100 * cider, abs=1e-9)
    assert "METEOR" not in ours and "SPICE" not in ours
