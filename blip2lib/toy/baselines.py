"""Reference numbers stored with the toy world: LLM blind/text-oracle VQA accuracy, retrieval chance, ViT probe.

* blind: the frozen LLM sees only the zero-shot prompt (no image, no description) — its language prior.
* text oracle: the LLM sees the TRUE scene description where BLIP-2 puts the soft visual prompt — an upper bound
  for zero-shot VQA through that LLM (a perfect Q-Former could at best tell the LLM what the caption says).
* chance retrieval: expected R@k of a random ranking over the test split (docs/paper_map.md §5.3 metrics).
Accuracy is the official VQA accuracy (docs/paper_map.md §5.1) with the number-word/article normalisation that matters
here.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

from . import vocab as V

_NUM = {w: str(i) for i, w in enumerate(("none", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                          "nine", "ten"))}  # fmt: skip
_NUM["zero"] = "0"
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, number words → digits, drop articles.

    These are the parts of the official answer normalisation (docs/paper_map.md §5.1) that toy answers hit.
    """
    words = re.sub(r"[^\w\s]", " ", text.lower().replace("\n", " ")).split()
    return " ".join(_NUM.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """Official per-question VQA accuracy: mean over the 10 leave-one-out subsets of min(1, matches / 3)."""
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(g == p for g in others) / 3.0))
    return sum(accs) / len(accs)


def summarize(preds: list[str], records: list[dict]) -> dict:
    """Overall and per-family VQA accuracy in % (2 decimals, as the official script reports)."""
    per = defaultdict(list)
    for p, r in zip(preds, records):
        acc = vqa_accuracy(p, r["answers"])
        per["overall"].append(acc)
        per[r["family"]].append(acc)
    return {k: round(100 * sum(v) / len(v), 2) for k, v in per.items()}


@torch.no_grad()
def opt_answers(model, records: list[dict], descriptions: dict[int, str] | None, batch: int = 256) -> list[str]:
    r"""Greedy answers of the toy OPT: ``</s> {description} </s> question : q answer :`` → text up to ``"\n"``."""
    inv = {i: w for w, i in V._vocab(V.OPT_SPECIALS).items()}
    vocab = V._vocab(V.OPT_SPECIALS)
    out = []
    for s in range(0, len(records), batch):
        seqs = []
        for r in records[s : s + batch]:
            desc = [V.OPT_BOS] + V.encode(descriptions[r["image_id"]], vocab) if descriptions else []
            seqs.append(desc + [V.OPT_BOS] + V.encode(V.OPT_PROMPT.format(r["question"]), vocab))
        n = max(map(len, seqs))
        x = torch.tensor([[V.OPT_PAD] * (n - len(q)) + q for q in seqs])  # (B, T) left padded (LAVIS OPT)
        gen = model.generate(input_ids=x, attention_mask=(x != V.OPT_PAD).long(), max_new_tokens=3, do_sample=False,
                             eos_token_id=V.OPT_NEWLINE, pad_token_id=V.OPT_PAD)  # fmt: skip
        for row in gen[:, n:].tolist():
            words = []
            for t in row:
                if t in (V.OPT_NEWLINE, V.OPT_PAD, V.OPT_EOS):
                    break
                words.append(inv[t])
            out.append(" ".join(words))
    return out


@torch.no_grad()
def t5_answers(model, records: list[dict], descriptions: dict[int, str] | None, batch: int = 256) -> list[str]:
    """Greedy answers of the toy T5: encoder ``{description} question : q short answer : </s>``."""
    vocab = V._vocab(V.T5_SPECIALS)
    inv = {i: w for w, i in vocab.items()}
    out = []
    for s in range(0, len(records), batch):
        seqs = []
        for r in records[s : s + batch]:
            desc = V.encode(descriptions[r["image_id"]], vocab) if descriptions else []
            seqs.append(desc + V.encode(V.T5_PROMPT.format(r["question"]), vocab) + [V.T5_EOS])
        n = max(map(len, seqs))
        x = torch.tensor([q + [V.T5_PAD] * (n - len(q)) for q in seqs])  # (B, S)
        gen = model.generate(input_ids=x, attention_mask=(x != V.T5_PAD).long(), max_new_tokens=3, do_sample=False)
        for row in gen[:, 1:].tolist():  # drop the decoder start token
            words = []
            for t in row:
                if t in (V.T5_EOS, V.T5_PAD):
                    break
                words.append(inv[t])
            out.append(" ".join(words))
    return out


def retrieval_chance(num_images: int, captions_per_image: int = 5) -> dict:
    """Expected R@1/5/10 (%) of a uniformly random ranking (image→text: any of the image's captions in the top k)."""
    n_txt = num_images * captions_per_image
    out = {}
    for k in (1, 5, 10):
        miss = math.comb(n_txt - captions_per_image, k) / math.comb(n_txt, k)
        out[f"txt_r{k}"] = round(100 * (1 - miss), 3)
        out[f"img_r{k}"] = round(100 * min(k, num_images) / num_images, 3)
    return out


def caption_ceiling(captions: list[list[str]]) -> dict:
    """Best achievable text→image R@1 (%) given captions shared by several images (e.g. two lone red circles)."""
    owners = defaultdict(set)
    for i, caps in enumerate(captions):
        owners[caps[0]].add(i)
    return {"img_r1": round(100 * sum(1 / len(owners[c[0]]) for c in captions) / len(captions), 2),
            "distinct_scenes": len(owners)}  # fmt: skip
