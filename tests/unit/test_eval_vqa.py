"""VQA scoring: every expected score below is worked out by hand from the two evaluators' rules.

Notation: A(m) = accuracy when m of the 10 (compared) annotator answers equal the (compared) prediction.
Leave-one-out: a matching annotator sees m-1 other matches, a non-matching one sees m, each capped at 3:
A(0)=0; A(1)=(1*0 + 9*1/3)/10=0.3; A(2)=(2*1/3 + 8*2/3)/10=0.6; A(3)=(3*2/3 + 7*1)/10=0.9; A(4)=(4*1 + 6*1)/10=1.

What each evaluator compares (the rules the expectations are derived from):
official: tabs/newlines -> spaces + strip on both sides; if the cleaned GT answers are all identical, nothing else
          (raw string equality); otherwise prediction and GT answers both get punctuation + digit/article processing.
lavis:    prediction always cleaned + punctuation + digit/article processed; GT answers raw, and only when they are
          not all identical (raw) punctuation-processed (no lower-casing, numbers, articles, contractions, spaces).
"""

import dataclasses
import json
import sys
import types

import pytest

from blip2lib.evaluate import vqa
from blip2lib.evaluate.vqa import (
    CONTRACTIONS,
    VQA_SCORERS,
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

U = "unanimous GT: official compares the raw (whitespace-cleaned) strings"
CASES = [
    # (prediction, gt answers, official, lavis, hand reasoning)
    ("two", ["2"] * 10, 0.0, 1.0, f"{U}, 'two' != '2'; lavis pred 'two'->'2', 10 identical GT '2' -> A(10)=1"),
    ("2", ["two"] * 10, 0.0, 0.0, f"{U}; lavis never digit-processes the GT: 'two' != '2'"),
    ("none", ["0"] * 10, 0.0, 1.0, f"{U}; lavis 'none' is in the number table -> '0'"),
    ("zero", ["0"] * 3 + ["1"] * 7, 0.9, 0.9, "GT disagree: both normalise 'zero'->'0', 3 matches -> A(3)"),
    ("eleven", ["11"] * 10, 0.0, 0.0, "only none/zero..ten are mapped; 'eleven' stays"),
    ("Ten dogs", ["10 dogs"] * 10, 0.0, 1.0, f"{U}; lavis lower -> 'ten dogs' -> '10 dogs'"),
    ("Ten dogs", ["10 dogs"] * 9 + ["dogs"], 1.0, 1.0, "GT disagree: official normalises the pred too -> A(9)"),
    ("The dog", ["dog"] * 10, 0.0, 1.0, f"{U}; lavis lower 'the dog', article dropped -> 'dog'"),
    ("a", ["a"] * 10, 1.0, 0.0, f"{U}: 'a'=='a'; lavis pred article dropped -> '' vs unprocessed GT 'a'"),
    ("An apple", ["apple"] * 9 + ["apples"], 1.0, 1.0, "GT disagree: pred -> 'apple' in both; 9 matches"),
    ("the two", ["2"] * 10, 0.0, 1.0, f"{U}; lavis 'the' dropped, 'two'->'2'"),
    ("dont", ["don't"] * 10, 0.0, 1.0, f"{U}; lavis contraction table dont -> don't"),
    ("Dont know", ["don't know"] * 10, 0.0, 1.0, f"{U}; lavis lower first, then word-wise 'dont' -> \"don't\""),
    ("Im", ["i'm"] * 10, 0.0, 0.0, "table key is 'Im' but lookup is after lower-casing -> 'im' stays (both)"),
    ("Im", ["i'm"] * 9 + ["x"], 0.0, 0.0, "GT disagree: both normalise the pred, still 'im' != \"i'm\""),
    ("somebody'd", ["somebodyd"] * 10, 0.0, 1.0, f"{U}; lavis table maps somebody'd -> somebodyd (sic)"),
    ("3.5", ["3.5"] * 10, 1.0, 1.0, "identical strings; lavis: a period before a digit survives the regex"),
    ("yes.", ["yes"] * 10, 0.0, 1.0, f"{U}; lavis trailing period (not before a digit) removed"),
    ("3.", ["3"] * 10, 0.0, 1.0, f"{U}; lavis '3.'->'3': the malformed lookbehind does not protect it"),
    ("3.", ["3"] * 9 + ["4"], 1.0, 1.0, "GT disagree: official also strips the period -> A(9)"),
    (".5", ["0.5"] * 10, 0.0, 0.0, "'.5' keeps its period (before a digit) and is not '0.5'"),
    ("1.000.000", ["1000000"] * 9 + ["1"], 0.0, 0.0, "both periods precede digits -> kept in both"),
    ("mr. smith", ["mr smith"] * 10, 0.0, 1.0, f"{U}; lavis '.' removed by the period regex -> 'mr smith'"),
    ("yes", ["yes."] * 10, 0.0, 0.0, "unanimous GT is unprocessed in both -> 'yes.' != 'yes'"),
    ("yes", ["yes."] * 9 + ["no"], 1.0, 1.0, "GT disagree -> punctuation-processed 'yes.'->'yes'; 9 matches"),
    ("1,000", ["1000"] * 10, 0.0, 1.0, f"{U}; lavis digit,digit -> every mark deleted -> '1000'"),
    ("1,000", ["1,000"] * 10, 1.0, 0.0, f"{U}: equal; lavis pred -> '1000' vs unprocessed GT '1,000'"),
    ("1000", ["1,000"] * 5 + ["1000"] * 5, 1.0, 1.0, "GT disagree -> '1,000' -> '1000'; 10 matches"),
    ("red,blue", ["red blue"] * 9 + ["x"], 1.0, 1.0, "no space next to ',' and no digit,digit -> ',' -> ' '"),
    ("red,blue", ["redblue"] * 9 + ["x"], 0.0, 0.0, "same rule: becomes 'red blue', not 'redblue'"),
    ("red, blue", ["red blue"] * 9 + ["x"], 1.0, 1.0, "', ' occurs -> ',' deleted -> 'red blue'"),
    ("t-shirt (red)", ["t shirt red"] * 9 + ["x"], 1.0, 1.0, "' (' -> '(' deleted; ')' and '-' spaced out"),
    ("t-shirt", ["t-shirt"] * 10, 1.0, 0.0, f"{U}: equal; lavis pred -> 't shirt' vs unprocessed 't-shirt'"),
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0, 1.0, "GT disagree -> 't-shirt' -> 't shirt' in both; 9 matches"),
    ("what?", ["what"] * 9 + ["x"], 1.0, 1.0, "'?' not next to a space -> ' ' -> split/join 'what'"),
    ("@home", ["home"] * 9 + ["x"], 1.0, 1.0, "'@' -> ' ', the leading space vanishes in split/join"),
    ("x @ y", ["x y"] * 9 + ["z"], 1.0, 1.0, "' @' occurs -> '@' deleted -> 'x  y' -> 'x y'"),
    ("  YES\n", ["yes"] * 10, 0.0, 1.0, f"{U}: 'YES' != 'yes'; lavis newline -> space, strip, lower-case"),
    ("Yes\tsir", ["yes sir"] * 9 + ["no"], 1.0, 1.0, "GT disagree: tab -> space, lower-case in both"),
    ("yes", ["no"] * 10, 0.0, 0.0, "no annotator agrees"),
    ("cat", ["cat"] + ["dog"] * 9, 0.3, 0.3, "A(1): matching annotator sees 0 others, 9 others see 1 -> 9*(1/3)/10"),
    ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6, 0.6, "A(2): 2*(1/3) + 8*(2/3) = 6 -> /10"),
    ("cat", ["cat"] * 3 + ["dog"] * 7, 0.9, 0.9, "A(3): 3*(2/3) + 7*1 = 9 -> /10"),
    ("cat", ["cat"] * 4 + ["dog"] * 6, 1.0, 1.0, "A(4): every annotator sees >= 3 matches"),
    ("Cat", ["cat", "cat", "kitten"], 4 / 9, 4 / 9, "3 GT, 2 match: 'cat's see 1 (1/3), 'kitten' 2 (2/3) -> (4/3)/3"),
]

# Each way the two evaluators differ, with both values (official, lavis).
DIFF_CASES = [
    # prediction normalised or not when the annotators agree
    ("Yes", ["yes"] * 10, 0.0, 1.0, "unanimous: official compares raw 'Yes' != 'yes'; lavis lower-cases the pred"),
    ("Two", ["Two"] * 10, 1.0, 0.0, "unanimous: official 'Two'=='Two'; lavis pred -> '2' vs raw GT 'Two'"),
    # ground-truth digit / article / case / contraction / spacing processing
    ("2", ["two"] * 9 + ["three"], 1.0, 0.0, "GT disagree: official maps GT 'two'->'2'; lavis GT punctuation only"),
    ("dog", ["the dog"] * 9 + ["cat"], 1.0, 0.0, "GT disagree: official drops the GT article; lavis keeps it"),
    ("yes", ["Yes"] * 9 + ["no"], 1.0, 0.0, "GT disagree: official lower-cases the GT; lavis does not"),
    ("don't", ["dont"] * 9 + ["x"], 1.0, 0.0, "GT disagree: official GT dont -> don't; lavis GT stays 'dont'"),
    ("red car", ["red  car"] * 5 + ["car"] * 5, 1.0, 0.0, "official split/join collapses the GT double space"),
    # whitespace clean-up deciding the branch
    ("Yes", ["yes"] * 9 + ["yes\n"], 0.0, 1.0, "official: cleaned GT unanimous -> raw 'Yes'; lavis: raw GT differ"),
    (" yes ", [" yes "] * 10, 1.0, 0.0, "official strips both sides -> equal; lavis pred 'yes' vs raw ' yes '"),
    # period regex (and its 32-removal cap) applied to different sides
    ("5.", ["5."] * 10, 1.0, 0.0, "unanimous: official raw equal; lavis pred '5.' -> '5' vs raw GT '5.'"),
    ("yes" + "." * 33, ["yes."] * 10, 0.0, 1.0, "lavis pred: 32 of 33 periods removed -> 'yes.' == raw GT"),
    # punctuation adjacency judged on the original string, after (official) or without (lavis) clean-up
    ("xy z", ["x-y\n-z"] * 9 + ["q"], 1.0, 0.0, "official GT 'x-y -z': ' -' -> '-' deleted; lavis '-' -> ' '"),
]


ALL_CASES = CASES + DIFF_CASES


@pytest.mark.parametrize("pred,gts,official,lavis,why", ALL_CASES, ids=[f"{i:02d}" for i in range(len(ALL_CASES))])
def test_vqa_accuracy_hand_cases(pred, gts, official, lavis, why):
    assert vqa_accuracy(pred, gts) == pytest.approx(official, abs=1e-12), why  # default = official
    assert vqa_accuracy(pred, gts, scorer="official") == pytest.approx(official, abs=1e-12), why
    assert vqa_accuracy(pred, gts, scorer="lavis") == pytest.approx(lavis, abs=1e-12), why


def test_unknown_scorer_is_a_clear_error():
    assert VQA_SCORERS == ("official", "lavis")
    for call in (
        lambda: vqa_accuracy("yes", ["yes"], scorer="vqa"),
        lambda: evaluate_vqa(PREDS, ANNOTATIONS, scorer="LAVIS"),
        lambda: evaluate_okvqa(PREDS, ANNOTATIONS, lemmatize=False, scorer=""),
    ):
        with pytest.raises(ValueError, match="unknown VQA scorer .*'official'.*'lavis'"):
            call()


def test_leave_one_out_compares_whole_annotation_dicts():
    # ten identical dicts (no answer_id): each annotation drops all ten as "itself" -> 0 matches left, in both
    same = [{"answer": "yes", "answer_confidence": "yes"}] * 10
    assert vqa_accuracy("yes", same) == 0.0 and vqa_accuracy("yes", same, scorer="lavis") == 0.0
    # the real files number the answers (answer_id 1..10): only itself is dropped -> 9 matches -> 1.0
    numbered = [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    assert vqa_accuracy("yes", numbered) == 1.0
    # plain strings are distinct annotators; dicts equal only after processing drop each other (official
    # processes 'Cat'/'cat' to 'cat' -> the two dicts become equal): 'cat' dicts see 0 others, 'dog' sees 2 -> 2/9
    two = [{"answer": "Cat"}, {"answer": "cat"}, {"answer": "dog"}]
    assert vqa_accuracy("cat", two) == pytest.approx((0 + 0 + 2 / 3) / 3)
    assert vqa_accuracy("cat", ["Cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        vqa_accuracy("yes", [])


# The official evaluator's mark list (vqaEval.py ``punct``), typed here from the VQA repository, not imported.
OFFICIAL_MARKS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                  "?", "!"]  # fmt: skip


@pytest.mark.parametrize("mark", OFFICIAL_MARKS)
def test_every_official_mark_is_spaced_out_or_deleted(mark):
    """Between letters a listed mark becomes a space; next to a space it is deleted; as the answer it scores.

    The annotators disagree (one says "blue car"), so both scorers process the prediction.
    """
    assert process_punctuation(f"x{mark}y") == "x y"
    assert process_punctuation(f"x {mark}y") == "x y"  # next to a space: deleted, the space stays
    gts = ["red car"] * 9 + ["blue car"]
    for scorer in VQA_SCORERS:
        assert vqa_accuracy(f"red{mark}car", gts, scorer=scorer) == 1.0, scorer


@pytest.mark.parametrize("char", [":", "'", "#", "%", "&", "*", "$", "|", "~"])
def test_characters_outside_the_official_list_survive(char):
    assert process_punctuation(f"x{char}y") == f"x{char}y"
    gts = ["red car"] * 9 + ["blue car"]
    for scorer in VQA_SCORERS:
        assert vqa_accuracy(f"red{char}car", gts, scorer=scorer) == 0.0, scorer


def test_punctuation_quirks():
    # The official re.sub passes re.UNICODE (32) as count: 33 trailing periods leave exactly one.
    assert process_punctuation("." * 33) == "."
    # Deletion decision is taken on the input string per mark: '-' here is spaced out, '!' deleted ('! ' occurs).
    assert process_punctuation("a-b! c") == "a b c"
    # ';' becomes a space first, yet '-' is judged on the ORIGINAL string (no ' -' there) -> spaced out, not deleted
    assert process_punctuation("x;-yz-w") == "x  yz w"
    # A digit,digit anywhere deletes every mark, even ones not adjacent to spaces.
    assert process_punctuation("1,2-3") == "123"
    # The malformed regex removes a period after a digit ('5.') and inside words, keeps one before a digit.
    assert process_punctuation("5.") == "5" and process_punctuation("2.5") == "2.5"
    assert process_punctuation("dog.cat") == "dogcat"
    assert normalize_answer("The  Two   Dogs!") == "2 dogs"


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["twas"] == "'twas" and CONTRACTIONS["Im"] == "I'm"
    assert CONTRACTIONS["y'allll"] == "y'all'll" and CONTRACTIONS["somebody'd"] == "somebodyd"


def test_gqa_processes_both_sides_without_cleanup_or_rounding():
    assert gqa_accuracy("The Dog.", "dog") == 1.0  # article + period removed from the prediction
    assert gqa_accuracy("two", "2") == 1.0 and gqa_accuracy("2", "two") == 1.0  # unlike VQA: GT is processed too
    assert gqa_accuracy("t-shirt", "T shirt") == 1.0
    assert gqa_accuracy("yes", "no") == 0.0
    # no tab/newline clean-up first: '\n' is not a space, so '-' is spaced out -> 'a b c' (clean-up would give 'ab c')
    assert gqa_accuracy("a-b\n-c", "a b c") == 1.0 and gqa_accuracy("a-b\n-c", "ab c") == 0.0
    res = evaluate_gqa({1: "yes", 2: "two", 3: "cat"}, {1: "yes", 2: "2", 3: "dog"})
    # LAVIS: sum(acc) / len(acc) * 100, not rounded
    assert res == {"overall": 2 / 3 * 100, "n_questions": 3, "unit": "percent", "scorer": "lavis"}
    assert res["overall"] != 66.67
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
        _ann(1, "is the", "yes/no", ["yes"] * 10),  # pred "Yes": official 0 (unanimous, raw); lavis 1.0
        _ann(2, "how many", "number", ["2"] + ["3"] * 9),  # pred "two" -> '2' in both -> A(1) = 0.3
        _ann(3, "what color", "other", ["red"] * 2 + ["blue"] * 8),  # pred "red" -> A(2) = 0.6
        _ann(4, "what color", "other", ["red"] * 2 + ["blue"] * 8),  # pred "blue" -> A(8) = 1.0
        _ann(5, "what is", "other", ["dog"] * 10),  # pred "cat" -> 0
    ]
}
PREDS = {1: "Yes", 2: "two", 3: "red", 4: "blue", 5: "cat"}


def test_evaluate_vqa_breakdown_in_percent_for_both_scorers(tmp_path):
    res = evaluate_vqa(PREDS, ANNOTATIONS)  # official by default
    assert res["unit"] == "percent" and res["n_questions"] == 5 and res["scorer"] == "official"
    assert res["overall"] == 38.0  # (0 + .3 + .6 + 1 + 0) / 5 = .38
    assert res["per_answer_type"] == {"yes/no": 0.0, "number": 30.0, "other": 53.33}  # 1.6/3 = .5333
    assert res["per_question_type"] == {"is the": 0.0, "how many": 30.0, "what color": 80.0, "what is": 0.0}
    assert res["per_question"] == {1: 0.0, 2: 30.0, 3: 60.0, 4: 100.0, 5: 0.0}
    lav = evaluate_vqa(PREDS, ANNOTATIONS, scorer="lavis")
    assert lav["scorer"] == "lavis" and lav["overall"] == 58.0  # (1 + .3 + .6 + 1 + 0) / 5 = .58
    assert lav["per_answer_type"] == {"yes/no": 100.0, "number": 30.0, "other": 53.33}
    assert lav["per_question_type"] == {"is the": 100.0, "how many": 30.0, "what color": 80.0, "what is": 0.0}
    assert lav["per_question"] == {1: 100.0, 2: 30.0, 3: 60.0, 4: 100.0, 5: 0.0}
    # same result from a path and from a bare list with string answers
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ANNOTATIONS))
    assert evaluate_vqa(PREDS, path)["overall"] == 38.0
    bare = [{**a, "answers": [x["answer"] for x in a["answers"]]} for a in ANNOTATIONS["annotations"]]
    assert evaluate_vqa(PREDS, bare)["per_answer_type"]["other"] == 53.33
    assert ANNOTATIONS["annotations"][0]["answers"][0]["answer"] == "yes"  # the caller's annotations are untouched


def test_rounding_ties_follow_each_evaluators_python():
    # 32 unanimous questions, 1 right: 100 * 1/32 = 3.125 exactly. The official code is Python 2 (round half away
    # from zero -> 3.13); LAVIS's runs on Python 3 (round half to even -> 3.12).
    ann = [_ann(q, "how many", "number", ["yes"] * 10) for q in range(32)]
    preds = {q: "yes" if q == 0 else "no" for q in range(32)}
    assert evaluate_vqa(preds, ann)["overall"] == 3.13
    assert evaluate_vqa(preds, ann, scorer="lavis")["overall"] == 3.12


def test_evaluate_vqa_requires_exact_coverage_and_unique_questions():
    with pytest.raises(ValueError, match="1 missing, 0 extra"):
        evaluate_vqa({k: v for k, v in PREDS.items() if k != 5}, ANNOTATIONS)
    with pytest.raises(ValueError, match="0 missing, 1 extra"):
        evaluate_vqa({**PREDS, 99: "x"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="repeat 1 question_id"):
        evaluate_vqa(PREDS, ANNOTATIONS["annotations"] + [ANNOTATIONS["annotations"][0]])


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
    assert evaluate_okvqa({7: "dogs"}, ann, nlp=_fake_nlp)["overall"] == 100.0  # 'dog' == unanimous raw 'dog'
    assert evaluate_okvqa({7: "dogs"}, ann, nlp=_fake_nlp, scorer="lavis")["scorer"] == "lavis"
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
