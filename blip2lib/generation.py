"""Text generation from the frozen LLM conditioned on the visual soft prompt (see ``docs/fidelity.md``).

Layout of the LLM input (one row per image), the soft prompt always first as in LAVIS:

* decoder-only (OPT): ``[prefix (Q) ; pad … pad ; BOS prompt]`` — the prompt tokens are LEFT padded, the pads sit
  between the soft prompt and the text (LAVIS and the HF processor do the same). OPT derives positions from the
  attention-mask cumsum, so every real token gets the same position as in an unpadded single-row run (queries
  0..Q-1, BOS at Q), and new tokens are appended right after the last real token. No row is ever fully masked
  (pads can attend to the prefix), which keeps eager/SDPA numerics finite. Hence batched == one-by-one.
* encoder–decoder (T5): encoder ``[prefix (Q) ; prompt </s> ; pad …]`` (right padding), decoder from its start id.

Length rules (``length_rule``; :func:`new_token_bounds` turns each into exact generated-token bounds):

* ``"new"`` (default, ``recipe: paper``): ``max_new_tokens`` / ``min_new_tokens`` count generated tokens only, never
  the Q + prompt positions, the same for every family; ``min_new_tokens=k`` means at least k tokens before EOS.
* ``"lavis_head"`` (``recipe: lavis``): the two numbers are LAVIS's ``max_len`` / ``min_len`` counted as LAVIS HEAD
  does with its pinned transformers 4.33: T5 ``min_length`` counts the decoder start token (``min_len=1`` allows an
  empty answer, ``min_len=8`` needs 7 tokens before EOS); OPT generates from ``inputs_embeds`` alone, so
  transformers starts from empty ``input_ids`` and both bounds count generated tokens (same as ``"new"``).
* ``"lavis_paper_time"``: LAVIS as of the paper (Feb–Mar 2023, transformers < 4.27): T5 as above; OPT ran a patched
  ``modeling_opt`` with ``input_ids`` = the prompt ids (BOS included, padded batch length) and the soft prompt as
  ``query_embeds``, so ``min_length`` counted those prompt ids: ``"a photo of"`` (4 ids) with ``min_len=8`` needs
  only 4 generated tokens. ``max_new_tokens`` always counted generated tokens.

transformers 5.x ``generate(inputs_embeds=..., attention_mask=...)`` without ``input_ids`` returns ONLY the new
tokens for a decoder-only model, and ``[decoder_start, new tokens…]`` for T5; :func:`generate_ids` normalises both
to new tokens only. Repetition penalty therefore sees generated tokens only (the prompt ids are not passed).

Decode engines (``engine``): ``"hf"`` calls transformers' ``generate``; ``"static"`` is our loop over the same modules
(:mod:`blip2lib.static_decode`: one prefill per sample, preallocated cache, CUDA graphs on GPU) and returns the same
ids; ``"auto"`` (default) takes ``"static"`` for OPT / T5 models without sampling, on every device (the same ids, and
less work: the beam-search prefill runs once per sample instead of once per beam), and ``"hf"`` otherwise.
"""

from __future__ import annotations

import logging

import torch
from transformers import GenerationConfig, PreTrainedModel

from . import static_decode
from .llm import _check_family, newline_id, prepend_prefix

log = logging.getLogger(__name__)

LENGTH_RULES = ("new", "lavis_head", "lavis_paper_time")
ENGINES = ("auto", "hf", "static")  # decode loop: transformers' generate, or ours (blip2lib/static_decode.py)
LENGTH_FAMILIES = ("opt", "t5", "qformer")

# Zero-shot VQA prompt templates, kept as data; "{}" is replaced by the question.
VQA_PROMPTS = {
    "opt": "Question: {} Answer:",  # OPT, paper; LAVIS' OPT zero-shot yaml uses the FlanT5 template instead
    "t5": "Question: {} Short answer:",  # FlanT5, paper and LAVIS
    "opt_lavis": "Question: {} Short answer:",  # what LAVIS' vqav2_zeroshot_opt_eval.yaml actually uses (51.88 val)
}
CAPTION_PROMPT = "a photo of"  # caption fine-tuning prompt


def format_prompt(template: str, question: str) -> str:
    """Insert ``question`` at the single ``"{}"`` of ``template`` (plain substitution: no ``str.format`` fields).

    Raises:
        ValueError: the template does not contain exactly one ``"{}"``.
    """
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain exactly one '{{}}', got {template!r}")
    return template.replace("{}", question)


def resolve_eos(tokenizer, family: str, eos: str | int | None = None) -> int:
    r"""End-of-text id: ``"\n"`` for OPT (50118 for the real tokenizer), the tokenizer EOS for T5."""
    _check_family(family)
    if isinstance(eos, int):
        return eos
    if eos is None:
        return newline_id(tokenizer) if family == "opt" else tokenizer.eos_token_id
    ids = tokenizer(eos, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"eos {eos!r} must be a single token, got {ids}")
    return ids[0]


def new_token_bounds(length_rule: str, family: str, max_len: int, min_len: int, prompt_len: int = 0) -> tuple[int, int]:
    """Exact ``(max_new_tokens, min_new_tokens)`` in generated tokens for a length rule (module docstring).

    ``min_new_tokens = k`` suppresses EOS for the first k generated tokens; ``max_new_tokens`` counts EOS.

    Args:
        length_rule: one of ``LENGTH_RULES``.
        family: ``"opt"``, ``"t5"`` or ``"qformer"`` (the stage-1 captioner, which starts from ``[DEC]``).
        max_len: ``max_new_tokens`` under ``"new"``; LAVIS ``max_len`` / ``max_length`` otherwise.
        min_len: ``min_new_tokens`` under ``"new"``; LAVIS ``min_len`` / ``min_length`` otherwise.
        prompt_len: OPT only: columns of the tokenised prompt batch (BOS and padding included), what transformers
            < 4.27 counted in ``min_length`` for the paper-time LAVIS OPT.

    Raises:
        ValueError: unknown rule or family.
    """
    if length_rule not in LENGTH_RULES:
        raise ValueError(f"length_rule must be one of {LENGTH_RULES}, got {length_rule!r}")
    if family not in LENGTH_FAMILIES:
        raise ValueError(f"family must be one of {LENGTH_FAMILIES}, got {family!r}")
    if length_rule == "new":
        return max_len, min_len
    if family == "t5":  # min_length counts the decoder start token; max_new_tokens=max_len counts generated ones
        return max_len, max(0, min_len - 1)
    if family == "qformer":  # Qformer.generate(input_ids=[[DEC]], max_length, min_length): [DEC] counts in both
        return max_len - 1, max(0, min_len - 1)
    if length_rule == "lavis_paper_time":  # OPT with input_ids = prompt ids: min_length counted them
        return max_len, max(0, min_len - prompt_len)
    return max_len, min_len  # OPT at HEAD: inputs_embeds only, input_ids start empty


def _prompt_tokens(tokenizer, family: str, prompts: list[str], max_prompt_len: int | None):
    side = "left" if family == "opt" else "right"  # see the module docstring
    return tokenizer(
        prompts,
        padding="longest",
        padding_side=side,
        truncation=max_prompt_len is not None,
        max_length=max_prompt_len,
        return_tensors="pt",
    )


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    family: str,
    tokenizer,
    prefix_embeds: torch.Tensor,
    prompts: str | list[str],
    num_beams: int = 5,
    max_new_tokens: int = 30,
    min_new_tokens: int = 8,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool = False,
    top_p: float = 0.9,
    eos: str | int | None = None,
    max_prompt_len: int | None = None,
    length_rule: str = "new",
    engine: str = "auto",
) -> torch.Tensor:
    r"""Generate NEW token ids from the soft prompt + text prompt (transformers' ``generate`` or our static loop).

    Args:
        model: frozen transformers LLM (eval).
        family: "opt" (decoder-only) or "t5" (encoder–decoder).
        tokenizer: the LLM tokenizer (OPT-like: BOS prepended; T5-like: EOS appended).
        prefix_embeds: (B, Q, D) projected Q-Former outputs.
        prompts: one prompt per row (a single string is broadcast); ``""`` → BOS only for OPT.
        num_beams: beam width (1 = greedy / sampling).
        max_new_tokens: most generated tokens, EOS included (never the Q + prompt positions); LAVIS ``max_len`` under
            a ``lavis_*`` rule (the same number for the LLMs).
        min_new_tokens: EOS is suppressed until this many tokens were generated; LAVIS ``min_len`` under a
            ``lavis_*`` rule, converted by :func:`new_token_bounds`.
        length_penalty: beam score = sum log-prob / length ** length_penalty (beam search only).
        repetition_penalty: HF CTRL-style penalty over the generated tokens.
        do_sample: sample instead of greedy/beam argmax (HF's default ``top_k=50`` also applies, as in LAVIS).
        top_p: nucleus mass when sampling.
        eos: end-of-text token (string or id); None → ``"\n"`` for OPT, the tokenizer EOS for T5.
        max_prompt_len: truncate prompt tokens (LAVIS OPT VQA: 32); None → no truncation.
        length_rule: how the two lengths count (module docstring): ``"new"``, ``"lavis_head"``,
            ``"lavis_paper_time"``.
        engine: ``"hf"`` (transformers' ``generate``), ``"static"`` (our static-cache loop, the same ids) or
            ``"auto"`` (``"static"`` where it supports the request, else ``"hf"``).

    Returns:
        (B, T) new token ids, T ≤ the resolved ``max_new_tokens``; rows that stopped early are padded with the pad
        id after EOS.
    """
    _check_family(family)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "static" and do_sample:
        raise ValueError("engine='static' does not sample: use do_sample=False, or engine='hf' / 'auto'")
    b = prefix_embeds.shape[0]
    prompts = [prompts] * b if isinstance(prompts, str) else list(prompts)
    if len(prompts) != b:
        raise ValueError(f"{len(prompts)} prompts for {b} soft prompts")
    tok = _prompt_tokens(tokenizer, family, prompts, max_prompt_len)
    embeds, mask = prepend_prefix(model, prefix_embeds, tok.input_ids, tok.attention_mask)  # (B, Q+T, D), (B, Q+T)
    # (B, L) prompt ids: L = the padded batch length, which transformers < 4.27 counted in OPT's min_length
    max_new_tokens, min_new_tokens = new_token_bounds(
        length_rule, family, max_new_tokens, min_new_tokens, prompt_len=tok.input_ids.shape[1]
    )
    eos_id = resolve_eos(tokenizer, family, eos)
    if engine == "static" or (engine == "auto" and static_decode.supports(model, family, do_sample)):
        if not static_decode.supports(model, family, do_sample):
            raise ValueError(f"engine='static' drives OPT / T5 models only, got model_type {model.config.model_type!r}")
        start = model.config.decoder_start_token_id if family == "t5" else None
        return static_decode.static_generate(
            model, family, embeds, mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, length_penalty=length_penalty, repetition_penalty=repetition_penalty,
            eos_id=eos_id, pad_id=tokenizer.pad_token_id, decoder_start_id=start,
        )  # fmt: skip
    beam = num_beams > 1
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=do_sample,
        top_p=top_p if do_sample else None, length_penalty=length_penalty if beam else None,
        repetition_penalty=repetition_penalty, eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=getattr(model.config, "bos_token_id", None),
        decoder_start_token_id=model.config.decoder_start_token_id if family == "t5" else None, use_cache=True,
    )  # fmt: skip
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)
    if family == "t5":
        out = out[:, 1:]  # drop decoder_start_token_id
    if out.shape[1] > max_new_tokens:  # a transformers version that returns the prompt would break the contract
        raise RuntimeError(f"generate returned {out.shape[1]} > max_new_tokens={max_new_tokens} tokens")
    return out


def decode_new_tokens(tokenizer, ids: torch.Tensor, eos_id: int) -> list[str]:
    """Cut each row at its first ``eos_id``, decode without special tokens, strip whitespace."""
    texts = []
    for row in ids.tolist():
        row = row[: row.index(eos_id)] if eos_id in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def generate(
    model: PreTrainedModel,
    family: str,
    tokenizer,
    prefix_embeds: torch.Tensor,
    prompts: str | list[str],
    num_beams: int = 5,
    max_new_tokens: int = 30,
    min_new_tokens: int = 8,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool = False,
    top_p: float = 0.9,
    eos: str | int | None = None,
    max_prompt_len: int | None = None,
    length_rule: str = "new",
    engine: str = "auto",
) -> list[str]:
    """Generate text for each soft prompt: see :func:`generate_ids` for the arguments.

    Defaults follow the paper-time captioning settings (beam 5, 30/8 new tokens, length penalty 1, no repetition
    penalty). VQA uses ``max_new_tokens=10, min_new_tokens=1, length_penalty=-1``.

    Returns:
        One string per row: the new text only (prompt excluded), cut at EOS, special tokens removed, stripped.
    """
    ids = generate_ids(
        model,
        family,
        tokenizer,
        prefix_embeds,
        prompts,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        length_penalty=length_penalty,
        repetition_penalty=repetition_penalty,
        do_sample=do_sample,
        top_p=top_p,
        eos=eos,
        max_prompt_len=max_prompt_len,
        length_rule=length_rule,
        engine=engine,
    )
    return decode_new_tokens(tokenizer, ids, resolve_eos(tokenizer, family, eos))
