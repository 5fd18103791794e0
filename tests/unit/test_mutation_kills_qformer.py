"""Q-Former behaviours pinned for the mutants that survived `make mutate` (docs/mutation.md).

Attention dropout in training, which kernel each ``attn_implementation`` runs, the Q-Former's own dtype for inputs
and masks, query-only passes without the text FFN, one-layer caches, masks on the inputs' device, the exact
error messages, and the BERT loader (safetensors or legacy ``pytorch_model.bin`` read weights-only, gamma/beta
names, the MLM bias kept only as the decoder's, a vocabulary without extra rows, its messages and log line).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from blip2lib.config import QFormerConfig, tiny_config
from blip2lib.qformer import Blip2QFormer, _Attention, _MultiHeadAttention, causal_text_mask_with_prefix

B, Q, L, N, DV = 2, 4, 5, 6, 24  # batch, queries, text length, image tokens, image width


def qcfg(**kw) -> QFormerConfig:
    base = tiny_config().qformer  # hidden 32, 4 heads, 2 layers, vocab 100
    return dataclasses.replace(base, encoder_hidden_size=DV, **kw)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def built(c: QFormerConfig, impl: str = "sdpa") -> Blip2QFormer:
    torch.manual_seed(0)
    return Blip2QFormer(c, attn_implementation=impl).eval()


# ---- dropout on the attention probabilities (training only) ----


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_dropout_one_zeroes_the_context_in_training_only(impl):
    # p = 1 drops every attention weight: the attended context is exactly 0 in training, untouched in eval.
    c = qcfg(attention_probs_dropout_prob=1.0, hidden_dropout_prob=0.0)
    attn = _MultiHeadAttention(c, c.hidden_size, impl)
    x = rand(B, L, c.hidden_size, seed=1)  # (B, T, H)
    ctx, _ = attn.train()(x, x)
    assert torch.equal(ctx, torch.zeros_like(ctx))
    with torch.no_grad():
        ctx, _ = attn.eval()(x, x)
        v = attn.value(x).view(B, L, 4, 8).transpose(1, 2)  # (B, nh, T, hd)
        q = attn.query(x).view(B, L, 4, 8).transpose(1, 2)
        k = attn.key(x).view(B, L, 4, 8).transpose(1, 2)
        ref = (torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v).transpose(1, 2).reshape(B, L, 32)
    torch.testing.assert_close(ctx, ref, atol=1e-6, rtol=0)


# ---- which kernel runs ----


def _count_sdpa(monkeypatch) -> list[int]:
    calls, real = [], F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_picks_the_kernel_in_every_layer(monkeypatch, impl):
    # The eager path (explicit softmax, used for tight parity checks) must never call the fused kernel; the sdpa
    # path calls it once per attention block: 2 layers self + 1 cross (frequency 2) = 3 for a query pass.
    m = built(qcfg(), impl)
    calls = _count_sdpa(monkeypatch)
    with torch.no_grad():
        m(rand(B, Q, 32, seed=1), Q, encoder_hidden_states=rand(B, N, DV, seed=2))
    assert len(calls) == (3 if impl == "sdpa" else 0)
    assert m.encoder.layer[0].crossattention.attention.impl == impl
    assert all(layer.attention.attention.impl == impl for layer in m.encoder.layer)
    assert _Attention(qcfg(), 32, impl).attention.impl == impl


def test_config_is_kept():
    c = qcfg()
    assert built(c).config is c


# ---- dtypes: the Q-Former computes in its own parameter dtype ----


def test_float64_inputs_are_cast_to_the_qformer_dtype():
    m = built(qcfg())
    queries, img = rand(B, Q, 32, seed=1), rand(B, N, DV, seed=2)
    with torch.no_grad():
        ref = m(queries, Q, encoder_hidden_states=img).last_hidden_state
        out = m(queries.double(), Q, encoder_hidden_states=img.double()).last_hidden_state
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # the casts round the float64 copies back exactly


def test_bfloat16_qformer_builds_its_additive_mask_in_bfloat16():
    # An integer 0/1 mask must become a bf16 additive mask: a float32 mask would promote the eager scores to float32
    # and the probs @ v product (bf16 values) would fail.
    m = built(qcfg(), "eager").to(torch.bfloat16)
    text = rand(B, L, 32, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # (B, L)
    with torch.no_grad():
        out = m(text, 0, mask).last_hidden_state
        ref = built(qcfg(), "eager")(text, 0, mask).last_hidden_state  # same weights (same seed), float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0)  # bf16 has an 8-bit mantissa


# ---- query-only passes, caches, masks on the input device ----


def test_query_only_pass_needs_no_text_ffn():
    # Stage-2 Q-Formers drop the text FFN; a pass of queries only (T == Q) must not touch it, and the query rows
    # equal those of a Q-Former that has the text FFN (same query weights).
    with_text, no_text = built(qcfg(use_text_input=True)), built(qcfg(use_text_input=False))
    no_text.load_state_dict({k: v for k, v in with_text.state_dict().items() if k in no_text.state_dict()})
    queries, img = rand(B, Q, 32, seed=1), rand(B, N, DV, seed=2)
    with torch.no_grad():
        out = no_text(queries, Q, encoder_hidden_states=img).last_hidden_state
        ref = with_text(queries, Q, encoder_hidden_states=img).last_hidden_state
    assert out.shape == (B, Q, 32)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_one_layer_qformer_reads_its_cache_length():
    c = qcfg(num_hidden_layers=1)
    m = built(c)
    queries, img, text = rand(B, Q, 32, seed=1), rand(B, N, DV, seed=2), rand(B, L, 32, seed=3)
    with torch.no_grad():
        cache = m(queries, Q, encoder_hidden_states=img, use_cache=True).past_key_values
        out = m(text, 0, torch.ones(B, Q + L), past_key_values=cache, use_cache=True)
    assert len(out.past_key_values) == 1
    assert out.past_key_values[0][0].shape == (B, 4, Q + L, 8)  # (B, nh, P+L, hd)


def test_causal_text_mask_lives_on_the_mask_device():
    mask = causal_text_mask_with_prefix(torch.ones(B, L, dtype=torch.long, device="meta"), Q)
    assert mask.device.type == "meta" and mask.shape == (B, L, Q + L) and mask.dtype == torch.long


# ---- exact error messages (they name the offending argument and value) ----


def test_error_messages():
    with pytest.raises(ValueError, match=r"^hidden_size 30 is not a multiple of num_attention_heads 4$"):
        Blip2QFormer(qcfg(hidden_size=30))
    with pytest.raises(ValueError, match=r"^attn_implementation must be 'sdpa' or 'eager', got 'flash'$"):
        Blip2QFormer(qcfg(), attn_implementation="flash")
    m = built(qcfg(use_text_input=False))
    with pytest.raises(ValueError, match=r"^query_length 6 must lie in \[0, 5\]$"):
        m(rand(B, L, 32), 6)
    with pytest.raises(ValueError, match=r"^attention_mask must be 2-D or 3-D, got 4-D$"):
        m(rand(B, Q, 32), Q, torch.ones(B, 1, Q, Q), rand(B, N, DV))
    with pytest.raises(ValueError, match=r"^text positions need the text FFN: build the Q-Former with use_text_input"):
        m(rand(B, L, 32), 0)
    with pytest.raises(ValueError, match=r"^encoder_hidden_states must be given for a pass with queries"):
        m(rand(B, Q, 32), Q)


# ---- BERT initialisation: file forms, renames, messages, the log line ----


def bert_state(vocab=99, **change):
    """State dict of a tiny ``BertForMaskedLM`` shaped like ``qcfg()`` (vocab 99 = ours less [DEC]), distinct values."""
    import transformers

    c = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(5)
    sd = {k: torch.randn(v.shape) for k, v in transformers.BertForMaskedLM(c).state_dict().items()}  # unshared
    sd.update(change)
    return sd


def text_qformer():
    from blip2lib.qformer import Blip2QFormerLMHead, Blip2TextEmbeddings

    c = qcfg()
    emb = Blip2TextEmbeddings(c)
    return Blip2QFormer(c), emb, Blip2QFormerLMHead(c, emb.word_embeddings.weight)


def save(sd, folder):
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(folder / "model.safetensors"))
    return str(folder)


def test_bert_loader_messages(tmp_path):
    from blip2lib.qformer import load_bert_weights

    m, emb, head = text_qformer()
    with pytest.raises(FileNotFoundError) as err:
        load_bert_weights(m, emb, head, str(tmp_path))
    assert str(err.value) == f"{tmp_path}: no model.safetensors or pytorch_model.bin"
    tied = "lm_head's decoder must be tied to embeddings.word_embeddings (the BERT LM head)"
    for embeddings in (None, text_qformer()[1]):  # no embeddings at all, or another table than the head's
        with pytest.raises(ValueError) as err:
            load_bert_weights(m, embeddings, head, str(tmp_path))
        assert str(err.value) == tied
    short = bert_state(**{"bert.embeddings.position_embeddings.weight": torch.zeros(40, 32)})
    with pytest.raises(ValueError) as err:  # fewer rows than ours, outside the two resizable tables: refused
        load_bert_weights(m, emb, head, save(short, tmp_path / "short"))
    name = "embeddings.position_embeddings.weight"
    assert str(err.value) == f"{name} has shape (40, 32), {name} expects (64, 32)"


def test_bert_of_our_vocabulary_size_adds_no_rows(tmp_path):
    from blip2lib.qformer import load_bert_weights

    sd = bert_state(vocab=100)
    m, emb, head = text_qformer()
    rep = load_bert_weights(m, emb, head, save(sd, tmp_path))
    assert [k for k in rep["initialised"] if "[" in k] == []
    assert torch.equal(emb.word_embeddings.weight, sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(head.predictions.bias, sd["cls.predictions.bias"])


def test_bias_read_from_the_decoder_bias_when_alone(tmp_path):
    from blip2lib.qformer import load_bert_weights

    sd = bert_state()
    bias = sd.pop("cls.predictions.bias")  # some checkpoints keep the MLM bias only as the decoder's
    sd["cls.predictions.decoder.bias"] = bias
    m, emb, head = text_qformer()
    rep = load_bert_weights(m, emb, head, save(sd, tmp_path))
    assert torch.equal(head.predictions.bias[:99], bias) and head.predictions.bias[99] == 0
    assert "cls.predictions.decoder.bias" not in rep["ignored"] and "cls.predictions.bias" in rep["loaded"]


def test_legacy_gamma_beta_names_and_log_line(tmp_path, caplog):
    from blip2lib.qformer import load_bert_weights

    sd = bert_state()
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in sd.items()}  # fmt: skip
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    m, emb, head = text_qformer()
    with caplog.at_level("INFO", logger="blip2lib.qformer"):
        rep = load_bert_weights(m, emb, head, str(tmp_path))
    assert torch.equal(m.layernorm.bias, sd["bert.embeddings.LayerNorm.bias"])
    assert torch.equal(m.encoder.layer[1].output.LayerNorm.bias, sd["bert.encoder.layer.1.output.LayerNorm.bias"])
    assert torch.equal(head.predictions.transform.LayerNorm.bias, sd["cls.predictions.transform.LayerNorm.bias"])
    assert rep["ignored"] == ["bert.embeddings.token_type_embeddings.weight", "cls.predictions.decoder.bias",
                              "cls.predictions.decoder.weight"]  # fmt: skip
    # loaded: 2 layers x (self-attn q, k, v, dense, LN 10 + text FFN 6 + query FFN 6) + LN 2 + embeddings 2 + head 5
    # = 53;
    # initialised: layer 0's cross-attention (8 + LN 2) + the [DEC] row and its bias entry = 12
    assert (len(rep["loaded"]), len(rep["initialised"])) == (53, 12)
    assert caplog.messages == [f"BERT init {tmp_path}: 53 loaded, 3 ignored, 12 initialised"]


def test_legacy_bin_is_read_weights_only(tmp_path):
    import pickle

    from blip2lib.qformer import load_bert_weights

    torch.save({"bert.embeddings.LayerNorm.gamma": torch.ones(32), "note": Note()}, tmp_path / "pytorch_model.bin")
    m, emb, head = text_qformer()
    with pytest.raises(pickle.UnpicklingError):  # an arbitrary object in the pickle is refused, never built
        load_bert_weights(m, emb, head, str(tmp_path))


class Note:
    """Any class: a weights-only load refuses to build it."""


def test_init_weights_default_range_is_a_centred_bert_normal():
    from blip2lib.qformer import init_weights

    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 200)  # 40000 draws: the sample mean is within 1e-4 of 0, the std within 1e-4 of 0.02
    with torch.no_grad():
        init_weights(lin)  # no range given: BERT's 0.02
    assert abs(lin.weight.mean().item()) < 1e-3 and abs(lin.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(lin.bias, torch.zeros(200))
