"""VQA scoring details that the mutation pass of blip2lib/evaluate/vqa.py showed unpinned (docs/mutation.md).

Rounding: the official evaluator is Python 2 code, whose ``round`` takes ties away from zero; Python 3 rounds them
to even. The two differ only on an exact binary tie at the third decimal, so the cases below are built to hit one
(3.125 is exact in binary). The other checks: the fallback question type, tabs in answers, the
error messages, the submission folder and the recipe labels. Retrieval (blip2lib/evaluate/retrieval.py): the rank
dtype and the exact messages of the rank and recall checks.
"""

import json

import pytest
import torch

from blip2lib.evaluate.retrieval import ranks, recall_at_k
from blip2lib.evaluate.vqa import VQADecoding, evaluate_vqa, vqa_accuracy, write_vqav2_submission


def test_per_type_and_per_question_percentages_round_ties_away_from_zero():
    # 32 questions, one right (4 annotators agree with it): 100 / 32 = 3.125 -> 3.13 (Python 3 would give 3.12)
    ann = [
        {"question_id": i, "answers": ["yes"] * 4, "answer_type": "yes/no", "question_type": "is"} for i in range(32)
    ]
    preds = {i: "yes" if i == 0 else "no" for i in range(32)}
    out = evaluate_vqa(preds, ann)
    assert out["overall"] == out["per_answer_type"]["yes/no"] == out["per_question_type"]["is"] == 3.13


def test_question_type_defaults_to_unknown_and_tabs_are_spaces():
    out = evaluate_vqa({1: "red\tcar"}, [{"question_id": 1, "answers": ["red car"] * 10}])
    assert out["per_question_type"] == {"unknown": 100.0}


def test_messages():
    with pytest.raises(ValueError, match=r"^a question needs at least one ground-truth answer$"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match=r"expected 'official' \(GT-Vision-Lab vqaEval.py, the default\) or 'lavis' "
                       r"\(LAVIS's modified vqa_eval.py\)$"):  # fmt: skip
        vqa_accuracy("yes", ["yes"], scorer="x")


def test_submission_creates_parent_folders(tmp_path):
    path = write_vqav2_submission({5: "two"}, tmp_path / "a" / "b" / "sub.json")
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "two"}]


def test_recipe_defaults_and_labels():
    assert VQADecoding.paper() == VQADecoding(prompt="Question: {} Short answer:", source="paper §4.1 (flant5)")
    head = VQADecoding.lavis_head()
    assert (head.source, head.length_rule, head.length_penalty) == ("LAVIS HEAD yaml (flant5)", "lavis_head", -1.0)


# ---- retrieval ranks and recalls (blip2lib/evaluate/retrieval.py) ----


def test_ranks_are_long_and_name_a_row_without_ground_truth():
    out = ranks(torch.tensor([[0.1, 0.9, 0.5]]), [[2]])
    assert out.dtype == torch.long and out.tolist() == [1]  # one column (0.9) above the positive
    with pytest.raises(ValueError, match=r"^row 1 has no ground-truth column$"):
        ranks(torch.zeros(2, 3), [[0], []])


def test_recall_at_k_checks_each_mapping_length():
    message = r"^img2txt / txt2img lengths must match the score matrix rows$"
    with pytest.raises(ValueError, match=message):  # one image too many in img2txt only
        recall_at_k(torch.zeros(2, 2), [0, 1], [[0], [1], [0]])
    with pytest.raises(ValueError, match=message):  # one text too many in txt2img only
        recall_at_k(torch.zeros(2, 2), [0, 1, 1], [[0], [1]])
