"""engine="static" (blip2lib/static_decode.py) returns exactly the ids of transformers' ``generate`` (engine="hf").

Tiny random OPT and T5 (fp32, weights redrawn at std 0.5 so that the greedy and beam answers differ), batch 7 with
prompts of different lengths (OPT left-pads them behind the soft prompt, T5 right-pads the encoder input). The EOS
ids were picked from what these models emit: OPT's 97 and T5's 77 end some rows within a few steps and never appear
in others, so EOS handling, finished-beam bookkeeping and the padding after EOS are all exercised; each case also
asserts that it is not trivial. Finished samples leaving the batch (``compact_at``) is checked by recording the rows of
every decoder step: they shrink by whole samples, by at least the configured share, and the ids stay transformers'.
The work-sharing claims (one prefill per sample, T5's cross-attention keys/values
computed once, beam reorders that leave the prompt part of the cache alone) are checked by counting module calls
and by reordering a cache by hand.
"""

import functools
from itertools import pairwise

import pytest
import torch

from blip2lib import static_decode
from blip2lib.config import tiny_config
from blip2lib.generation import generate_ids
from blip2lib.llm import build_llm, freeze_llm_
from blip2lib.static_decode import SlabLayer, supports
from blip2lib.toy.synthetic import tiny_llm_tokenizer

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")  # transformers: new tokens only

PROMPTS = [  # 7 rows (odd), tokenised lengths 4, 11, 1, 3, 7, 8, 2 for OPT (BOS included)
    "a photo of",
    "question : what is on the mat ? answer :",
    "",
    "a dog",
    "what colour is the cat ?",
    "x5 x6 x7 x8 x9 x10 x11",
    "the",
]
EOS = {"opt": 97, "t5": 77}  # ids these random models emit early in some rows (see the module docstring)


def _llm(family):
    torch.manual_seed(0)
    model = build_llm(tiny_config(family).llm)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return freeze_llm_(model), tiny_llm_tokenizer(family)


@pytest.fixture(scope="module")
def llms():
    return {fam: _llm(fam) for fam in ("opt", "t5")}


def _prefix(model, b=7):
    d = model.get_input_embeddings().embedding_dim
    return torch.randn(b, 4, d, generator=torch.Generator().manual_seed(1))  # (B, Q=4, D)


def _record_rows(model, rows):
    """Pre-hook: append the rows of every one-token decoder call (OPT ``input_ids``, T5 ``decoder_input_ids``)."""

    def pre(_mod, _args, kw):
        ids = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("decoder_input_ids")
        if ids is not None and ids.shape[1] == 1:
            rows.append(len(ids))

    return model.register_forward_pre_hook(pre, with_kwargs=True)


def _both(llms, family, rows=None, **kw):
    """transformers' ids; asserts the static engine's are the same. ``rows``: filled with the static steps' rows."""
    model, tok = llms[family]
    kw = {"eos": EOS[family], "max_new_tokens": 12, "min_new_tokens": 0, **kw}
    hf = generate_ids(model, family, tok, _prefix(model), PROMPTS, engine="hf", **kw)
    handle = _record_rows(model, rows if rows is not None else [])
    try:
        static = generate_ids(model, family, tok, _prefix(model), PROMPTS, engine="static", **kw)
    finally:
        handle.remove()
    assert static.shape == hf.shape and static.tolist() == hf.tolist(), kw
    return hf


def _check_drops(steps, beams, compact_at):
    """Rows of the decode steps never grow, drop by whole samples and by at least ``compact_at`` of the rows."""
    steps = [7 * beams, *steps]  # the prefill's logits are for every row (samples may leave before step 1)
    drops = [(a, b) for a, b in pairwise(steps) if a != b]
    if compact_at is None:
        assert drops == []
    for a, b in drops:
        assert b < a and (a - b) % beams == 0 and a - b >= compact_at * a, steps
    return len(drops)


def _ended_early(ids, eos):
    """Rows whose first EOS comes before their last column."""
    return [eos in row and row.index(eos) < len(row) - 1 for row in ids.tolist()]


CASES = [  # (num_beams, length_penalty, repetition_penalty, min_new_tokens)
    (1, 1.0, 1.0, 0),
    (1, 1.0, 1.5, 3),
    (5, -1.0, 1.0, 0),
    (5, 0.0, 1.5, 2),
    (5, 1.0, 1.0, 3),
]


@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("compact_at", [0.25, 0.0, None])  # default, every step a sample finished, never
def test_static_equals_transformers(llms, family, compact_at, monkeypatch):
    monkeypatch.setattr(static_decode, "static_generate",
                        functools.partial(static_decode.static_generate, compact_at=compact_at))  # fmt: skip
    eos, got, shrunk = EOS[family], {}, []
    for beams, lp, rp, lo in CASES:
        rows = []
        ids = _both(llms, family, rows, num_beams=beams, length_penalty=lp, repetition_penalty=rp, min_new_tokens=lo)
        got[(beams, lp, rp, lo)] = ids
        if family == "t5":  # its first recorded call is the prefill of the decoder start token, one row per sample
            assert rows.pop(0) == 7
        shrunk.append(_check_drops(rows, beams, compact_at) > 0)
        assert len(rows) == ids.shape[1] - 1  # one step per generated token but the last (the prefill gave the first)
        early = _ended_early(ids, eos)
        assert any(early) and not all(early), (beams, lp, rp, lo, ids)  # EOS matters, and not everywhere
        for row in ids.tolist():  # min_new_tokens: no EOS among the first `lo` tokens
            assert eos not in row[:lo]
    assert got[CASES[0]].tolist() != got[(5, 1.0, 1.0, 3)][:, : got[CASES[0]].shape[1]].tolist()  # beams ≠ greedy
    assert got[(5, -1.0, 1.0, 0)].tolist() != got[(5, 1.0, 1.0, 3)].tolist()  # the length penalty matters
    assert got[(1, 1.0, 1.5, 3)].tolist() != got[CASES[0]].tolist()  # the repetition penalty matters
    if compact_at is not None:  # finished samples left the batch: both greedy cases, and beam cases
        assert shrunk[:2] == [True, True] and sum(shrunk[2:]) >= 2, shrunk


def test_length_rules_and_max_new_tokens(llms):
    # OPT paper-time rule: min_len counts the padded prompt ids (11 columns here), so min 12 -> 1 generated token
    ids = _both(llms, "opt", num_beams=5, max_new_tokens=6, min_new_tokens=12, length_rule="lavis_paper_time")
    assert ids.shape[1] <= 6 and any(_ended_early(ids, EOS["opt"]))
    ids = _both(llms, "opt", num_beams=1, max_new_tokens=6, min_new_tokens=4, length_rule="lavis_head")
    assert all(EOS["opt"] not in row[:4] for row in ids.tolist())
    # T5 LAVIS rule: min_len counts the decoder start token (min 1 -> EOS allowed at once)
    ids = _both(llms, "t5", num_beams=5, length_penalty=-1.0, max_new_tokens=5, min_new_tokens=1,
                length_rule="lavis_head")  # fmt: skip
    assert ids.shape[1] <= 5 and ids[0, 0].item() == EOS["t5"]  # row 0's first choice is EOS
    ids = _both(llms, "t5", num_beams=1, max_new_tokens=3, min_new_tokens=3, length_rule="new")
    assert ids.shape == (7, 3) and not (ids == EOS["t5"]).any()  # EOS suppressed for all 3 allowed tokens


def test_prefill_once_per_sample_and_t5_cross_attention_once(llms):
    model, tok = llms["opt"]
    batches = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kw: batches.append((kw.get("inputs_embeds") is not None, len(next(
            v for v in (kw.get("inputs_embeds"), kw.get("input_ids")) if v is not None)))),
        with_kwargs=True,
    )  # fmt: skip
    try:
        generate_ids(model, "opt", tok, _prefix(model), PROMPTS, num_beams=5, eos=EOS["opt"], max_new_tokens=4,
                     min_new_tokens=4, engine="static")  # fmt: skip
        assert batches == [(True, 7), (False, 35), (False, 35), (False, 35)]  # prefill on 7 rows, steps on 7 x 5
        batches.clear()
        generate_ids(model, "opt", tok, _prefix(model), PROMPTS, num_beams=5, eos=EOS["opt"], max_new_tokens=4,
                     min_new_tokens=4, engine="hf")  # fmt: skip
        assert batches[0] == (True, 35)  # transformers prefills every beam
    finally:
        handle.remove()
    model, tok = llms["t5"]
    calls = []  # (module, rows) for the cross-attention key projections and the encoder
    mods = [blk.layer[1].EncDecAttention.k for blk in model.decoder.block] + [model.get_encoder()]
    hooks = [m.register_forward_hook(lambda m, a, kw, out: calls.append((m, len(out[0]) if isinstance(out, tuple)
             else len(getattr(out, "last_hidden_state", out)))), with_kwargs=True) for m in mods]  # fmt: skip
    try:
        generate_ids(model, "t5", tok, _prefix(model), PROMPTS, num_beams=5, eos=EOS["t5"], max_new_tokens=4,
                     min_new_tokens=4, engine="static")  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    assert sorted((mods.index(m), rows) for m, rows in calls) == [(i, 7) for i in range(len(mods))]  # once, 7 rows


def test_beam_reorder_touches_only_generated_positions():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(6, 2, 10, 3, generator=g), torch.randn(6, 2, 10, 3, generator=g)  # (N, H, L, d)
    layer = SlabLayer(keys.clone(), values.clone(), length=7)  # 4 prompt + 3 generated positions written
    rows = torch.tensor([1, 1, 0, 5, 3, 3])
    layer.reorder_generated_(rows, start=4)
    for buf, ref in ((layer.keys, keys), (layer.values, values)):
        assert torch.equal(buf[:, :, :4], ref[:, :, :4])  # prompt part untouched
        assert torch.equal(buf[:, :, 4:7], ref[[1, 1, 0, 5, 3, 3], :, 4:7])  # generated part follows its beam
        assert torch.equal(buf[:, :, 7:], ref[:, :, 7:])  # unwritten tail untouched
    # exact mode: attention reads the written prefix, the new step lands right after it
    k_new, v_new = torch.ones(6, 2, 1, 3), torch.zeros(6, 2, 1, 3)
    k, v = layer.update(k_new, v_new, 0)
    assert k.shape == (6, 2, 8, 3) and torch.equal(k[:, :, 7:], k_new) and layer.get_mask_sizes(1) == (9, 0)


def test_engine_choice(llms, monkeypatch):
    model, tok = llms["opt"]
    assert supports(model, "opt", do_sample=False) and not supports(model, "opt", do_sample=True)
    assert not supports(model, "t5", do_sample=False)  # an OPT model is not a T5 one
    with pytest.raises(ValueError, match="does not sample"):
        generate_ids(model, "opt", tok, _prefix(model), PROMPTS, num_beams=1, do_sample=True, engine="static")
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    generate_ids(model, "opt", tok, _prefix(model), PROMPTS, num_beams=2, max_new_tokens=2, min_new_tokens=0)
    assert calls == []  # auto: the static loop
    torch.manual_seed(0)
    short = {"max_new_tokens": 2, "min_new_tokens": 0}
    generate_ids(model, "opt", tok, _prefix(model), PROMPTS, num_beams=1, do_sample=True, **short)
    assert len(calls) == 1  # auto with sampling: transformers
    monkeypatch.setattr(model.config, "model_type", "llama")  # a causal LM our loop does not drive
    generate_ids(model, "opt", tok, _prefix(model), PROMPTS, num_beams=2, max_new_tokens=2, min_new_tokens=0)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="OPT / T5 models only"):
        generate_ids(model, "opt", tok, _prefix(model), PROMPTS, num_beams=2, engine="static", **short)


def test_t5_repetition_penalty_counts_the_decoder_start_token(llms):
    # transformers' T5 input_ids start with the decoder start token (id 0), so the penalty hits id 0 from step 0 on.
    # Make id 0 the best logit by a small margin: penalised, it loses; unpenalised, it would win every first step.
    model, tok = llms["t5"]

    def hook(_mod, _inp, out):
        out = out.clone()
        out[..., 0] = out.max(-1).values + 0.05
        return out

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        for beams in (1, 5):
            ids = _both(llms, "t5", num_beams=beams, repetition_penalty=1.5, max_new_tokens=3)
            assert (ids[:, 0] != 0).all()
            ids = _both(llms, "t5", num_beams=beams, max_new_tokens=3)  # no penalty: id 0 comes first
            assert (ids[:, 0] == 0).all() if beams == 1 else (ids[:, 0] == 0).sum() >= 3
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_bucket_mode_equals_transformers(llms, family, monkeypatch):
    # the fixed-shape steps a CUDA graph records (cache window rounded up to 4 positions, prepared masks, device-side
    # write position), run eagerly: still transformers' ids, in sdpa and eager attention; finished samples leave at
    # every step (compact_at=0), so the fixed-address inputs and the prepared masks are cut down too
    windows = []
    real_step = static_decode._Decoder._bucket_step

    def spy(self, tokens, t):
        logits = real_step(self, tokens, t)
        windows.append(self.layers[0].window)
        return logits

    monkeypatch.setattr(static_decode._Decoder, "_bucket_step", spy)
    bucketed = functools.partial(static_decode.static_generate, mode="bucket", bucket=4, compact_at=0.0)
    monkeypatch.setattr(static_decode, "static_generate", bucketed)
    model = llms[family][0]
    for attn in ("sdpa", "eager"):
        monkeypatch.setattr(model.config, "_attn_implementation", attn)
        for beams, lp, rp, lo in (CASES[1], CASES[3]):
            rows = []
            _both(llms, family, rows, num_beams=beams, length_penalty=lp, repetition_penalty=rp, min_new_tokens=lo)
            assert _check_drops(rows[family == "t5" :], beams, 0.0) > 0  # T5: the prefill row count left out
    assert len(set(windows)) >= 3  # several windows were used
    with pytest.raises(ValueError, match="needs CUDA"):
        static_decode.static_generate(model, family, torch.zeros(1, 2, 32), torch.ones(1, 2), num_beams=1,
                                      max_new_tokens=2, min_new_tokens=0, length_penalty=1.0, repetition_penalty=1.0,
                                      eos_id=1, pad_id=0, decoder_start_id=0, mode="graphs")  # fmt: skip


def test_graphs_mode_drops_rows_only_when_a_new_window_starts(llms):
    # a CUDA graph reads fixed addresses, so rows may leave only before a step that captures anyway: the first step
    # and the first step of each new window. Prompt 5 positions, 10 new tokens (cache 15), windows of 4: step t
    # writes position 4 + t, so steps 1-3 attend over 8 keys, 4-7 over 12, 8-10 over the whole cache (15).
    model = llms["opt"][0]
    embeds = torch.randn(2, 5, model.get_input_embeddings().embedding_dim)  # (B, P, D)
    dec = static_decode._Decoder(model, "opt", embeds, torch.ones(2, 5), 1, 10, None, mode="bucket", bucket=4)
    assert all(dec.can_keep(t) for t in range(1, 11))  # eager steps: any time
    dec.mode = "graphs"
    assert [t for t in range(1, 11) if dec.can_keep(t)] == [1, 4, 8]
    dec.keep(torch.tensor([1]))  # every per-row input of a step follows the kept row
    assert dec.rows == 1 and dec.graphs == {}
    assert [tuple(x.shape) for x in (dec.tok, dec.self_mask, dec.real, dec.pos_ids, dec.mask)] == [
        (1, 1), (1, 1, 1, 15), (1, 1), (1, 1), (1, 15)]  # fmt: skip
    assert all(layer.keys.shape[0] == 1 == layer.values.shape[0] for layer in dec.layers)
