"""Training as LAVIS trained: the FlanT5 caption target, the frozen LLM's dropout, from-scratch initialisation.

Every expected value is computed here from its definition (tokenizer calls, PyTorch's nn.Linear bound, the
normal std), never by the helper under test.
"""

import math

import pytest
import torch
import transformers
from torch import nn

from blip2lib import train as train_mod
from blip2lib.assemble import _load_frozen_and_init, _transforms
from blip2lib.config import tiny_config
from blip2lib.llm import llm_loss
from blip2lib.model import Blip2, Blip2QFormerModel
from blip2lib.qformer import Blip2QFormer, Blip2QFormerLMHead, Blip2TextEmbeddings, init_weights, load_bert_weights
from blip2lib.tasks import Stage2Task
from blip2lib.toy.synthetic import tiny_llm_tokenizer
from blip2lib.train import TrainParams

torch.set_num_threads(1)
CAPTIONS = ["A dog on the mat.", "two red circle", "the sky is blue"]


# ---------------------------------------------------------------------------------------------------------------
# Caption fine-tuning targets: T5 prompt → caption, OPT "prompt caption" with the prompt masked


def _caption_ft_batch() -> list[str]:
    """Captions exactly as the caption-FT pipeline hands them to the task (the processor prepends the prompt)."""
    _, processor = _transforms(TrainParams(stage="caption_ft", prompt="a photo of", augment="none"))
    texts = [processor(c) for c in CAPTIONS]
    assert texts == ["a photo of a dog on the mat", "a photo of two red circle", "a photo of the sky is blue"]
    return texts


def test_t5_caption_ft_encoder_gets_the_prompt_and_the_decoder_the_bare_caption():
    tok = tiny_llm_tokenizer("t5")
    task = Stage2Task(Blip2(tiny_config("t5"), tokenizer=tok), prompt="a photo of", max_txt_len=32)
    out = task.llm_inputs({"text_input": _caption_ft_batch()})

    enc = tok("a photo of").input_ids  # [a, photo, of, </s>]
    assert out["input_ids"].tolist() == [enc] * 3
    assert out["attention_mask"].tolist() == [[1] * len(enc)] * 3
    bare = ["a dog on the mat", "two red circle", "the sky is blue"]
    dec = [tok(c).input_ids for c in bare]  # each ends with </s>; no prompt token anywhere in the target
    width = max(map(len, dec))
    assert out["labels"].tolist() == [d + [-100] * (width - len(d)) for d in dec]
    assert out["decoder_attention_mask"].tolist() == [[1] * len(d) + [0] * (width - len(d)) for d in dec]
    assert out["labels"][0, :3].tolist() != enc[:3]  # the model is not taught to emit "a photo of"
    # a caption handed over without the prompt is taken as it is (no word is eaten)
    raw = task.llm_inputs({"text_input": ["a photographer on the mat"]})
    assert raw["labels"][0].tolist() == tok("a photographer on the mat").input_ids


def test_opt_caption_ft_keeps_the_prompt_in_the_text_and_masks_it():
    tok = tiny_llm_tokenizer("opt")
    task = Stage2Task(Blip2(tiny_config("opt"), tokenizer=tok), prompt="a photo of", max_txt_len=32)
    texts = _caption_ft_batch()
    out = task.llm_inputs({"text_input": texts})

    ids = [tok(t + "\n").input_ids for t in texts]  # </s> a photo of … \n
    n_prompt = len(tok("a photo of").input_ids)  # BOS + 3 prompt tokens
    assert n_prompt == 4
    width = max(map(len, ids))
    assert out["input_ids"].tolist() == [i + [tok.pad_token_id] * (width - len(i)) for i in ids]
    want = [[-100] * n_prompt + i[n_prompt:] + [-100] * (width - len(i)) for i in ids]
    assert out["labels"].tolist() == want


# ---------------------------------------------------------------------------------------------------------------
# The frozen LLM's dropout (LAVIS: requires_grad off, mode follows model.train(); ViT pinned by disabled_train)


def _mode_records(monkeypatch):
    """Patch train()'s model builder to hook the LLM's dropout-bearing modules and the ViT; returns the log."""
    records = []
    build = train_mod.build_model_and_task

    def hooked(params, device):
        model, task, comps = build(params, device)
        lm = model.language_model
        # T5: nn.Dropout modules; OPT: its decoder layers apply functional dropout gated by their own .training
        drops = [m for m in lm.modules() if isinstance(m, nn.Dropout) or type(m).__name__ == "OPTDecoderLayer"]
        assert drops and all(getattr(m, "p", getattr(m, "dropout", 0)) == 0.1 for m in drops)  # HF default 0.1
        vit = model.vision_model

        def record(*_):
            records.append((model.training, torch.is_grad_enabled(), [m.training for m in drops], vit.training))

        lm.register_forward_pre_hook(record)
        return model, task, comps

    monkeypatch.setattr(train_mod, "build_model_and_task", hooked)
    return records


@pytest.mark.parametrize("family,llm_dropout", [("opt", True), ("t5", True), ("opt", False), ("t5", False)])
def test_llm_dropout_is_on_exactly_in_training_steps(tmp_path, monkeypatch, family, llm_dropout):
    records = _mode_records(monkeypatch)
    params = TrainParams(
        stage="stage2", model="tiny", llm=family, train_data="synthetic", val_data="synthetic", val_images=4,
        steps=3, batch_size=4, warmup_steps=1, image_size=28, max_txt_len=12, progress=False, eval_every=1,
        llm_dropout=llm_dropout,
    )  # fmt: skip
    train_mod.train(params, tmp_path)
    steps = [r for r in records if r[1]]  # forward passes with autograd: the engine's training steps
    evals = [r for r in records if not r[1]]  # validation (lm_health under no_grad, model.eval())
    assert len(steps) == 3 and evals  # 3 steps, each after a validation that switched the model to eval
    for parent_training, _, drops, vit_training in steps:
        assert parent_training and all(d == llm_dropout for d in drops)
        assert not vit_training  # the frozen ViT stays pinned in eval
    for parent_training, _, drops, vit_training in evals:
        assert not parent_training and not any(drops) and not vit_training


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_llm_dropout_changes_the_loss_only_in_train_mode(family):
    tok = tiny_llm_tokenizer(family)
    texts = ["a dog on the mat", "the sky is blue"]
    for llm_dropout in (True, False):
        model = Blip2(tiny_config(family), tokenizer=tok, llm_dropout=llm_dropout)
        task = Stage2Task(model)
        batch = task.llm_inputs({"text_input": texts})
        prefix = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))  # (B, Q, D) fixed soft prompt
        for mode in (True, False):
            model.train(mode)
            with torch.no_grad():
                a, b = (llm_loss(model.language_model, family, prefix, batch) for _ in range(2))
            assert (a != b) == (mode and llm_dropout), (llm_dropout, mode)  # dropout draws differ between calls
        assert not any(p.requires_grad for p in model.language_model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# From-scratch initialisation (LAVIS: heads keep PyTorch's nn.Linear init; [DEC] row N(0, 0.02) from the resize)


def _assert_pytorch_linear_init(lin: nn.Linear) -> None:
    bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=√5) weight and the bias: U(-bound, bound)
    w, b = lin.weight.detach(), lin.bias.detach()
    assert w.abs().max() <= bound and b.abs().max() <= bound
    # uniform std = bound/√3 (0.102 for fan_in 32); BERT's rule would give 0.02 and an all-zero bias
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.25, lin
    assert b.abs().mean() > bound / 5, lin


def test_projection_and_itm_heads_keep_pytorch_linear_init():
    torch.manual_seed(0)
    m = Blip2QFormerModel(tiny_config())
    for lin in (m.vision_projection, m.text_projection, m.itm_head):
        _assert_pytorch_linear_init(lin)
    assert m.temp.item() == pytest.approx(0.07)
    dense = m.cls.predictions.transform.dense  # the BERT MLM head stays BERT-initialised: N(0, 0.02), zero bias
    assert abs(dense.weight.std().item() - 0.02) < 0.004 and not dense.bias.any() and not m.cls.predictions.bias.any()
    assert abs(m.query_tokens.std().item() - 0.02) < 0.004
    stage2 = Blip2(tiny_config("opt"), tokenizer=tiny_llm_tokenizer("opt"))
    _assert_pytorch_linear_init(stage2.language_projection)  # LAVIS opt_proj / t5_proj: plain nn.Linear


def _bert_dir(tmp_path, hidden: int, vocab: int = 99, layers: int = 1, intermediate: int = 37):
    c = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=intermediate, max_position_embeddings=64,
    )  # fmt: skip
    bert = transformers.BertForMaskedLM(c)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bert.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    bert.save_pretrained(tmp_path)
    return bert.state_dict()


def test_dec_row_from_bert_is_drawn_like_lavis_resize(tmp_path):
    h = 256
    sd = _bert_dir(tmp_path, h)
    c = tiny_config().qformer.__class__(vocab_size=100, hidden_size=h, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=37, max_position_embeddings=64, encoder_hidden_size=32,
                                        dec_token_id=99)  # fmt: skip
    q, emb = Blip2QFormer(c), Blip2TextEmbeddings(c)
    head = Blip2QFormerLMHead(c, emb.word_embeddings.weight)
    for mod in (q, emb, head):
        init_weights(mod, 0.02)
    torch.manual_seed(0)
    load_bert_weights(q, emb, head, str(tmp_path))
    w = sd["bert.embeddings.word_embeddings.weight"]  # (99, H), entries N(0, 0.05)
    dec = emb.word_embeddings.weight[99].detach()
    # LAVIS: N(0, 0.02) — the std of 256 draws lies within ±15 % (≈ 3.4 standard errors). Mean of BERT's 99 rows:
    # std ≈ 0.05/√99 = 0.005, far outside.
    assert abs(dec.std().item() / 0.02 - 1) < 0.15 and abs(dec.mean().item()) < 0.005
    assert w.mean(0).std().item() < 0.008 and head.predictions.bias[99] == 0
    assert torch.equal(emb.word_embeddings.weight[:99], w)


def test_stage2_from_scratch_takes_the_qformer_from_bert(tmp_path):
    """Stage 2 without a stage-1 parent (Figure 5 "w/o representation learning") starts from BERT as LAVIS does."""
    cfg = tiny_config("opt")
    q = cfg.qformer
    sd = _bert_dir(tmp_path, q.hidden_size, layers=q.num_hidden_layers, intermediate=q.intermediate_size)
    model = Blip2(cfg, tokenizer=tiny_llm_tokenizer("opt"))
    assert model.embeddings is None
    _load_frozen_and_init(model, {"bert_dir": str(tmp_path)}, TrainParams(stage="stage2", model="tiny"))
    layer = model.qformer.encoder.layer[1]
    assert torch.equal(layer.attention.attention.query.weight, sd["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(layer.intermediate_query.dense.weight, sd["bert.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(model.qformer.layernorm.bias, sd["bert.embeddings.LayerNorm.bias"])
    with_parent = Blip2(cfg, tokenizer=tiny_llm_tokenizer("opt"))  # a parent checkpoint replaces BERT: not loaded
    before = with_parent.qformer.layernorm.bias.clone()
    _load_frozen_and_init(with_parent, {"bert_dir": str(tmp_path)}, TrainParams(stage="stage2", init_from="x"))
    assert torch.equal(with_parent.qformer.layernorm.bias, before)
