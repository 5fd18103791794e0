"""Q-Former behaviours pinned for the mutants that survived `make mutate` (docs/mutation.md).

Attention dropout in training, which kernel each ``attn_implementation`` runs, the Q-Former's own dtype for inputs
and masks, query-only passes without the text FFN, one-layer caches, masks on the inputs' device and the exact
error messages.
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
