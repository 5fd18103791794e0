"""Model-driving half of evaluation: run a model over an eval set, then score with the scorers.

See docs/paper_map.md §4.3, §5.

* :func:`run_vqa` / :func:`run_caption`: batched beam-search generation (``Blip2.generate``), sharded over ranks,
  resumable from ``<out_dir>/predictions.<rank>.jsonl`` (see ``drivers_common``), scored on rank 0. VQA runs one
  soft prompt per image by default (``pipeline.GroupedVQA``).
* :func:`run_retrieval`: ITC over all pairs, ITM re-ranking of the top-k (``rerank_scores``), recalls.

Every driver writes ``<out_dir>/result.json`` = metrics in percent (``"unit": "percent"``, user need 31) plus the
full configuration that produced them (decoding recipe, split, precision, library versions, counts, bad samples;
user needs 7/8), and returns the same dict on every rank.

Bad samples (unreadable images, the dataset returns ``None``) are skipped, counted and listed in ``result.json``;
they are **excluded from scoring** (``"complete": false``), so the denominator is printed next to every score.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from blip2lib import dist
from blip2lib.data.processors import CaptionProcessor, pre_question

from .caption import ALL_METRICS, CaptionDecoding, coco_caption_scores, nocaps_breakdown, write_nocaps_submission
from .drivers_common import (
    cache_meta,
    encode_images,
    environment_info,
    gather_records,
    generation_pass,
    model_device,
    write_json,
)
from .integrity import check_unique_ids, duplicate_captions
from .pipeline import GroupedVQA, plan_generation, plan_vqa_pipeline
from .retrieval import FUSIONS, recall_at_k, rerank_scores, trim_padding
from .vqa import VQADecoding, evaluate_gqa, evaluate_vqa, lemmatize_answers, write_vqav2_submission

__all__ = ["run_vqa", "run_caption", "run_retrieval", "OPT_VQA_MAX_PROMPT_LEN"]

logger = logging.getLogger(__name__)

OPT_VQA_MAX_PROMPT_LEN = 32  # LAVIS OPT predict_answers: left padding, truncation 32
_MAX_LISTED_BAD = 50


def _bad_summary(rows: list[dict]) -> dict[str, Any]:
    bad = [r for r in rows if "bad" in r]
    return {"count": len(bad), "examples": [r["bad"] for r in bad[:_MAX_LISTED_BAD]],
            "policy": "skipped and excluded from scoring"}  # fmt: skip


def _where(dataset: Dataset, identity: dict | None) -> str:
    """The annotation file behind ``dataset`` for messages (from ``identity``), else the dataset's class."""
    return ((identity or {}).get("ann_file") or {}).get("path") or f"{type(dataset).__name__} annotations"


def _recipe(decoding: Any) -> dict:
    """The decoding recipe as part of the cache key: every field but ``source`` (provenance text naming a file)."""
    return {k: v for k, v in dataclasses.asdict(decoding).items() if k != "source"}


def _finish(result: dict, out_dir: Path) -> dict:
    """Rank 0 writes ``result.json``; every rank returns rank 0's dict."""
    if dist.is_main():
        write_json(result, out_dir / "result.json")
        logger.info("wrote %s", out_dir / "result.json")
    result = dist.broadcast_object(result)
    dist.barrier()
    return result


def _vqa_ground_truth(dataset: Dataset, annotations: Any, gqa: bool) -> Any:
    """GT for scoring: given ``annotations``; else the dataset's own ``answer`` fields; None for test-dev."""
    if annotations is not None:
        if not isinstance(annotations, (str, Path)):
            return annotations
        gt = json.loads(Path(annotations).read_text())
        if not gqa:  # the scorer refuses repeats too, but without naming the file or the id
            check_unique_ids(gt["annotations"] if isinstance(gt, dict) else gt, "question_id", str(annotations))
        return gt
    anns = getattr(dataset, "annotation", None)
    if not anns or not all("answer" in a for a in anns):
        return None
    if gqa:
        return {a["question_id"]: a["answer"] for a in anns}
    # answer_type / question_type are not in LAVIS lists, but kept when a list carries them (the toy world's do),
    # so the per-type breakdown is not all "unknown".
    types = ("answer_type", "question_type")
    return [{"question_id": a["question_id"], "answers": list(a["answer"]), **{k: a[k] for k in types if k in a}}
            for a in anns]  # fmt: skip


def _score_vqa(preds: dict, gt: Any, gqa: bool, lemmatize: bool) -> dict | None:
    """Score ``preds`` on the questions that have a prediction (bad samples excluded, see module docstring).

    VQAv2 / OK-VQA: the official evaluator's numbers are the headline (``overall``, per type, per question, with
    ``"scorer": "official"``); LAVIS's evaluator's ``overall`` and ``per_answer_type`` sit beside them under
    ``"lavis"``, for comparison with the numbers LAVIS printed. GQA: LAVIS's exact match (``"scorer": "lavis"``).
    """
    if not preds:
        logger.warning("no question could be answered (all images unreadable): nothing to score")
        return None
    if gqa:
        return evaluate_gqa(preds, {q: a for q, a in gt.items() if q in preds})
    entries = gt["annotations"] if isinstance(gt, dict) else gt
    entries = [e for e in entries if e["question_id"] in preds]
    if lemmatize:  # OK-VQA: lemmatise once (spaCy is slow); both evaluators then score the same answers
        qids = list(preds)
        preds = dict(zip(qids, lemmatize_answers([preds[q] for q in qids])))
    result = evaluate_vqa(preds, entries, scorer="official")
    lavis = evaluate_vqa(preds, entries, scorer="lavis")
    result["lavis"] = {k: lavis[k] for k in ("overall", "per_answer_type", "scorer")}
    if lemmatize:
        result["lemmatized"] = True
    return result


def run_vqa(
    model: torch.nn.Module,
    dataset: Dataset,
    decoding: VQADecoding | None,
    batch_size: int | str,
    out_dir: str | Path,
    split_name: str,
    annotations: Any = None,
    gqa: bool = False,
    lemmatize: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    autocast: str | None = None,
    identity: dict | None = None,
    pipeline: str = "auto",
    decode_engine: str | None = None,
) -> dict[str, Any]:
    """Zero-shot VQA evaluation: generate answers, score, write results and the submission file.

    Args:
        model: ``Blip2`` with ``family`` and ``tokenizer`` (placed on its device; ``eval`` is set here).
        dataset: ``VQAEvalDataset`` / ``GQAEvalDataset`` (or any dataset giving ``image``, ``text_input``,
            ``question_id``). Questions go through ``blip_question`` (``pre_question``, idempotent) here.
        decoding: recipe (prompt, beams, lengths, length penalty); None -> ``VQADecoding.paper(model.family)``.
        batch_size: questions per ``generate`` call (images per soft prompt when grouped); ``"auto"``: free memory.
        out_dir: cache + results folder (re-running with the same folder resumes).
        split_name: recorded in the result (e.g. ``"vqa_val_eval"``).
        annotations: official annotation dict/list/path (VQAv2, OK-VQA) or qid -> answer (GQA); None -> the
            dataset's own ``answer`` fields, or no scoring (test-dev) when it has none.
        gqa: GQA exact-match scoring (LAVIS's) instead of VQA accuracy.
        lemmatize: OK-VQA spaCy lemmatisation of predictions (NOUN/VERB lemmas, as LAVIS does).
        num_workers: DataLoader workers.
        progress: tqdm progress bar with ETA on rank 0.
        autocast: ``"fp16"`` / ``"bf16"`` autocast around generation, or None.
        identity: where model and data come from, as only the caller knows it (``{"checkpoint":
            checkpoint_identity(path), "ann_file": file_identity(path)}``); recorded in ``result.json`` and part of
            the prediction cache's key (see ``drivers_common``: a changed key moves the old cache aside).
        pipeline: ``"grouped"`` (one soft prompt per image, length-sorted question batches: ``evaluate.pipeline``),
            ``"per_question"`` (image and soft prompt per question) or ``"auto"`` (grouped where it applies).
        decode_engine: ``generate``'s ``engine`` (``"auto"`` / ``"hf"`` / ``"static"``); None: its default.

    Returns:
        The ``result.json`` dict: ``metrics`` (percent; None without GT; VQAv2 / OK-VQA: the official evaluator's
        numbers with LAVIS's beside them under ``"lavis"``, each naming its ``scorer``), ``config``, ``counts``,
        ``timing``, ``files``.
    """
    out_dir = Path(out_dir)
    # a repeated question id would let one answer overwrite another: refused before any generation
    check_unique_ids(getattr(dataset, "annotation", None), "question_id", _where(dataset, identity))
    decoding = decoding if decoding is not None else VQADecoding.paper(model.family)
    gen_kwargs = decoding.generate_kwargs()
    if model.family == "opt":
        gen_kwargs["max_prompt_len"] = OPT_VQA_MAX_PROMPT_LEN
    meta = cache_meta(model, dataset, identity, autocast, task="gqa" if gqa else "vqa", split=split_name,
                      n_items=len(dataset), decoding=_recipe(decoding), generate_kwargs=gen_kwargs,
                      question_processor="pre_question")  # fmt: skip
    batch_size, call_kwargs, plan = plan_generation(model, batch_size, gen_kwargs, decode_engine)
    plan["pipeline"] = plan_vqa_pipeline(model, dataset, pipeline)

    def prompt(question: str) -> str:
        return decoding.format_prompt(pre_question(question))

    def prompts(batch: dict) -> list[str]:
        return [prompt(q) for q in batch["text_input"]]

    def record(batch: dict, j: int) -> dict:
        qid = batch["question_id"][j]
        return {"id": int(qid) if isinstance(qid, torch.Tensor) else qid}

    grouped = {}  # per question: generation_pass's own loop
    if plan["pipeline"] == "grouped":
        grouped["runner"] = GroupedVQA(model, dataset, batch_size, prompt, call_kwargs, num_workers)
    records, stats = generation_pass(model, dataset, out_dir, meta, batch_size, prompts, record, call_kwargs,
                                     num_workers, progress, autocast, **grouped)  # fmt: skip
    rows, timing = gather_records(records, stats)
    result: dict[str, Any] = {}
    if dist.is_main():
        preds = {r["id"]: r["text"] for r in rows if "bad" not in r}
        files = {"predictions": str(write_json([{"question_id": q, "answer": a} for q, a in preds.items()],
                                               out_dir / "predictions.json"))}  # fmt: skip
        gt = _vqa_ground_truth(dataset, annotations, gqa)
        metrics = None
        if gt is not None:
            metrics = _score_vqa(preds, gt, gqa, lemmatize)
            per_q = metrics.pop("per_question", None) if metrics else None
            if per_q is not None:
                files["per_question"] = str(write_json(per_q, out_dir / "per_question.json"))
        elif not gqa:  # test-dev: the evaluation server scores it (user need 30)
            files["submission"] = str(write_vqav2_submission(preds, out_dir / "vqav2_submission.json"))
        bad = _bad_summary(rows)
        result = {
            "task": meta["task"],
            "split": split_name,
            "metrics": metrics,
            "config": {"decoding": dataclasses.asdict(decoding), "generate_kwargs": gen_kwargs,
                       "family": model.family, "question_processor": "blip_question (pre_question, max_words=50)",
                       "lemmatize": lemmatize, **plan, "identity": identity or {}, **environment_info(model, autocast)},
            "counts": {"n_questions": len(dataset), "n_predicted": len(preds), "n_scored":
                       (metrics or {}).get("n_questions", 0), "bad_samples": bad, "complete": bad["count"] == 0},
            "timing": timing,
            "cache": {"key": meta, "superseded": timing.pop("superseded")},
            "files": files,
        }  # fmt: skip
    return _finish(result, out_dir)


def run_caption(
    model: torch.nn.Module,
    dataset: Dataset,
    decoding: CaptionDecoding | None,
    gt: Any,
    batch_size: int | str,
    out_dir: str | Path,
    split_name: str = "",
    metrics: tuple[str, ...] | list[str] = ALL_METRICS,
    num_workers: int = 0,
    progress: bool = True,
    autocast: str | None = None,
    identity: dict | None = None,
    decode_engine: str | None = None,
) -> dict[str, Any]:
    """Caption evaluation: generate one caption per image, COCO metrics, NoCaps domain breakdown.

    See docs/paper_map.md §5.2.

    Args:
        model: ``Blip2`` with a tokenizer.
        dataset: ``CaptionEvalDataset`` (Karpathy val/test) or ``NoCapsDataset`` (items with ``domain``).
        decoding: recipe; None -> ``CaptionDecoding.paper()``.
        gt: COCO-format GT dict/path, or image_id -> captions; None -> no scoring (submission file only).
        batch_size: images per ``generate`` call; ``"auto"``: from free GPU memory (as in :func:`run_vqa`).
        out_dir: cache + results folder (re-running resumes).
        split_name: recorded in the result.
        metrics: subset of ``ALL_METRICS`` (METEOR/SPICE need Java; SPICE may be "not computed").
        num_workers: DataLoader workers.
        progress: tqdm bar on rank 0.
        autocast: ``"fp16"`` / ``"bf16"`` or None.
        identity: checkpoint / annotation-file identity, recorded and part of the cache key (as in :func:`run_vqa`).
        decode_engine: ``generate``'s ``engine`` (``"auto"`` / ``"hf"`` / ``"static"``); None: its default.

    Returns:
        The ``result.json`` dict (``metrics`` in percent; for NoCaps ``{in-domain, near-domain, out-domain,
        overall}``).
    """
    out_dir = Path(out_dir)
    decoding = decoding if decoding is not None else CaptionDecoding.paper()
    gen_kwargs = decoding.generate_kwargs()
    meta = cache_meta(model, dataset, identity, autocast, task="caption", split=split_name, n_items=len(dataset),
                      decoding=_recipe(decoding), generate_kwargs=gen_kwargs)  # fmt: skip
    batch_size, call_kwargs, plan = plan_generation(model, batch_size, gen_kwargs, decode_engine)

    def prompts(batch: dict) -> list[str]:
        return [decoding.prompt] * batch["batch_size"]

    def record(batch: dict, j: int) -> dict:
        row = {"id": int(batch["image_id"][j])}
        if "domain" in batch:
            row["domain"] = batch["domain"][j]
        return row

    records, stats = generation_pass(model, dataset, out_dir, meta, batch_size, prompts, record, call_kwargs,
                                     num_workers, progress, autocast)  # fmt: skip
    rows, timing = gather_records(records, stats)
    result: dict[str, Any] = {}
    if dist.is_main():
        ok = [r for r in rows if "bad" not in r]
        preds = {r["id"]: r["text"] for r in ok}
        domains = {r["id"]: r["domain"] for r in ok if r.get("domain")}
        files = {"predictions": str(write_nocaps_submission(preds, out_dir / "captions.json"))}  # COCO result format
        if domains:
            files["nocaps_submission"] = files["predictions"]
        scores = None
        if gt is not None and preds:
            refs = _caption_refs(gt)
            if domains:
                sub = {i: refs[i] for i in preds if i in refs}  # bad samples excluded; unknown ids still raise
                scores = nocaps_breakdown(preds, sub, domains=domains, metrics=metrics)
            else:
                scores = coco_caption_scores(preds, refs, metrics=metrics, allow_subset=len(preds) < len(dataset))
        bad = _bad_summary(rows)
        result = {
            "task": "caption",
            "split": split_name,
            "metrics": scores,
            "config": {"decoding": dataclasses.asdict(decoding), "generate_kwargs": gen_kwargs,
                       "family": model.family, "metrics": list(metrics), **plan, "identity": identity or {},
                       **environment_info(model, autocast)},
            "counts": {"n_images": len(dataset), "n_predicted": len(preds), "bad_samples": bad,
                       "complete": bad["count"] == 0},
            "timing": timing,
            "cache": {"key": meta, "superseded": timing.pop("superseded")},
            "files": files,
        }  # fmt: skip
    return _finish(result, out_dir)


def _caption_refs(gt: Any) -> dict[int, list[str]]:
    """image_id -> reference captions from a COCO-format dict/path or a ready mapping."""
    if isinstance(gt, (str, Path)):
        gt = json.loads(Path(gt).read_text())
    if isinstance(gt, dict) and "annotations" in gt:
        refs: dict[int, list[str]] = {img["id"]: [] for img in gt.get("images", [])}
        for ann in gt["annotations"]:
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
        return refs
    return {int(k): list(v) for k, v in gt.items()}


# ----------------------------------------------------------------------------------------------------------------
# Retrieval (docs/paper_map.md §4.3 "Inference / score fusion", §5.3, §10.8)


@torch.no_grad()
def run_retrieval(
    model: torch.nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    k: int = 128,
    fusion: str = "itm+itc",
    text_max_len: int = 35,
    batch_size: int = 64,
    out_dir: str | Path = "eval_retrieval",
    split_name: str = "",
    itm_batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    save_scores: bool = False,
    text_processor: Callable[[str], str] | None = None,
    identity: dict | None = None,
) -> dict[str, Any]:
    """Image-text retrieval (docs/paper_map.md §4.3, §5.3): ITC top-k candidates re-ranked by ITM, R@1/5/10 in percent.

    Every rank encodes all images and texts (as LAVIS); the top-k ITM re-ranking, the expensive part, is split
    over ranks by ``rerank_scores``. Image embeddings stay on the CPU and move to the model device per ITM batch.
    Images that cannot be read are dropped from the gallery together with their captions (``complete: false``).

    Args:
        model: ``Blip2QFormerModel`` (``encode_image``, ``encode_text``, ``itc_similarity``, ``itm_logits``).
        dataset: ``RetrievalEvalDataset`` (items ``image``, ``index``; attributes ``text``, ``txt2img``,
            ``img2txt``).
        tokenizer: the Q-Former BERT tokenizer.
        k: candidates per query (``k_test`` = 128).
        fusion: ``"itm+itc"`` (LAVIS code), ``"itm"`` (paper text) or ``"itc"``; the ITC-only recalls over all
            pairs are always reported too (user need 18).
        text_max_len: 35 in evaluation (docs/paper_map.md §10.8), ``padding="max_length"`` as LAVIS.
        batch_size: images / texts per encoder call.
        out_dir: results folder.
        split_name: recorded in the result.
        itm_batch_size: image-text pairs per ITM call.
        num_workers: DataLoader workers.
        progress: progress bars on rank 0.
        save_scores: also write ``scores.pt`` (``itc``, ``score_i2t``, ``score_t2i``, ``txt2img``, ``img2txt``).
        text_processor: applied to every caption before tokenising; None -> ``CaptionProcessor()`` (LAVIS
            ``blip_caption`` with 50 words, what its ``ret_*_eval.yaml`` use at evaluation). It is idempotent, so a
            dataset that already processed its captions gives the same texts; ``str`` keeps them as they are.
        identity: checkpoint / annotation-file identity, recorded in ``result.json`` (nothing is cached here).

    Returns:
        The ``result.json`` dict: ``metrics`` (fused), ``metrics_itc_only``, ``config``, ``counts``.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    out_dir = Path(out_dir)
    device = model_device(model)
    text_processor = CaptionProcessor() if text_processor is None else text_processor
    was_training = model.training
    model.eval()
    try:
        kept, image_embeds, image_feats, bad = encode_images(model, dataset, batch_size, num_workers, progress)
        new_img = {old: new for new, old in enumerate(kept)}
        texts, txt2img, img2txt = [], [], [[] for _ in kept]
        for t, text in enumerate(dataset.text):  # captions of dropped images leave the gallery too
            img = new_img.get(dataset.txt2img[t])
            if img is not None:
                img2txt[img].append(len(texts))
                txt2img.append(img)
                texts.append(text_processor(text))
        shared = duplicate_captions(texts, txt2img, _where(dataset, identity))
        tok = tokenizer(texts, padding="max_length", truncation=True, max_length=text_max_len, return_tensors="pt")
        ids, mask = tok.input_ids, tok.attention_mask  # (Nt, L) CPU
        text_feat = torch.cat(
            [
                model.encode_text(
                    *(t.to(device) for t in trim_padding(ids[s : s + batch_size], mask[s : s + batch_size]))
                )["text_feat"]
                for s in range(0, len(texts), batch_size)
            ]
        )  # (Nt, E) fmt: skip
        # ITC over all pairs in image chunks: the (Bi, Nt, Q) intermediate of the full matrix would not fit
        sim = torch.cat(
            [
                model.itc_similarity(image_feats[s : s + batch_size].to(device), text_feat)
                for s in range(0, len(kept), batch_size)
            ]
        )  # (Ni, Nt) fmt: skip

        def itm_fn(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            img_idx, txt_idx = img_idx.cpu(), txt_idx.cpu()
            pair_ids, pair_mask = trim_padding(ids[txt_idx], mask[txt_idx])  # (P, L') exact, shorter
            logits = model.itm_logits(
                image_embeds[img_idx].to(device), pair_ids.to(device), pair_mask.to(device)
            )  # (P, 2)
            return logits[:, 1].float()  # positive-class logit averaged over queries (docs/paper_map.md §4.3 step 4)

        score_i2t, score_t2i = rerank_scores(sim, itm_fn if fusion != "itc" else None, k=k, fusion=fusion,
                                             batch_size=itm_batch_size)  # fmt: skip
    finally:
        model.train(was_training)
    result: dict[str, Any] = {}
    if dist.is_main():
        if save_scores:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"itc": sim.cpu(), "score_i2t": score_i2t.cpu(), "score_t2i": score_t2i.cpu(),
                        "txt2img": txt2img, "img2txt": img2txt}, out_dir / "scores.pt")  # fmt: skip
        result = {
            "task": "retrieval",
            "split": split_name,
            "metrics": recall_at_k(score_i2t.cpu(), txt2img, img2txt, score_t2i.cpu()),
            "metrics_itc_only": recall_at_k(sim.cpu(), txt2img, img2txt),
            "config": {"k": k, "fusion": fusion, "text_max_len": text_max_len, "text_padding": "max_length",
                       "text_processor": repr(text_processor),
                       "itm_batch_size": itm_batch_size, "batch_size": batch_size, "identity": identity or {},
                       **environment_info(model)},
            "counts": {"n_images": len(dataset), "n_texts": len(dataset.text), "n_images_scored": len(kept),
                       "n_texts_scored": len(texts), "bad_samples": _bad_summary(bad), "complete": not bad,
                       "duplicate_captions": shared},
        }  # fmt: skip
    return _finish(result, out_dir)
