"""Tasks: a model plus its objectives; ``forward(batch)`` returns named loss terms summed into ``loss``.

This is the only place that gathers features for losses (through ``blip2lib.dist``; no-ops at world size 1). Stage 1 =
ITC + ITM + ITG (docs/paper_map.md §2), the retrieval fine-tuning variant adds image ids (docs/paper_map.md §4.3), stage
2 and the generative fine-tunings use the frozen LLM's LM loss (docs/paper_map.md §3, §4.1, §4.2).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from . import dist
from .crossinput import cross_input
from .losses import (
    build_itm_pairs,
    build_itm_texts,
    itc_loss,
    itc_similarities,
    itg_inputs,
    itg_loss,
    itm_accuracy,
    itm_loss,
    itm_pair_images,
    missing_negative,
    sample_hard_negatives,
)
from .model import Blip2QFormerModel
from .options import TEXT_PADDINGS


def vision_keys(model, batch: dict):
    """Context naming the batch's images for the model's vision feature cache.

    A no-op without a cache, and for id-less batches in eval mode (validation passes run the tower); an id-less
    training batch is an error rather than a silently uncached run.
    """
    cache = getattr(model, "vision_cache", None)
    if cache is None or (batch.get("image_id") is None and not model.training):
        return contextlib.nullcontext()
    if batch.get("image_id") is None:
        raise ValueError("cache_vision_features needs an image_id per sample: this dataset yields none")
    return cache.batch(batch["image_id"])


class Stage1Task(nn.Module):
    """ITC + ITM (hard negatives) + ITG on the Q-Former with a frozen (or fine-tuned) vision tower.

    Args:
        model: the stage-1 model.
        tokenizer: BERT tokenizer with ``[DEC]`` (Q-Former side, docs/paper_map.md §1.3).
        max_txt_len: Q-Former text length (32 in training, docs/paper_map.md §1.3).
        use_itg: include the ITG term (the Table 6 ablation switches it off).
        negative_sampler: replaces :func:`sample_hard_negatives` (tests pass a fixed sampler).
        text_padding: ``"max_length"`` pads every caption to ``max_txt_len`` (LAVIS, docs/paper_map.md §2 step 3);
            ``"longest"`` pads to the longest caption of the global batch. Pads are masked everywhere (attention
            keys, ITG labels; ITC reads [CLS], ITM the queries), so both give the same losses up to float rounding
            — only the cost differs (short toy captions: ~1.45× faster steps). Dropout draws differ in shape, so
            training runs are not bit-identical between the two.
        itm_kv_reuse: the ITM pass gathers its 3B pairs' cross-attention keys/values from distinct images instead
            of projecting 3B copies: in one process it reuses the query pass's keys/values of the B images (one
            projection per image per step), with several it projects 2B (local + mined negatives). Same losses and
            gradients up to float summation order; ``False`` keeps the copy-per-pair pass (the reference).

    A step never reads a device value on the host: a row without any ITM negative (global batch of one, or one image
    id for the whole batch) makes ``itm_loss`` (and so ``loss``) NaN and ``itm_no_negative`` 1, which the training
    loop reads when it logs the step (its non-finite guard skips the step and stops after repeated ones).
    """

    def __init__(
        self,
        model: Blip2QFormerModel,
        tokenizer,
        max_txt_len: int = 32,
        use_itg: bool = True,
        negative_sampler: Callable | None = None,
        text_padding: str = "max_length",
        itm_kv_reuse: bool = True,
    ):
        super().__init__()
        if text_padding not in TEXT_PADDINGS:
            raise ValueError(f"text_padding must be one of {TEXT_PADDINGS}, got {text_padding!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len
        self.text_padding = text_padding
        self.use_itg = use_itg
        self.itm_kv_reuse = itm_kv_reuse
        # The library sampler runs without its host-side check (see missing_negative below).
        self.negative_sampler = negative_sampler or functools.partial(sample_hard_negatives, check=False)

    def tokenize(self, texts: list[str], device: torch.device, max_len: int | None = None):
        """BERT ids (B, L): L = ``max_len`` for ``"max_length"`` (LAVIS), else the global batch's longest caption."""
        max_len = max_len or self.max_txt_len
        tok = self.tokenizer(texts, padding=self.text_padding, truncation=True, max_length=max_len, return_tensors="pt")
        # non_blocking: a pageable host tensor still arrives before any kernel reads it, without a host wait
        ids, mask = tok.input_ids.to(device, non_blocking=True), tok.attention_mask.to(device, non_blocking=True)
        if self.text_padding == "max_length" or not dist.is_dist():
            return ids, mask
        # ITM gathers every rank's ids for its negatives, so all ranks pad to the same (global) length.
        length = int(dist.all_reduce_max(torch.tensor([ids.shape[1]], device=device)).item())
        if length > ids.shape[1]:
            extra = length - ids.shape[1]
            ids = F.pad(ids, (0, extra), value=self.tokenizer.pad_token_id)
            mask = F.pad(mask, (0, extra), value=0)
        return ids, mask

    def forward(self, batch: dict) -> dict:
        """``batch``: ``image`` (B, 3, S, S), ``text_input`` list of B strings, optional integer ``image_id`` (B,)."""
        m, q = self.model, self.model.config.qformer
        images = batch["image"]
        ids, mask = self.tokenize(batch["text_input"], images.device)
        image_ids = batch.get("image_id")
        # Only integer image ids switch on the multi-positive variant (docs/paper_map.md §10.15: never raw string ids).
        if not (isinstance(image_ids, torch.Tensor) and not image_ids.is_floating_point()):
            image_ids = None
        rank = dist.get_rank()

        # record_function labels name the phases in a torch.profiler table (benchmarks/gpu.py --profile); ~µs each.
        with record_function("stage1/encode"), vision_keys(m, batch):
            enc = m.encode_image(images, use_cache=self.use_itg)  # image_feats (B, Q, E)
            txt = m.encode_text(ids, mask)  # text_feat (B, E)

        # ---- ITC: local rows vs gathered columns without grad (docs/paper_map.md §2 ITC) ----
        img_all = dist.all_gather_no_grad(enc["image_feats"])  # (B*W, Q, E)
        txt_all = dist.all_gather_no_grad(txt["text_feat"])  # (B*W, E)
        ids_all = dist.all_gather_no_grad(image_ids) if image_ids is not None else None
        sim_i2t, sim_t2i = itc_similarities(enc["image_feats"], txt["text_feat"], img_all, txt_all, m.temp)
        out = {"itc_loss": itc_loss(sim_i2t, sim_t2i, rank, image_ids=image_ids, image_ids_all=ids_all)}

        # ---- ITM with hard negatives from the global batch (docs/paper_map.md §2 ITM) ----
        embeds_all = dist.all_gather_with_grad(enc["image_embeds"])  # (B*W, N, Dv), grads return to owners
        text_ids_all = dist.all_gather_no_grad(ids)
        text_mask_all = dist.all_gather_no_grad(mask)
        # neg_img: one image per local text (from sim_t2i); neg_txt: one text per local image (from sim_i2t).
        neg_img, neg_txt = self.negative_sampler(
            sim_i2t.detach(), sim_t2i.detach(), rank, image_ids=image_ids, image_ids_all=ids_all
        )
        no_negative = missing_negative(sim_i2t, rank, image_ids, ids_all)  # device flag, read at logging time
        # texts [pos; pos; neg], images [pos; neg; pos], labels [1]*B + [0]*2B
        if self.itm_kv_reuse:  # S distinct images, gathered per pair inside each cross-attention layer
            pair_ids, pair_mask, labels = build_itm_texts(ids, mask, text_ids_all, text_mask_all, neg_txt)
            source, index = itm_pair_images(enc["image_embeds"], embeds_all, neg_img)
            if source is enc["image_embeds"]:  # one process: the query pass's once-cast input and its image K/V
                pair_images = enc["cross_input"]._replace(index=index)
            else:
                pair_images = cross_input(source, m.qformer.layernorm.weight.dtype, index)
        else:
            pair_ids, pair_mask, pair_images, labels = build_itm_pairs(
                ids, mask, text_ids_all, text_mask_all, enc["image_embeds"], embeds_all, neg_img, neg_txt
            )
        with record_function("stage1/itm_qformer"):
            itm = m.itm_logits(pair_images, pair_ids, pair_mask)  # (3B, 2), averaged over the queries
        out["itm_loss"] = torch.where(no_negative, float("nan"), itm_loss(itm, labels))
        out["itm_acc"] = itm_accuracy(itm, labels)  # a constant "no match" already scores 2/3
        out["itm_no_negative"] = no_negative.float()

        # ---- ITG: [DEC] replaces [CLS], causal text over the cached query states (docs/paper_map.md §2 ITG) ----
        if self.use_itg:
            dec_ids, lm_labels = itg_inputs(ids, q.pad_token_id, q.dec_token_id)
            with record_function("stage1/itg_qformer"):
                logits = m.itg_logits(enc["past_key_values"], dec_ids, mask)
            out["itg_loss"] = itg_loss(logits, lm_labels)
        out["loss"] = out["itc_loss"] + out["itm_loss"] + out.get("itg_loss", 0.0)  # equal weights
        out["temp"] = m.temp.detach()
        return out


class Stage2Task(nn.Module):
    """Generative learning from a frozen LLM (docs/paper_map.md §3): stage 2, caption FT (§4.1) and VQA FT (§4.2).

    Batches: ``image`` + ``text_input`` (captions) for stage 2 / caption FT; ``image`` + ``text_input`` (question)
    + ``answer`` (list of one target answer per row) for VQA fine-tuning, or ``text_output`` for an explicit T5 split.

    Args:
        model: the stage-2 model (its ``tokenizer`` is the LLM tokenizer).
        prompt: caption prompt ("" in pre-training, "a photo of" in caption FT). Captions arrive with it prepended
            (caption processor). OPT: the text stays "a photo of <caption>" and the prompt tokens are masked from
            the loss. T5: the prompt alone is the encoder input and the caption without it the decoder target
            (LAVIS#364), so the model never learns to emit the prompt.
        max_txt_len: LLM-side truncation (32, docs/paper_map.md §3.1).
        prefix_lm: FlanT5 pre-training splits each caption at a random word into prefix → suffix (docs/paper_map.md
        §3.2.4).
        question_template: VQA prompt, e.g. "Question: {} Answer:" (docs/paper_map.md §4.2).
        qformer_question: feed the question through the Q-Former with the queries (docs/paper_map.md §4.2; needs
            ``model.qformer_tokenizer`` and ``qformer.use_text_input``).
        seed: seed of the prefix-LM split sampler.
    """

    def __init__(
        self,
        model,
        prompt: str = "",
        max_txt_len: int = 32,
        prefix_lm: bool = True,
        question_template: str = "Question: {} Answer:",
        qformer_question: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        import random

        self.model = model
        self.prompt = prompt
        self.max_txt_len = max_txt_len
        self.prefix_lm = prefix_lm
        self.question_template = question_template
        self.qformer_question = qformer_question
        self.rng = random.Random(seed)

    def strip_prompt(self, text: str) -> str:
        """``text`` without the caption prompt the caption processor prepends: ``"a photo of dog"`` → ``"dog"``.

        Only a whole-word prompt is removed once; a text that does not start with it is already a bare caption.
        """
        if text == self.prompt or text.startswith(self.prompt + " "):
            return text[len(self.prompt) :].lstrip(" ")
        return text

    def llm_inputs(self, batch: dict) -> dict:
        """Tokenised LLM inputs with the right positions masked from the loss."""
        from .llm import opt_training_inputs, prompt_length, split_prefix_lm, t5_training_inputs

        tok, texts = self.model.tokenizer, list(batch["text_input"])
        if self.model.family == "opt":
            if "answer" in batch:  # VQA FT: "Question: q Answer: a\n", loss on the answer only
                prompts = [self.question_template.format(q) for q in texts]
                out = opt_training_inputs(
                    tok, [f"{p} {a}" for p, a in zip(prompts, batch["answer"])], "", self.max_txt_len
                )
                for i, p in enumerate(prompts):  # per-row prompt length (questions differ in length)
                    out["labels"][i, : prompt_length(tok, p)] = -100
                return out
            if self.prompt:
                texts = [t if t.startswith(self.prompt) else f"{self.prompt} {t}" for t in texts]
            return opt_training_inputs(tok, texts, self.prompt, self.max_txt_len)
        if "answer" in batch:
            return t5_training_inputs(
                tok, [self.question_template.format(q) for q in texts], list(batch["answer"]), self.max_txt_len
            )
        if "text_output" in batch:
            return t5_training_inputs(tok, texts, list(batch["text_output"]), self.max_txt_len)
        if self.prompt:  # caption FT (LAVIS#364): the prompt is the encoder input, the bare caption the target
            captions = [self.strip_prompt(t) for t in texts]
            return t5_training_inputs(tok, [self.prompt] * len(texts), captions, self.max_txt_len)
        if self.prefix_lm:
            pairs = [split_prefix_lm(t, self.rng) for t in texts]
            return t5_training_inputs(tok, [a for a, _ in pairs], [b for _, b in pairs], self.max_txt_len)
        return t5_training_inputs(tok, [""] * len(texts), texts, self.max_txt_len)

    def forward(self, batch: dict) -> dict:
        """``{"lm_loss", "loss"}`` for one batch."""
        images = batch["image"]
        qids = qmask = None
        if self.qformer_question:
            tok = self.model.qformer_tokenizer(
                list(batch["text_input"]),
                padding="longest",
                truncation=True,
                max_length=self.max_txt_len,
                return_tensors="pt",
            )
            qids = tok.input_ids.to(images.device, non_blocking=True)
            qmask = tok.attention_mask.to(images.device, non_blocking=True)
        with vision_keys(self.model, batch):
            loss = self.model.lm_loss(images, self.llm_inputs(batch), qids, qmask)
        return {"lm_loss": loss, "loss": loss}
