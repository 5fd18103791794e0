r"""VQA scoring (spec §5.1): official answer normalisation, VQA accuracy, GQA exact match, OK-VQA lemmas, prompts.

The normalisation rules are re-implemented from the official VQA evaluator's behaviour as LAVIS runs it
(``lavis/common/vqa_tools/vqa_eval.py``, spec §10.17), quirks included:

* the prediction is always normalised (whitespace, punctuation, digits/articles/contractions);
* ground-truth answers get *punctuation processing only*, and only when the annotators disagree (the official
  annotation files are already normalised, so GT ``"two"`` never matches a prediction, which becomes ``"2"``);
* the period regex is the official malformed ``(?!<=\d)(\.)(?!\d)``: the "lookbehind" is really a lookahead that
  never fires, so every period *not followed by a digit* is removed, at most 32 per string (the official code
  passes ``re.UNICODE`` (= 32) as ``re.sub``'s ``count`` argument);
* the contraction table is applied after lower-casing, so its capitalised keys (``Im``, ``Ive``, ``Id've``) never
  match, and it maps ``somebody'd`` to ``somebodyd`` (sic).

Accuracy per question is the leave-one-out mean over the annotators of ``min(1, #other annotators that gave the
answer / 3)``; with m of 10 matching: m=1 -> 0.3, m=2 -> 0.6, m=3 -> 0.9, m>=4 -> 1.0.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "ARTICLES",
    "PUNCTUATION",
    "VQA_PROMPTS",
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

# Prompts per LLM family (spec §5.1 table). "paper": paper §4.1; "lavis": the shipped zero-shot yamls.
VQA_PROMPTS = {
    "paper": {"opt": "Question: {} Answer:", "flant5": "Question: {} Short answer:"},
    "lavis": {"opt": "Question: {} Short answer:", "flant5": "Question: {} Short answer:"},
}
_FAMILY_ALIASES = {"opt": "opt", "flant5": "flant5", "t5": "flant5"}
_INSTALL_HINT = (
    "OK-VQA answers are spaCy-lemmatised (spec §5.1, §10.17) but spaCy / en_core_web_sm is not available. "
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
    """Full prediction normalisation: whitespace, punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """VQA accuracy of one prediction against its (usually 10) annotator answers, in [0, 1].

    Args:
        prediction: raw model answer (normalised here, as LAVIS always does).
        gt_answers: annotator answers; punctuation-processed only when they are not all identical.

    Returns:
        mean over annotators j of ``min(1, #{i != j : gt_i == prediction} / 3)``.
    """
    if not gt_answers:
        raise ValueError("a question needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [_clean_whitespace(a) for a in gt_answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    hits = [g == pred for g in gts]
    total = sum(hits)
    # leave annotator j out (by position; the official code drops equal answer dicts, which differ by answer_id)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)


def _load(obj: Any) -> Any:
    if isinstance(obj, (str, Path)):
        return json.loads(Path(obj).read_text())
    return obj


def _percent(values: list[float]) -> float:
    return round(100 * float(sum(values)) / len(values), 2)


def evaluate_vqa(
    predictions: dict[Any, str], annotations: Any, lemmatize: bool = False, nlp: Any = None
) -> dict[str, Any]:
    """Score VQAv2 / OK-VQA predictions like the official evaluator (spec §5.1).

    Args:
        predictions: question_id -> raw answer; must cover exactly the annotated questions.
        annotations: official annotation dict (``{"annotations": [...]}``), its list, or a path to the JSON. Each
            entry has ``question_id``, ``answers`` (dicts with ``answer``, or strings), optional ``answer_type`` and
            ``question_type``.
        lemmatize: spaCy NOUN/VERB-lemmatise the predictions first (OK-VQA; raises if spaCy is missing).
        nlp: an already loaded spaCy pipeline (or compatible callable) for ``lemmatize``.

    Returns:
        ``{"overall", "per_answer_type", "per_question_type", "per_question", "n_questions", "unit": "percent"}``;
        all scores in percent rounded to 2 decimals as in the official evaluator.
    """
    data = _load(annotations)
    entries = data["annotations"] if isinstance(data, dict) else data
    gold = {e["question_id"]: e for e in entries}
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
        answers = [a["answer"] if isinstance(a, dict) else a for a in entry["answers"]]
        acc = vqa_accuracy(preds[qid], answers)
        per_q[qid] = acc
        by_ans[entry.get("answer_type", "unknown")].append(acc)
        by_ques[entry.get("question_type", "unknown")].append(acc)
    return {
        "overall": _percent(list(per_q.values())),
        "per_answer_type": {k: _percent(v) for k, v in by_ans.items()},
        "per_question_type": {k: _percent(v) for k, v in by_ques.items()},
        "per_question": {q: round(100 * a, 2) for q, a in per_q.items()},
        "n_questions": len(per_q),
        "unit": "percent",
    }


def evaluate_okvqa(
    predictions: dict[Any, str], annotations: Any, lemmatize: bool = True, nlp: Any = None
) -> dict[str, Any]:
    """OK-VQA = VQA accuracy on spaCy-lemmatised predictions (spec §5.1); ``lemmatize=False`` is explicit opt-out."""
    result = evaluate_vqa(predictions, annotations, lemmatize=lemmatize, nlp=nlp)
    result["lemmatized"] = lemmatize
    return result


def gqa_accuracy(prediction: str, gt_answer: str) -> float:
    """GQA: 1.0 on exact match after punctuation + digit/article processing of both strings, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gt_answer))


def evaluate_gqa(predictions: dict[Any, str], answers: dict[Any, str]) -> dict[str, Any]:
    """GQA accuracy in percent over ``answers`` (question_id -> single GT answer); predictions must cover them."""
    missing = set(answers) - set(predictions)
    if missing:
        raise ValueError(f"{len(missing)} GQA questions have no prediction")
    accs = [gqa_accuracy(predictions[q], a) for q, a in answers.items()]
    return {"overall": _percent(accs), "n_questions": len(accs), "unit": "percent"}


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
