"""Training-step levers (stage 1 and stage 2): each must leave the losses and gradients where they were.

* ITM image K/V once per image: the ITM pass projects each distinct image's cross-attention keys/values once and
  gathers them for its pairs; pinned against the copy-per-pair pass (the switch ``itm_kv_reuse=False``).
* One cast of the image features under autocast, with each use's gradient still cast back to fp32 on its own.
* No host reads inside the step: Python-level reads are counted on CPU; the CUDA check is ``gpu``-marked.
* Stage 2: the OPT LM head and its fp32 upcast only at label positions, against a loss written out here.
* ``torch.compile`` of a tiny stage-1 step with the Inductor workaround, against eager.
"""

import pytest
import torch

from blip2lib.config import tiny_config
from blip2lib.crossinput import CrossInput, _GatherRows, cross_input
from blip2lib.inductor import compile_inplace, inductor_options
from blip2lib.llm import build_llm, freeze_llm_, label_positions, llm_loss
from blip2lib.losses import _exponential_race, itm_pair_images, missing_negative, sample_hard_negatives
from blip2lib.model import Blip2QFormerModel
from blip2lib.tasks import Stage1Task
from blip2lib.toy.synthetic import tiny_bert_tokenizer

torch.set_num_threads(1)

TEXTS = ["a red circle on the mat", "a dog", "two small blue square", "the cat on the left"]
B = len(TEXTS)


def _model(seed: int = 0, num_layers: int = 2) -> Blip2QFormerModel:
    """Tiny fp32 stage-1 model with weights spread wider than the 0.02 init (gradients far from zero)."""
    torch.manual_seed(seed)
    model = Blip2QFormerModel(tiny_config(num_layers=num_layers, cross_attention_frequency=1))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_model") and "layernorm" not in name.lower() and name != "temp":
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        model.temp.fill_(0.1)
    return model


def _sampler(sim_i2t, sim_t2i, rank, image_ids=None, image_ids_all=None):
    """Fixed negatives with a repeated image (image 1 serves 5 of the 12 ITM pairs), so the gather sums rows."""
    return torch.tensor([1, 0, 1, 1]), torch.tensor([2, 3, 0, 1])


def _batch(seed: int = 3) -> dict:
    return {"image": torch.randn(B, 3, 28, 28, generator=torch.Generator().manual_seed(seed)), "text_input": TEXTS}


def _step(model, reuse: bool, train: bool = True) -> tuple[dict, dict]:
    """Losses and the gradient of every trainable parameter after one forward/backward."""
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=12, negative_sampler=_sampler, itm_kv_reuse=reuse)
    task.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same dropout draws in both paths (same calls on same shapes)
    out = task(_batch())
    out["loss"].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


# ---------------------------------------------------------------------------------------------------------------
# Lever 1: ITM image K/V once per image


def test_pair_images_as_distinct_images_and_an_index():
    emb = torch.randn(B, 5, 3)
    neg = torch.tensor([2, 0, 2, 1])
    layout = torch.cat([emb, emb[neg], emb])  # images [pos; neg; pos], written out
    source, index = itm_pair_images(emb, emb, neg)  # one process: the gathered tensor IS the local one
    assert source is emb and torch.equal(index, torch.tensor([0, 1, 2, 3, 2, 0, 2, 1, 0, 1, 2, 3]))
    assert torch.equal(source[index], layout)
    other = torch.randn(B, 5, 3)  # two ranks, this one rank 1: negatives 0..3 live on rank 0
    emb_all = torch.cat([other, emb])
    neg2 = torch.tensor([0, 5, 7, 3])
    source, index = itm_pair_images(emb, emb_all, neg2)
    assert source.shape[0] == 2 * B
    assert torch.equal(source[index], torch.cat([emb, emb_all[neg2], emb]))


def test_kv_reuse_gives_the_same_losses_and_gradients_fp32():
    model = _model()
    ref_out, ref_grads = _step(model, reuse=False)
    out, grads = _step(model, reuse=True)
    for k in ("itc_loss", "itm_loss", "itg_loss", "loss", "itm_acc"):
        assert abs(float(out[k]) - float(ref_out[k])) <= 1e-6, k
    assert set(grads) == set(ref_grads)
    for name in ("ln_vision.weight", "query_tokens", "qformer.encoder.layer.1.crossattention.attention.key.weight",
                 "qformer.encoder.layer.0.crossattention.attention.value.bias", "itm_head.weight"):  # fmt: skip
        assert ref_grads[name].abs().max() > 1e-4, name  # the comparison below is not between zeros
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
    assert worst <= 1e-6, worst


def test_kv_reuse_projects_each_image_once():
    """One K/V projection of the B images per step (query pass and ITM pass share it) instead of B, then 3B rows."""
    model = _model()
    rows = {True: [], False: []}
    key = model.qformer.encoder.layer[0].crossattention.attention.key
    for reuse in (False, True):
        handle = key.register_forward_hook(lambda m, args, out, r=reuse: rows[r].append(args[0].shape[0]))
        _step(model, reuse=reuse, train=False)
        handle.remove()
    assert rows == {False: [B, 3 * B], True: [B]}


def test_gather_backward_sums_repeated_rows_in_fp32():
    """Half-precision K/V: a repeated image's gradient is the fp32 sum of its pairs', rounded once."""
    x = torch.zeros(3, 2, dtype=torch.bfloat16, requires_grad=True)
    index = torch.tensor([0, 2, 0, 0, 1])
    g = torch.tensor([[1.0, 1.0], [5.0, 5.0], [2**-8, 0.5], [2**-8, 0.25], [3.0, 3.0]], dtype=torch.bfloat16)
    _GatherRows.apply(x, index).backward(g)
    # row 0: 1 + 2^-8 + 2^-8 = 1 + 2^-7, exact in bf16; adding in bf16 (8-bit significand) would round each
    # 1 + 2^-8 back to 1
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, torch.tensor([[1 + 2**-7, 1.75], [3.0, 3.0], [5.0, 5.0]], dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# Lever 2: one cast of the image features under autocast


def test_one_cast_under_autocast_equals_a_cast_per_projection():
    model = _model().eval()
    q = model.qformer
    queries = model.query_tokens.detach().expand(B, -1, -1)
    feats = torch.randn(B, 17, 32, generator=torch.Generator().manual_seed(5))
    assert cross_input(feats, torch.float32).low is None  # no autocast: nothing to cast
    results = []
    for once in (False, True):
        x = feats.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # once=False: low=None, so every K/V Linear casts its fp32 input itself (the pre-lever behaviour)
            enc = cross_input(x, torch.float32) if once else CrossInput(x)
            assert (enc.low is not None) == once and (not once or enc.low.dtype == torch.bfloat16)
            out = q(queries, query_length=queries.shape[1], encoder_hidden_states=enc).last_hidden_state
        out.float().pow(2).sum().backward()
        results.append((out.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert x.grad.dtype == torch.float32 and x.grad.abs().max() > 0
    assert torch.allclose(results[0][1], results[1][1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Lever 3: no host reads inside the step


@pytest.fixture
def host_reads(monkeypatch):
    """Count Python-level reads of tensor values on the host (``.item()``, ``bool()``, ``int()``, ``.tolist()`` …)."""
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_stage1_step_reads_nothing_on_the_host(host_reads):
    model = _model()
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=12).train()  # the library's own sampler
    batch = _batch()
    host_reads.clear()  # building the model and the tokenizer may read values; the step may not
    out = task(batch)
    out["loss"].backward()
    assert host_reads == []
    # the counter does catch the old check: the sampler with its host-side check reads a flag
    sample_hard_negatives(torch.randn(B, B), torch.randn(B, B), 0, check=True)
    assert host_reads == ["__bool__"]


def test_missing_negative_poisons_the_itm_loss_and_is_reported():
    model = _model()
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=12).train()
    ok = task(_batch())
    assert float(ok["itm_no_negative"]) == 0.0 and torch.isfinite(ok["loss"])
    # one image id for the whole batch: every column is a positive of every row (retrieval fine-tuning)
    bad = task({**_batch(), "image_id": torch.tensor([7, 7, 7, 7])})
    assert float(bad["itm_no_negative"]) == 1.0
    assert torch.isnan(bad["itm_loss"]) and torch.isnan(bad["loss"]) and torch.isfinite(bad["itc_loss"])
    sim = torch.zeros(1, 1)
    assert bool(missing_negative(sim, 0)) and not bool(missing_negative(torch.zeros(2, 2), 0))
    with pytest.raises(ValueError, match="no negative"):  # direct callers keep the host-side error
        sample_hard_negatives(sim, sim, 0)
    ni, nt = sample_hard_negatives(sim, sim, 0, check=False)  # no error and valid indices
    assert ni.tolist() == [0] and nt.tolist() == [0]


def test_exponential_race_draws_what_multinomial_draws():
    """The CUDA draw uses the same generator stream and arithmetic as ``multinomial``'s one-sample path."""
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)).softmax(-1)
    w[:, 4] = 0  # a masked positive
    for seed in range(30):
        a = torch.multinomial(w, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        b = _exponential_race(w, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b), seed
        assert (b != 4).all()


@pytest.mark.gpu
def test_exponential_race_draws_what_multinomial_draws_on_cuda():
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)).softmax(-1).cuda()
    for seed in range(10):
        a = torch.multinomial(w, 1, generator=torch.Generator("cuda").manual_seed(seed)).squeeze(1)
        assert torch.equal(a, _exponential_race(w, torch.Generator("cuda").manual_seed(seed))), seed


@pytest.mark.gpu
def test_stage1_step_has_no_cuda_sync():
    model = _model().cuda()
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=12).train()
    batch = {**_batch(), "image": _batch()["image"].cuda()}
    task(batch)["loss"].backward()  # warm-up: allocator, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            out = task(batch)
        out["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"])


# ---------------------------------------------------------------------------------------------------------------
# Lever 5: stage-2 LM head at label positions only


def test_label_positions_hand_worked():
    labels = torch.tensor([[-100, 5, 6], [7, -100, -100]])
    positions, targets = label_positions(labels, num_prefix=2)  # text column c is predicted by position 2 + c - 1
    assert positions.tolist() == [[2, 3], [1, 0]] and targets.tolist() == [[5, 6], [7, -100]]  # row 1 padded
    positions, targets = label_positions(torch.tensor([[4, 5, -100]]), num_prefix=0)  # no predictor for token 0
    assert positions.tolist() == [[0]] and targets.tolist() == [[5]]


def _opt():
    lm = build_llm(tiny_config("opt").llm, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return freeze_llm_(lm)


def test_opt_loss_at_label_positions_equals_the_full_head():
    lm = _opt()
    v = lm.config.vocab_size
    ids = torch.randint(3, v, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # BOS + prompt tokens are context
    labels[2, 4] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    prefix = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))

    seen = []
    hook = lm.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    results = {}
    for only in (True, False):
        p = prefix.clone().requires_grad_(True)
        loss = llm_loss(lm, "opt", p, batch, label_logits_only=only)
        loss.backward()
        results[only] = (loss.detach(), p.grad)
    hook.remove()
    k = int((labels != -100).sum(1).max())  # the most labels in a row
    assert seen == [(3, k, 32), (3, 4 + 6, 32)]  # the head ran on k positions per row, then on every position

    # the loss written out: position Q + c - 1 predicts text token c, fp32 log-softmax, mean over kept labels
    with torch.no_grad():
        embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1)
        logits = lm(inputs_embeds=embeds, attention_mask=full_mask).logits.float()  # (3, 10, V)
    terms = [-logits[b, 4 + c - 1].log_softmax(-1)[labels[b, c]] for b in range(3) for c in range(6)
             if labels[b, c] != -100]  # fmt: skip
    expected = torch.stack(terms).mean()
    assert abs(float(results[True][0]) - float(expected)) <= 1e-6
    assert abs(float(results[True][0]) - float(results[False][0])) <= 1e-6
    assert results[False][1].abs().max() > 1e-3
    assert (results[True][1] - results[False][1]).abs().max() <= 1e-6


def test_label_head_runs_inside_the_llms_autocast_region():
    """An LLM in its own autocast region (hooks on its forward) keeps it when only its parts are called."""
    from blip2lib.precision import autocast_region_

    lm = autocast_region_(_opt(), torch.bfloat16, "cpu")
    ids = torch.randint(3, lm.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    dtypes = []
    hook = lm.get_output_embeddings().register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    for only in (True, False):
        loss = llm_loss(lm, "opt", torch.randn(2, 4, 32), batch, label_logits_only=only)
        assert loss.dtype == torch.float32
    hook.remove()
    assert dtypes == [torch.bfloat16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------
# Lever 4: torch.compile with the Inductor workaround


def test_inductor_workaround_options():
    assert inductor_options() == {"loop_reindexing_after_fusion": False}  # this PyTorch has the pass


@pytest.mark.gpu  # on this project's 2-core CPU the Inductor C++ compile of the step took > 5 min
def test_compiled_qformer_stage1_step_matches_eager():
    """The training configuration that failed in Inductor (fp16 autocast, CUDA) compiles with the workaround."""
    model = _model(num_layers=2).cuda()
    batch = {**_batch(), "image": _batch()["image"].cuda()}
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=12, negative_sampler=_cuda_sampler).eval()

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = task(batch)
        out["loss"].backward()
        return {k: float(out[k]) for k in ("itc_loss", "itm_loss", "itg_loss")}, model.query_tokens.grad.clone()

    ref, ref_grad = run()
    compile_inplace(model.qformer)
    got, grad = run()
    for k in ref:  # fp16 autocast: fused kernels round differently, far below the losses' size (~1)
        assert abs(got[k] - ref[k]) <= 1e-2, (k, got[k], ref[k])
    assert torch.allclose(grad, ref_grad, rtol=5e-2, atol=1e-4)


def _cuda_sampler(sim_i2t, sim_t2i, rank, image_ids=None, image_ids_all=None):
    """:func:`_sampler` on the logits' device."""
    return tuple(t.to(sim_i2t.device) for t in _sampler(sim_i2t, sim_t2i, rank))


# ---------------------------------------------------------------------------------------------------------------
# The benchmark rows (tiny configs on the CPU: the code path and the parity column, not timing)


def test_lever_benchmark_rows_run_tiny_with_parity():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "rows_train_levers.py"
    spec = importlib.util.spec_from_file_location("rows_train_levers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--tiny", "--iters", "1", "--warmup", "0", "--only", "stage1_itm_kv_reuse,stage2_label_head_opt"])
    assert [r["row"] for r in rows] == ["stage1_itm_kv_reuse", "stage2_label_head_opt"]
    for r in rows:  # fp32 on the CPU: both sides of each lever give the same loss on the same weights and draws
        assert r["loss_abs_diff"] <= 1e-6 and r["off"] > 0 and r["on"] > 0, r


def test_lever_flop_count_saves_exactly_three_projections_per_image():
    """Counted FLOPs (meta device): off − on = the K/V projections of 3B images, forward + both backward GEMMs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "rows_train_levers.py"
    spec = importlib.util.spec_from_file_location("rows_train_levers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (row,) = mod.main(["--tiny", "--flops", str(B)])
    cfg = tiny_config()
    n = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1  # patch tokens + [CLS]
    dv, h = cfg.qformer.encoder_hidden_size, cfg.qformer.hidden_size
    cross_layers = len(range(0, cfg.qformer.num_hidden_layers, cfg.qformer.cross_attention_frequency))
    # per image and layer: key + value, each 2·N·Dv·H forward and twice that backward (input and weight grads)
    saved = 3 * B * cross_layers * 2 * (2 * n * dv * h) * 3
    assert round((row["off"] - row["on"]) * 1e12) == saved


def test_cross_input_on_the_meta_device():
    """Shape-only models (parameter counts, FLOP counts) run on ``meta``, which has no autocast state to query."""
    enc = cross_input(torch.empty(2, 5, 3, device="meta"), torch.float32)
    assert enc.low is None and enc.states.device.type == "meta"
