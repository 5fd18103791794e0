r"""VQA scoring: answer normalisation, VQAv2 / OK-VQA accuracy under two evaluators, GQA exact match, prompts.

Two evaluators are reproduced, quirks included (see ``docs/fidelity.md``); both share the normalisation helpers
below and the accuracy formula, and differ only in *which* strings get normalised:

* ``scorer="official"`` (the default): the benchmark's own evaluator (GT-Vision-Lab ``vqaEval.py``, Python 2,
  the code the VQAv2 evaluation server runs). Tabs and newlines become spaces and the ends are stripped, in the
  prediction and in every ground-truth answer. Then, only if the cleaned ground-truth answers are *not* all
  identical, the prediction and every ground-truth answer go through punctuation processing and then
  digit/article processing. When the annotators are unanimous nothing else is done to either side, so ``"Yes"``
  scores 0 against ten ``"yes"``.
* ``scorer="lavis"``: the modified copy LAVIS ships (``lavis/common/vqa_tools/vqa_eval.py``), which produced the
  VQAv2 val / OK-VQA numbers LAVIS prints. The prediction is always cleaned and fully normalised; the
  ground-truth answers are never whitespace-cleaned, the unanimity test looks at them raw, and when they disagree
  they get punctuation processing only (no lower-casing, number words, articles or contractions).

Shared quirks: a punctuation mark is deleted when it touches a space somewhere in the *original* string (or the
string has a digit,digit pattern anywhere), otherwise it becomes a space; the period regex is the malformed
``(?!<=\d)(\.)(?!\d)`` (the "lookbehind" is a lookahead that never fires), so any period not followed by a digit
is removed, at most 32 of them (``re.UNICODE`` = 32 lands in ``re.sub``'s count slot); lower-casing happens before
the contraction table, whose capitalised keys (``Im``, ``Ive``, ``Id've``) therefore never match, and which maps
``somebody'd`` to ``somebodyd`` (sic).

Accuracy of one question: for every annotation j, ``min(1, #other annotations equal to the prediction / 3)``,
averaged over the annotations (with 10 distinct annotators and m matches: 0, 0.3, 0.6, 0.9, then 1.0 from m=4).
"Other" means "not equal to annotation j": the official code compares whole annotation dicts, so dicts that are
identical (same answer *and* same ``answer_id`` / confidence) drop each other; plain string answers count as
distinct annotators, as in the real files where every ``answer_id`` differs. Overall and per-type accuracies are
``100 * mean`` rounded to 2 decimals, from the unrounded per-question values; the official code rounds with Python
2's ``round`` (ties away from zero), LAVIS's with Python 3's (ties to even), which differ only on exact ties such
as 0.125.

GQA (LAVIS's GQA task, the only reference): exact match after punctuation and digit/article processing of both the
prediction and the single ground-truth answer, with no whitespace clean-up, as an unrounded percentage.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

__all__ = [
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "ARTICLES",
    "PUNCTUATION",
    "VQA_PROMPTS",
    "VQA_SCORERS",
    "LemmatizerUnavailable",
    "VQADecoding",
    "process_punctuation",
    "process_digit_article",
    "normalize_answer",
    "vqa_accuracy",
    "evaluate_vqa",
    "evaluate_okvqa",
    "gqa_accuracy",
    "evaluate_gqa",
    "load_lemmatizer",
    "lemmatize_answers",
    "write_vqav2_submission",
]

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
# The official apostrophe-less contraction table as data: "written|expanded" pairs (120 entries).
_CONTRACTION_PAIRS = """
aint|ain't arent|aren't cant|can't couldve|could've couldnt|couldn't couldn'tve|couldn't've couldnt've|couldn't've
didnt|didn't doesnt|doesn't dont|don't hadnt|hadn't hadnt've|hadn't've hadn'tve|hadn't've hasnt|hasn't
havent|haven't hed|he'd hed've|he'd've he'dve|he'd've hes|he's howd|how'd howll|how'll hows|how's Id've|I'd've
I'dve|I'd've Im|I'm Ive|I've isnt|isn't itd|it'd itd've|it'd've it'dve|it'd've itll|it'll let's|let's maam|ma'am
mightnt|mightn't mightnt've|mightn't've mightn'tve|mightn't've mightve|might've mustnt|mustn't mustve|must've
neednt|needn't notve|not've oclock|o'clock oughtnt|oughtn't ow's'at|'ow's'at 'ows'at|'ow's'at 'ow'sat|'ow's'at
shant|shan't shed've|she'd've she'dve|she'd've she's|she's shouldve|should've shouldnt|shouldn't
shouldnt've|shouldn't've shouldn'tve|shouldn't've somebody'd|somebodyd somebodyd've|somebody'd've
somebody'dve|somebody'd've somebodyll|somebody'll somebodys|somebody's someoned|someone'd someoned've|someone'd've
someone'dve|someone'd've someonell|someone'll someones|someone's somethingd|something'd
somethingd've|something'd've something'dve|something'd've somethingll|something'll thats|that's thered|there'd
thered've|there'd've there'dve|there'd've therere|there're theres|there's theyd|they'd theyd've|they'd've
they'dve|they'd've theyll|they'll theyre|they're theyve|they've twas|'twas wasnt|wasn't wed've|we'd've
we'dve|we'd've weve|we've werent|weren't whatll|what'll whatre|what're whats|what's whatve|what've whens|when's
whered|where'd wheres|where's whereve|where've whod|who'd whod've|who'd've who'dve|who'd've wholl|who'll
whos|who's whove|who've whyll|why'll whyre|why're whys|why's wont|won't wouldve|would've wouldnt|wouldn't
wouldnt've|wouldn't've wouldn'tve|wouldn't've yall|y'all yall'll|y'all'll y'allll|y'all'll yall'd've|y'all'd've
y'alld've|y'all'd've y'all'dve|y'all'd've youd|you'd youd've|you'd've you'dve|you'd've youll|you'll
youre|you're youve|you've
"""
CONTRACTIONS = dict(pair.split("|") for pair in _CONTRACTION_PAIRS.split())
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # malformed on purpose: see module docstring
_OFFICIAL_PERIOD_COUNT = 32  # official code passes re.UNICODE (= 32) as re.sub's count
# "official": GT-Vision-Lab vqaEval.py (the default, the evaluation server's); "lavis": LAVIS's modified vqa_eval.py.
VQA_SCORERS = ("official", "lavis")

# Prompts per LLM family. "paper": paper §4.1; "lavis": the zero-shot yamls LAVIS ships.
VQA_PROMPTS = {
    "paper": {"opt": "Question: {} Answer:", "flant5": "Question: {} Short answer:"},
    "lavis": {"opt": "Question: {} Short answer:", "flant5": "Question: {} Short answer:"},
}
_FAMILY_ALIASES = {"opt": "opt", "flant5": "flant5", "t5": "flant5"}
_INSTALL_HINT = (
    "OK-VQA answers are spaCy-lemmatised (as LAVIS does) but spaCy / en_core_web_sm is not available. "
    "Install it with `pip install spacy && python -m spacy download en_core_web_sm` (the download needs a network "
    "connection; offline, pip-install a local en_core_web_sm wheel path instead), or pass lemmatize=False to "
    "score without lemmas (not comparable to the paper's OK-VQA numbers)."
)


class LemmatizerUnavailable(RuntimeError):
    """Raised when OK-VQA lemmatisation is requested but spaCy or its English model is missing."""


@dataclass(frozen=True)
class VQADecoding:
    """Zero-shot VQA decoding recipe (see ``docs/fidelity.md``).

    Attributes:
        prompt: format string with one ``{}`` for the pre-processed question.
        num_beams: beam width (5 in paper and LAVIS).
        length_penalty: exponent of the beam length normalisation; -1 favours short answers.
        max_new_tokens: LAVIS ``max_len`` (10): the most generated tokens, EOS included, under every rule.
        min_new_tokens: LAVIS ``min_len`` (1); what it counts depends on ``length_rule``.
        length_rule: ``"new"`` (paper recipe): both lengths count generated tokens, so ``min_len=1`` forces one
            real token before EOS. ``"lavis_head"`` (LAVIS recipe): counted as LAVIS does; for FlanT5 ``min_len``
            includes the decoder start token, so ``min_len=1`` allows an empty answer; for OPT (generation from
            ``inputs_embeds`` only) it counts generated tokens. See ``blip2lib.generation.new_token_bounds``.
        source: where the recipe comes from, echoed into result JSONs.
    """

    prompt: str = VQA_PROMPTS["paper"]["flant5"]
    num_beams: int = 5
    length_penalty: float = -1.0
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    source: str = "paper"
    length_rule: str = "new"

    @classmethod
    def paper(cls, family: str = "flant5") -> VQADecoding:
        """Paper §4.1: beam 5, length penalty -1 for both families; OPT prompt ``Question: {} Answer:``.

        Lengths count generated tokens (``length_rule="new"``): 1 to 10 answer tokens before EOS.
        """
        return cls(prompt=VQA_PROMPTS["paper"][_family(family)], source=f"paper §4.1 ({_family(family)})")

    @classmethod
    def lavis_head(cls, family: str = "flant5") -> VQADecoding:
        """LAVIS HEAD: ``Short answer:`` prompt for both; OPT ``predict_answers`` default length penalty 0.

        Lengths as LAVIS counts them (``length_rule="lavis_head"``): FlanT5 ``min_len=1`` allows an empty answer.
        """
        fam = _family(family)
        return cls(
            prompt=VQA_PROMPTS["lavis"][fam],
            length_penalty=0.0 if fam == "opt" else -1.0,
            source=f"LAVIS HEAD yaml ({fam})",
            length_rule="lavis_head",
        )

    def format_prompt(self, question: str) -> str:
        """Insert an already pre-processed question (``blip_question``) into the prompt."""
        return self.prompt.format(question)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate`` (deterministic beam search); ``dataclasses.asdict`` for result JSONs.

        ``length_rule`` is passed only when it is not ``generate``'s default ``"new"``, so a paper recipe passes
        the same keywords as before the rule existed.
        """
        skip = ("prompt", "source") + (("length_rule",) if self.length_rule == "new" else ())
        kwargs = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return {**kwargs, "do_sample": False}


def _family(family: str) -> str:
    try:
        return _FAMILY_ALIASES[family.lower()]
    except KeyError:
        raise ValueError(f"unknown LLM family {family!r}; expected one of {sorted(_FAMILY_ALIASES)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Normalisation


def process_punctuation(text: str) -> str:
    """Official punctuation processing: delete or space out each mark, then drop periods not before a digit."""
    # The decision looks at the *input* string for every mark, as in the official code.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _OFFICIAL_PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, expand apostrophe-less contractions, single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full normalisation: tabs/newlines to spaces and strip, then punctuation, then digits/articles/contractions.

    This is what LAVIS's evaluator always does to a prediction, and what the official one does to both sides when
    the annotators disagree (the official GT clean-up is the same whitespace step, so the result is identical).
    """
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def _check_scorer(scorer: str) -> None:
    if scorer not in VQA_SCORERS:
        raise ValueError(
            f"unknown VQA scorer {scorer!r}; expected 'official' (GT-Vision-Lab vqaEval.py, the default) or "
            "'lavis' (LAVIS's modified vqa_eval.py)"
        )


def _compared_strings(prediction: str, answers: list[str], scorer: str) -> tuple[str, list[str]]:
    """The prediction and ground-truth answers exactly as the chosen evaluator compares them."""
    if scorer == "official":
        pred, gts = _clean_whitespace(prediction), [_clean_whitespace(a) for a in answers]
        if len(set(gts)) > 1:  # decided on the cleaned strings; unanimous -> neither side is normalised
            return normalize_answer(pred), [process_digit_article(process_punctuation(a)) for a in gts]
        return pred, gts
    pred, gts = normalize_answer(prediction), list(answers)
    if len(set(gts)) > 1:  # decided on the raw strings; GT answers get punctuation processing only
        gts = [process_punctuation(a) for a in gts]
    return pred, gts


def vqa_accuracy(prediction: str, gt_answers: list[str] | list[dict], scorer: str = "official") -> float:
    """VQA accuracy of one prediction against its (usually 10) annotator answers, in [0, 1], unrounded.

    Args:
        prediction: raw model answer.
        gt_answers: annotator answers, as strings (each a distinct annotator) or as annotation dicts with an
            ``answer`` key (compared as whole dicts in the leave-one-out, as the official code does).
        scorer: ``"official"`` (GT-Vision-Lab, default) or ``"lavis"`` (LAVIS's variant); see the module docstring.

    Returns:
        mean over annotations j of ``min(1, #{i : annotation_i != annotation_j, answer_i == prediction} / 3)``.
    """
    _check_scorer(scorer)
    if not gt_answers:
        raise ValueError("a question needs at least one ground-truth answer")
    as_dicts = isinstance(gt_answers[0], dict)
    pred, gts = _compared_strings(prediction, [a["answer"] if as_dicts else a for a in gt_answers], scorer)
    # What "another annotation" means: a whole dict (processed answer included) that differs from annotation j, as
    # in the reference code; plain strings are told apart by their position (distinct annotators).
    items = [{**a, "answer": g} for a, g in zip(gt_answers, gts)] if as_dicts else list(enumerate(gts))
    accs = []
    for item_j in items:
        matches = sum(1 for item, g in zip(items, gts) if item != item_j and g == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)  # summed in annotation order, like the reference code


def _round_py2(x: float, ndigits: int = 2) -> float:
    """Python 2's ``round``: the exact binary value rounded to ``ndigits`` decimals, ties away from zero."""
    return float(Decimal(x).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def _round(x: float, scorer: str) -> float:
    # the official evaluator is Python 2 code (ties away from zero); LAVIS's runs on Python 3 (ties to even)
    return _round_py2(x) if scorer == "official" else round(x, 2)


def _load(obj: Any) -> Any:
    if isinstance(obj, (str, Path)):
        return json.loads(Path(obj).read_text())
    return obj


def _percent(values: list[float], scorer: str) -> float:
    return _round(100 * float(sum(values)) / len(values), scorer)  # same operation order as the reference code


def evaluate_vqa(
    predictions: dict[Any, str],
    annotations: Any,
    lemmatize: bool = False,
    nlp: Any = None,
    scorer: str = "official",
) -> dict[str, Any]:
    """Score VQAv2 / OK-VQA predictions with the official evaluator (default) or LAVIS's variant.

    Args:
        predictions: question_id -> raw answer; must cover exactly the annotated questions.
        annotations: official annotation dict (``{"annotations": [...]}``), its list, or a path to the JSON. Each
            entry has ``question_id``, ``answers`` (dicts with ``answer``, or strings), optional ``answer_type`` and
            ``question_type``. Entries are scored in file order, as the reference code does; nothing is mutated.
        lemmatize: spaCy NOUN/VERB-lemmatise the predictions first (OK-VQA; raises if spaCy is missing).
        nlp: an already loaded spaCy pipeline (or compatible callable) for ``lemmatize``.
        scorer: ``"official"`` or ``"lavis"``.

    Returns:
        ``{"overall", "per_answer_type", "per_question_type", "per_question", "n_questions", "unit": "percent",
        "scorer"}``; scores in percent rounded to 2 decimals the way the chosen evaluator rounds them.
    """
    _check_scorer(scorer)
    data = _load(annotations)
    entries = data["annotations"] if isinstance(data, dict) else data
    gold = {e["question_id"]: e for e in entries}
    if len(gold) != len(entries):
        raise ValueError(f"annotations repeat {len(entries) - len(gold)} question_id(s); each must appear once")
    missing, extra = set(gold) - set(predictions), set(predictions) - set(gold)
    if missing or extra:
        raise ValueError(f"predictions must cover the annotated questions: {len(missing)} missing, {len(extra)} extra")
    preds = dict(predictions)
    if lemmatize:
        qids = list(preds)
        preds = dict(zip(qids, lemmatize_answers([preds[q] for q in qids], nlp=nlp)))
    per_q: dict[Any, float] = {}
    by_ans, by_ques = defaultdict(list), defaultdict(list)
    for qid, entry in gold.items():
        acc = vqa_accuracy(preds[qid], entry["answers"], scorer=scorer)
        per_q[qid] = acc
        by_ans[entry.get("answer_type", "unknown")].append(acc)
        by_ques[entry.get("question_type", "unknown")].append(acc)
    return {
        "overall": _percent(list(per_q.values()), scorer),
        "per_answer_type": {k: _percent(v, scorer) for k, v in by_ans.items()},
        "per_question_type": {k: _percent(v, scorer) for k, v in by_ques.items()},
        "per_question": {q: _round(100 * a, scorer) for q, a in per_q.items()},
        "n_questions": len(per_q),
        "unit": "percent",
        "scorer": scorer,
    }


def evaluate_okvqa(
    predictions: dict[Any, str], annotations: Any, lemmatize: bool = True, nlp: Any = None, scorer: str = "official"
) -> dict[str, Any]:
    """OK-VQA = VQA accuracy on spaCy-lemmatised predictions (LAVIS); ``lemmatize=False`` is an explicit opt-out."""
    result = evaluate_vqa(predictions, annotations, lemmatize=lemmatize, nlp=nlp, scorer=scorer)
    result["lemmatized"] = lemmatize
    return result


def gqa_accuracy(prediction: str, gt_answer: str) -> float:
    """GQA: 1.0 on exact match after punctuation then digit/article processing of both strings, else 0.0.

    As LAVIS's GQA task does it: no tab/newline clean-up first (it can decide whether a mark is deleted or spaced).
    """
    pred = process_digit_article(process_punctuation(prediction))
    return float(pred == process_digit_article(process_punctuation(gt_answer)))


def evaluate_gqa(predictions: dict[Any, str], answers: dict[Any, str]) -> dict[str, Any]:
    """GQA accuracy in percent (unrounded, as LAVIS reports it) over ``answers`` (question_id -> GT answer)."""
    missing = set(answers) - set(predictions)
    if missing:
        raise ValueError(f"{len(missing)} GQA questions have no prediction")
    hits = [int(gqa_accuracy(predictions[q], a)) for q, a in answers.items()]
    # LAVIS: sum(acc) / len(acc) * 100 over 0/1 ints, in that operation order
    return {"overall": sum(hits) / len(hits) * 100, "n_questions": len(hits), "unit": "percent", "scorer": "lavis"}


# ----------------------------------------------------------------------------------------------------------------
# OK-VQA lemmatiser and submission files


def load_lemmatizer(model: str = "en_core_web_sm") -> Any:
    """Load spaCy's English pipeline, or raise ``LemmatizerUnavailable`` with install instructions."""
    try:
        import spacy
    except ImportError as err:
        raise LemmatizerUnavailable(_INSTALL_HINT) from err
    try:
        return spacy.load(model)
    except OSError as err:
        raise LemmatizerUnavailable(f"spaCy is installed but {model!r} is not. " + _INSTALL_HINT) from err


def lemmatize_answers(answers: list[str], nlp: Any = None) -> list[str]:
    """Replace every NOUN/VERB token by its lemma, keep other tokens, join with single spaces (LAVIS OK-VQA)."""
    nlp = nlp if nlp is not None else load_lemmatizer()
    out = []
    for answer in answers:
        doc = nlp(answer)
        out.append(" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in doc))
    return out


def write_vqav2_submission(predictions: dict[Any, str], path: str | Path) -> Path:
    """Write the VQAv2 test-dev / test server file: a JSON list of ``{"question_id", "answer"}`` (raw answers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": int(q), "answer": a} for q, a in sorted(predictions.items(), key=lambda kv: int(kv[0]))]
    path.write_text(json.dumps(rows))
    return path
