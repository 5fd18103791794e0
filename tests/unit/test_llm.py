"""Frozen-LLM side of stage 2: building/freezing, training inputs and loss, generation (blip2lib.llm/.generation)."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from blip2lib.config import LLMS, LLMConfig, tiny_config
from blip2lib.generation import (
    VQA_PROMPTS,
    decode_new_tokens,
    format_prompt,
    generate,
    generate_ids,
    resolve_eos,
)
from blip2lib.llm import (
    build_llm,
    build_tokenizer,
    check_tokenizer,
    freeze_llm_,
    llm_loss,
    opt_training_inputs,
    prompt_length,
    resolve_dtype,
    split_prefix_lm,
    t5_training_inputs,
)

torch.set_num_threads(1)
WORDS = ["a", "photo", "of", "dog", "cat", "red", "the", "on", "mat", "question", "answer", "short", ":", "?",
         "what", "is", "colour", "sky", "blue"]  # fmt: skip
V = 99  # tiny_config vocab size; the toy tokenizers fill every id so any generated id decodes


def _tokenizer(family):
    specials = ["<s>", "<pad>", "</s>", "<unk>", "\n"] if family == "opt" else ["<pad>", "</s>", "<unk>"]
    words = specials + WORDS
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), V)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # split on spaces only; "\n" and ":" / "?" become their own tokens
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated"),
         pre_tokenizers.Punctuation(behavior="isolated")])  # fmt: skip
    if family == "opt":  # OPT prepends BOS </s> (id 2)
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _model(family, std=0.5, seed=0):
    m = build_llm(tiny_config(family).llm, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF init is near-degenerate: re-randomise so outputs depend on inputs
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return freeze_llm_(m)


@pytest.fixture(scope="module")
def opt():
    return _model("opt"), _tokenizer("opt")


@pytest.fixture(scope="module")
def t5():
    return _model("t5"), _tokenizer("t5")


PROMPTS = ["", "what is the colour of the sky ? answer :", "a photo of", "question : what is on the mat ?"]


def _prefix(seed=1, b=4):
    return torch.randn(b, 4, 32, generator=torch.Generator().manual_seed(seed))  # (B, Q=4, D=32)


# ---------------------------------------------------------------------------------------------------------------
# building / freezing


def test_toy_tokenizers_follow_conventions():
    check_tokenizer(_tokenizer("opt"), "opt")
    check_tokenizer(_tokenizer("t5"), "t5")
    assert _tokenizer("opt")("a photo of\n").input_ids == [2, 5, 6, 7, 4]
    assert resolve_eos(_tokenizer("opt"), "opt") == 4 and resolve_eos(_tokenizer("t5"), "t5") == 1


@pytest.mark.parametrize("name", ["opt2.7b", "opt6.7b", "flant5xl", "flant5xxl"])
def test_meta_build_has_published_parameter_count(name):
    cfg = LLMS[name]
    m = build_llm(cfg, device="meta")
    assert next(m.parameters()).device.type == "meta"
    c = cfg.hf_config
    if cfg.family == "opt":  # tied lm_head; learned positions have 2 offset rows; pre-LN → final LayerNorm
        d, f = c["hidden_size"], c["ffn_dim"]
        layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
        want = c["vocab_size"] * d + (c["max_position_embeddings"] + 2) * d + c["num_hidden_layers"] * layer + 2 * d
    else:  # untied lm_head (FlanT5), no biases, RMSNorm weights only, relative bias (32 buckets) in block 0
        d, f, inner, h = c["d_model"], c["d_ff"], c["num_heads"] * c["d_kv"], c["num_heads"]
        attn, ffn = 4 * d * inner, 3 * d * f
        enc = c["num_layers"] * (attn + ffn + 2 * d) + 32 * h + d
        dec = c["num_decoder_layers"] * (2 * attn + ffn + 3 * d) + 32 * h + d
        want = 2 * c["vocab_size"] * d + enc + dec
    assert sum(p.numel() for p in m.parameters()) == want
    approx = {"opt2.7b": 2.65e9, "opt6.7b": 6.66e9, "flant5xl": 2.85e9, "flant5xxl": 11.14e9}[name]
    assert abs(want - approx) / approx < 2e-3


def test_t5_exact_gelu_override_and_untied_head():
    cfg = tiny_config("t5").llm
    x = torch.linspace(-4, 4, 101)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    m = build_llm(cfg)
    ff = m.encoder.block[0].layer[1].DenseReluDense
    assert m.config.dense_act_fn == "gelu" and m.config.is_gated_act and hasattr(ff, "wi_1")
    torch.testing.assert_close(ff.act(x), exact, atol=1e-6, rtol=0)
    approx = build_llm(LLMConfig(**{**cfg.__dict__, "exact_gelu": False})).encoder.block[0].layer[1].DenseReluDense
    assert (approx.act(x) - exact).abs().max() > 1e-4  # gelu_new (tanh) is really different
    assert m.lm_head.weight is not m.shared.weight  # FlanT5 has its own head ...
    assert m.encoder.embed_tokens.weight is m.shared.weight is m.decoder.embed_tokens.weight  # ... inputs shared


def test_fp16_refused_for_t5():
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("t5", torch.float16, "cpu")
    with pytest.raises(ValueError, match="fp16"):
        build_llm(tiny_config("t5").llm, dtype="fp16")
    with pytest.raises(ValueError, match="fp16"):
        freeze_llm_(build_llm(tiny_config("t5").llm), dtype=torch.float16)
    assert resolve_dtype("opt", None, "cuda") == torch.float16 and resolve_dtype("t5", None, "cuda") == torch.bfloat16
    assert resolve_dtype("opt", None, "cpu") == torch.float32 and resolve_dtype("t5", "bf16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_freeze_pins_eval_and_no_grad(family):
    m = build_llm(tiny_config(family).llm).to(torch.float64)
    parent = nn.ModuleDict({"head": nn.Linear(2, 2), "llm": freeze_llm_(m)})
    assert m.dtype == torch.float32  # CPU → fp32
    parent.train()
    assert parent["head"].training and not any(mod.training for mod in m.modules())
    m.train(True)
    assert not any(mod.training for mod in m.modules())
    assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_freeze_with_train_dropout_follows_the_parent(family):
    m = build_llm(tiny_config(family).llm)
    freeze_llm_(m)  # pinned first: freezing again with train_dropout must lift the pin
    parent = nn.ModuleDict({"head": nn.Linear(2, 2), "llm": freeze_llm_(m, train_dropout=True)})
    assert not any(mod.training for mod in m.modules())  # eval until the parent says train, as from_pretrained
    parent.train()
    assert all(mod.training for mod in m.modules())
    drops = [mod for mod in m.modules() if isinstance(mod, nn.Dropout)]
    assert family == "opt" or drops and all(d.p == 0.1 for d in drops)  # T5 dropout_rate 0.1 (OPT: functional)
    assert not any(p.requires_grad for p in m.parameters())
    parent.eval()
    assert not any(mod.training for mod in m.modules())


def test_build_from_local_path(tmp_path):
    src = build_llm(tiny_config("t5").llm)
    src.save_pretrained(tmp_path)
    _tokenizer("t5").save_pretrained(tmp_path)
    cfg = LLMConfig("t5", path=str(tmp_path), exact_gelu=True)
    m = build_llm(cfg, attn_implementation="eager")
    assert m.config.dense_act_fn == "gelu" and m.config._attn_implementation == "eager"
    for (k, a), b in zip(src.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    assert m.lm_head.weight is not m.shared.weight and m.encoder.embed_tokens.weight is m.shared.weight
    assert build_tokenizer(cfg)("a dog").input_ids == [3, 6, 1]


# ---------------------------------------------------------------------------------------------------------------
# training inputs and loss


def test_opt_training_inputs_hand_worked():
    tok = _tokenizer("opt")
    caps = ["a photo of dog", "a photo of the red cat on the mat"]
    assert prompt_length(tok, "a photo of") == 4  # BOS + 3 words
    out = opt_training_inputs(tok, caps, "a photo of", max_len=8)
    # </s>=2 a=5 photo=6 of=7 dog=8 cat=9 red=10 the=11 on=12 mat=13 \n=4 pad=1; row 2 loses its "\n" (truncation)
    assert out["input_ids"].tolist() == [[2, 5, 6, 7, 8, 4, 1, 1], [2, 5, 6, 7, 11, 10, 9, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]
    assert out["labels"].tolist() == [[-100] * 4 + [8, 4, -100, -100], [-100] * 4 + [11, 10, 9, 12]]
    # empty prompt: only padding is masked, BOS is a target (docs/paper_map.md §3.1.5)
    out = opt_training_inputs(tok, ["dog", "red cat"], "", max_len=32)
    assert out["labels"].tolist() == [[2, 8, 4, -100], [2, 10, 9, 4]]
    with pytest.raises(ValueError, match="start with the prompt"):
        opt_training_inputs(tok, ["dog"], "a photo of", 32)


def test_t5_training_inputs_hand_worked():
    out = t5_training_inputs(_tokenizer("t5"), ["a photo of", "the"], ["dog", "red cat on the mat"], max_len=5)
    # pad=0 </s>=1 a=3 photo=4 of=5 dog=6 cat=7 red=8 the=9 on=10 mat=11
    assert out["input_ids"].tolist() == [[3, 4, 5, 1], [9, 1, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # truncation drops words but keeps the appended </s> (the tokenizer reserves room for special tokens)
    assert out["labels"].tolist() == [[6, 1, -100, -100, -100], [8, 7, 10, 9, 1]]
    assert out["decoder_attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1] * 5]


def _manual_ce(logits, targets):  # mean over (row, position) pairs with target != -100, explicit loop
    terms = [-F.log_softmax(logits[b, t].double(), -1)[targets[b][t]] for b in range(len(targets))
             for t in range(len(targets[b])) if targets[b][t] != -100]  # fmt: skip
    return torch.stack(terms).mean()


def test_opt_loss_matches_manual_and_only_prefix_gets_grad(opt):
    model, tok = opt
    batch = opt_training_inputs(tok, ["a photo of dog", "a photo of the red cat on the mat"], "a photo of", 32)
    prefix = _prefix(2, b=2).requires_grad_(True)
    loss = llm_loss(model, "opt", prefix, batch)
    with torch.no_grad():
        emb = torch.cat([prefix, model.get_input_embeddings()(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(2, 4, dtype=torch.long), batch["attention_mask"]], 1)
        logits = model(inputs_embeds=emb, attention_mask=mask).logits  # (B, 4+T, V)
    ids, m = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    # logits at position p predict token p+1; text token j sits at position 4+j; targets: non-pad tokens j ≥ 4
    targets = [[-100] * 3 + [ids[b][j] if (j >= 4 and m[b][j]) else -100 for j in range(len(ids[b]))] + [-100]
               for b in range(2)]  # fmt: skip
    assert sum(t != -100 for row in targets for t in row) == 2 + 7  # "dog \n" and "the red cat on the mat \n"
    torch.testing.assert_close(loss.double(), _manual_ce(logits, targets), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_t5_loss_matches_manual_and_only_prefix_gets_grad(t5):
    model, tok = t5
    batch = t5_training_inputs(tok, ["a photo of", "the red"], ["dog", "cat on the mat"], 32)
    prefix = _prefix(3, b=2).requires_grad_(True)
    loss = llm_loss(model, "t5", prefix, batch)
    labels = batch["labels"].tolist()
    dec_in = torch.tensor([[0] + [max(t, 0) for t in row[:-1]] for row in labels])  # right shift, start id 0
    with torch.no_grad():
        emb = torch.cat([prefix, model.get_input_embeddings()(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(2, 4, dtype=torch.long), batch["attention_mask"]], 1)
        logits = model(
            inputs_embeds=emb,
            attention_mask=mask,
            decoder_input_ids=dec_in,
            decoder_attention_mask=batch["decoder_attention_mask"],
        ).logits
    torch.testing.assert_close(loss.double(), _manual_ce(logits, labels), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_split_prefix_lm():
    text = "a b c d e f g"  # 7 words → split after 1..3 words
    seen = set()
    for rng in (random.Random(0), np.random.default_rng(0)):
        for _ in range(200):
            inp, out = split_prefix_lm(text, rng)
            k = len(inp.split())
            assert 1 <= k <= 3 and f"{inp} {out}" == text
            seen.add(k)
    assert seen == {1, 2, 3}
    assert split_prefix_lm("dog", random.Random(0)) == ("", "dog")
    assert split_prefix_lm("red dog", random.Random(0)) == ("red", "dog")


# ---------------------------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_by_one(family, num_beams, opt, t5):
    model, tok = opt if family == "opt" else t5
    prefix = _prefix()
    kw = dict(num_beams=num_beams, max_new_tokens=8, min_new_tokens=3)
    batched = generate_ids(model, family, tok, prefix, PROMPTS, **kw)
    pad = tok.pad_token_id
    for i, p in enumerate(PROMPTS):
        single = generate_ids(model, family, tok, prefix[i : i + 1], [p], **kw)[0].tolist()
        row = batched[i].tolist()
        assert row[: len(single)] == single and all(t == pad for t in row[len(single) :]), (i, row, single)
    # non-trivial: the rows differ and more than one token value occurs
    rows = {tuple(r) for r in batched.tolist()}
    assert len(rows) == len(PROMPTS) and len(set(batched.flatten().tolist())) > 3


def _bias_eos(model, eos_id, bias):  # add `bias` to the EOS logit at every step (forward hook on the LM head)
    def hook(_mod, _inp, out):
        out = out.clone()
        out[..., eos_id] += bias
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_max_and_min_new_tokens_count_new_tokens_only(family, opt, t5):
    model, tok = opt if family == "opt" else t5
    eos = resolve_eos(tok, family)
    prefix = _prefix()
    handle = _bias_eos(model, eos, -1e4)  # EOS never chosen → every row runs to max_new_tokens exactly
    try:
        for beams in (1, 3):
            ids = generate_ids(model, family, tok, prefix, PROMPTS, num_beams=beams, max_new_tokens=7, min_new_tokens=0)
            assert ids.shape == (len(PROMPTS), 7) and not (ids == eos).any()
    finally:
        handle.remove()
    handle = _bias_eos(model, eos, 1e4)  # EOS always wins once allowed → exactly min_new_tokens tokens, then EOS
    try:
        for k in (0, 1, 5):
            ids = generate_ids(model, family, tok, prefix, PROMPTS, num_beams=1, max_new_tokens=9, min_new_tokens=k)
            assert ids.shape == (len(PROMPTS), k + 1)
            assert (ids[:, k] == eos).all() and not (ids[:, :k] == eos).any()
            texts = generate(model, family, tok, prefix, PROMPTS, num_beams=1, max_new_tokens=9, min_new_tokens=k)
            for row, text in zip(ids.tolist(), texts):  # new text only, EOS cut, stripped
                assert text == tok.decode(row[:k], skip_special_tokens=True).strip()
                assert len(text.split()) == sum(t not in tok.all_special_ids for t in row[:k])
    finally:
        handle.remove()


def test_decode_new_tokens_and_prompts():
    tok = _tokenizer("opt")
    ids = torch.tensor([[8, 9, 4, 10, 1], [11, 4, 1, 1, 1], [2, 10, 13, 12, 11]])
    assert decode_new_tokens(tok, ids, 4) == ["dog cat", "the", "red mat on the"]
    assert format_prompt(VQA_PROMPTS["opt"], "what is {0.x}?") == "Question: what is {0.x}? Answer:"
    assert format_prompt(VQA_PROMPTS["t5"], "why") == "Question: why Short answer:"
    with pytest.raises(ValueError):
        format_prompt("{0.__class__}", "q")


def test_sampling_is_seeded_and_bounded(opt):
    model, tok = opt
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(generate_ids(model, "opt", tok, _prefix(), PROMPTS, num_beams=1, do_sample=True, top_p=0.9,
                                 max_new_tokens=6, min_new_tokens=0))  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[0] == len(PROMPTS) and runs[0].shape[1] <= 6


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["opt", "t5"])
def test_gpu_low_precision_loss_and_generate(family):  # unverified on CPU-only hosts (skipped there)
    model = freeze_llm_(build_llm(tiny_config(family).llm, device="cuda"))
    assert model.dtype == (torch.float16 if family == "opt" else torch.bfloat16)
    tok = _tokenizer(family)
    prefix = _prefix(b=2).cuda().requires_grad_(True)
    if family == "opt":
        batch = opt_training_inputs(tok, ["a photo of dog", "a photo of the red cat"], "a photo of", 32)
    else:
        batch = t5_training_inputs(tok, ["a photo of", "the"], ["dog", "red cat"], 32)
    loss = llm_loss(model, family, prefix, batch)
    loss.backward()
    assert torch.isfinite(loss) and prefix.grad is not None and torch.isfinite(prefix.grad).all()
    ids = generate_ids(model, family, tok, prefix.detach(), PROMPTS[:2], num_beams=3, max_new_tokens=5,
                       min_new_tokens=1)  # fmt: skip
    assert ids.shape[0] == 2 and ids.shape[1] <= 5
