"""Caption scoring: decoding recipes, COCO caption metrics via pycocoevalcap, NoCaps breakdown.

Metrics are pycocoevalcap's (PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE), reported in **percent**
with ``"unit": "percent"`` in every result; they are asked for by pycocoevalcap's result names (``METRIC_NAMES``:
``Bleu_4``, ``CIDEr`` ...) or by scorer group (``ALL_METRICS``: ``BLEU`` ...). The PTB tokenizer, METEOR and SPICE
run Java subprocesses: Java is checked up front with a clear error. METEOR loads its paraphrase table on every start
(about half a minute on a busy 2-core machine); SPICE additionally needs Stanford CoreNLP 3.6.0 jars that
pycocoevalcap downloads on first use, so when they are missing (offline) or SPICE fails, the result holds
``"SPICE": None`` and a ``"SPICE_status"`` reason — never a fake 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "ALL_METRICS",
    "METRIC_NAMES",
    "DOMAINS",
    "CaptionDecoding",
    "JavaNotFoundError",
    "check_java",
    "metric_groups",
    "spice_models_available",
    "coco_caption_scores",
    "nocaps_breakdown",
    "write_nocaps_submission",
]

logger = logging.getLogger(__name__)

ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")  # scorer groups: one pycocoevalcap scorer each
# the names pycocoevalcap's COCOEvalCap writes into its result (and LAVIS's logs, and the paper's columns):
# BLEU is one scorer that yields all four n-gram orders at once, the others one number each
METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_GROUP_OF = {**{name: "BLEU" if name.startswith("Bleu_") else name for name in METRIC_NAMES}, "BLEU": "BLEU"}
DOMAINS = ("in-domain", "near-domain", "out-domain")
_SPICE_CORENLP_JAR = "stanford-corenlp-3.6.0.jar"  # what pycocoevalcap's get_stanford_models() fetches


class JavaNotFoundError(UserError, RuntimeError):
    """Raised when no ``java`` executable is on PATH (pycocoevalcap's tokenizer, METEOR and SPICE need it)."""


@dataclass(frozen=True)
class CaptionDecoding:
    """Caption decoding recipe (see ``docs/fidelity.md``).

    Attributes:
        prompt: text prefix fed to the LLM ("a photo of" for the COCO fine-tuned models); not part of the output.
        num_beams: beam width.
        max_new_tokens: LAVIS ``max_len`` (30): the most generated tokens, EOS included, under every rule.
        min_new_tokens: LAVIS ``min_len`` (8); what it counts depends on ``length_rule``.
        repetition_penalty: 1.0 = off.
        length_penalty: beam length-normalisation exponent.
        source: provenance, echoed into result JSONs.
        length_rule: ``"new"`` (paper recipe): both lengths count generated tokens (8 tokens before EOS at least).
            ``"lavis_head"`` (LAVIS recipe): counted as LAVIS HEAD does: FlanT5 ``min_len=8`` includes the decoder
            start token (7 tokens before EOS); OPT generates from ``inputs_embeds`` only (8). ``"lavis_paper_time"``:
            the Feb-2023 OPT counted the prompt ids too (``"a photo of"`` = 4 ids: 4 tokens before EOS). See
            ``blip2lib.generation.new_token_bounds``.
    """

    prompt: str = "a photo of"
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    source: str = "paper"
    length_rule: str = "new"

    @classmethod
    def paper(cls) -> CaptionDecoding:
        """Paper-time LAVIS task (Feb 2023): beam 5, 8-30 new tokens, repetition 1.0, length penalty 1.0.

        Lengths count generated tokens (``length_rule="new"``); ``length_rule="lavis_paper_time"`` counts them as
        the Feb-2023 code did.
        """
        return cls(source="paper (Feb-2023 LAVIS CaptionTask)")

    @classmethod
    def lavis_head(cls) -> CaptionDecoding:
        """LAVIS HEAD ``CaptionTask`` defaults: repetition penalty 1.15, length penalty 0 (not the paper's).

        Lengths as LAVIS HEAD counts them (``length_rule="lavis_head"``).
        """
        return cls(
            repetition_penalty=1.15, length_penalty=0.0, source="LAVIS HEAD CaptionTask", length_rule="lavis_head"
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate`` (deterministic beam search); ``dataclasses.asdict`` for result JSONs.

        ``length_rule`` is passed only when it is not ``generate``'s default ``"new"``.
        """
        skip = ("prompt", "source") + (("length_rule",) if self.length_rule == "new" else ())
        kwargs = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return {**kwargs, "do_sample": False}


def check_java() -> str:
    """Return the path of ``java`` or raise ``JavaNotFoundError`` with an install hint."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "Java was not found on PATH. pycocoevalcap's PTB tokenizer, METEOR and SPICE run `java` subprocesses "
            "for caption scoring. Install a JRE >= 8, e.g. `apt-get install default-jre-headless` or "
            "`conda install -c conda-forge openjdk`, then re-run."
        )
    return java


def spice_models_available() -> tuple[bool, str]:
    """Whether SPICE can run offline: pycocoevalcap needs Stanford CoreNLP 3.6.0 next to ``spice-1.0.jar``."""
    try:
        import pycocoevalcap.spice.spice as spice_mod
    except ImportError as err:
        return False, f"pycocoevalcap SPICE not importable ({err})"
    jar = Path(spice_mod.__file__).parent / "lib" / _SPICE_CORENLP_JAR
    if not jar.exists():
        return False, (
            f"{jar} is missing; SPICE needs a one-time download of Stanford CoreNLP 3.6.0 (network): run "
            "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'`"
        )
    return True, "ok"


def _gt_captions(gt: Any) -> dict[Any, list[str]]:
    """image_id -> reference captions from a COCO-format dict, its path, or an image_id -> list mapping."""
    if isinstance(gt, (str, Path)):
        gt = json.loads(Path(gt).read_text())
    if isinstance(gt, dict) and "annotations" in gt:
        refs: dict[Any, list[str]] = {}
        for ann in gt["annotations"]:
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
        return refs
    return {k: list(v) for k, v in gt.items()}


def _tokenize(predictions: dict[Any, str], refs: dict[Any, list[str]]) -> tuple[dict, dict]:
    """PTB-tokenise (lower-case, punctuation dropped) references and predictions: one Java call each."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    check_java()
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in predictions})
    res = tok.tokenize({i: [{"caption": predictions[i]}] for i in predictions})
    return gts, res


def _spice(gts: dict, res: dict) -> tuple[float | None, str]:
    ok, reason = spice_models_available()
    if not ok:
        return None, f"not computed: {reason}"
    try:
        from pycocoevalcap.spice.spice import Spice

        score, _ = Spice().compute_score(gts, res)
    except Exception as err:  # any SPICE failure (Java crash, OOM, bad output) becomes "not computed"
        return None, f"not computed: SPICE failed ({type(err).__name__}: {err})"
    return 100.0 * float(score), "ok"


def _score(gts: dict, res: dict, metrics: Sequence[str]) -> dict[str, Any]:
    """Run the selected pycocoevalcap scorers on tokenised captions; scores in percent."""
    out: dict[str, Any] = {}
    if "BLEU" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"Bleu_{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)})
    if "METEOR" in metrics:
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = 100.0 * float(Meteor().compute_score(gts, res)[0])
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["ROUGE_L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    if "SPICE" in metrics:
        out["SPICE"], out["SPICE_status"] = _spice(gts, res)
    return out


def metric_groups(metrics: Sequence[str]) -> tuple[str, ...]:
    """The scorer groups (``ALL_METRICS`` members) that compute ``metrics``, in ``ALL_METRICS`` order.

    Args:
        metrics: group names (``BLEU``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``) and / or pycocoevalcap's result
            names (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``), mixed freely.

    Raises:
        ValueError: a name that is neither; the message names it and lists both kinds of choice.
    """
    unknown = [m for m in metrics if m not in _GROUP_OF]
    if unknown:
        raise ValueError(
            f"unknown metrics {unknown}; choose pycocoevalcap result names {list(METRIC_NAMES)} "
            f"or scorer groups {list(ALL_METRICS)}"
        )
    wanted = {_GROUP_OF[m] for m in metrics}
    return tuple(g for g in ALL_METRICS if g in wanted)


def _check_ids(predictions: dict[Any, str], refs: dict[Any, list[str]], allow_subset: bool) -> None:
    extra = set(predictions) - set(refs)
    if extra:
        raise ValueError(f"{len(extra)} predicted image ids have no references, e.g. {sorted(extra, key=str)[:3]}")
    missing = set(refs) - set(predictions)
    if missing and not allow_subset:
        raise ValueError(
            f"{len(missing)} reference images have no prediction (pass allow_subset=True to score "
            "only the predicted images, as LAVIS does)"
        )


def coco_caption_scores(
    predictions: dict[Any, str],
    gt: Any,
    metrics: Sequence[str] = ALL_METRICS,
    allow_subset: bool = False,
) -> dict[str, Any]:
    """COCO caption metrics of one caption per image (LAVIS ``coco_caption_eval``).

    Args:
        predictions: image_id -> generated caption (prompt not included).
        gt: COCO-format dict (``{"annotations": [{"image_id", "caption"}, ...]}``), its JSON path, or a mapping
            image_id -> list of reference captions.
        metrics: scorer groups (``ALL_METRICS``) and / or result names (``METRIC_NAMES``: ``Bleu_4`` runs the BLEU
            scorer, which reports ``Bleu_1..4``); leave out ``"METEOR"`` / ``"SPICE"`` to skip those Java steps.
        allow_subset: score only the predicted images when some references have no prediction.

    Returns:
        ``Bleu_1..4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE`` (None when not computed) and
        ``SPICE_status`` for the selected metrics, in percent, plus ``n_images`` and ``"unit": "percent"``.
    """
    groups = metric_groups(metrics)
    refs = _gt_captions(gt)
    _check_ids(predictions, refs, allow_subset)
    gts, res = _tokenize(predictions, refs)
    out = _score(gts, res, groups)
    out.update(n_images=len(res), unit="percent")
    return out


def nocaps_breakdown(
    predictions: dict[Any, str],
    gt: Any,
    domains: dict[Any, str] | None = None,
    metrics: Sequence[str] = ("CIDEr", "SPICE"),
) -> dict[str, Any]:
    """NoCaps validation scores per domain and overall (paper Table 3).

    Each domain is scored as its own corpus (CIDEr's document frequencies come from that domain's references), like
    the official NoCaps evaluation; tokenisation runs once.

    Args:
        predictions: image_id -> caption for every image of ``gt``.
        gt: NoCaps-format dict / path (COCO format; ``images`` entries carry ``domain``) or image_id -> captions.
        domains: image_id -> ``"in-domain" | "near-domain" | "out-domain"``; default read from ``gt["images"]``.
        metrics: as in :func:`coco_caption_scores` (default CIDEr and SPICE, the paper's NoCaps metrics).

    Returns:
        ``{"in-domain": {...}, "near-domain": {...}, "out-domain": {...}, "overall": {...}, "unit": "percent"}``;
        each inner dict holds the metrics and ``n_images``.
    """
    groups = metric_groups(metrics)
    if domains is None:
        gt_dict = json.loads(Path(gt).read_text()) if isinstance(gt, (str, Path)) else gt
        domains = {img["id"]: img["domain"] for img in gt_dict.get("images", [])}
        gt = gt_dict
    refs = _gt_captions(gt)
    _check_ids(predictions, refs, allow_subset=False)
    unknown = {d for d in domains.values() if d not in DOMAINS} | ({i for i in predictions if i not in domains})
    if unknown:
        raise ValueError(f"every image needs a domain in {DOMAINS}; bad or missing: {sorted(unknown, key=str)[:5]}")
    gts, res = _tokenize(predictions, refs)
    out: dict[str, Any] = {}
    for name in (*DOMAINS, "overall"):
        ids = [i for i in res if name == "overall" or domains[i] == name]
        if ids:
            out[name] = _score({i: gts[i] for i in ids}, {i: res[i] for i in ids}, groups)
            out[name]["n_images"] = len(ids)
    out["unit"] = "percent"
    return out


def write_nocaps_submission(predictions: dict[Any, str], path: str | Path) -> Path:
    """Write the NoCaps evaluation-server file: a JSON list of ``{"image_id", "caption"}`` sorted by id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": int(i), "caption": c} for i, c in sorted(predictions.items(), key=lambda kv: int(kv[0]))]
    path.write_text(json.dumps(rows))
    return path
