"""Training and forward rows of ``benchmarks/gpu.py``: ViT forward, stage-1 step, stage-2 step (ours vs transformers).

See the table in ``benchmarks/gpu.py``'s docstring; ``bench`` is its ``Bench`` (device, autocast, timing, memory).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from decode_rows import images, texts

from blip2lib.model import count_parameters
from blip2lib.optim import build_optimizer, param_groups
from blip2lib.tasks import Stage1Task, Stage2Task
from blip2lib.toy.synthetic import tiny_bert_tokenizer


def _free(*objs) -> None:
    for o in objs:
        if isinstance(o, torch.optim.Optimizer):
            o.state.clear()
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def row_vit(bench: Any, model, cfg) -> dict:
    n = bench.sizes["vit_batch"]
    px = images(bench, cfg, n)
    bench.reset_memory()

    @torch.inference_mode()
    def step():
        with bench.amp(cfg):
            model.encode_vision(px.to(bench.device, non_blocking=True))

    dt = bench.timed(step)
    return dict(row="vit_forward", unit="img/s", ours=n / dt, mem_ours=bench.peak_gib(), batch=n)


def row_stage1(bench: Any, model, cfg) -> dict:
    n = bench.sizes["s1_batch"]
    task = Stage1Task(model, tiny_bert_tokenizer(cfg.qformer.vocab_size), max_txt_len=cfg.max_txt_len).train()
    opt = build_optimizer(param_groups(model, 0.05), lr=1e-4)
    scaler, px, caps = bench.scaler(cfg), images(bench, cfg, n), texts(n, (8, 14))
    bench.reset_memory()

    def step():
        with bench.amp(cfg):
            loss = task({"image": px.to(bench.device, non_blocking=True), "text_input": caps})["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    dt = bench.timed(step)
    out = dict(row="stage1_train", unit="samples/s", ours=n / dt, mem_ours=bench.peak_gib(), batch=n,
               trainable_params=count_parameters(model))  # fmt: skip
    _free(opt)
    return out


def _hf_lm_batch(hf, llm_inputs: dict, nq: int, device) -> dict:
    """Our OPT LM inputs in transformers' placeholder layout: ``[<image>×Q ; ids]``, labels -100 on the queries."""
    ids, mask, labels = (llm_inputs[k] for k in ("input_ids", "attention_mask", "labels"))
    b = ids.shape[0]
    image = torch.full((b, nq), hf.config.image_token_index, dtype=ids.dtype)
    cat = {"input_ids": (image, ids), "attention_mask": (torch.ones_like(image), mask),
           "labels": (torch.full_like(image, -100), labels)}  # fmt: skip
    return {k: torch.cat(v, 1).to(device) for k, v in cat.items()}


def _train_step_fn(bench, cfg, params, loss_fn, fused_from_library: bool):
    """One optimizer step closure: ours uses the library optimizer (fused on CUDA), transformers plain AdamW."""
    if fused_from_library:
        opt = build_optimizer(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    scaler = bench.scaler(cfg)

    def step():
        with bench.amp(cfg):
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step, opt


def row_stage2(bench: Any, model, cfg, name: str, hf=None) -> dict:
    """Stage-2 step, ours and (OPT) transformers'; first a parity check of the loss in eval mode (no dropout)."""
    n = bench.sizes["s2_batch"]
    task = Stage2Task(model, max_txt_len=cfg.llm.max_txt_len)
    batch_cpu = {"image": images(bench, cfg, n), "text_input": texts(n, 12, seed=1)}
    extra = {}
    if hf is not None:  # same weights, same batch, eval mode: losses must agree (within the autocast precision)
        hb = _hf_lm_batch(hf, task.llm_inputs(batch_cpu), cfg.qformer.num_query_tokens, bench.device)
        px = batch_cpu["image"].to(bench.device)
        with torch.no_grad(), bench.amp(cfg):
            model.eval()
            ours_loss = model.lm_loss(px, task.llm_inputs(batch_cpu)).float().item()
            hf_loss = hf(pixel_values=px, **hb).loss.float().item()
        extra = dict(loss_ours=ours_loss, loss_hf=hf_loss, loss_abs_diff=abs(ours_loss - hf_loss))
    task.train()

    def ours_loss_fn():
        return task(
            {"image": batch_cpu["image"].to(bench.device, non_blocking=True), "text_input": batch_cpu["text_input"]}
        )["loss"]

    bench.reset_memory()
    step, opt = _train_step_fn(bench, cfg, param_groups(model, 0.05), ours_loss_fn, True)
    out = dict(row=name, unit="samples/s", ours=n / bench.timed(step), mem_ours=bench.peak_gib(), batch=n,
               trainable_params=count_parameters(model), **extra)  # fmt: skip
    _free(opt)
    model.zero_grad(set_to_none=True)
    model.eval()
    if hf is not None:
        trainable = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")
        params = [p for k, p in hf.named_parameters() if k.startswith(trainable)]
        for p in params:
            p.requires_grad_(True)
        hf.train()
        hf.vision_model.eval()  # frozen towers without dropout, as ours
        hf.language_model.eval()
        bench.reset_memory()
        hf_loss_fn = lambda: hf(pixel_values=batch_cpu["image"].to(bench.device, non_blocking=True), **hb).loss  # noqa: E731
        step, opt = _train_step_fn(bench, cfg, params, hf_loss_fn, False)
        out.update(
            hf=n / bench.timed(step), mem_hf=bench.peak_gib(), trainable_params_hf=sum(p.numel() for p in params)
        )
        _free(opt)
        hf.requires_grad_(False).eval()
    return out
