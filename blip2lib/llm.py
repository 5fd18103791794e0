"""The frozen LLM of BLIP-2 stage 2: building, freezing, tokenizing and the language-modelling loss.

See docs/paper_map.md §1.5, §3.

Any local transformers causal LM (decoder-only, OPT is the reference: ``family="opt"``) or seq2seq LM
(encoder–decoder, FlanT5 is the reference: ``family="t5"``) works. The visual soft prompt ``prefix_embeds``
(B, Q, D) produced by ``language_projection`` is *prepended* to the token embeddings with a ones mask, as LAVIS does
(docs/paper_map.md §8.3, "prepend adapter"); the LLM never sees placeholder tokens. Generation lives in
:mod:`blip2lib.generation`.

Nothing here touches the network: weights come from a local directory (``local_files_only=True``) or from an
inline transformers config (random weights; ``device="meta"`` for parameter counts without memory).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from .config import LLMConfig

log = logging.getLogger(__name__)

FAMILIES = ("opt", "t5")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
IGNORE_INDEX = -100  # label value skipped by the HF cross-entropy


# ----------------------------------------------------------------------------------------------------------------
# Building and freezing


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"LLM family must be one of {FAMILIES}, got {family!r}")


def resolve_dtype(family: str, dtype: torch.dtype | str | None, device: torch.device | str | None) -> torch.dtype:
    """The frozen LLM's dtype: fp16 OPT / bf16 T5 on GPU, fp32 on CPU, unless ``dtype`` says otherwise.

    See docs/paper_map.md §3.3.

    Raises:
        ValueError: fp16 requested for a T5 model (FlanT5 overflows in fp16 — LAVIS#206; docs/paper_map.md §3.3 uses
        bf16).
    """
    _check_family(family)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is None:
        on_gpu = device is not None and torch.device(device).type == "cuda"
        dtype = (torch.float16 if family == "opt" else torch.bfloat16) if on_gpu else torch.float32
    if family == "t5" and dtype == torch.float16:
        raise ValueError("fp16 is not supported for T5/FlanT5 LLMs (activations overflow): use bf16 or fp32")
    return dtype


def _hf_config(cfg: LLMConfig, attn_implementation: str) -> PretrainedConfig:
    if cfg.path:
        config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    elif cfg.hf_config:
        config = AutoConfig.for_model(**cfg.hf_config)
    else:
        raise ValueError("LLMConfig needs either `path` (local transformers directory) or `hf_config`")
    if cfg.family == "t5" and cfg.exact_gelu:
        # LAVIS loads FlanT5's config and replaces the tanh-approximate gelu_new by exact GELU (docs/paper_map.md §1.5,
        # §10.11); the gated FFN stays gated. Must happen before the model is constructed (the activation is built
        # from it).
        config.dense_act_fn = "gelu"
    config._attn_implementation = attn_implementation
    return config


def _untie_t5_head_(model: PreTrainedModel) -> None:
    """Give a config-built FlanT5 its own ``lm_head`` (real checkpoints have one: 2.85 B parameters for XL).

    transformers 5.x ``T5Config`` forces ``tie_word_embeddings=True`` and keeps the user's ``False`` only as
    ``scale_decoder_outputs`` (docs/paper_map.md §8.3), so ``from_config`` ties ``lm_head`` to
    ``shared``; path-loaded checkpoints with distinct tensors stay untied. Only the head is untied (setting the
    config flag before construction would also untie the encoder/decoder input embeddings from ``shared``).
    """
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        return
    head.weight = nn.Parameter(torch.empty_like(head.weight))
    nn.init.normal_(head.weight, std=model.config.initializer_factor)  # T5's untied-head init (no-op on meta)
    model.config.tie_word_embeddings = False  # so a later tie_weights() does not re-tie the head


def build_llm(
    cfg: LLMConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Build the LLM from a local directory (``cfg.path``) or from ``cfg.hf_config`` (random weights).

    Args:
        cfg: LLM configuration; ``family`` "opt" → ``AutoModelForCausalLM`` (any decoder-only model),
            "t5" → ``AutoModelForSeq2SeqLM``. FlanT5 gets exact GELU when ``cfg.exact_gelu`` (docs/paper_map.md §1.5).
        device: where to build; ``"meta"`` builds shapes only (parameter counting without memory).
        dtype: weight dtype (torch dtype or "fp16"/"bf16"/"fp32"); None → fp32 on CPU/meta, ``cfg.precision`` on GPU.
        attn_implementation: "sdpa" (default) or "eager" (tightest numerical comparisons).

    Returns:
        The transformers model (not yet frozen: call :func:`freeze_llm_`).
    """
    _check_family(cfg.family)
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    on_gpu = device is not None and torch.device(device).type == "cuda"
    dtype = resolve_dtype(cfg.family, dtype if dtype is not None else (cfg.precision if on_gpu else None), device)
    config = _hf_config(cfg, attn_implementation)
    auto = AutoModelForCausalLM if cfg.family == "opt" else AutoModelForSeq2SeqLM
    meta = device is not None and torch.device(device).type == "meta"
    if cfg.path and not meta:
        model = auto.from_pretrained(
            cfg.path, config=config, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
        if device is not None:
            model = model.to(device)
    else:  # inline config, or shapes only (meta) for a local directory
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        if cfg.family == "t5" and not getattr(config, "scale_decoder_outputs", True):
            _untie_t5_head_(model)  # the config said tie_word_embeddings=False (FlanT5)
    log.info("built %s LLM (%s, %s, %s)", cfg.family, cfg.path or "from hf_config", dtype, attn_implementation)
    return model


def _stay_eval(model: nn.Module, mode: bool = True) -> nn.Module:
    # Replaces the instance's `train`: whatever `mode` a parent passes down, the frozen LLM (dropout!) stays in eval.
    return nn.Module.train(model, False)


def freeze_llm_(
    model: PreTrainedModel, dtype: torch.dtype | str | None = None, train_dropout: bool = False
) -> PreTrainedModel:
    """Freeze the LLM in place: no gradients, low precision on GPU, and a train/eval mode policy (docs/fidelity.md).

    Mode policy (``train_dropout``):

    * ``False``: eval mode pinned. ``model.train`` is overridden on the instance, so ``parent.train()`` cannot
      switch dropout on; the LLM computes the same function in training and in evaluation.
    * ``True`` (what LAVIS does): only ``requires_grad`` is switched off. The LLM follows its parent's
      ``train()`` / ``eval()``, so while training its dropout (OPT ``dropout``, T5 ``dropout_rate``, 0.1 in the
      released checkpoints) is active in the forward pass whose gradients reach the soft prompt. LAVIS' runner
      calls ``model.train()`` every epoch and pins only the vision tower (``disabled_train``), never the LLM.

    The model is left in eval mode here either way (as ``from_pretrained`` leaves it); with ``train_dropout`` the
    next ``parent.train()`` switches it on. Re-freezing a pinned model with ``train_dropout=True`` unpins it.

    Args:
        model: the transformers model from :func:`build_llm`.
        dtype: None → fp16 (decoder-only) / bf16 (encoder–decoder) when the model is on a GPU, fp32 otherwise;
            or an explicit torch dtype / "fp16" / "bf16" / "fp32". fp16 for T5 raises ``ValueError``.
        train_dropout: let the parent's mode reach the LLM (dropout in training) instead of pinning eval.

    Returns:
        The same model.
    """
    family = "t5" if model.config.is_encoder_decoder else "opt"
    device = next(model.parameters()).device
    target = resolve_dtype(family, dtype, device)
    if device.type != "meta" and next(model.parameters()).dtype != target:
        model.to(target)
    model.requires_grad_(False)
    if train_dropout:
        model.__dict__.pop("train", None)  # drop an earlier pin: the class's train() propagates again
    else:
        model.train = functools.partial(_stay_eval, model)  # instance attribute shadows nn.Module.train
    nn.Module.train(model, False)
    return model


def build_tokenizer(cfg: LLMConfig):
    """The LLM's tokenizer from the local ``cfg.path`` (``AutoTokenizer``, ``local_files_only``; no network).

    Tests and the toy world pass a tokenizer object built offline instead (e.g. a ``tokenizers`` WordLevel model
    wrapped in ``PreTrainedTokenizerFast``); every function here takes the tokenizer as an argument.
    LAVIS used OPT's slow tokenizer (docs/paper_map.md §1.5); transformers 5.x has one unified (fast) class with the
    same ids.
    """
    if not cfg.path:
        raise ValueError("build_tokenizer needs LLMConfig.path; for config-built LLMs pass a tokenizer object")
    tok = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
    check_tokenizer(tok, cfg.family)
    return tok


def check_tokenizer(tokenizer, family: str) -> None:
    r"""Check the conventions the training/generation code relies on (docs/paper_map.md §1.5).

    OPT-like: a pad token, BOS prepended to every text, ``"\n"`` a single token (the generation EOS).
    T5-like: a pad token and EOS appended to every text.
    """
    _check_family(family)
    if tokenizer.pad_token_id is None:
        raise ValueError("the LLM tokenizer needs a pad token")
    ids = tokenizer("a").input_ids
    if family == "opt":
        if tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id:
            raise ValueError(f"OPT-style tokenizer must prepend BOS; 'a' → {ids}")
        newline_id(tokenizer)
    elif tokenizer.eos_token_id is None or ids[-1] != tokenizer.eos_token_id:
        raise ValueError(f"T5-style tokenizer must append EOS; 'a' → {ids}")


def newline_id(tokenizer) -> int:
    r"""Id of ``"\n"``, OPT's end-of-caption token in BLIP-2 (50118 for the real OPT tokenizer).

    See docs/paper_map.md §1.5.
    """
    ids = tokenizer("\n", add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f'"\\n" must be a single token for the OPT end-of-text, got {ids}')
    return ids[0]


# ----------------------------------------------------------------------------------------------------------------
# Training inputs and loss (docs/paper_map.md §3.1, §3.2)


def prompt_length(tokenizer, prompt: str) -> int:
    """Number of tokens of ``prompt`` INCLUDING the BOS the tokenizer prepends (``"a photo of"`` → 4 for OPT)."""
    return len(tokenizer(prompt).input_ids) if prompt else 0


def opt_training_inputs(tokenizer, captions: list[str], prompt: str, max_len: int) -> dict[str, torch.Tensor]:
    r"""Decoder-only LM inputs for stage 2 / caption fine-tuning (docs/paper_map.md §3.1 steps 2–3).

    ``captions`` are the full texts as the caption processor returns them, i.e. already starting with the prompt
    (LAVIS' ``blip_caption`` prepends ``"a photo of "``); ``prompt`` only decides how many leading tokens are
    excluded from the loss. Each text gets ``"\n"`` appended (the generation EOS), right padding, truncation to
    ``max_len`` tokens counting BOS and ``"\n"`` (long captions lose their terminator, as in LAVIS).

    Quirk kept on purpose (docs/paper_map.md §3.1.5): with the empty pre-training prompt only padding is masked, so the
    first label is BOS — the model is trained to emit BOS from the last query position.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with pad and the first
        ``prompt_length`` (prompt tokens + BOS, computed once) positions set to -100. Query slots are added by
        :func:`llm_loss`.
    """
    if prompt and not all(c.startswith(prompt) for c in captions):
        raise ValueError(f"captions must already start with the prompt {prompt!r} (caption processor adds it)")
    tok = tokenizer(
        [c + "\n" for c in captions],
        padding="longest",
        padding_side="right",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
    )
    labels = tok.input_ids.masked_fill(tok.attention_mask == 0, IGNORE_INDEX)  # pad → -100
    labels[:, : prompt_length(tokenizer, prompt)] = IGNORE_INDEX  # BOS + prompt are context, not targets
    return {"input_ids": tok.input_ids, "attention_mask": tok.attention_mask, "labels": labels}


def t5_training_inputs(
    tokenizer, text_input: list[str], text_output: list[str], max_len: int
) -> dict[str, torch.Tensor]:
    """Encoder–decoder (prefix-LM) inputs (docs/paper_map.md §3.2 step 2): prefix → encoder, suffix → decoder labels.

    Both sides: padding "longest" (right), truncation to ``max_len``, EOS appended by the tokenizer.

    Returns:
        ``input_ids``/``attention_mask`` (B, Te) of the prefix, ``labels`` (B, Td) = suffix ids with pad → -100,
        ``decoder_attention_mask`` (B, Td) = suffix mask (HF T5 right-shifts labels into decoder inputs).
    """
    if len(text_input) != len(text_output):
        raise ValueError("text_input and text_output must have the same length")
    kw = dict(padding="longest", padding_side="right", truncation=True, max_length=max_len, return_tensors="pt")
    enc, dec = tokenizer(list(text_input), **kw), tokenizer(list(text_output), **kw)
    labels = dec.input_ids.masked_fill(dec.attention_mask == 0, IGNORE_INDEX)
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "labels": labels,
        "decoder_attention_mask": dec.attention_mask,
    }


def prepend_prefix(
    model: PreTrainedModel, prefix_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[prefix ; embed(ids)]`` and ``[ones(Q) ; mask]`` (docs/paper_map.md §1.5): the soft visual prompt goes first.

    The prefix is cast to the LLM's embedding dtype (gradients still flow back through the cast), except for an LLM
    that runs inside its own autocast region (FlanT5 in bf16 on a GPU, see :func:`blip2lib.precision.autocast_region_`):
    there LAVIS concatenates the fp16/fp32 prefix with the bf16 token embeddings and type promotion makes the
    encoder's input, and so its residual stream, fp32 — reproduced here by promoting both to their common type.
    """
    tok_embeds = model.get_input_embeddings()(input_ids.to(prefix_embeds.device, non_blocking=True))  # (B, T, D)
    if getattr(model, "_autocast_region", None) is not None:  # Linear layers run in the region's dtype anyway
        dtype = torch.promote_types(prefix_embeds.dtype, tok_embeds.dtype)
        tok_embeds = tok_embeds.to(dtype)
    else:
        dtype = tok_embeds.dtype
    prefix = prefix_embeds.to(dtype)  # (B, Q, D)
    ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=prefix.device)  # (B, Q)
    return torch.cat([prefix, tok_embeds], 1), torch.cat([ones, attention_mask.to(prefix.device, non_blocking=True)], 1)


def label_positions(labels: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sequence positions whose logits meet a label, and those labels (for ``logits_to_keep``).

    The sequence is ``[prefix (P) ; text (T)]`` and position p predicts token p + 1, so text label ``labels[b, c]``
    is predicted by position ``P + c - 1`` (the first text token by the last prefix position; with no prefix it has
    no predictor). Rows keep their labels in order, padded to the longest row's count K with position 0 and target
    -100. Computed where ``labels`` lives: on the host for tokenizer output, so no device sync.

    Args:
        labels: text labels, -100 where ignored, (B, T).
        num_prefix: number of soft-prompt positions P in front of the text.

    Returns:
        ``(positions (B, K) long, targets (B, K))``, K >= 1.
    """
    keep = labels != IGNORE_INDEX  # (B, T)
    if num_prefix == 0:
        keep[:, 0] = False  # nothing precedes the first token
    counts = keep.sum(dim=1)  # (B,)
    k = max(int(counts.max()), 1) if labels.shape[0] else 1
    cols = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # (B, K): kept columns first
    real = torch.arange(k, device=labels.device) < counts[:, None]  # (B, K)
    positions = torch.where(real, num_prefix + cols - 1, 0)  # padding entries point at position 0 (any valid one)
    return positions, torch.where(real, labels.gather(1, cols), IGNORE_INDEX)


def _keeps_logits(model: PreTrainedModel) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (then its LM head can run at chosen positions)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def llm_loss(
    model: PreTrainedModel,
    family: str,
    prefix_embeds: torch.Tensor,
    batch: dict[str, torch.Tensor],
    label_logits_only: bool = True,
) -> torch.Tensor:
    """Language-modelling loss of the frozen LLM conditioned on the soft prompt.

    See docs/paper_map.md §3.1 step 4, §3.2 step 3.

    Args:
        model: frozen transformers LLM.
        family: "opt" (decoder-only: labels get Q leading -100, HF causal-LM loss = shift by one, mean over
            non-ignored tokens) or "t5" (prefix on the encoder side; HF seq2seq CE). No label smoothing.
        prefix_embeds: (B, Q, D) projected Q-Former outputs; receives the gradient.
        batch: output of :func:`opt_training_inputs` / :func:`t5_training_inputs`.
        label_logits_only: decoder-only models whose forward takes ``logits_to_keep`` (OPT): run the LM head and
            the fp32 upcast only at label positions, padded per row to the batch's most labels (same loss and
            gradients up to float summation order; ``False``: the model's own loss over every position, soft prompt
            and text prompt included). T5's decoder positions are all targets except padding: not applied.

    Returns:
        Scalar loss (fp32 logits, as inside HF's loss).
    """
    _check_family(family)
    dev = prefix_embeds.device
    embeds, mask = prepend_prefix(model, prefix_embeds, batch["input_ids"], batch["attention_mask"])
    if family == "opt" and label_logits_only and _keeps_logits(model):
        positions, targets = label_positions(batch["labels"], prefix_embeds.shape[1])  # (B, K) each
        positions, targets = positions.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        # through the model's forward (its hooks and autocast region apply), no KV cache: training
        out = model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=positions, use_cache=False)
        logits = out.logits.float().flatten(0, 1)  # (B*K, V): fp32 only at label positions, as HF's loss upcasts
        return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX)
    labels = batch["labels"].to(dev, non_blocking=True)
    if family == "opt":
        ignore = torch.full(prefix_embeds.shape[:2], IGNORE_INDEX, dtype=labels.dtype, device=dev)  # (B, Q)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=torch.cat([ignore, labels], 1))
    else:
        out = model(
            inputs_embeds=embeds,
            attention_mask=mask,
            labels=labels,
            decoder_attention_mask=batch["decoder_attention_mask"].to(dev, non_blocking=True),
        )
    return out.loss


def split_prefix_lm(text: str, rng: random.Random | np.random.Generator) -> tuple[str, str]:
    """Random prefix/suffix split of a caption for FlanT5 prefix-LM pre-training (docs/paper_map.md §3.2.4).

    The split point k is uniform over {1, ..., max(1, n // 2)} where n is the number of WORDS (whitespace split):
    the maintainer said "between position 1 and the middle"; the unit is not stated, words are our assumption.
    A one-word caption gives ``("", text)`` (nothing to condition on).

    Returns:
        ``(text_input, text_output)``: the first k words and the rest, each re-joined with single spaces.
    """
    words = text.split()
    if len(words) < 2:
        return "", " ".join(words)
    hi = max(1, len(words) // 2)
    k = int(rng.integers(1, hi + 1)) if isinstance(rng, np.random.Generator) else rng.randint(1, hi)
    return " ".join(words[:k]), " ".join(words[k:])
