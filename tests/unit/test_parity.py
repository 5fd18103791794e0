"""Parity with stock transformers: tiny random BLIP-2s, fp32, eager attention, re-randomised weights.

The recipe is the one of docs/paper_map.md §8.3.

transformers side: ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` built from hand-written configs,
saved with ``save_pretrained``; our side: ``blip2lib.from_pretrained`` of that directory. Max-abs differences are
printed (``pytest -s``) and must stay ≤ 1e-5.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not transformers.__version__.startswith("5."):  # T5 tie semantics differ in 4.x (docs/paper_map.md §8.3)
    pytest.skip(f"parity tests were written against transformers 5.x, found {transformers.__version__}",
                allow_module_level=True)  # fmt: skip

from blip2lib.config import tiny_config  # noqa: E402
from blip2lib.convert import ours_to_lavis  # noqa: E402
from blip2lib.generation import generate_ids  # noqa: E402
from blip2lib.llm import prepend_prefix  # noqa: E402
from blip2lib.pretrained import from_pretrained, save_pretrained_hf  # noqa: E402
from blip2lib.toy.synthetic import tiny_llm_tokenizer  # noqa: E402

TOL = 1e-5
NQ, S = 4, 28
IMG_TOKEN = {"opt": 98, "t5": 98, None: 100}  # inside the 99-row LLM tables; one past the Q-Former vocab


def hf_config(llm, freq=2, layers=2):
    text = None
    if llm is not None:
        text = dict(tiny_config(llm).llm.hf_config)
        if llm == "t5":
            text["dense_act_fn"] = "gelu"  # exact GELU, as LAVIS forces on FlanT5 (docs/paper_map.md §1.5)
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=S, patch_size=7, layer_norm_eps=1e-6),
        qformer_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, cross_attention_frequency=freq,
                            use_qformer_text_input=llm is None),
        text_config=text, num_query_tokens=NQ, image_token_index=IMG_TOKEN[llm], image_text_hidden_size=16,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def rerandomise_(model, seed=0):
    """HF init is ~0 for the ViT and 0 for the queries (docs/paper_map.md §8.3): draw every tensor again, seeded."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name.lower()):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight") else
                    0.1 * torch.randn(p.shape, generator=g))  # fmt: skip
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        if name.endswith("self_attn.qkv.bias"):
            p[p.shape[0] // 3 : 2 * p.shape[0] // 3] = 0  # EVA has no key bias (docs/paper_map.md §1.2)
    return model.eval()


def build_hf(tmp_path, llm, freq=2, layers=2, name="hf"):
    cls = transformers.Blip2ForImageTextRetrieval if llm is None else transformers.Blip2ForConditionalGeneration
    hf = rerandomise_(cls(hf_config(llm, freq, layers)))
    d = tmp_path / name
    hf.save_pretrained(d)
    return hf, d


def inputs(seed=1, vocab=98, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -2:] = 0  # one right-padded row
    return torch.randn(2, 3, S, S, generator=g), ids, mask, torch.randint(3, vocab, (2, 4), generator=g)


def maxabs(a, b):
    return (a - b).abs().max().item()


def report(title, diffs):
    print(f"\n[parity] {title}: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    assert all(v <= TOL for v in diffs.values()), diffs


@torch.no_grad()
def ours_lm_logits(model, pix, ids, mask, dec):
    lm = model.language_model
    embeds, full = prepend_prefix(lm, model.soft_prompt(pix), ids, mask)  # soft prompt PREPENDED (LAVIS style)
    kw = {"decoder_input_ids": dec} if lm.config.is_encoder_decoder else {}
    return lm(inputs_embeds=embeds, attention_mask=full, **kw).logits


@torch.no_grad()
def hf_lm_logits(hf, pix, ids, mask, dec):
    b = ids.shape[0]
    ph = torch.full((b, NQ), hf.config.image_token_index)  # processor layout: placeholders first
    kw = {"decoder_input_ids": dec} if hf.config.text_config.is_encoder_decoder else {}
    return hf(pixel_values=pix, input_ids=torch.cat([ph, ids], 1),
              attention_mask=torch.cat([torch.ones(b, NQ, dtype=torch.long), mask], 1), **kw).logits  # fmt: skip


@pytest.mark.parametrize("llm,freq,layers", [("opt", 1, 2), ("opt", 2, 3), ("t5", 2, 2), ("t5", 1, 3)])
def test_stage2_intermediates_and_logits(tmp_path, llm, freq, layers):
    hf, d = build_hf(tmp_path, llm, freq, layers)
    ours = from_pretrained(d, attn_implementation="eager")
    pix, ids, mask, dec = inputs()
    with torch.no_grad():
        v_hf = hf.vision_model(pix).last_hidden_state
        q_hf = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=v_hf).last_hidden_state
        v, q = ours.encode_vision(pix), ours.query_pass(ours.encode_vision(pix)).last_hidden_state
        diffs = {
            "vision": maxabs(v, v_hf),
            "qformer": maxabs(q, q_hf),
            "soft_prompt": maxabs(ours.soft_prompt(pix), hf.language_projection(q_hf)),
            "logits": maxabs(ours_lm_logits(ours, pix, ids, mask, dec), hf_lm_logits(hf, pix, ids, mask, dec)),
        }
    assert q.abs().max() > 0.1 and v.std() > 0.5  # re-randomised: the comparison exercises real activations
    report(f"hf→ours {llm} freq={freq} layers={layers}", diffs)


@pytest.mark.parametrize("llm", ["opt", pytest.param("t5", marks=pytest.mark.slow)])  # T5 generate: ~15 s on CPU
@pytest.mark.parametrize("beams", [1, 3])
def test_generation_ids_match_hf(tmp_path, llm, beams):
    hf, d = build_hf(tmp_path, llm)
    ours = from_pretrained(d, attn_implementation="eager")
    tok = tiny_llm_tokenizer(llm)
    pix = inputs()[0]
    prompt = "a photo of"
    eos = 4 if llm == "opt" else 1  # "\n" for OPT (docs/paper_map.md §1.5), </s> for T5
    kw = dict(num_beams=beams, max_new_tokens=7, min_new_tokens=2, length_penalty=1.0)
    with torch.no_grad():
        mine = generate_ids(ours.language_model, llm, tok, ours.soft_prompt(pix), prompt, eos=eos, **kw)
        t = tok([prompt] * 2, return_tensors="pt")
        ids = torch.cat([torch.full((2, NQ), hf.config.image_token_index), t.input_ids], 1)
        theirs = hf.generate(pixel_values=pix, input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=eos,
                             pad_token_id=tok.pad_token_id, do_sample=False, **kw)  # fmt: skip
    theirs = theirs[:, ids.shape[1] :] if llm == "opt" else theirs[:, 1:]  # new tokens only (docs/paper_map.md §8.3)
    print(f"\n[parity] generate {llm} beams={beams}: ours {mine.tolist()} hf {theirs.tolist()}")
    assert mine.shape[1] >= 2 and torch.equal(mine, theirs)


@pytest.mark.parametrize("freq,layers", [(2, 2), (1, 3)])
def test_retrieval_itm_itc_match_hf(tmp_path, freq, layers):
    hf, d = build_hf(tmp_path, None, freq, layers)
    ours = from_pretrained(d, attn_implementation="eager")
    pix, ids, mask, _ = inputs(vocab=99)
    ph = torch.full((2, NQ), IMG_TOKEN[None])
    ids_hf, mask_hf = torch.cat([ph, ids], 1), torch.cat([torch.ones(2, NQ, dtype=torch.long), mask], 1)
    with torch.no_grad():
        itm_hf = hf(pixel_values=pix, input_ids=ids_hf, attention_mask=mask_hf, use_image_text_matching_head=True)
        itc_hf = hf(pixel_values=pix, input_ids=ids_hf, attention_mask=mask_hf)
        img = ours.encode_image(pix)
        itc = ours.itc_similarity(img["image_feats"], ours.encode_text(ids, mask)["text_feat"])
        diffs = {"vision": maxabs(img["image_embeds"], itm_hf.vision_model_output.last_hidden_state),
                 "qformer": maxabs(img["query_output"], hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1),
                                   encoder_hidden_states=img["image_embeds"]).last_hidden_state),
                 "itm": maxabs(ours.itm_logits(img["image_embeds"], ids, mask), itm_hf.logits_per_image),
                 "itc": maxabs(itc, itc_hf.logits_per_image)}  # fmt: skip
    assert itc.shape == (2, 2) and (itc[0, 0] - itc[0, 1]).abs() > 1e-3
    report(f"hf→ours retrieval freq={freq} layers={layers}", diffs)
    rep = ours.load_report.summary()["expected"]
    assert any("cls.predictions.transform.dense.weight" in ks for ks in rep.values()) and ["temp"] in rep.values()
    assert ours.temp.item() == pytest.approx(0.07)


@pytest.mark.parametrize("llm", ["opt", "t5", None])
def test_export_reloads_in_transformers(tmp_path, llm):
    _, d = build_hf(tmp_path, llm, freq=1, layers=2)
    ours = from_pretrained(d, attn_implementation="eager")
    if llm is not None:
        ours.tokenizer = tiny_llm_tokenizer(llm)
    diffs = save_pretrained_hf(ours, tmp_path / "export")
    cls = transformers.Blip2ForImageTextRetrieval if llm is None else transformers.Blip2ForConditionalGeneration
    back = cls.from_pretrained(tmp_path / "export", dtype=torch.float32, attn_implementation="eager").eval()
    pix, ids, mask, dec = inputs(vocab=97)
    if llm is None:
        with torch.no_grad():
            nq = back.config.num_query_tokens
            ph = torch.full((2, nq), back.config.image_token_index)
            out = back(
                pixel_values=pix,
                input_ids=torch.cat([ph, ids], 1),
                use_image_text_matching_head=True,
                attention_mask=torch.cat([torch.ones(2, nq, dtype=torch.long), mask], 1),
            ).logits_per_image
            final = maxabs(out, ours.itm_logits(ours.encode_vision(pix), ids, mask))
    else:
        assert back.config.image_token_index < back.language_model.get_input_embeddings().weight.shape[0]
        proc = transformers.AutoProcessor.from_pretrained(tmp_path / "export")
        assert proc.num_query_tokens == NQ
        assert proc.tokenizer.convert_tokens_to_ids(proc.image_token) == back.config.image_token_index
        final = maxabs(hf_lm_logits(back, pix, ids, mask, dec), ours_lm_logits(ours, pix, ids, mask, dec))
    report(f"ours→hf export {llm or 'retrieval'}", {**{k: v for k, v in diffs.items() if k != "eps_effect"},
                                                    "reload_final": final})  # fmt: skip


@pytest.mark.parametrize("llm", ["opt", "t5", None])
def test_lavis_layout_loads_to_same_outputs(tmp_path, llm):
    hf, d = build_hf(tmp_path, llm, freq=2, layers=2)
    ours = from_pretrained(d, attn_implementation="eager")
    cfg = ours.config.replace(
        vision=ours.config.vision.__class__(**{**ours.config.vision.__dict__, "ln_vision_eps": 1e-5})
    )  # LAVIS eps
    ours.ln_vision.eps = 1e-5
    sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("language_model.")}
    lavis = ours_to_lavis(sd, llm)
    vit = {k[len("visual_encoder.") :]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    vit.update({k.replace("blocks.1.", "blocks.2."): v for k, v in vit.items() if k.startswith("blocks.1.")})
    torch.save(vit, tmp_path / "eva_vit_g.pth")  # a 3-block file for a 2-block tower (like 40 vs 39)
    body = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}
    body["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save({"model": body}, tmp_path / "blip2.pth")
    kw = {}
    if llm is not None:
        ours.language_model.save_pretrained(tmp_path / "llm")
        kw["llm_path"] = str(tmp_path / "llm")
    back, rep = from_pretrained(tmp_path / "blip2.pth", vision_weights=str(tmp_path / "eva_vit_g.pth"), config=cfg,
                                attn_implementation="eager", return_report=True, **kw)  # fmt: skip
    pix, ids, mask, dec = inputs(vocab=97)
    with torch.no_grad():
        if llm is None:
            final = maxabs(back.itm_logits(back.encode_vision(pix), ids, mask),
                           ours.itm_logits(ours.encode_vision(pix), ids, mask))  # fmt: skip
        else:
            final = maxabs(ours_lm_logits(back, pix, ids, mask, dec), ours_lm_logits(ours, pix, ids, mask, dec))
    report(f"LAVIS layout → ours {llm or 'retrieval'}", {"final": final})
    expected = rep.summary()["expected"]
    flat = [k for ks in expected.values() for k in ks]
    assert "Qformer.bert.embeddings.position_ids" in flat and "eva_vit_g.pth:blocks.2.norm1.weight" in flat
    assert not rep.missing and not rep.unexpected
