"""VQA scoring (spec §5.1, §10.17): every expected score below is worked out by hand from the official rules.

Notation: A(m) = accuracy when m of the 10 (processed) annotator answers equal the processed prediction.
Leave-one-out: a matching annotator sees m-1 other matches, a non-matching one sees m, each capped at 3:
A(0)=0; A(1)=(1*0 + 9*1/3)/10=0.3; A(2)=(2*1/3 + 8*2/3)/10=0.6; A(3)=(3*2/3 + 7*1)/10=0.9; A(4)=(4*1 + 6*1)/10=1.
"""

import dataclasses
import json
import sys
import types

import pytest

from blip2lib.evaluate import vqa
from blip2lib.evaluate.vqa import (
    CONTRACTIONS,
    LemmatizerUnavailable,
    VQADecoding,
    evaluate_gqa,
    evaluate_okvqa,
    evaluate_vqa,
    gqa_accuracy,
    lemmatize_answers,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    write_vqav2_submission,
)

CASES = [
    # (prediction, gt answers, expected accuracy, hand reasoning)
    ("two", ["2"] * 10, 1.0, "pred 'two'->'2'; 10 identical GT '2' match; each sees 9 others -> min(1, 9/3)=1"),
    ("2", ["two"] * 10, 0.0, "GT never gets digit processing: 'two' != '2' -> A(0)"),
    ("none", ["0"] * 10, 1.0, "'none' is in the number table -> '0'"),
    ("zero", ["0"] * 3 + ["1"] * 7, 0.9, "'zero'->'0', 3 matches -> A(3) = (3*2/3 + 7*1)/10"),
    ("eleven", ["11"] * 10, 0.0, "only none/zero..ten are mapped; 'eleven' stays"),
    ("Ten dogs", ["10 dogs"] * 10, 1.0, "lower -> 'ten dogs' -> '10 dogs'"),
    ("The dog", ["dog"] * 10, 1.0, "lower 'the dog', article 'the' dropped -> 'dog'"),
    ("a", ["a"] * 10, 0.0, "pred article dropped -> ''; identical GT 'a' is not processed -> no match"),
    ("An apple", ["apple"] * 9 + ["apples"], 1.0, "pred -> 'apple'; 9 matches -> A(9)=1"),
    ("the two", ["2"] * 10, 1.0, "'the' dropped, 'two'->'2'"),
    ("dont", ["don't"] * 10, 1.0, "contraction table dont -> don't"),
    ("Dont know", ["don't know"] * 10, 1.0, "lower first, then word-wise 'dont' -> \"don't\""),
    ("Im", ["i'm"] * 10, 0.0, "table key is capitalised 'Im' but lookup happens after lower-casing -> 'im' stays"),
    ("somebody'd", ["somebodyd"] * 10, 1.0, "official table maps somebody'd -> somebodyd (sic)"),
    ("3.5", ["3.5"] * 10, 1.0, "period followed by a digit survives the period regex"),
    ("yes.", ["yes"] * 10, 1.0, "trailing period (not before a digit) removed"),
    ("3.", ["3"] * 10, 1.0, "'3.' -> '3': the malformed lookbehind does not protect a period after a digit"),
    (".5", ["0.5"] * 10, 0.0, "'.5' keeps its period (before a digit) and is not '0.5'"),
    ("1.000.000", ["1000000"] * 10, 0.0, "both periods precede digits -> kept"),
    ("mr. smith", ["mr smith"] * 10, 1.0, "'.' is not in the mark list; the period regex removes it -> 'mr smith'"),
    ("yes", ["yes."] * 10, 0.0, "all 10 GT identical -> GT not processed -> 'yes.' != 'yes'"),
    ("yes", ["yes."] * 9 + ["no"], 1.0, "GT disagree -> punctuation-processed 'yes.'->'yes'; 9 matches"),
    ("1,000", ["1000"] * 10, 1.0, "digit,digit pattern -> every mark deleted -> '1000'"),
    ("1,000", ["1,000"] * 10, 0.0, "pred -> '1000' but identical GT '1,000' stays unprocessed"),
    ("1000", ["1,000"] * 5 + ["1000"] * 5, 1.0, "GT disagree -> '1,000' -> '1000'; 10 matches"),
    ("red,blue", ["red blue"] * 10, 1.0, "no space next to ',' and no digit,digit -> ',' replaced by a space"),
    ("red,blue", ["redblue"] * 10, 0.0, "same rule: becomes 'red blue', not 'redblue'"),
    ("red, blue", ["red blue"] * 10, 1.0, "', ' occurs -> ',' deleted -> 'red blue'"),
    ("t-shirt (red)", ["t shirt red"] * 10, 1.0, "' (' -> '(' deleted; ')' and '-' spaced out -> 't shirt red '"),
    ("t-shirt", ["t-shirt"] * 10, 0.0, "pred -> 't shirt'; identical GT 't-shirt' unprocessed"),
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0, "GT disagree -> 't-shirt' -> 't shirt'; 9 matches"),
    ("what?", ["what"] * 10, 1.0, "'?' not next to a space -> replaced by a space -> 'what ' -> split/join 'what'"),
    ("@home", ["home"] * 10, 1.0, "'@' replaced by a space, leading space vanishes in split/join"),
    ("x @ y", ["x y"] * 10, 1.0, "' @' occurs -> '@' deleted -> 'x  y' -> 'x y'"),
    ("red car", ["red  car"] * 5 + ["car"] * 5, 0.0, "GT only punctuation-processed: its double space survives"),
    ("  YES\n", ["yes"] * 10, 1.0, "newline -> space, strip, lower-case"),
    ("Yes\tsir", ["yes sir"] * 10, 1.0, "tab -> space"),
    ("yes", ["no"] * 10, 0.0, "no annotator agrees"),
    ("cat", ["cat"] + ["dog"] * 9, 0.3, "A(1): matching annotator sees 0 others, 9 others see 1 -> 9*(1/3)/10"),
    ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6, "A(2): 2*(1/3) + 8*(2/3) = 6 -> /10"),
    ("cat", ["cat"] * 3 + ["dog"] * 7, 0.9, "A(3): 3*(2/3) + 7*1 = 9 -> /10"),
    ("cat", ["cat"] * 4 + ["dog"] * 6, 1.0, "A(4): every annotator sees >= 3 matches"),
    ("Cat", ["cat", "cat", "kitten"], 4 / 9, "3 GT, 2 match: 'cat's see 1 (1/3), 'kitten' 2 (2/3) -> (4/3)/3"),
]


@pytest.mark.parametrize("pred,gts,expected,why", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_vqa_accuracy_hand_cases(pred, gts, expected, why):
    assert vqa_accuracy(pred, gts) == pytest.approx(expected, abs=1e-12), why


# The official evaluator's mark list (vqaEval.py ``punct``), typed here from the VQA repository, not imported.
OFFICIAL_MARKS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                  "?", "!"]  # fmt: skip


@pytest.mark.parametrize("mark", OFFICIAL_MARKS)
def test_every_official_mark_is_spaced_out_or_deleted(mark):
    """Between letters a listed mark becomes a space; next to a space it is deleted; as the answer it scores."""
    assert process_punctuation(f"x{mark}y") == "x y"
    assert process_punctuation(f"x {mark}y") == "x y"  # next to a space: deleted, the space stays
    assert vqa_accuracy(f"red{mark}car", ["red car"] * 10) == 1.0


@pytest.mark.parametrize("char", [":", "'", "#", "%", "&", "*", "$", "|", "~"])
def test_characters_outside_the_official_list_survive(char):
    assert process_punctuation(f"x{char}y") == f"x{char}y"
    assert vqa_accuracy(f"red{char}car", ["red car"] * 10) == 0.0


def test_punctuation_quirks():
    # The official re.sub passes re.UNICODE (32) as count: 33 trailing periods leave exactly one.
    assert process_punctuation("." * 33) == "."
    # Deletion decision is taken on the input string per mark: '-' here is spaced out, '!' deleted ('! ' occurs).
    assert process_punctuation("a-b! c") == "a b c"
    # A digit,digit anywhere deletes every mark, even ones not adjacent to spaces.
    assert process_punctuation("1,2-3") == "123"
    assert normalize_answer("The  Two   Dogs!") == "2 dogs"


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["twas"] == "'twas" and CONTRACTIONS["Im"] == "I'm"
    assert CONTRACTIONS["y'allll"] == "y'all'll" and CONTRACTIONS["somebody'd"] == "somebodyd"


def test_gqa_processes_both_sides():
    assert gqa_accuracy("The Dog.", "dog") == 1.0  # article + period removed from the prediction
    assert gqa_accuracy("two", "2") == 1.0 and gqa_accuracy("2", "two") == 1.0  # unlike VQA: GT is processed too
    assert gqa_accuracy("t-shirt", "T shirt") == 1.0
    assert gqa_accuracy("yes", "no") == 0.0
    res = evaluate_gqa({1: "yes", 2: "two", 3: "cat"}, {1: "yes", 2: "2", 3: "dog"})
    assert res == {"overall": 66.67, "n_questions": 3, "unit": "percent"}  # 2/3 -> 66.666.. -> 66.67
    with pytest.raises(ValueError, match="no prediction"):
        evaluate_gqa({1: "yes"}, {1: "yes", 2: "no"})


def _ann(qid, qtype, atype, answers):
    return {
        "question_id": qid,
        "question_type": qtype,
        "answer_type": atype,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


ANNOTATIONS = {
    "annotations": [
        _ann(1, "is the", "yes/no", ["yes"] * 10),  # pred "Yes" -> 1.0
        _ann(2, "how many", "number", ["2"] + ["3"] * 9),  # pred "two" -> A(1) = 0.3
        _ann(3, "what color", "other", ["red"] * 2 + ["blue"] * 8),  # pred "red" -> A(2) = 0.6
        _ann(4, "what color", "other", ["red"] * 2 + ["blue"] * 8),  # pred "blue" -> A(8) = 1.0
        _ann(5, "what is", "other", ["dog"] * 10),  # pred "cat" -> 0
    ]
}
PREDS = {1: "Yes", 2: "two", 3: "red", 4: "blue", 5: "cat"}


def test_evaluate_vqa_breakdown_in_percent(tmp_path):
    res = evaluate_vqa(PREDS, ANNOTATIONS)
    assert res["unit"] == "percent" and res["n_questions"] == 5
    assert res["overall"] == 58.0  # (1 + .3 + .6 + 1 + 0) / 5 = .58
    assert res["per_answer_type"] == {"yes/no": 100.0, "number": 30.0, "other": 53.33}  # 1.6/3 = .5333
    assert res["per_question_type"] == {"is the": 100.0, "how many": 30.0, "what color": 80.0, "what is": 0.0}
    assert res["per_question"] == {1: 100.0, 2: 30.0, 3: 60.0, 4: 100.0, 5: 0.0}
    # same result from a path and from a bare list with string answers
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ANNOTATIONS))
    assert evaluate_vqa(PREDS, path)["overall"] == 58.0
    bare = [{**a, "answers": [x["answer"] for x in a["answers"]]} for a in ANNOTATIONS["annotations"]]
    assert evaluate_vqa(PREDS, bare)["per_answer_type"]["other"] == 53.33


def test_evaluate_vqa_requires_exact_coverage():
    with pytest.raises(ValueError, match="1 missing, 0 extra"):
        evaluate_vqa({k: v for k, v in PREDS.items() if k != 5}, ANNOTATIONS)
    with pytest.raises(ValueError, match="0 missing, 1 extra"):
        evaluate_vqa({**PREDS, 99: "x"}, ANNOTATIONS)


class _Tok:
    def __init__(self, text, pos, lemma):
        self.text, self.pos_, self.lemma_ = text, pos, lemma


def _fake_nlp(answer):
    table = {"dogs": ("NOUN", "dog"), "running": ("VERB", "run"), "red": ("ADJ", "red"), "better": ("ADV", "well")}
    return [_Tok(w, *table.get(w, ("X", w + "_lemma"))) for w in answer.split()]


def test_lemmatiser_replaces_only_nouns_and_verbs():
    # dogs NOUN -> dog, running VERB -> run; red (ADJ) and better (ADV) keep their text, not their lemma
    assert lemmatize_answers(["red dogs running", "better"], nlp=_fake_nlp) == ["red dog run", "better"]
    ann = {"annotations": [_ann(7, "what are", "other", ["dog"] * 10)]}
    assert evaluate_okvqa({7: "dogs"}, ann, nlp=_fake_nlp)["overall"] == 100.0
    res = evaluate_okvqa({7: "dogs"}, ann, lemmatize=False)  # explicit opt-out: 'dogs' != 'dog'
    assert res["overall"] == 0.0 and res["lemmatized"] is False


def test_missing_spacy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # makes `import spacy` raise ImportError
    ann = {"annotations": [_ann(7, "what are", "other", ["dog"] * 10)]}
    with pytest.raises(LemmatizerUnavailable) as err:
        evaluate_okvqa({7: "dogs"}, ann)
    msg = str(err.value)
    assert "pip install spacy && python -m spacy download en_core_web_sm" in msg
    assert "network" in msg and "wheel" in msg and "lemmatize=False" in msg


def test_missing_spacy_model_is_a_clear_error(monkeypatch):
    def load(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    with pytest.raises(LemmatizerUnavailable, match="'en_core_web_sm' is not"):
        vqa.load_lemmatizer()


def test_vqav2_submission_format(tmp_path):
    path = write_vqav2_submission({"12": "yes", 3: "two"}, tmp_path / "sub" / "vqav2.json")
    assert json.loads(path.read_text()) == [{"question_id": 3, "answer": "two"}, {"question_id": 12, "answer": "yes"}]


def test_decoding_recipes():
    opt, t5 = VQADecoding.paper("opt"), VQADecoding.paper("flant5")
    assert opt.prompt == "Question: {} Answer:" and t5.prompt == "Question: {} Short answer:"
    assert (opt.num_beams, opt.length_penalty, opt.max_new_tokens, opt.min_new_tokens) == (5, -1.0, 10, 1)
    head_opt, head_t5 = VQADecoding.lavis_head("opt"), VQADecoding.lavis_head("t5")
    assert head_opt.prompt == "Question: {} Short answer:" and head_opt.length_penalty == 0.0
    assert head_t5.length_penalty == -1.0 and head_t5.prompt == t5.prompt
    assert opt.format_prompt("what is it?") == "Question: what is it? Answer:"
    assert opt.generate_kwargs() == {
        "num_beams": 5,
        "length_penalty": -1.0,
        "max_new_tokens": 10,
        "min_new_tokens": 1,
        "do_sample": False,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.num_beams = 3
    with pytest.raises(ValueError, match="unknown LLM family"):
        VQADecoding.paper("llama")
