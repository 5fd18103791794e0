"""Training-step levers of issue 22, each timed OFF and ON in one process on the same model and batch.

Rows (printed as a table, also written as JSON with ``--out``):

* ``stage1_itm_kv_reuse``    stage-1 step (ViT-g frozen, batch 128): cross-attention K/V computed once per image and
                             step, gathered per ITM pair (on) vs projected again for each pair (off); samples/s both,
                             ratio, peak memory, and |loss difference| of one eval-mode forward with the same draws.
* ``stage2_label_head_opt``  stage-2 step (ViT-g + OPT-2.7B, batch 32): the LM head and its fp32 upcast only at label
                             positions (on) vs at every position (off); samples/s, ratio, peak memory, |loss diff|.
* ``stage1_compile``         stage-1 step with the Q-Former compiled (Inductor workaround, ``blip2lib.inductor``) vs
                             eager (on = compiled); only with ``--compile`` (compilation takes minutes).

The same model serves both sides of a row, so the ratio is free of build-to-build noise; the optimizer keeps
stepping, so "off" runs first, then "on". Exactness per lever: docs/fidelity.md.

Usage:  python benchmarks/rows_train_levers.py --out benchmarks/measured/levers_h100.json   (GPU host)
        python benchmarks/rows_train_levers.py --tiny                                      (tiny configs, CPU)
        python benchmarks/rows_train_levers.py --flops 128      (FLOPs of the full-size stage-1 step, any machine)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import blip2lib.llm  # noqa: E402
from blip2lib.inductor import compile_inplace  # noqa: E402
from blip2lib.optim import param_groups  # noqa: E402
from blip2lib.tasks import Stage1Task, Stage2Task  # noqa: E402
from blip2lib.toy.synthetic import tiny_bert_tokenizer  # noqa: E402

_spec = importlib.util.spec_from_file_location("benchmarks_gpu", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)  # Bench (timing, memory, autocast), build
_spec.loader.exec_module(gpu)  # (gpu.py puts benchmarks/ on sys.path for its row modules)
from decode_rows import images, texts  # noqa: E402  synthetic inputs shared with the decode rows
from train_rows import _train_step_fn  # noqa: E402  the optimizer step the stage rows time

ROWS = ("stage1_itm_kv_reuse", "stage2_label_head_opt", "stage1_compile")


def _step_fn(bench, cfg, model, loss_fn):
    """One optimizer step (library optimizer, GradScaler as the policy asks) around ``loss_fn``: gpu.py's own step."""
    return _train_step_fn(bench, cfg, param_groups(model, 0.05), loss_fn, True)


def _eval_loss(bench, cfg, model, loss_fn) -> float:
    """One eval-mode forward (no dropout) with the RNG reset, so both sides draw the same ITM negatives."""
    was = model.training
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad(), bench.amp(cfg):
        loss = float(loss_fn())
    model.train(was)
    return loss


def _off_on(bench, cfg, model, name: str, loss_fns: dict, n: int, switch) -> dict:
    """Time ``loss_fns[False]`` then ``loss_fns[True]`` as training steps; ``switch(on)`` is a context per side."""
    r = dict(row=name, unit="samples/s", batch=n)
    losses = {}
    for on in (False, True):  # parity first, on the same (initial) weights: the timed steps then move them
        with switch(on):
            losses[on] = _eval_loss(bench, cfg, model, loss_fns[on])
    for on in (False, True):
        with switch(on):
            bench.reset_memory()
            step, opt = _step_fn(bench, cfg, model, loss_fns[on])
            r["on" if on else "off"] = n / bench.timed(step)
            r["mem_on" if on else "mem_off"] = bench.peak_gib()
            gpu._free(opt)
            model.zero_grad(set_to_none=True)
    r["ratio"] = r["on"] / r["off"]
    r["loss_abs_diff"] = abs(losses[True] - losses[False])
    return r


def row_kv_reuse(bench) -> dict:
    cfg = bench.config(None)
    model = gpu.build(bench, cfg).train()
    n = bench.sizes["s1_batch"]
    px, caps = images(bench, cfg, n), texts(n, (8, 14))
    tok = tiny_bert_tokenizer(cfg.qformer.vocab_size)
    tasks = {on: Stage1Task(model, tok, max_txt_len=cfg.max_txt_len, itm_kv_reuse=on).train() for on in (False, True)}
    fns = {on: functools.partial(lambda t: t({"image": px.to(bench.device), "text_input": caps})["loss"], tasks[on])
           for on in (False, True)}  # fmt: skip
    out = _off_on(bench, cfg, model, "stage1_itm_kv_reuse", fns, n, lambda on: contextlib.nullcontext())
    gpu._free(model)
    return out


def row_label_head(bench) -> dict:
    cfg = bench.config("opt2.7b")
    model = gpu.build(bench, cfg).train()
    n = bench.sizes["s2_batch"]
    task = Stage2Task(model, max_txt_len=cfg.llm.max_txt_len).train()
    batch = {"image": images(bench, cfg, n), "text_input": texts(n, 12, seed=1)}
    fn = lambda: task({"image": batch["image"].to(bench.device), "text_input": batch["text_input"]})["loss"]  # noqa: E731
    full = functools.partial(blip2lib.llm.llm_loss, label_logits_only=False)  # the model's own loss, every position

    def switch(on):
        return contextlib.nullcontext() if on else mock.patch.object(blip2lib.llm, "llm_loss", full)

    out = _off_on(bench, cfg, model, "stage2_label_head_opt", {False: fn, True: fn}, n, switch)
    gpu._free(model)
    return out


def row_compile(bench) -> dict:
    cfg = bench.config(None)
    model = gpu.build(bench, cfg).train()
    n = bench.sizes["s1_batch"]
    px, caps = images(bench, cfg, n), texts(n, (8, 14))
    task = Stage1Task(model, tiny_bert_tokenizer(cfg.qformer.vocab_size), max_txt_len=cfg.max_txt_len).train()
    fn = lambda: task({"image": px.to(bench.device), "text_input": caps})["loss"]  # noqa: E731

    q, compiled = model.qformer, {}

    @contextlib.contextmanager
    def switch(on):  # nn.Module.compile keeps the compiled callable in _compiled_call_impl: swap it in and out
        if on and "impl" not in compiled:
            compile_inplace(q)  # the first calls (parity, then warm-up) compile
            compiled["impl"] = q._compiled_call_impl
        q._compiled_call_impl = compiled.get("impl") if on else None
        try:
            yield
        finally:
            q._compiled_call_impl = None

    out = _off_on(bench, cfg, model, "stage1_compile", {False: fn, True: fn}, n, switch)
    gpu._free(model)
    return out


def flops_kv_reuse(bench, batch: int) -> dict:
    """FLOPs of one stage-1 step (forward + backward) with the ITM K/V lever off and on, counted on the meta device.

    Independent of the machine and its load (``torch.utils.flop_counter``; matmuls and attention only), so it runs
    anywhere, full size included. Fixed negatives (the next image and the text after next) keep both sides equal.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from blip2lib.model import Blip2QFormerModel

    cfg = bench.config(None)
    model = Blip2QFormerModel(cfg, device="meta").train()
    px = torch.empty(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device="meta")
    caps = texts(batch, (8, 14))

    def sampler(sim_i2t, sim_t2i, rank, image_ids=None, image_ids_all=None):
        ar = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
        return (ar + 1) % len(ar), (ar + 2) % len(ar)

    flops = {}
    for on in (False, True):
        task = Stage1Task(model, tiny_bert_tokenizer(cfg.qformer.vocab_size), max_txt_len=cfg.max_txt_len,
                          negative_sampler=sampler, itm_kv_reuse=on).train()  # fmt: skip
        with FlopCounterMode(display=False) as counter:
            task({"image": px, "text_input": caps})["loss"].backward()
        flops[on] = counter.get_total_flops()
    return dict(row="flops_stage1_itm_kv_reuse", unit="TFLOP/step", batch=batch, off=flops[False] / 1e12,
                on=flops[True] / 1e12, ratio=flops[False] / flops[True], loss_abs_diff=0.0, device="meta")  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke run)")
    p.add_argument("--compile", action="store_true", help="also the stage1_compile row")
    p.add_argument("--only", default="", help=f"comma-separated rows from {', '.join(ROWS)}")
    p.add_argument("--out", default="", help="write the rows as JSON to this file")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per side")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads in --tiny mode")
    p.add_argument("--flops", type=int, default=0, metavar="B", help="only count stage-1 FLOPs off/on at batch B")
    args = p.parse_args(argv)
    gargs = gpu.parse_args(["--no-hf"] + (["--tiny"] if args.tiny else []))
    gargs.iters, gargs.warmup = args.iters, args.warmup
    bench = gpu.Bench(gargs)
    if bench.tiny:
        torch.set_num_threads(args.threads)
    if args.flops:
        r = flops_kv_reuse(bench, args.flops)
        print(f"{r['row']} batch {r['batch']}: off {r['off']:.4g}, on {r['on']:.4g} TFLOP/step ({r['ratio']:.3f}x)")
        return [r]
    want = {s.strip() for s in args.only.split(",") if s.strip()} or set(ROWS[:2]) | (
        {ROWS[2]} if args.compile else set()
    )
    if want - set(ROWS):
        raise SystemExit(f"--only: unknown rows {sorted(want - set(ROWS))}; rows are {ROWS}")
    fns = {"stage1_itm_kv_reuse": row_kv_reuse, "stage2_label_head_opt": row_label_head, "stage1_compile": row_compile}
    rows, t0 = [], time.perf_counter()
    for name in ROWS:
        if name in want:
            bench.row, bench.calls = name, 0
            rows.append({**fns[name](bench), "device": str(bench.device)})
            print(json.dumps(rows[-1]), flush=True)
    wall = time.perf_counter() - t0
    print(f"\n{'row':<24}{'off':>12}{'on':>12}{'ratio':>8}{'|dloss|':>10}   ({bench.device}, {wall:.0f} s)")
    for r in rows:
        print(f"{r['row']:<24}{r['off']:>12.1f}{r['on']:>12.1f}{r['ratio']:>8.3f}{r['loss_abs_diff']:>10.2e}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(bench.device), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
