"""Model-level invariants (issue: model core): trainable sets, frozen towers, counts, generation batching."""

import pytest
import torch

from blip2lib.config import PRESETS, tiny_config
from blip2lib.model import Blip2, Blip2QFormerModel, count_parameters
from blip2lib.tasks import Stage1Task, Stage2Task
from blip2lib.toy.synthetic import synthetic_batch, tiny_bert_tokenizer, tiny_llm_tokenizer

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# Full-size parameter counts on the meta device (docs/paper_map.md §1.6), against formulas written from the
# shapes in docs/paper_map.md §1.3.


def _qformer_count(h=768, inter=3072, layers=12, vocab=30523, pos=512, dv=1408, nq=32, text=True, freq=2):
    lin = lambda i, o: i * o + o  # noqa: E731
    n = 2 * h + nq * h  # embedding LayerNorm + queries
    for i in range(layers):
        n += 3 * lin(h, h) + lin(h, h) + 2 * h  # self-attention q,k,v + output dense + LN
        n += lin(h, inter) + lin(inter, h) + 2 * h  # query FFN
        if text:
            n += lin(h, inter) + lin(inter, h) + 2 * h  # text FFN
        if i % freq == 0:
            n += lin(h, h) + 2 * lin(dv, h) + lin(h, h) + 2 * h  # cross-attention q, k/v from Dv, output + LN
    if text:
        n += vocab * h + pos * h  # word + position embeddings
        n += lin(h, h) + 2 * h + vocab  # ITG head transform + LN + bias (decoder tied to word embeddings)
    return n


def test_stage1_full_size_trainable_count():
    m = Blip2QFormerModel(PRESETS["vitg"], device="meta")
    heads = 2 * (768 * 256 + 256) + 768 * 2 + 2 + 1 + 2 * 1408  # vision/text proj, itm head, temp, ln_vision
    assert count_parameters(m) == _qformer_count() + heads == 186_705_470
    assert _qformer_count() == 186_307_387  # "186.3M" (docs/paper_map.md §1.6); paper rounds Q-Former + heads to 188M
    assert heads == 398_083  # "+0.4M"
    assert count_parameters(m.vision_model, trainable_only=False) == 985_894_528  # EVA ViT-g 39 blocks ≈ 0.99B


@pytest.mark.parametrize(
    "name,d_llm,dv,expected",
    [
        ("vitg_opt2.7b", 2560, 1408, 107_133_696),
        ("vitg_opt6.7b", 4096, 1408, 108_314_880),
        ("vitg_flant5xl", 2048, 1408, 106_739_968),
        ("vitg_flant5xxl", 4096, 1408, 108_314_880),
        ("vitl_opt2.7b", 2560, 1024, 103_593_984),
        ("vitl_flant5xl", 2048, 1024, 103_200_256),
    ],
)
def test_stage2_full_size_trainable_counts(name, d_llm, dv, expected):
    m = Blip2(PRESETS[name], device="meta")
    formula = _qformer_count(dv=dv, text=False) + 2 * dv + 768 * d_llm + d_llm  # + ln_vision + projection
    assert count_parameters(m) == formula == expected  # 107.1 / 108.3 / 106.7 / 108.3 / 103.6 / 103.2 M


# ---------------------------------------------------------------------------------------------------------------
# Trainable sets and frozen towers (the central BLIP-2 invariant)


def _step_and_check(task, model, batch, trainable_prefixes):
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in trainable_prefixes for n in trainable), trainable
    assert {n.split(".")[0] for n in trainable} == set(trainable_prefixes)
    task.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = task(batch)
    out["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    assert {n.split(".")[0] for n in with_grad} == set(trainable_prefixes)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert p.grad is None and torch.equal(p, frozen_before[n]), n  # bit-identical frozen weights
    return with_grad


def test_stage1_gradients_reach_exactly_the_trainable_set():
    cfg = tiny_config()
    model = Blip2QFormerModel(cfg)
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=cfg.max_txt_len)
    prefixes = {
        "ln_vision",
        "query_tokens",
        "qformer",
        "embeddings",
        "cls",
        "vision_projection",
        "text_projection",
        "itm_head",
        "temp",
    }
    _step_and_check(task, model, synthetic_batch(4, 28), prefixes)
    assert not model.vision_model.training and model.training  # frozen tower stays in eval after task.train()
    assert not any(p.requires_grad for p in model.vision_model.parameters())


@pytest.mark.parametrize("family,llm_dropout", [("opt", True), ("t5", False)])
def test_stage2_gradients_reach_exactly_the_query_path(family, llm_dropout):
    model = Blip2(tiny_config(family), tokenizer=tiny_llm_tokenizer(family), llm_dropout=llm_dropout)
    assert model.embeddings is None  # stage 2 keeps only the query path (docs/paper_map.md §1.5)
    assert not any(
        "intermediate." in n or ".output." in n and "output_query" not in n and "attention" not in n
        for n, _ in model.qformer.named_parameters()
    )
    task = Stage2Task(model)
    with_grad = _step_and_check(
        task, model, synthetic_batch(3, 28), {"ln_vision", "query_tokens", "qformer", "language_projection"}
    )
    assert not any(n.startswith("language_model") for n in with_grad)
    # frozen either way; the LLM follows task.train() only with llm_dropout (LAVIS), the ViT never
    assert model.language_model.training == llm_dropout and not model.vision_model.training


def test_vqa_finetune_variant_keeps_text_path_and_feeds_question():
    cfg = tiny_config("opt")
    cfg = cfg.replace(qformer=cfg.qformer.__class__(**{**cfg.qformer.__dict__, "use_text_input": True}))
    model = Blip2(cfg, tokenizer=tiny_llm_tokenizer("opt"), qformer_tokenizer=tiny_bert_tokenizer()).eval()
    batch = dict(synthetic_batch(2, 28), answer=["red", "two"])
    task = Stage2Task(model, question_template="question : {} answer :", qformer_question=True)
    base = task(batch)["loss"]
    changed = task(dict(batch, text_input=["what colour", "what"]))["loss"]
    assert not torch.allclose(base, changed)  # the question reaches the Q-Former and the LLM prompt
    ids = torch.tensor([[1, 20, 2], [1, 21, 2]])
    a = model.soft_prompt(batch["image"], ids, torch.ones_like(ids))
    b = model.soft_prompt(batch["image"], torch.tensor([[1, 22, 2], [1, 21, 2]]), torch.ones_like(ids))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)  # per-row conditioning


# ---------------------------------------------------------------------------------------------------------------
# Generation: batched == one by one (greedy), new-token counting


def _randomise(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("vision_model") and "LayerNorm" not in n and "layernorm" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_stage2_batched_generation_equals_one_by_one(family):
    model = _randomise(Blip2(tiny_config(family), tokenizer=tiny_llm_tokenizer(family))).eval()
    images = synthetic_batch(3, 28, seed=3)["image"]
    prompts = ["a photo of", "question : what is the colour ? answer :", ""]
    batched = model.generate(images, prompts, num_beams=1, max_new_tokens=5, min_new_tokens=5)
    single = [
        model.generate(images[i : i + 1], [prompts[i]], num_beams=1, max_new_tokens=5, min_new_tokens=5)[0]
        for i in range(3)
    ]
    assert batched == single
    assert all(len(s.split()) == 5 for s in batched)  # exactly 5 NEW tokens (one word each), prompt excluded


def test_qformer_captioning_batched_equals_one_by_one():
    model = _randomise(Blip2QFormerModel(tiny_config())).eval()
    images = synthetic_batch(3, 28, seed=4)["image"]
    for beams in (1, 3):
        batched = model.generate_captions(images, num_beams=beams, max_new_tokens=6, min_new_tokens=6)
        for i in range(3):
            one = model.generate_captions(images[i : i + 1], num_beams=beams, max_new_tokens=6, min_new_tokens=6)
            assert torch.equal(batched[i, : one.shape[1]], one[0])
        assert batched.shape[1] == 6 and not (batched[:, :] == model.config.qformer.sep_token_id).any()


def test_itc_and_itm_scoring_api():
    model = Blip2QFormerModel(tiny_config()).eval()
    tok = tiny_bert_tokenizer()
    b = synthetic_batch(3, 28)
    t = tok(b["text_input"], padding="longest", return_tensors="pt")
    enc, txt = model.encode_image(b["image"]), model.encode_text(t.input_ids, t.attention_mask)
    assert enc["image_feats"].shape == (3, 4, 16) and txt["text_feat"].shape == (3, 16)
    sim = model.itc_similarity(enc["image_feats"], txt["text_feat"])
    brute = torch.tensor(
        [
            [max(float((enc["image_feats"][i, q] @ txt["text_feat"][j]).detach()) for q in range(4)) for j in range(3)]
            for i in range(3)
        ]
    )
    assert torch.allclose(sim, brute, atol=1e-6)
    p = model.itm_probability(b["image"], t.input_ids, t.attention_mask)
    logits = model.itm_logits(enc["image_embeds"], t.input_ids, t.attention_mask)
    assert torch.allclose(p, logits.softmax(-1)[:, 1], atol=1e-6) and ((p > 0) & (p < 1)).all()


def test_stage1_longest_padding_gives_the_max_length_losses_and_gradients():
    """Pads are masked everywhere, so padding to the batch's longest caption changes cost, not results (eval mode)."""
    from blip2lib.tasks import TEXT_PADDINGS

    texts = ["a red circle", "a dog", "the small blue cat", "two"]
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def sampler(sim_i2t, sim_t2i, rank, image_ids=None, image_ids_all=None):
        g = torch.arange(sim_i2t.shape[0])
        return (g + 1) % 4, (g + 2) % 4

    runs = {}
    for padding in TEXT_PADDINGS:
        torch.manual_seed(0)
        model = Blip2QFormerModel(tiny_config()).double()
        task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=12, negative_sampler=sampler,
                          text_padding=padding).eval()  # fmt: skip
        ids, _ = task.tokenize(texts, torch.device("cpu"))
        out = task({"image": images, "text_input": texts})
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[padding] = (ids.shape[1], {k: float(v.detach()) for k, v in out.items() if k.endswith("loss")}, grads)
    (long_len, long_loss, long_grads), (short_len, short_loss, short_grads) = runs["max_length"], runs["longest"]
    assert long_len == 12 and short_len < 12  # the longest caption is 4 words + [CLS]/[SEP]
    assert set(long_loss) == {"itc_loss", "itm_loss", "itg_loss", "loss"}
    for term, v in long_loss.items():
        assert short_loss[term] == pytest.approx(v, abs=1e-12), term
    assert set(long_grads) == set(short_grads)
    for name, g in long_grads.items():
        assert torch.allclose(short_grads[name], g, atol=1e-12), name
    with pytest.raises(ValueError, match="text_padding must be one of"):
        Stage1Task(model, tiny_bert_tokenizer(), text_padding="right")
