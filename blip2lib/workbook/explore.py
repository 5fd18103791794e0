"""Library calls of the walk-through notebooks: ``00_explore``, ``02_prepare_data`` and ``50_parity``.

Each public function is one notebook step: load a model (or a random tiny one), pick images, score image-text
pairs, read the Q-Former's cross-attention, prepare datasets with a dedup report, and check parity with
transformers. Nothing here prints (``logging`` only); the notebooks display the returned values.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from .run import REPO_ROOT

log = logging.getLogger(__name__)

VQA_PROMPT = "Question: {} Answer:"  # the paper's zero-shot OPT VQA prompt (docs/paper_map.md §5.1)


# ----------------------------------------------------------------------------------------------------------------
# 00_explore: models, images, scores, attention


def _existing(path: str) -> Path | None:
    """``path`` as given, else relative to the repo root; None when neither exists."""
    for p in (Path(path), REPO_ROOT / path):
        if p.exists():
            return p
    return None


def load_model(checkpoint: str, seed: int = 42, family: str = "opt", image_size: int = 28, missing_ok: bool = False):
    """A stage-2 :class:`~blip2lib.model.Blip2` with its LLM tokenizer, in eval mode.

    Args:
        checkpoint: a run folder, transformers dir or LAVIS file (``blip2lib.from_pretrained``), or ``"tiny"`` for a
            random tiny model (``config.tiny_config`` + ``blip2lib.toy.synthetic`` tokenizers), seeded with ``seed``.
        seed: seed of the tiny model's initialisation.
        family: LLM family of the tiny model (``opt`` or ``t5``).
        image_size: input resolution of the tiny model.
        missing_ok: a path that does not exist falls back to ``"tiny"`` (logged) instead of raising.
    """
    from ..model import Blip2

    if checkpoint != "tiny":
        found = _existing(checkpoint)
        if found is not None:
            from ..pretrained import from_pretrained

            return from_pretrained(found).eval()
        if not missing_ok:
            raise FileNotFoundError(f"checkpoint {checkpoint!r} not found (set missing_ok to fall back to tiny)")
        log.warning("checkpoint %s not found: using a random tiny model", checkpoint)
    from ..config import tiny_config
    from ..toy.synthetic import tiny_llm_tokenizer

    torch.manual_seed(seed)
    return Blip2(tiny_config(family, image_size=image_size), tokenizer=tiny_llm_tokenizer(family)).eval()


def load_stage1_model(checkpoint: str, seed: int = 42, image_size: int = 28, missing_ok: bool = False):
    """A stage-1 :class:`~blip2lib.model.Blip2QFormerModel` and its BERT tokenizer (``"tiny"``: random tiny model)."""
    from ..model import Blip2QFormerModel

    if checkpoint != "tiny":
        found = _existing(checkpoint)
        if found is not None:
            from ..pretrained import from_pretrained

            model = from_pretrained(found).eval()
            return model, getattr(model, "qformer_tokenizer", None) or model.tokenizer
        if not missing_ok:
            raise FileNotFoundError(f"stage-1 checkpoint {checkpoint!r} not found")
        log.warning("stage-1 checkpoint %s not found: using a random tiny model", checkpoint)
    from ..config import tiny_config
    from ..toy.synthetic import tiny_bert_tokenizer

    torch.manual_seed(seed)
    return Blip2QFormerModel(tiny_config(image_size=image_size)).eval(), tiny_bert_tokenizer()


def sample_images(source: str, n: int = 4, seed: int = 0) -> dict:
    """``n`` test images with a reference caption and a question each.

    Args:
        source: ``"synthetic"`` (random pixels, captions from ``blip2lib.toy.synthetic.WORDS``) or a toy-world size
            (``"full"`` / ``"tiny"``): the toy world's Karpathy-style test split and VQA val questions.
        n: number of images.
        seed: seed of the synthetic images (the toy world is always the shared seed-0 world the stages read).

    Returns:
        ``{"images": [PIL.Image], "captions": [str], "questions": [str], "answers": [str]}``.
    """
    from PIL import Image

    if source == "synthetic":
        from ..toy.synthetic import SyntheticImageText

        ds = SyntheticImageText(n, 56, seed=seed, vqa=True)
        items = [ds[i] for i in range(n)]
        images = [Image.fromarray((it["image"].permute(1, 2, 0).numpy() * 255).astype("uint8")) for it in items]
        return {"images": images, "captions": [it["text_input"] for it in items],
                "questions": ["what is the colour ?"] * n, "answers": [it["answers"][0] for it in items]}  # fmt: skip
    from ..toy import build_toy_world

    world = build_toy_world(size=source, progress=False)
    caps = json.loads(world.annotations["coco_karpathy_test"].read_text())[:n]
    vqa = json.loads(world.annotations["vqa_val_eval"].read_text())[:n]
    images = [Image.open(world.images_dir / e["image"]).convert("RGB") for e in caps]
    answers = [max(set(q["answer"]), key=q["answer"].count) for q in vqa]  # majority answer
    return {"images": images, "captions": [e["caption"][0] for e in caps], "questions": [q["question"] for q in vqa],
            "answers": answers}  # fmt: skip


def to_pixels(images: list, model) -> torch.Tensor:
    """PIL images → (B, 3, S, S) with the evaluation transform at the model's resolution (docs/paper_map.md §6)."""
    from ..data.processors import image_eval_transform

    tf = image_eval_transform(model.config.vision.image_size)
    return torch.stack([tf(im) for im in images])


@torch.no_grad()
def ask(model, pixels: torch.Tensor, questions: list[str], template: str = VQA_PROMPT, **decoding) -> list[str]:
    """Zero-shot VQA: each question in the prompt template, greedy by default (docs/paper_map.md §5.1)."""
    from ..generation import format_prompt

    decoding = {"num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 1, **decoding}
    return model.generate(pixels, [format_prompt(template, q) for q in questions], **decoding)


@torch.no_grad()
def match_scores(model, tokenizer, pixels: torch.Tensor, texts: list[str], max_len: int = 32) -> dict:
    """ITC similarity and ITM match probability of every (image, text) pair (docs/paper_map.md §4.3).

    Returns:
        ``{"itc": (Bi, Bt) max-over-queries cosine, "itm": (Bi, Bt) P(match)}`` as tensors.
    """
    tok = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    img = model.encode_image(pixels)
    text_feat = model.encode_text(tok.input_ids, tok.attention_mask)["text_feat"]  # (Bt, E)
    itc = model.itc_similarity(img["image_feats"], text_feat)  # (Bi, Bt)
    bi, bt = itc.shape
    embeds = img["image_embeds"].repeat_interleave(bt, dim=0)  # (Bi*Bt, N, Dv): image i against every text
    ids, mask = tok.input_ids.repeat(bi, 1), tok.attention_mask.repeat(bi, 1)  # (Bi*Bt, L)
    itm = model.itm_logits(embeds, ids, mask).softmax(dim=-1)[:, 1].view(bi, bt)  # (Bi, Bt)
    return {"itc": itc, "itm": itm}


def score_table(scores: dict, captions: list[str]):
    """The ITC and ITM matrices side by side as a pandas DataFrame (rows: images; columns: captions)."""
    import pandas as pd

    short = [c if len(c) <= 24 else c[:23] + "…" for c in captions]
    frames = {k: pd.DataFrame(v.numpy(), columns=short, index=[f"image {i}" for i in range(len(v))]) for k, v in
              scores.items()}  # fmt: skip
    return pd.concat(frames, axis=1).round(3)


@torch.no_grad()
def cross_attention(model, pixels: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Head-averaged cross-attention of the queries over the image patches in Q-Former ``layer``: (B, Q, g, g).

    ``qformer.py`` does not return attention weights (SDPA never forms them), so a forward pre-hook on the layer's
    ``crossattention.attention`` captures its inputs (query hidden states, image embeddings) and the probabilities
    are recomputed exactly as the eager path does: ``softmax(q k^T / sqrt(d_head))`` with no mask (every image
    token is visible, docs/paper_map.md §1.3 step 3). A CLS token, if the tower has one, is dropped before reshaping.
    """
    block = model.qformer.encoder.layer[layer]
    if not getattr(block, "has_cross_attention", False):
        raise ValueError(f"Q-Former layer {layer} has no cross-attention (every cross_attention_frequency-th has)")
    attn, seen = block.crossattention.attention, {}
    hook = attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], kv=args[1]))
    try:
        model.query_pass(model.encode_vision(pixels))
    finally:
        hook.remove()
    q = attn._heads(attn.query(seen["x"]))  # (B, nh, Q, hd)
    kv = seen["kv"]  # the image embeddings, or a CrossInput (keys / values prepared once per image, gathered per row)
    if isinstance(kv, torch.Tensor):
        k = attn._heads(attn.key(kv))  # (B, nh, N, hd)
    else:
        k = kv.keys_values(attn.key, attn.value, attn._heads, attn.layer_index)[0]  # (B, nh, N, hd)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(attn.hd)).softmax(dim=-1).mean(dim=1)  # (B, Q, N)
    n = probs.shape[-1]
    g = math.isqrt(n)
    if g * g != n:  # leading CLS token
        probs, g = probs[..., 1:], math.isqrt(n - 1)
    if g * g != probs.shape[-1]:
        raise ValueError(f"{n} image tokens do not form a square patch grid")
    return probs.reshape(probs.shape[0], probs.shape[1], g, g)  # (B, Q, g, g)


# ----------------------------------------------------------------------------------------------------------------
# 02_prepare_data: fake official downloads (smoke), prepare, dedup


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def fake_official_downloads(root: str | Path, num_images: int = 10) -> Path:
    """A miniature of the official downloads in their formats, for smoke runs of ``prepare``; returns ``root``.

    Written: Karpathy's ``dataset_coco.json`` and ``dataset_flickr30k.json``, and the VQAv2 question/annotation
    pairs (train, val, an empty test-dev).

    Counts are tiny, so every size check warns (by design: the report shows what a mismatch looks like). The
    VQAv2 val questions reuse Karpathy train images, so the dedup report has a known overlap.
    """
    root = Path(root)
    splits = ["train", "restval", "val", "test"]

    def entry(i: int, folder: str) -> dict:
        sents = [{"raw": f"A photo of object {i} number {j}.", "sentid": j} for j in range(5)]
        return {"filepath": folder, "filename": f"COCO_{folder}_{i:012d}.jpg", "cocoid": i, "imgid": i,
                "split": splits[i % 4], "sentences": sents}  # fmt: skip

    coco = [entry(i, "train2014" if i % 4 == 0 else "val2014") for i in range(1, 1 + num_images)]
    _dump({"dataset": "coco", "images": coco}, root / "caption_datasets" / "dataset_coco.json")
    flickr = [{**entry(i, ""), "filename": f"{1000 + i}.jpg"} for i in range(1, 1 + num_images)]
    _dump({"dataset": "flickr30k", "images": flickr}, root / "caption_datasets" / "dataset_flickr30k.json")
    for sub, ids in (("train2014", range(1, 1 + num_images, 4)), ("val2014", range(2, 1 + num_images))):
        qs = [{"image_id": i, "question": f"what is object {i}?", "question_id": 10 * i} for i in ids]
        _dump({"data_subtype": sub, "questions": qs}, root / "vqa" / f"v2_OpenEnded_mscoco_{sub}_questions.json")
        answers = [{"answer": "yes", "answer_id": a} for a in range(10)]
        anns = [{"question_id": 10 * i, "image_id": i, "answers": answers} for i in ids]
        _dump({"annotations": anns}, root / "vqa" / f"v2_mscoco_{sub}_annotations.json")
    _dump(
        {"data_subtype": "test-dev2015", "questions": []},
        root / "vqa" / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
    )
    return root


def prepare_all(datasets: list[str], src_root: str | Path, data_root: str | Path, link_images: bool = False):
    """``blip2lib.data.prepare`` for each dataset; returns (results by dataset, a DataFrame of the size checks).

    The table has one row per checked count: expected (published), found, difference, and the warning text.
    """
    import pandas as pd

    from ..data.prepare import KNOWN_SIZES, prepare

    results, rows = {}, []
    for name in datasets:
        results[name] = res = prepare(name, src_root, data_root, link_images=link_images)
        for what, found in res["counts"].items():
            expected = KNOWN_SIZES.get(name, {}).get(what)
            diff = None if expected is None else found - expected
            rows.append({"dataset": name, "count": what, "found": found, "expected": expected, "difference": diff})
    return results, pd.DataFrame(rows)


DEDUP_PRETRAIN = ["coco/annotations/coco_karpathy_train.json", "vg/annotations/vg_caption.json"]
DEDUP_EVAL = [
    "coco/annotations/coco_karpathy_test.json",
    "flickr30k/annotations/flickr30k_test.json",
    "nocaps/annotations/nocaps_val.json",
]


def dedup_table(data_root: str | Path, pretrain: list[str], evaluation: list[str], by: str = "coco_id"):
    """Pre-training images found in each evaluation split (``blip2lib.data.dedup.dedup_report``).

    Args:
        data_root: the prepared folder; annotation paths below are relative to it, missing ones are skipped.
        pretrain: pre-training annotation files (empty: ``DEDUP_PRETRAIN``).
        evaluation: evaluation annotation files, one split each named by file stem (empty: ``DEDUP_EVAL``).
        by: ``coco_id`` or ``hash``.

    Returns:
        (the report dict, a DataFrame with one row per evaluation split).
    """
    import pandas as pd

    from ..data.dedup import dedup_report, image_paths

    root = Path(data_root)
    pretrain, evaluation = pretrain or DEDUP_PRETRAIN, evaluation or DEDUP_EVAL
    pre = [root / p for p in pretrain if (root / p).exists()]
    ev = {Path(p).stem: image_paths(root / p) for p in evaluation if (root / p).exists()}
    report = dedup_report(image_paths(pre) if pre else [], ev, by=by)
    rows = [{"split": k, "images": v["n_eval"], "in pre-training": v["n_overlap"]} for k, v in report["splits"].items()]
    return report, pd.DataFrame(rows, columns=["split", "images", "in pre-training"])


# ----------------------------------------------------------------------------------------------------------------
# 50_parity: ours vs transformers on the same weights

TINY = {"tiny-opt": "opt", "tiny-t5": "t5", "tiny-retrieval": None}


@torch.no_grad()
def rerandomise_(model, seed: int = 0):
    """Draw every parameter again, seeded (inits are near 0 for the queries; docs/paper_map.md §8.3); returns model."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name.lower():  # LayerNorms stay near identity
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        if name.endswith("attn.qkv.bias"):
            p[p.shape[0] // 3 : 2 * p.shape[0] // 3] = 0  # EVA has no key bias (docs/paper_map.md §1.2)
    return model.eval()


def _tiny(name: str, seed: int):
    from ..config import tiny_config
    from ..model import Blip2, Blip2QFormerModel
    from ..toy.synthetic import tiny_bert_tokenizer, tiny_llm_tokenizer

    fam = TINY[name]
    torch.manual_seed(seed)
    if fam is None:
        model = Blip2QFormerModel(tiny_config())
        model.tokenizer = tiny_bert_tokenizer()
    else:
        model = Blip2(tiny_config(fam), tokenizer=tiny_llm_tokenizer(fam))
    return rerandomise_(model, seed)


@torch.no_grad()
def _greedy_agreement(ours, hf, seed: int, max_new_tokens: int = 8) -> float:
    """Share of greedy tokens (prompt "a photo of") equal between ours and transformers' ``generate``."""
    from ..convert import check_inputs
    from ..generation import generate_ids, resolve_eos

    fam, tok = ours.family, ours.tokenizer
    pix = check_inputs(ours.config, seed)["pixel_values"]
    eos = resolve_eos(tok, fam)
    kw = dict(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=2)
    mine = generate_ids(ours.language_model, fam, tok, ours.soft_prompt(pix), "a photo of", eos=eos, **kw)
    t = tok(["a photo of"] * pix.shape[0], return_tensors="pt")
    nq = hf.config.num_query_tokens
    ids = torch.cat([torch.full((pix.shape[0], nq), hf.config.image_token_index), t.input_ids], 1)
    theirs = hf.generate(pixel_values=pix, input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=eos,
                         pad_token_id=tok.pad_token_id, do_sample=False, **kw)  # fmt: skip
    theirs = theirs[:, ids.shape[1] :] if fam == "opt" else theirs[:, 1:]  # new tokens only (docs/paper_map.md §8.3)
    n = min(mine.shape[1], theirs.shape[1])
    same = (mine[:, :n] == theirs[:, :n]).float().sum().item()
    return same / (mine.numel() if mine.shape == theirs.shape else max(mine.numel(), theirs.numel()))


@torch.no_grad()
def _itm_agreement(ours, hf, seed: int) -> float:
    """Share of ITM decisions (argmax) equal between ours and transformers on the parity inputs."""
    from ..convert import check_inputs, hf_outputs, ours_outputs

    inp = check_inputs(ours.config, seed, vocab=hf.config.qformer_config.vocab_size)
    a, b = ours_outputs(ours, inp)["itm"].argmax(-1), hf_outputs(hf, inp)["itm"].argmax(-1)
    return (a == b).float().mean().item()


def parity(checkpoint: str, work_dir: str | Path, seed: int = 0) -> dict[str, float]:
    """Max-abs differences per stage between our model and transformers on the same weights, and agreement.

    Args:
        checkpoint: ``tiny-opt`` / ``tiny-t5`` / ``tiny-retrieval`` (random tiny model, re-randomised with
            ``seed``) or a path for ``blip2lib.from_pretrained`` (a transformers dir is compared to itself loaded
            by stock transformers; anything else is exported with ``save_pretrained_hf`` first).
        work_dir: where exports are written (``work_dir/<name>``).
        seed: weights (tiny) and input seed.

    Returns:
        ``vision``, ``qformer``, then ``soft_prompt`` + ``logits`` (stage 2) or ``itm`` + ``itc`` (stage 1),
        ``eps_effect`` (``convert.compare_to_hf``), ``max_abs`` (largest stage difference) and ``agreement``
        (greedy tokens for stage 2, ITM decisions for stage 1; 1.0 = identical).
    """
    from ..convert import compare_to_hf, load_hf_reference, set_attn_implementation
    from ..pretrained import from_pretrained, save_pretrained_hf

    if checkpoint in TINY:
        ours = _tiny(checkpoint, seed)
    else:
        found = _existing(checkpoint)
        if found is None:
            raise FileNotFoundError(f"checkpoint {checkpoint!r} not found")
        ours = from_pretrained(found)
    set_attn_implementation(ours, "eager")
    if checkpoint not in TINY and (found / "config.json").exists():
        hf_dir = found
    else:
        hf_dir = Path(work_dir) / checkpoint.strip("/").replace("/", "_")
        if not hf_dir.exists():
            save_pretrained_hf(ours, hf_dir, check=False)  # the check below records the differences instead
    hf = load_hf_reference(hf_dir)
    diffs = compare_to_hf(ours, hf, seed=seed)
    stages = [k for k in diffs if k != "eps_effect"]
    diffs["max_abs"] = max(diffs[k] for k in stages)
    diffs["agreement"] = (
        _itm_agreement(ours, hf, seed) if ours.config.llm is None else _greedy_agreement(ours, hf, seed)
    )
    return diffs


def parity_all(checkpoints: list[str], work_dir: str | Path, seed: int = 0, skip_missing: bool = False) -> dict:
    """:func:`parity` of each checkpoint (name → result); with ``skip_missing`` absent paths are skipped (logged)."""
    out = {}
    for c in checkpoints:
        if skip_missing and c not in TINY and _existing(c) is None:
            log.warning("parity: %s not found, skipped", c)
            continue
        out[c] = parity(c, work_dir, seed)
    return out


def parity_table(results: dict[str, dict]):
    """One row per checkpoint: every difference and the agreement (pandas DataFrame, scientific notation)."""
    import pandas as pd

    return pd.DataFrame.from_dict(results, orient="index")
