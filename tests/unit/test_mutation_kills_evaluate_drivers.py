"""The evaluation drivers (blip2lib/evaluate/drivers.py): what they hand to the scorers and what result.json holds.

The mutation pass (docs/mutation.md) showed these unpinned: the bad-sample summary, rank 0's write of result.json,
where the VQA ground truth comes from, which questions and images reach the scorers (and with which flags), the
result fields (config, counts, files), the cache meta of a run, and what reaches the generation pass. The
datasets here are in memory (image ``i`` is a tensor filled with ``i``) and the scorers are replaced by recorders
where the test is about their arguments; the scorers have their own tests.
"""

import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from blip2lib.evaluate import CaptionDecoding, VQADecoding, drivers, run_caption, run_vqa

DEC = VQADecoding(prompt="Q: {} A:", num_beams=1, max_new_tokens=2)
CAP = CaptionDecoding(prompt="a photo of", num_beams=1, max_new_tokens=3, min_new_tokens=1)


class Items(Dataset):
    """In-memory eval set: ``items[i]`` dict (``image`` added), or None for an unreadable image."""

    def __init__(self, items, annotation=None):
        self.items, self.annotation = items, annotation

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return None if self.items[i] is None else {"image": torch.full((3, 2, 2), float(i)), **self.items[i]}


def questions(n, bad=()):
    return Items([None if i in bad else {"text_input": f"Q{i}?", "question_id": 100 + i} for i in range(n)])


class Answerer(nn.Module):
    """``generate`` answers ``answers[pixel value]``; records prompts and keyword arguments."""

    def __init__(self, answers, family="opt"):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.answers, self.family, self.calls = answers, family, []

    def generate(self, pixel_values, prompts, **kw):
        self.calls.append((list(prompts), kw))
        return [self.answers[int(x[0, 0, 0])] for x in pixel_values]


def meta_line(out):
    return json.loads((out / "predictions.0.jsonl").read_text().splitlines()[0])["meta"]


# ----------------------------------------------------------------------------------------------------------------
# small pieces


def test_bad_summary_lists_at_most_fifty():
    rows = [{"index": i, "bad": f"b{i}"} for i in range(52)] + [{"index": 99, "text": "ok"}]
    assert drivers._bad_summary(rows) == {"count": 52, "examples": [f"b{i}" for i in range(50)],
                                          "policy": "skipped and excluded from scoring"}  # fmt: skip


def test_finish_writes_on_rank_zero_only(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger=drivers.__name__):
        assert drivers._finish({"a": 1}, tmp_path / "o") == {"a": 1}
    assert json.loads((tmp_path / "o/result.json").read_text()) == {"a": 1}
    assert caplog.messages == [f"wrote {tmp_path / 'o' / 'result.json'}"]
    barriers = []
    monkeypatch.setattr(drivers.dist, "is_main", lambda: False)
    monkeypatch.setattr(drivers.dist, "broadcast_object", lambda obj: {"from": "rank 0", "mine": obj})
    monkeypatch.setattr(drivers.dist, "barrier", lambda: barriers.append(1))
    assert drivers._finish({}, tmp_path / "r1") == {"from": "rank 0", "mine": {}}
    assert not (tmp_path / "r1").exists() and barriers == [1]


def test_vqa_ground_truth_sources(tmp_path):
    gt = drivers._vqa_ground_truth
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"annotations": [{"question_id": 1}]}))
    assert gt(None, path, False) == gt(None, str(path), False) == {"annotations": [{"question_id": 1}]}
    given = [{"question_id": 1}]
    assert gt(None, given, False) is given
    anns = [{"question_id": 1, "answer": ("a", "b"), "answer_type": "other", "extra": 0},
            {"question_id": 2, "answer": ["c"], "question_type": "what"}]  # fmt: skip
    ds = Items([], annotation=anns)
    assert gt(ds, None, False) == [{"question_id": 1, "answers": ["a", "b"], "answer_type": "other"},
                                   {"question_id": 2, "answers": ["c"], "question_type": "what"}]  # fmt: skip
    assert gt(ds, None, True) == {1: ("a", "b"), 2: ["c"]}
    assert gt(Items([], annotation=[*anns, {"question_id": 3}]), None, False) is None  # one without answers: test
    assert gt(Items([], annotation=[]), None, False) is None and gt(Items([]), None, False) is None
    assert gt(torch.utils.data.TensorDataset(torch.zeros(1)), None, False) is None  # no annotation attribute at all


def test_score_vqa_scores_only_predicted_questions(monkeypatch, caplog):
    seen = []

    def evaluate_vqa(preds, entries, scorer):
        seen.append((dict(preds), list(entries), scorer))
        return {"overall": {"official": 1.0, "lavis": 2.0}[scorer], "per_answer_type": {scorer: 3.0},
                "scorer": scorer, "n_questions": 9}  # fmt: skip

    monkeypatch.setattr(drivers, "evaluate_vqa", evaluate_vqa)
    entries = [{"question_id": q, "answers": ["x"]} for q in (1, 2, 3)]
    out = drivers._score_vqa({1: "a", 3: "b"}, {"annotations": entries}, gqa=False, lemmatize=False)
    assert seen == [({1: "a", 3: "b"}, [entries[0], entries[2]], "official"),
                    ({1: "a", 3: "b"}, [entries[0], entries[2]], "lavis")]  # fmt: skip
    assert out == {"overall": 1.0, "per_answer_type": {"official": 3.0}, "scorer": "official", "n_questions": 9,
                   "lavis": {"overall": 2.0, "per_answer_type": {"lavis": 3.0}, "scorer": "lavis"}}  # fmt: skip
    monkeypatch.setattr(drivers, "lemmatize_answers", lambda answers: [a.upper() for a in answers])
    seen.clear()
    out = drivers._score_vqa({3: "b", 1: "a"}, entries, gqa=False, lemmatize=True)
    assert seen[0][0] == {3: "B", 1: "A"} and seen[1][0] == {3: "B", 1: "A"} and out["lemmatized"] is True
    gqa = drivers._score_vqa({"g1": "yes"}, {"g1": "yes", "g2": "no"}, gqa=True, lemmatize=False)
    assert gqa == {"overall": 100.0, "n_questions": 1, "unit": "percent", "scorer": "lavis"}
    with caplog.at_level(logging.WARNING, logger=drivers.__name__):
        assert drivers._score_vqa({}, entries, gqa=False, lemmatize=False) is None
    assert caplog.messages == ["no question could be answered (all images unreadable): nothing to score"]


def test_caption_refs_forms(tmp_path):
    coco = {"images": [{"id": 1}, {"id": 2}, {"id": 5}],
            "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"},
                            {"image_id": 2, "caption": "c"}, {"image_id": 7, "caption": "d"}]}  # fmt: skip
    want = {1: ["a", "b"], 2: ["c"], 5: [], 7: ["d"]}
    assert drivers._caption_refs(coco) == want
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    assert drivers._caption_refs(tmp_path / "gt.json") == drivers._caption_refs(str(tmp_path / "gt.json")) == want
    assert drivers._caption_refs({"annotations": [{"image_id": 3, "caption": "e"}]}) == {3: ["e"]}
    assert drivers._caption_refs({"4": ("x", "y")}) == {4: ["x", "y"]}


# ----------------------------------------------------------------------------------------------------------------
# run_vqa


def test_vqa_result_fields_and_cache_meta(tmp_path):
    anns = [{"question_id": 100 + i, "answer": ["yes"] * 10} for i in range(3)]
    ds = Items([{"text_input": f"Q{i}?", "question_id": 100 + i} for i in range(3)], annotation=anns)
    res = run_vqa(Answerer(["yes", "no", "yes"], family="t5"), ds, DEC, 2, tmp_path, "val", progress=False)
    assert res["task"] == "vqa" and res["split"] == "val"
    assert res["metrics"]["overall"] == round(200 / 3, 2) and res["metrics"]["lavis"]["overall"] == round(200 / 3, 2)
    cfg = res["config"]
    assert cfg["generate_kwargs"] == {"num_beams": 1, "length_penalty": -1.0, "max_new_tokens": 2, "min_new_tokens": 1,
                                      "do_sample": False}  # fmt: skip  # no max_prompt_len for T5
    assert cfg["question_processor"] == "blip_question (pre_question, max_words=50)"
    assert (cfg["family"], cfg["lemmatize"], cfg["batch_size"]) == ("t5", False, 2)
    assert res["counts"]["n_questions"] == 3 and res["counts"]["n_predicted"] == 3 and res["counts"]["n_scored"] == 3
    assert res["files"] == {"predictions": str(tmp_path / "predictions.json"),
                            "per_question": str(tmp_path / "per_question.json")}  # fmt: skip
    assert "per_question" not in res["metrics"]
    meta = meta_line(tmp_path)
    assert (meta["task"], meta["split"], meta["n_items"]) == ("vqa", "val", 3)
    assert meta["generate_kwargs"] == cfg["generate_kwargs"] and meta["decoding"]["prompt"] == "Q: {} A:"


def test_vqa_opt_prompt_length_and_gqa_task(tmp_path):
    model = Answerer(["yes", "no"])
    ds = Items([{"text_input": f"Q{i}?", "question_id": f"g{i}"} for i in range(2)],
               annotation=[{"question_id": "g0", "answer": "yes"}, {"question_id": "g1", "answer": "yes"}])  # fmt: skip
    res = run_vqa(model, ds, DEC, 2, tmp_path, "gqa_testdev", gqa=True, progress=False)
    assert model.calls[0] == (["Q: q0? A:", "Q: q1? A:"], {**DEC.generate_kwargs(), "max_prompt_len": 32})
    assert res["task"] == meta_line(tmp_path)["task"] == "gqa" and res["metrics"]["overall"] == 50.0
    assert res["files"] == {"predictions": str(tmp_path / "predictions.json")}  # no submission file for GQA


def test_vqa_without_answers_and_all_images_bad(tmp_path):
    res = run_vqa(Answerer([]), questions(2, bad={0, 1}), DEC, 2, tmp_path / "a", "val", progress=False,
                  annotations=[{"question_id": 100, "answers": ["x"]}])  # fmt: skip
    assert res["metrics"] is None and res["counts"]["n_scored"] == 0 and res["counts"]["n_predicted"] == 0
    assert not res["counts"]["complete"] and res["counts"]["bad_samples"]["count"] == 2
    res = run_vqa(Answerer(["r", "s"]), questions(2), DEC, 2, tmp_path / "b", "test", progress=False)
    assert res["metrics"] is None and res["counts"]["n_scored"] == 0 and res["counts"]["complete"]
    assert res["files"]["submission"] == str(tmp_path / "b" / "vqav2_submission.json")


def test_vqa_cache_of_another_split_task_or_dataset_is_not_reused(tmp_path):
    run_vqa(Answerer(["a", "b", "c"]), questions(3), DEC, 2, tmp_path, "val", progress=False)
    for kw, n, changed in (({"split_name": "test"}, 3, "split"), ({"split_name": "test"}, 2, "n_items"),
                           ({"split_name": "test", "gqa": True}, 2, "task")):  # fmt: skip
        model = Answerer(["a", "b", "c"][:n])
        res = run_vqa(model, questions(n), DEC, 2, tmp_path, progress=False, **kw)
        assert sum(len(c[0]) for c in model.calls) == n  # everything generated again
        assert changed in res["cache"]["superseded"]["changed"]


# ----------------------------------------------------------------------------------------------------------------
# run_caption


@pytest.fixture
def scorers(monkeypatch):
    log = []
    monkeypatch.setattr(drivers, "coco_caption_scores", lambda p, r, **kw: log.append(("coco", p, r, kw)) or {"s": 1})
    monkeypatch.setattr(drivers, "nocaps_breakdown", lambda p, r, **kw: log.append(("nocaps", p, r, kw)) or {"n": 2})
    return log


def images(n, bad=(), domains=None):
    return Items([None if i in bad else {"image_id": 10 + i, **({"domain": domains[i]} if domains else {})}
                  for i in range(n)])  # fmt: skip


def test_caption_scorer_arguments(tmp_path, scorers):
    refs = {10: ["r0"], 11: ["r1"], 12: ["r2"]}
    model = Answerer(["c0", "c1", "c2"], family="t5")
    res = run_caption(model, images(3), CAP, refs, 2, tmp_path / "a", "val", metrics=("BLEU",), progress=False)
    assert scorers == [("coco", {10: "c0", 11: "c1", 12: "c2"}, refs, {"metrics": ("BLEU",), "allow_subset": False})]
    assert model.calls[0][0] == ["a photo of"] * 2 and res["metrics"] == {"s": 1}
    assert res["files"] == {"predictions": str(tmp_path / "a" / "captions.json")}
    assert (res["task"], res["split"]) == ("caption", "val")
    cfg = res["config"]
    assert (cfg["family"], cfg["metrics"], cfg["batch_size"]) == ("t5", ["BLEU"], 2)
    assert cfg["generate_kwargs"] == CAP.generate_kwargs() == meta_line(tmp_path / "a")["generate_kwargs"]
    assert res["counts"] == {
        "n_images": 3,
        "n_predicted": 3,
        "complete": True,
        "bad_samples": {"count": 0, "examples": [], "policy": "skipped and excluded from scoring"},
    }
    meta = meta_line(tmp_path / "a")
    assert (meta["task"], meta["split"], meta["n_items"]) == ("caption", "val", 3)
    scorers.clear()
    res = run_caption(model, images(3, bad={1}), CAP, refs, 2, tmp_path / "b", progress=False)
    assert scorers[0][1] == {10: "c0", 12: "c2"} and scorers[0][3]["allow_subset"] is True
    assert res["counts"]["n_predicted"] == 2 and not res["counts"]["complete"]


def test_caption_nocaps_domains_reach_the_breakdown(tmp_path, scorers):
    refs = {10: ["r0"], 11: ["r1"], 12: ["r2"], 13: ["r3"]}
    ds = images(4, bad={2}, domains=["in-domain", "out-domain", "in-domain", ""])
    res = run_caption(Answerer(["c0", "c1", "c2", "c3"]), ds, CAP, refs, 4, tmp_path, progress=False)
    assert scorers == [
        (
            "nocaps",
            {10: "c0", 11: "c1", 13: "c3"},
            {10: ["r0"], 11: ["r1"], 13: ["r3"]},
            {"domains": {10: "in-domain", 11: "out-domain"}, "metrics": drivers.ALL_METRICS},
        )
    ]
    assert res["files"]["nocaps_submission"] == res["files"]["predictions"] == str(tmp_path / "captions.json")


def test_caption_without_gt_or_predictions_is_not_scored(tmp_path, scorers):
    assert run_caption(Answerer(["c0"]), images(1), CAP, None, 1, tmp_path / "a", progress=False)["metrics"] is None
    res = run_caption(Answerer([]), images(1, bad={0}), CAP, {10: ["r"]}, 1, tmp_path / "b", progress=False)
    assert res["metrics"] is None and scorers == []


def test_generation_arguments_and_defaults(tmp_path, monkeypatch):
    import dataclasses

    passes = []
    stats = {"generated_this_run": 0, "from_cache": 0, "wall_s": 0.0}

    def generation_pass(model, dataset, out, meta, batch_size, prompts, record, gen_kwargs, *rest):
        passes.append((meta, batch_size, gen_kwargs, rest))
        return {}, stats

    monkeypatch.setattr(drivers, "generation_pass", generation_pass)
    t5 = Answerer([], family="t5")
    res = run_vqa(t5, questions(2), None, 4, tmp_path / "v", "val")  # decoding None: the family's paper recipe
    paper = VQADecoding.paper("t5")
    assert passes[0][2:] == (paper.generate_kwargs(), (0, True, None)) and passes[0][0]["split"] == "val"
    assert res["config"]["decoding"] == dataclasses.asdict(paper)
    res = run_caption(t5, images(2), None, None, 4, tmp_path / "c")
    cap = CaptionDecoding.paper()
    meta = {k: passes[1][0][k] for k in ("task", "split", "n_items", "generate_kwargs")}  # the cache key has more
    assert meta == {"task": "caption", "split": "", "n_items": 2, "generate_kwargs": cap.generate_kwargs()}
    assert passes[1][1:] == (4, cap.generate_kwargs(), (0, True, None))
    assert res["config"]["decoding"] == dataclasses.asdict(cap) and res["split"] == ""
    assert res["timing"] == {"generated_this_run": 0, "from_cache": 0, "wall_s": 0.0, "per_rank": [stats]}  # no cache
    run_vqa(t5, questions(2), DEC, 4, tmp_path / "v2", "s", num_workers=3, progress=False, autocast="bf16")
    run_caption(t5, images(2), CAP, None, 4, tmp_path / "c2", "s", num_workers=3, progress=False, autocast="bf16")
    assert passes[2][3] == passes[3][3] == (3, False, "bf16")


def test_caption_records_the_autocast_precision(tmp_path):
    res = run_caption(Answerer(["c0"]), images(1), CAP, None, 1, tmp_path, progress=False, autocast="bf16")
    assert res["config"]["precision"]["autocast"] == "bf16"
    res = run_vqa(Answerer(["a"]), questions(1), DEC, 1, tmp_path / "v", "val", progress=False, autocast="fp16")
    assert res["config"]["precision"]["autocast"] == "fp16"
