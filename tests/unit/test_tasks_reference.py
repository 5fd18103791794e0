"""Stage1Task against an independent plain-torch computation of the BLIP-2 stage-1 objectives.

The reference below is written from the paper's equations (and LAVIS ``Blip2Qformer.forward``), using only the
model's public sub-modules (vision features, ``qformer`` with masks built here, projections, ``itm_head``, ``cls``)
— never the task's or ``blip2lib.losses``' helpers — so a wiring bug in the task cannot hide behind the same bug in
the reference. ``torch.multinomial`` is replaced by a deterministic inverse-CDF pick that the reference reproduces,
so the hard negatives are known exactly. Everything runs in float64 in eval mode (no dropout).

    ITC   s(i, t) = max_q <z_q(i), t_cls(t)> / temp; targets (1 - eps) * pos / |pos| + eps / N (eps = 0.1),
          pos = diagonal, or every pair with the same integer image id (retrieval fine-tuning); i2t and t2i averaged.
    ITM   weights softmax(s) with positives at 0; a negative image per text from the t2i row, a negative text per
          image from the i2t row; pairs (img, txt), (neg img, txt), (img, neg txt), labels [1]*B + [0]*2B;
          2-way logits averaged over the queries; plain cross-entropy.
    ITG   [DEC] replaces [CLS]; text row t sees every query and the non-pad text s <= t; queries see queries only;
          next-token CE with label smoothing 0.1, pads ignored.
"""

import pytest
import torch

from blip2lib.config import tiny_config
from blip2lib.crossinput import CrossInput
from blip2lib.model import Blip2QFormerModel
from blip2lib.tasks import Stage1Task
from blip2lib.toy.synthetic import tiny_bert_tokenizer

torch.set_num_threads(1)

EPS = 0.1  # label smoothing of ITC and ITG
L = 12  # max_txt_len: every caption below is shorter, so rows carry padding
DEC, PAD = 99, 0  # tiny tokenizer's [DEC] (added bos) and [PAD]
U = 0.6  # the deterministic "multinomial": first index whose normalised CDF reaches U
TEXTS = [
    "a red circle on the mat",
    "a dog",
    "two small blue square",
    "the cat on the left",
    "a green dog",
    "what is the sky colour",
]


def _pick(weights: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw at a fixed U per row: (..., N) -> (..., 1). A zero-weight column is never picked."""
    cdf = weights.cumsum(-1) / weights.sum(-1, keepdim=True)
    return (cdf < U).sum(-1, keepdim=True).clamp(max=weights.shape[-1] - 1)


@pytest.fixture
def drawn(monkeypatch):
    """Replace ``torch.multinomial`` by :func:`_pick`; returns the list of weight matrices it was given."""
    seen = []

    def fake_multinomial(weights, num_samples, replacement=False, *, generator=None):
        assert num_samples == 1
        seen.append(weights.detach().clone())
        return _pick(weights)

    monkeypatch.setattr(torch, "multinomial", fake_multinomial)
    return seen


def _model(seed: int = 0) -> Blip2QFormerModel:
    """Tiny stage-1 model in float64 with weights spread wider than the 0.02 init, so every term is far from flat."""
    torch.manual_seed(seed)
    model = Blip2QFormerModel(tiny_config()).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_model") and "layernorm" not in name.lower() and name != "temp":
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.15)
        model.temp.fill_(0.1)
    return model


def _images(n: int, seed: int = 3) -> torch.Tensor:
    """``n`` random images, (n, 3, 28, 28).

    Captions of one image still get distinct tensors, as distinct random crops in training: with bit-identical
    images the multi-positive ITC target would equal the one-hot one (each same-image row pair swaps symmetrically).
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 28, 28, generator=g, dtype=torch.float64)


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j target[j] * log softmax(logits)[j]."""
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


@torch.no_grad()
def _reference(model: Blip2QFormerModel, images: torch.Tensor, texts: list[str], image_ids=None) -> dict:
    """Every stage-1 quantity, from the equations in the module docstring (world size 1)."""
    tok = tiny_bert_tokenizer()(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    ids, mask = tok.input_ids, tok.attention_mask  # (B, L)
    b, nq = ids.shape[0], model.query_tokens.shape[1]
    queries = model.query_tokens.expand(b, -1, -1)  # (B, Q, H)
    emb = model.encode_vision(images)  # (B, N, Dv): ln_vision(ViT(image))

    # ITC: queries alone (cross-attention to the image), text alone ([CLS] with its padding mask).
    q_out = model.qformer(queries, query_length=nq, encoder_hidden_states=emb).last_hidden_state  # (B, Q, H)
    z = torch.nn.functional.normalize(model.vision_projection(q_out), dim=-1)  # (B, Q, E)
    t_out = model.qformer(model.embeddings(ids), query_length=0, attention_mask=mask).last_hidden_state
    t_cls = torch.nn.functional.normalize(model.text_projection(t_out[:, 0]), dim=-1)  # (B, E)
    cos = torch.stack([torch.stack([(z[i] @ t_cls[j]).max() for j in range(b)]) for i in range(b)])  # (img, txt)
    sim_i2t, sim_t2i = cos / model.temp, cos.T / model.temp  # rows: local images / local texts
    if image_ids is None:
        pos = torch.eye(b, dtype=torch.bool)
    else:
        pos = torch.tensor([[image_ids[i] == image_ids[j] for j in range(b)] for i in range(b)])  # symmetric
    target = (1 - EPS) * pos.double() / pos.sum(1, keepdim=True) + EPS / b  # (B, B), rows sum to 1
    itc = (_soft_ce(sim_i2t, target) + _soft_ce(sim_t2i, target)) / 2

    # ITM hard negatives: positives get weight exactly 0.
    w_t2i = sim_t2i.masked_fill(pos, float("-inf")).softmax(-1)  # text b -> which image
    w_i2t = sim_i2t.masked_fill(pos, float("-inf")).softmax(-1)  # image b -> which text
    neg_img, neg_txt = _pick(w_t2i).squeeze(1), _pick(w_i2t).squeeze(1)  # (B,), (B,)
    pair_images = torch.cat([emb, emb[neg_img], emb])  # (3B, N, Dv)
    pair_ids = torch.cat([ids, ids, ids[neg_txt]])  # (3B, L)
    pair_mask = torch.cat([mask, mask, mask[neg_txt]])
    labels = torch.tensor([1] * b + [0] * (2 * b))
    joint = torch.cat([model.query_tokens.expand(3 * b, -1, -1), model.embeddings(pair_ids)], 1)  # (3B, Q+L, H)
    key_mask = torch.cat([torch.ones(3 * b, nq, dtype=pair_mask.dtype), pair_mask], 1)  # bi-directional
    h = model.qformer(joint, query_length=nq, attention_mask=key_mask, encoder_hidden_states=pair_images)
    itm_logits = model.itm_head(h.last_hidden_state[:, :nq]).mean(1)  # (3B, 2): mean over queries
    itm = -itm_logits.log_softmax(-1).gather(1, labels[:, None]).mean()

    # ITG: one [queries ; text] pass with the multimodal-causal mask (the task reuses the query pass's cache).
    dec = ids.clone()
    dec[:, 0] = DEC
    lm_labels = dec.masked_fill(ids == PAD, -100)
    m = torch.zeros(b, nq + L, nq + L, dtype=mask.dtype)
    m[:, :, :nq] = 1  # every row sees every query; query rows see no text
    m[:, nq:, nq:] = torch.tril(torch.ones(L, L, dtype=mask.dtype)) * mask[:, None, :]  # causal, non-pad keys
    joint = torch.cat([queries, model.embeddings(dec)], 1)
    h = model.qformer(joint, query_length=nq, attention_mask=m, encoder_hidden_states=emb).last_hidden_state
    logp = model.cls(h[:, nq:]).log_softmax(-1)[:, :-1]  # (B, L-1, V) predicts position t+1
    tgt = lm_labels[:, 1:]
    keep = tgt != -100
    nll = -logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    itg = ((1 - EPS) * nll - EPS * logp.mean(-1))[keep].mean()  # smoothing spreads eps over the whole vocab

    return dict(ids=ids, mask=mask, emb=emb, w_t2i=w_t2i, w_i2t=w_i2t, neg_img=neg_img, neg_txt=neg_txt,
                pair_images=pair_images, pair_ids=pair_ids, pair_mask=pair_mask, dec=dec, itc=itc, itm=itm, itg=itg,
                itm_acc=(itm_logits.argmax(-1) == labels).double().mean(), itm_logits=itm_logits, labels=labels,
                sim_i2t=sim_i2t, sim_t2i=sim_t2i, pos=pos)  # fmt: skip


def _run_task(model, batch, monkeypatch) -> tuple[dict, dict]:
    """Task forward with the ITM pair and ITG decoder inputs recorded at the model's public methods."""
    calls, itm_fn, itg_fn = {}, model.itm_logits, model.itg_logits

    def itm_logits(images, ids, mask):
        if isinstance(images, CrossInput):  # K/V reuse: distinct images + the image row of each pair
            images = images.states if images.index is None else images.states[images.index]
        calls["itm"] = (images.detach().clone(), ids.clone(), mask.clone())
        return itm_fn(images, ids, mask)

    def itg_logits(past, dec_ids, mask):
        calls["itg"] = (dec_ids.clone(), mask.clone())
        return itg_fn(past, dec_ids, mask)

    monkeypatch.setattr(model, "itm_logits", itm_logits)
    monkeypatch.setattr(model, "itg_logits", itg_logits)
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=L).eval()  # the library's own negative sampler
    with torch.no_grad():
        out = task(batch)
    return out, calls


def _check(out: dict, calls: dict, ref: dict, drawn: list) -> None:
    """Every loss term to 1e-6 (float64 agrees to ~1e-12) and the exact ITM pairs and ITG decoder ids."""
    for term in ("itc", "itm", "itg"):
        assert float(out[f"{term}_loss"]) == pytest.approx(float(ref[term]), abs=1e-6), term
    assert float(out["loss"]) == pytest.approx(float(ref["itc"] + ref["itm"] + ref["itg"]), abs=1e-6)
    assert float(out["itm_acc"]) == pytest.approx(float(ref["itm_acc"]), abs=1e-6)  # float32 fraction
    # the sampler saw exactly the two masked-softmax weight matrices (one draw per row, no positive reachable)
    assert len(drawn) == 2
    expected = [ref["w_t2i"], ref["w_i2t"]]
    for w in drawn:
        assert any(w.shape == e.shape and torch.allclose(w, e, atol=1e-10) for e in expected)
        assert torch.all(w[ref["pos"]] == 0)
    assert not torch.allclose(drawn[0], drawn[1])
    images, ids, mask = calls["itm"]
    assert torch.equal(ids, ref["pair_ids"]) and torch.equal(mask, ref["pair_mask"])
    assert torch.allclose(images, ref["pair_images"], atol=1e-12)
    dec_ids, dec_mask = calls["itg"]
    assert torch.equal(dec_ids, ref["dec"]) and torch.equal(dec_mask, ref["mask"])


def _discriminates(ref: dict) -> None:
    """Guards that the batch can tell the mutations apart (otherwise the checks above could not fail)."""
    b = ref["ids"].shape[0]
    # which sim matrix feeds which draw matters: the two directions pick different negatives
    assert not torch.equal(_pick(ref["w_t2i"]).squeeze(1), _pick(ref["w_i2t"]).squeeze(1))
    # the negative images are not the negative texts' images
    assert not torch.equal(ref["pair_images"][b : 2 * b], ref["emb"][ref["neg_txt"]])
    # swapped ITM labels change the loss by far more than the tolerance
    swapped = 1 - ref["labels"]
    itm_swapped = -ref["itm_logits"].log_softmax(-1).gather(1, swapped[:, None]).mean()
    assert abs(float(itm_swapped - ref["itm"])) > 1e-2


def test_stage1_task_equals_the_plain_torch_objectives(monkeypatch, drawn):
    model = _model()
    images = _images(len(TEXTS))
    ref = _reference(model, images, TEXTS)
    _discriminates(ref)
    out, calls = _run_task(model, {"image": images, "text_input": TEXTS}, monkeypatch)
    _check(out, calls, ref, drawn)


def test_string_image_ids_keep_the_one_hot_objectives(monkeypatch, drawn):
    """Raw string ids (a dataset's file names) never switch on the multi-positive variant."""
    model = _model()
    images = _images(len(TEXTS))
    ref = _reference(model, images, TEXTS)  # diagonal positives only
    batch = {"image": images, "text_input": TEXTS, "image_id": ["i0", "i0", "i1", "i2", "i2", "i3"]}
    out, calls = _run_task(model, batch, monkeypatch)
    _check(out, calls, ref, drawn)


def test_retrieval_finetuning_with_integer_image_ids_uses_every_positive(monkeypatch, drawn):
    """Several captions per image: ITC targets spread over the positives and no positive is drawn as a negative."""
    image_ids = [0, 0, 1, 2, 2, 3]
    model = _model()
    images = _images(len(image_ids))
    ref = _reference(model, images, TEXTS, image_ids=image_ids)
    _discriminates(ref)
    one_hot = _reference(model, images, TEXTS)
    assert abs(float(ref["itc"] - one_hot["itc"])) > 1e-4  # ignoring the ids: 100x the tolerance
    # with only the diagonal masked, some row would draw a same-image "negative"
    assert any(image_ids[int(j)] == image_ids[i] for i, j in enumerate(one_hot["neg_img"].tolist()))
    assert ref["pos"].sum() == 10 and all(image_ids[int(j)] != image_ids[i] for i, j in enumerate(ref["neg_img"]))
    batch = {"image": images, "text_input": TEXTS, "image_id": torch.tensor(image_ids)}
    out, calls = _run_task(model, batch, monkeypatch)
    _check(out, calls, ref, drawn)
