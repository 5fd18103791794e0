"""Q-Former: HF key names and parity, the three masks, the ITG K/V-cache trick, LM head, BERT init.

See docs/paper_map.md §1.3, §2.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from blip2lib.config import QFormerConfig, tiny_config
from blip2lib.qformer import (
    Blip2QFormer,
    Blip2QFormerLMHead,
    Blip2TextEmbeddings,
    bidirectional_mask,
    causal_prefix_mask,
    causal_text_mask_with_prefix,
    init_weights,
    load_bert_weights,
)

transformers = pytest.importorskip("transformers")

B, Q, L, N, DV = 2, 4, 5, 6, 24  # batch, queries, text length, image tokens, image width (≠ H: K/V shapes)


def qcfg(freq: int = 2, layers: int = 3, text: bool = True) -> QFormerConfig:
    base = tiny_config(cross_attention_frequency=freq, num_layers=layers).qformer  # hidden 32, 4 heads, vocab 100
    return dataclasses.replace(base, encoder_hidden_size=DV, use_text_input=text)


def hf_qformer(c: QFormerConfig):
    hc = transformers.Blip2QFormerConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps,
        cross_attention_frequency=c.cross_attention_frequency,
        encoder_hidden_size=c.encoder_hidden_size,
        use_qformer_text_input=c.use_text_input,
        pad_token_id=c.pad_token_id,
    )
    hc._attn_implementation = "eager"
    return transformers.Blip2QFormerModel(hc).eval(), hc


def rerandomise_(module: torch.nn.Module, seed: int = 1) -> None:
    """HF random init is degenerate for parity (docs/paper_map.md §8.3): normal 0.05, LN weights 1 + noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if "LayerNorm.weight" in name or "layernorm.weight" in name else noise)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text_mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # (B, L): second sample padded


def built(c: QFormerConfig, impl: str = "sdpa"):
    torch.manual_seed(0)
    m = Blip2QFormer(c, attn_implementation=impl).eval()
    rerandomise_(m, seed=3)
    return m


# ---------------------------------------------------------------------------------------------------------------
# transformers compatibility


@pytest.mark.parametrize("text", [True, False])
@pytest.mark.parametrize("freq", [1, 2])
def test_state_dict_keys_equal_hf(freq, text):
    c = qcfg(freq, text=text)
    hf, _ = hf_qformer(c)
    ours = Blip2QFormer(c)
    assert list(ours.state_dict()) == list(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    has_cross = [hasattr(layer, "crossattention") for layer in ours.encoder.layer]
    assert has_cross == [i % freq == 0 for i in range(3)]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("freq", [1, 2])
def test_parity_with_hf(freq, impl):
    c = qcfg(freq)
    hf, _ = hf_qformer(c)
    rerandomise_(hf)
    ours = Blip2QFormer(c, attn_implementation=impl).eval()
    ours.load_state_dict(hf.state_dict())
    queries, text, img = rand(B, Q, 32, seed=1), rand(B, L, 32, seed=2), rand(B, N, DV, seed=3)
    tm = text_mask()
    diffs = {}
    with torch.no_grad():
        # (a) queries only, cross-attention to the image
        ref = hf(query_embeds=queries, query_length=Q, encoder_hidden_states=img).last_hidden_state
        diffs["a"] = (ours(queries, Q, encoder_hidden_states=img).last_hidden_state - ref).abs().max()
        # (b) [queries ; text] with the bi-directional padding mask (ITM)
        joint, m = torch.cat([queries, text], 1), bidirectional_mask(tm, Q)
        ref = hf(query_embeds=joint, query_length=Q, attention_mask=m, encoder_hidden_states=img).last_hidden_state
        diffs["b"] = (ours(joint, Q, m, img).last_hidden_state - ref).abs().max()
        # (c) text only (query_length 0 → text FFN, no cross-attention)
        ref = hf(query_embeds=text, query_length=0, attention_mask=tm).last_hidden_state
        diffs["c"] = (ours(text, 0, tm).last_hidden_state - ref).abs().max()
    print(f"parity freq={freq} impl={impl}: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    for k, d in diffs.items():
        assert d <= 1e-5, (k, d)


def test_text_embeddings_match_hf():
    c = qcfg()
    _, hc = hf_qformer(c)
    ref = transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(hc)
    rerandomise_(ref)
    ours = Blip2TextEmbeddings(c)
    ours.load_state_dict(ref.state_dict())  # same keys (word/position embeddings; position_ids non-persistent)
    assert set(ours.state_dict()) == {"word_embeddings.weight", "position_embeddings.weight"}
    ids = torch.randint(0, c.vocab_size, (B, L))
    torch.testing.assert_close(ours(ids), ref(input_ids=ids), atol=0, rtol=0)
    pos = torch.arange(3, 3 + L)[None]
    torch.testing.assert_close(ours(ids, past_length=3), ref(input_ids=ids, position_ids=pos), atol=0, rtol=0)
    # by hand: word row + position row, no token type, no LayerNorm
    torch.testing.assert_close(
        ours(ids, 3)[1, 2], ours.word_embeddings.weight[ids[1, 2]] + ours.position_embeddings.weight[5]
    )


# ---------------------------------------------------------------------------------------------------------------
# Masks (paper Fig. 2): exact patterns, then behaviour


MASK2 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # (B=2, L=4), Q=2 below


def test_bidirectional_mask_pattern():
    assert bidirectional_mask(MASK2, 2).tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]


def test_causal_prefix_mask_pattern():
    expected = [
        [
            [1, 1, 0, 0, 0, 0],  # query rows: all queries, no text
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],  # text t=0
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
        ],  # t=3 is padding itself: still sees queries + non-pad text ≤ t
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
        ],
    ]
    m = causal_prefix_mask(MASK2, 2)
    assert m.dtype == MASK2.dtype and m.tolist() == expected
    # text rows of variant (b) == variant (a)
    assert causal_text_mask_with_prefix(MASK2, 2).tolist() == [e[2:] for e in expected]


def test_causal_masks_brute_force():
    tm = (torch.rand(3, 7) > 0.3).long()
    p = 4
    m = causal_prefix_mask(tm, p)
    for b in range(3):
        for i in range(p + 7):
            for j in range(p + 7):
                if i < p:
                    want = int(j < p)
                else:
                    want = int(j < p or (j <= i and tm[b, j - p] == 1))
                assert m[b, i, j] == want, (b, i, j)


def test_fully_masked_row_is_finite():
    m = built(qcfg())
    tm = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding: row 0 of sample 0 sees nothing
    with torch.no_grad():
        out = m(rand(B, L, 32), 0, causal_text_mask_with_prefix(tm, 0)).last_hidden_state
    assert torch.isfinite(out).all()


def test_mask_shape_errors():
    m = built(qcfg())
    x = rand(B, L, 32)
    with pytest.raises(ValueError, match="2-D"):
        m(x, 0, torch.ones(B, L + 1))
    with pytest.raises(ValueError, match="3-D"):
        m(x, 0, torch.ones(B, L, L + 1))


def _joint_pass(m, queries, text, mask, img):
    with torch.no_grad():
        return m(torch.cat([queries, text], 1), Q, mask, img).last_hidden_state


@pytest.mark.parametrize("freq", [1, 2])
def test_causal_mask_behaviour(freq):
    m = built(qcfg(freq))
    queries, text, img = rand(B, Q, 32, seed=1), rand(B, L, 32, seed=2), rand(B, N, DV, seed=3)
    tm = torch.ones(B, L, dtype=torch.long)
    mask = causal_prefix_mask(tm, Q)
    base = _joint_pass(m, queries, text, mask, img)
    # queries never see text
    other = _joint_pass(m, queries, rand(B, L, 32, seed=9), mask, img)
    torch.testing.assert_close(other[:, :Q], base[:, :Q], atol=1e-6, rtol=0)
    # causality: changing text token t+1 leaves positions ≤ t unchanged, changes t+1
    t = 2
    text2 = text.clone()
    text2[:, t + 1] += rand(B, 32, seed=4)  # not a constant shift: the LayerNorm would remove it
    other = _joint_pass(m, queries, text2, mask, img)
    torch.testing.assert_close(other[:, : Q + t + 1], base[:, : Q + t + 1], atol=1e-6, rtol=0)
    assert (other[:, Q + t + 1] - base[:, Q + t + 1]).abs().max() > 1e-3
    # bi-directional: queries do see the text; padded text is invisible to everyone else
    bi = bidirectional_mask(text_mask(), Q)
    base = _joint_pass(m, queries, text, bi, img)
    assert (_joint_pass(m, queries, text2, bi, img)[:, :Q] - base[:, :Q]).abs().max() > 1e-3
    text3 = text.clone()
    text3[1, 3:] += 3 * rand(2, 32, seed=5)  # sample 1's padding
    other = _joint_pass(m, queries, text3, bi, img)
    torch.testing.assert_close(other[1, : Q + 3], base[1, : Q + 3], atol=1e-6, rtol=0)


def test_text_only_pass_needs_text_ffn_and_queries_need_image():
    m = built(qcfg(text=False))
    with pytest.raises(ValueError, match="use_text_input"):
        m(rand(B, L, 32), 0)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        m(rand(B, Q, 32), Q)


# ---------------------------------------------------------------------------------------------------------------
# KV cache (docs/paper_map.md §2 ITG: the query pass's cache feeds a text-only causal pass)


@pytest.mark.parametrize("freq", [1, 2])
def test_kv_cache_equals_full_causal_pass(freq):
    c = qcfg(freq)
    m, emb = built(c), Blip2TextEmbeddings(c)
    rerandomise_(emb, seed=5)
    queries, img = rand(B, Q, 32, seed=1), rand(B, N, DV, seed=3)
    ids = torch.randint(3, c.vocab_size, (B, L))
    tm = text_mask()
    with torch.no_grad():
        full = m(torch.cat([queries, emb(ids)], 1), Q, causal_prefix_mask(tm, Q), img).last_hidden_state
        qp = m(queries, Q, encoder_hidden_states=img, use_cache=True)
        assert len(qp.past_key_values) == c.num_hidden_layers
        assert qp.past_key_values[0][0].shape == (B, 4, Q, 8)  # (B, nh, Q, hd)
        tp = m(emb(ids), 0, causal_text_mask_with_prefix(tm, Q), past_key_values=qp.past_key_values, use_cache=True)
    d_q = (qp.last_hidden_state - full[:, :Q]).abs().max()
    d_t = (tp.last_hidden_state - full[:, Q:]).abs().max()
    print(f"kv-cache freq={freq}: query rows {d_q:.2e}, text rows {d_t:.2e}")
    assert d_q <= 1e-5 and d_t <= 1e-5
    assert tp.past_key_values[0][0].shape == (B, 4, Q + L, 8)  # returned cache includes the prefix
    torch.testing.assert_close(tp.past_key_values[1][0][:, :, :Q], qp.past_key_values[1][0], atol=0, rtol=0)

    # incremental decoding: one token at a time on top of the cache == the full pass (2-D all-ones mask)
    ones = torch.ones(B, L, dtype=torch.long)
    with torch.no_grad():
        full = m(torch.cat([queries, emb(ids)], 1), Q, causal_prefix_mask(ones, Q), img).last_hidden_state
        cache, steps = qp.past_key_values, []
        for t in range(L):
            out = m(
                emb(ids[:, t : t + 1], past_length=t),
                0,
                torch.ones(B, Q + t + 1),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            steps.append(out.last_hidden_state)
    d_inc = (torch.cat(steps, 1) - full[:, Q:]).abs().max()
    print(f"incremental freq={freq}: {d_inc:.2e}")
    assert d_inc <= 1e-5


def test_no_cache_unless_asked():
    m = built(qcfg())
    with torch.no_grad():
        assert m(rand(B, L, 32), 0).past_key_values is None


# ---------------------------------------------------------------------------------------------------------------
# LM head and initialisation


def test_lm_head_tied_and_forward_by_hand():
    c = qcfg()
    emb = Blip2TextEmbeddings(c)
    head = Blip2QFormerLMHead(c, emb.word_embeddings.weight)
    rerandomise_(emb, seed=6)
    rerandomise_(head, seed=7)  # also re-randomises the shared embedding storage through the decoder
    dec = head.predictions.decoder
    assert dec.weight is emb.word_embeddings.weight
    assert dec.weight.data_ptr() == emb.word_embeddings.weight.data_ptr()
    assert dec.bias is head.predictions.bias
    assert set(head.state_dict()) == {
        "predictions.bias",
        "predictions.transform.dense.weight",
        "predictions.transform.dense.bias",
        "predictions.transform.LayerNorm.weight",
        "predictions.transform.LayerNorm.bias",
        "predictions.decoder.weight",
        "predictions.decoder.bias",
    }
    tr = head.predictions.transform
    x = rand(B, L, 32)
    h = F.gelu(x @ tr.dense.weight.T + tr.dense.bias)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + c.layer_norm_eps)
    h = h * tr.LayerNorm.weight + tr.LayerNorm.bias
    expected = h @ emb.word_embeddings.weight.T + head.predictions.bias
    with torch.no_grad():
        torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-5)


def test_init_weights():
    c = dataclasses.replace(qcfg(), hidden_size=64, intermediate_size=128)
    m, emb = Blip2QFormer(c), Blip2TextEmbeddings(c)
    head = Blip2QFormerLMHead(c, emb.word_embeddings.weight)
    for mod in (m, emb):
        rerandomise_(mod)
        init_weights(mod, 0.02)
    before = emb.word_embeddings.weight.clone()
    init_weights(head, 0.02)
    assert torch.equal(emb.word_embeddings.weight, before)  # the tied decoder is the embedding's to initialise
    assert torch.equal(emb.word_embeddings.weight[c.pad_token_id], torch.zeros(64))
    for name, p in list(m.named_parameters()) + list(emb.named_parameters()) + list(head.named_parameters()):
        if "LayerNorm.weight" in name or "layernorm.weight" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.004, name


# ---------------------------------------------------------------------------------------------------------------
# BERT initialisation (docs/paper_map.md §1.3): tiny BERT written by transformers, no network


def tiny_bert(cls_name: str):
    c = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_act="gelu",
    )
    c._attn_implementation = "eager"
    bert = getattr(transformers, cls_name)(c).eval()
    rerandomise_(bert, seed=11)
    with torch.no_grad():  # no segment embedding in the Q-Former: zero BERT's so the two compute the same thing
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    return bert


def test_load_bert_weights_safetensors(tmp_path):
    bert = tiny_bert("BertForMaskedLM")
    with torch.no_grad():  # BERT rows centred on 1: a mean-of-rows [DEC] row would sit near 1, LAVIS' near 0
        bert.bert.embeddings.word_embeddings.weight.add_(1.0)
    bert.save_pretrained(tmp_path)
    c = qcfg(freq=2, layers=3)  # vocab 100 = BERT's 99 + one "[DEC]" row
    m, emb = Blip2QFormer(c).eval(), Blip2TextEmbeddings(c)
    head = Blip2QFormerLMHead(c, emb.word_embeddings.weight)
    for mod in (m, emb, head):
        init_weights(mod, 0.02)
    cross_before = m.encoder.layer[0].crossattention.attention.key.weight.clone()
    torch.manual_seed(0)  # the [DEC] row is drawn: its statistics below are checked on a fixed draw
    rep = load_bert_weights(m, emb, head, str(tmp_path))

    assert rep["ignored"] == ["bert.embeddings.token_type_embeddings.weight"]
    assert "embeddings.word_embeddings.weight[99:]" in rep["initialised"]
    assert "cls.predictions.bias[99:]" in rep["initialised"]
    cross = [k for k in rep["initialised"] if "[" not in k]
    assert cross and all(".crossattention." in k for k in cross)
    assert len(cross) == 2 * 10  # layers 0 and 2 × (q, k, v, dense, LN) × (weight, bias)
    assert "qformer.encoder.layer.1.intermediate_query.dense.weight" in rep["loaded"]
    assert torch.equal(m.encoder.layer[0].crossattention.attention.key.weight, cross_before)

    sd = bert.state_dict()
    w = sd["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(emb.word_embeddings.weight[:99], w)
    dec = emb.word_embeddings.weight[99]  # LAVIS (transformers 4.25-4.26 resize): N(0, 0.02), not the rows' mean
    assert dec.abs().max() < 0.1 and 0.012 < dec.std().item() < 0.03 and w.mean(0).min() > 0.5
    assert head.predictions.bias[99] == 0
    for i in range(3):  # query FFN = copy of the text FFN (docs/paper_map.md §1.3 step 4)
        layer = m.encoder.layer[i]
        text_ffn = sd[f"bert.encoder.layer.{i}.intermediate.dense.weight"]
        assert torch.equal(layer.intermediate_query.dense.weight, text_ffn)
        assert torch.equal(layer.output_query.LayerNorm.bias, sd[f"bert.encoder.layer.{i}.output.LayerNorm.bias"])
        assert torch.equal(layer.intermediate.dense.weight, layer.intermediate_query.dense.weight)
    assert torch.equal(m.layernorm.weight, sd["bert.embeddings.LayerNorm.weight"])

    # end to end: text-only Q-Former + LM head == BertForMaskedLM logits (first 99 columns)
    ids = torch.randint(3, 99, (B, L))
    tm = text_mask()
    with torch.no_grad():
        ours = head(m(emb(ids), 0, tm).last_hidden_state)  # (B, L, 100)
        ref = bert(input_ids=ids, attention_mask=tm).logits  # (B, L, 99)
    d = (ours[..., :99] - ref).abs().max()
    print(f"BERT MLM end-to-end max|Δ| = {d:.2e}")
    assert d <= 1e-5


def test_load_bert_weights_legacy_bin(tmp_path):
    """Original bert-base-uncased layout: pytorch_model.bin, LayerNorm gamma/beta, pooler, NSP, decoder weight."""
    bert = tiny_bert("BertForPreTraining")
    sd = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in bert.state_dict().items()
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    c = qcfg(freq=1, layers=2, text=False)  # query-only Q-Former, fewer layers than BERT, no embeddings/head
    m = Blip2QFormer(c)
    rep = load_bert_weights(m, None, None, str(tmp_path))
    assert "bert.pooler.dense.weight" in rep["ignored"] and "cls.seq_relationship.weight" in rep["ignored"]
    assert "bert.encoder.layer.2.attention.self.query.weight" in rep["ignored"]  # BERT layer 2 unused
    assert "bert.embeddings.LayerNorm.gamma" not in rep["ignored"]
    assert torch.equal(m.layernorm.weight, bert.state_dict()["bert.embeddings.LayerNorm.weight"])
    assert torch.equal(
        m.encoder.layer[1].output_query.dense.weight, bert.state_dict()["bert.encoder.layer.1.output.dense.weight"]
    )
    assert len(rep["loaded"]) == len(m.state_dict()) - len(rep["initialised"])
