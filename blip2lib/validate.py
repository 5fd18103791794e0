"""Periodic validation and the health checks users ask for: is this run learning?

Stage 1 / retrieval FT: a zero-shot retrieval probe on a fixed validation subset (ITC and ITC+ITM re-ranking, R@1/5 both
directions, docs/paper_map.md §4.3) and ITM accuracy against the constant predictor. Stage 2 / caption FT: validation LM
loss, the image-shuffle control (the loss must rise when images are shuffled: the soft prompt carries the image) and a
few generated captions with their diversity (unique / N); caption FT also CIDEr and BLEU-4 of greedy captions for every
validation image (LAVIS selects caption fine-tuning checkpoints by CIDEr + BLEU-4). VQA FT: greedy answers to a fixed
subset of validation questions, scored with the official VQA accuracy (docs/paper_map.md §5.1) against the constant
predictor that always gives the most frequent validation answer.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from . import dist
from .evaluate.retrieval import recall_at_k, rerank_scores, trim_padding
from .evaluate.vqa import normalize_answer, vqa_accuracy

log = logging.getLogger(__name__)


def _val_files(params, toy_name: str) -> tuple[Path, Path]:
    """``(image root, annotation file)`` of ``val_data``: the toy world's ``toy_name`` split or a file."""
    if params.val_data == "toy":
        from .assemble import toy_world

        world = toy_world(params)
        return world.images_dir, world.annotations[toy_name]
    root = Path(params.data_root or ".")
    return root / params.images_root, root / params.val_data


def _val_set(params, data: dict) -> dict | None:
    """Validation images (tensor, eval transform), captions and the txt2img / img2txt maps."""
    spec = params.val_data
    if not spec:
        return None
    n = params.val_images
    if spec == "synthetic":
        from .toy.synthetic import SyntheticImageText

        ds = SyntheticImageText(n, params.image_size, seed=params.seed + 1)
        items = [ds[i] for i in range(n)]
        images = torch.stack([it["image"] for it in items])
        texts = [it["text_input"] for it in items]
        return {"images": images, "texts": texts, "txt2img": list(range(n)), "img2txt": [[i] for i in range(n)]}
    from .data import CaptionProcessor, RetrievalEvalDataset

    root, ann = _val_files(params, "coco_karpathy_val")
    ds = RetrievalEvalDataset(root, [ann], transform=data["eval_transform"], text_processor=CaptionProcessor())
    idx = [i for i in range(min(n, len(ds)))]
    samples = [ds[i] for i in idx]
    keep = [i for i, s in zip(idx, samples) if s is not None]
    images = torch.stack([s["image"] for s in samples if s is not None])
    texts, txt2img, img2txt = [], [], []
    for new_i, i in enumerate(keep):
        img2txt.append([])
        for t in ds.img2txt[i]:
            img2txt[-1].append(len(texts))
            txt2img.append(new_i)
            texts.append(ds.text[t])
    return {"images": images, "texts": texts, "txt2img": txt2img, "img2txt": img2txt}


def _vqa_val_set(params, data: dict) -> dict | None:
    """The first ``val_images`` validation questions (LAVIS VQA eval format: ``answer`` = annotator answers)."""
    spec, n = params.val_data, params.val_images
    if not spec:
        return None
    from .data import QuestionProcessor, VQAEvalDataset

    if spec == "synthetic":
        from .toy.synthetic import SyntheticImageText

        ds = SyntheticImageText(n, params.image_size, seed=params.seed + 1, vqa=True)
        items = [ds[i] for i in range(n)]
        return {"images": torch.stack([it["image"] for it in items]), "questions": [it["text_input"] for it in items],
                "answers": [it["answers"] for it in items]}  # fmt: skip
    root, ann = _val_files(params, "vqa_val_eval")
    ds = VQAEvalDataset(root, [ann], transform=data["eval_transform"], text_processor=QuestionProcessor())
    images, questions, answers = [], [], []
    for i in range(len(ds)):
        answer = ds.annotation[i].get("answer")
        if not isinstance(answer, list) or not answer:
            raise ValueError(f"{ann}: question {i} has no 'answer' list, so VQA validation cannot score it")
        sample = ds[i]
        if sample is not None:
            images.append(sample["image"])
            questions.append(sample["text_input"])
            answers.append([str(a) for a in answer])
        if len(images) == n:
            break
    return {"images": torch.stack(images), "questions": questions, "answers": answers}


@torch.no_grad()
def vqa_probe(model, val: dict, device, template: str, batch: int = 64) -> dict:
    """Greedy answers (≤ 10 new tokens) with the question also in the Q-Former, official accuracy.

    See docs/paper_map.md §4.2.
    """
    preds = []
    for i in range(0, len(val["questions"]), batch):
        qs = val["questions"][i : i + batch]
        imgs = val["images"][i : i + batch].to(device)
        preds += model.generate(imgs, [template.format(q) for q in qs], questions=qs, num_beams=1,
                                max_new_tokens=10, min_new_tokens=1)  # fmt: skip
    acc = [vqa_accuracy(p, a) for p, a in zip(preds, val["answers"])]
    tally = Counter(normalize_answer(x) for a in val["answers"] for x in a)
    constant = max(tally, key=lambda k: (tally[k], k))  # the most frequent validation answer
    const_acc = [vqa_accuracy(constant, a) for a in val["answers"]]
    return {
        "val_vqa_acc": 100.0 * sum(acc) / len(acc),
        "val_vqa_acc_constant": 100.0 * sum(const_acc) / len(const_acc),
        "val_answer_diversity": len({normalize_answer(p) for p in preds}) / len(preds),
        "val_answers": preds[:8],
    }


@torch.no_grad()
def retrieval_probe(model, tokenizer, val: dict, device, k: int = 16, max_len: int = 35, batch: int = 64) -> dict:
    """ITC and ITC+ITM recall on a small validation set (percent)."""
    model.eval()
    feats, embeds = [], []
    for i in range(0, len(val["images"]), batch):
        enc = model.encode_image(val["images"][i : i + batch].to(device))
        feats.append(enc["image_feats"])
        embeds.append(enc["image_embeds"])
    image_feats, image_embeds = torch.cat(feats), torch.cat(embeds)
    tok = tokenizer(val["texts"], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    text_feat = torch.cat(
        [
            model.encode_text(*trim_padding(ids[i : i + batch], mask[i : i + batch]))["text_feat"]
            for i in range(0, len(ids), batch)
        ]
    )
    sim = model.itc_similarity(image_feats, text_feat).float().cpu()  # (N_img, N_txt)
    out = {}
    itc = recall_at_k(sim, val["txt2img"], val["img2txt"])

    def itm_fn(img_idx, txt_idx):
        pair_ids, pair_mask = trim_padding(ids[txt_idx.to(device)], mask[txt_idx.to(device)])  # exact, shorter
        return model.itm_logits(image_embeds[img_idx.to(device)], pair_ids, pair_mask)[:, 1].float().cpu()

    s_i2t, s_t2i = rerank_scores(sim, itm_fn, k=min(k, sim.shape[1], sim.shape[0]), fusion="itm+itc")
    itm = recall_at_k(s_i2t, val["txt2img"], val["img2txt"], score_t2i=s_t2i)
    for name, r in (("itc", itc), ("itm_itc", itm)):
        for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
            out[f"val_{key}_{name}"] = float(r[key])
    # Health check: ITM accuracy on positives vs rolled negatives, against the constant predictor (50% here).
    n = len(val["images"])
    first = torch.tensor([val["img2txt"][i][0] for i in range(n)])
    pos = itm_fn(torch.arange(n), first)
    neg = itm_fn(torch.arange(n), first.roll(1))
    out["val_itm_acc"] = float(((pos > 0).float().mean() + (neg <= 0).float().mean()) / 2 * 100)
    out["val_itm_acc_constant"] = 50.0
    return out


@torch.no_grad()
def lm_health(model, task, val: dict, device, batch: int = 32, n_captions: int = 8, prompt: str = "") -> dict:
    """Validation LM loss, the image-shuffle control and caption diversity (stage 2 / generative FT)."""
    model.eval()
    n = len(val["images"])
    first = [val["texts"][val["img2txt"][i][0]] for i in range(n)]
    losses, shuffled = [], []
    for i in range(0, n, batch):
        imgs = val["images"][i : i + batch].to(device)
        caps = first[i : i + batch]
        losses.append(float(task({"image": imgs, "text_input": caps})["loss"]) * len(caps))
        perm = torch.roll(torch.arange(len(caps)), 1) if len(caps) > 1 else torch.arange(1)
        shuffled.append(float(task({"image": imgs[perm], "text_input": caps})["loss"]) * len(caps))
    out = {"val_lm_loss": sum(losses) / n, "val_lm_loss_shuffled": sum(shuffled) / n}
    out["val_shuffle_gap"] = out["val_lm_loss_shuffled"] - out["val_lm_loss"]  # > 0: images are used
    caps = model.generate(
        val["images"][:n_captions].to(device), prompt, num_beams=1, max_new_tokens=20, min_new_tokens=1
    )
    out["val_caption_diversity"] = len(set(caps)) / max(1, len(caps))
    out["val_captions"] = caps
    return out


@torch.no_grad()
def caption_probe(model, val: dict, device, prompt: str = "", batch: int = 64) -> dict:
    """Greedy captions (≤ 30 new tokens) of every validation image scored against its references.

    See docs/paper_map.md §5.2.

    Greedy rather than the paper's beam 5 keeps validation cheap; the table notebooks use the paper's decoding.
    Needs Java for the PTB tokenizer, like the official scorer; without it the probe is skipped with a warning.
    """
    from .evaluate.caption import JavaNotFoundError, coco_caption_scores

    n = len(val["images"])
    caps = []
    for i in range(0, n, batch):
        caps += model.generate(val["images"][i : i + batch].to(device), prompt, num_beams=1, max_new_tokens=30,
                               min_new_tokens=1)  # fmt: skip
    refs = {i: [val["texts"][t] for t in val["img2txt"][i]] for i in range(n)}
    try:
        sc = coco_caption_scores(dict(enumerate(caps)), refs, metrics=("BLEU", "CIDEr"))
    except JavaNotFoundError as err:
        log.warning("caption validation skipped: %s", err)
        return {}
    return {"val_cider": sc["CIDEr"], "val_bleu4": sc["Bleu_4"], "val_cider_plus_bleu4": sc["CIDEr"] + sc["Bleu_4"]}


def make_eval_fn(params, model, task, comps: dict, data: dict, device, run_dir: Path) -> Callable[[int], dict] | None:
    """The engine's ``eval_fn(step) -> metrics`` for this stage (None when there is no validation set)."""
    vqa = params.stage == "vqa_ft"
    val = _vqa_val_set(params, data) if vqa else _val_set(params, data)
    if val is None:
        return None
    generative = hasattr(model, "language_model")

    def eval_fn(step: int) -> dict:
        was = model.training
        core_task = task.module if hasattr(task, "module") else task
        if vqa:
            m = vqa_probe(model, val, device, params.question_template)
        elif generative:
            m = lm_health(model, core_task, val, device, prompt=params.prompt)
            if params.stage == "caption_ft":
                m.update(caption_probe(model, val, device, prompt=params.prompt))
        else:
            m = retrieval_probe(model, comps["qformer_tokenizer"], val, device)
        if dist.is_main():
            with open(run_dir / "val.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **m}) + "\n")
        model.train(was)
        return {k: v for k, v in m.items() if isinstance(v, float)}

    return eval_fn
