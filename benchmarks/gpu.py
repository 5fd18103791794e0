"""One-process GPU benchmark of the full-size BLIP-2 architectures on random weights (no checkpoint needed).

Rows (one table, also written as JSON with ``--out``):

* ``vit_forward``            frozen EVA ViT-g forward (+ ``ln_vision``), batch 128: images/s — stage 1's roofline.
* ``stage1_train``           stage-1 step (ITC + ITM + ITG, docs/paper_map.md §2), ViT-g frozen, batch 128: samples/s,
                             peak memory.
* ``stage2_train_opt2.7b``   stage-2 step (docs/paper_map.md §3.1), ViT-g + OPT-2.7B, batch 32, ours AND transformers'
                             ``Blip2ForConditionalGeneration`` on the same weights: samples/s, peak memory, ratio.
* ``stage2_train_flant5xl``  the same step with FlanT5-XL (docs/paper_map.md §3.2, prefix LM), ours only.
* ``caption_greedy`` / ``caption_beam5``  ViT-g + OPT-2.7B captioning, batch 64, exactly 30 new tokens (EOS
                             suppressed so every row does the same work), our decode loop (``--engine``) vs
                             transformers' ``generate``: images/s of both, ratio, the fraction of identical token
                             ids and the largest logit difference over the first decode steps.
* ``vqa_opt2.7b`` / ``vqa_flant5xl``  zero-shot VQA generation (beam 5, ≤ 10 new tokens, length penalty -1,
                             docs/paper_map.md §5.1), one soft prompt per question: questions/s and the projected
                             time for VQAv2 val (214,354 questions).
* ``vqav2_pipeline``         the grouped evaluation pipeline (one soft prompt per image, length-sorted question
                             batches), OPT-2.7B, beam 5: measured images/s and questions/s, and the projected VQAv2
                             val run (40,504 images, 214,354 questions).

* ``featstore_read``         the disk-backed frozen-feature store (``python -m blip2lib.featstore``): stored features
                             read per second against the live tower's images/s, build images/s and store size.

The rows live in ``benchmarks/train_rows.py`` (ViT, stage 1, stage 2), ``benchmarks/decode_rows.py`` (generation) and
``benchmarks/rows_featstore.py`` (the feature store).

Precision policy (``--dtype policy``, docs/paper_map.md §3.3 and ``Blip2Base.place``): frozen ViT and OPT fp16, FlanT5
bf16; Q-Former, queries, ``ln_vision`` and projections fp32 master weights under autocast (fp16 + GradScaler for ViT/OPT
rows, bf16 for FlanT5). The transformers twin gets exactly the same per-module dtypes and autocast; its trainable set is
query_tokens + qformer + language_projection + post_layernorm (= our ``ln_vision``). ``--dtype bf16`` runs everything
low-precision in bf16.

Usage:  python benchmarks/gpu.py --out benchmarks/results_h100.json     (GPU host, ≤ 8 min on one H100)
        python benchmarks/gpu.py --only caption,vqa --engine static      (our static decode engine; default auto)
        python benchmarks/gpu.py --tiny --out /tmp/tiny.json            (same code, tiny configs, CPU, seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the row modules beside this file

from decode_rows import row_caption, row_vqa, row_vqav2_pipeline  # noqa: E402
from rows_featstore import row_featstore  # noqa: E402
from train_rows import _free, row_stage1, row_stage2, row_vit  # noqa: E402

from blip2lib.checkpoint import git_state  # noqa: E402
from blip2lib.config import PRESETS, Blip2Config, tiny_config  # noqa: E402
from blip2lib.generation import ENGINES  # noqa: E402
from blip2lib.inductor import compile_inplace  # noqa: E402
from blip2lib.model import Blip2, Blip2QFormerModel  # noqa: E402
from blip2lib.toy.synthetic import tiny_llm_tokenizer  # noqa: E402

GIB = 2**30
ROWS = tuple("vit_forward stage1_train stage2_train_opt2.7b stage2_train_flant5xl caption_greedy caption_beam5 "
             "vqa_opt2.7b vqa_flant5xl vqav2_pipeline featstore_read".split())  # fmt: skip
# Reference figures (one H100, torch 2.11, transformers 5.17, random weights) and goals from the issue.
REFERENCE = {"vit_forward": "882 img/s (bf16)", "stage2_train_opt2.7b": "HF 222 samples/s, 14.1 GiB (fp16)",
             "caption_greedy": "HF 160 img/s", "caption_beam5": "HF 69 img/s"}  # fmt: skip
GOALS = {"stage1_train": "≥ 600 samples/s", "stage2_train_opt2.7b": "≥ 2× HF, mem ≤ HF",
         "caption_greedy": "≥ 2× HF, tokens identical", "caption_beam5": "≥ 2× HF, tokens identical",
         "vqa_opt2.7b": "VQAv2 val ≤ 15 min", "vqav2_pipeline": "VQAv2 val ≤ 15 min"}  # fmt: skip
FULL = dict(vit_batch=128, s1_batch=128, s2_batch=32, gen_batch=64, vqa_batch=64, warmup=3, iters=10, gen_iters=3)
TINY = dict(vit_batch=4, s1_batch=8, s2_batch=4, gen_batch=4, vqa_batch=4, warmup=1, iters=2, gen_iters=1)


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: timing, memory, inputs


class Bench:
    """Device, precision and iteration counts shared by every row."""

    def __init__(self, args: argparse.Namespace):
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.sizes = dict(TINY if args.tiny else FULL)
        for k in ("warmup", "iters", "gen_iters"):
            if getattr(args, k) is not None:
                self.sizes[k] = getattr(args, k)
        self.dtype, self.compile, self.hf = args.dtype, args.compile, not args.no_hf
        self.engine = args.engine  # our generation rows' decode loop (blip2lib.generation engine)
        self.profile = Path(args.profile) if args.profile else None
        self.row, self.calls = "", 0  # the row being measured and its timed calls so far (names profile sections)

    def config(self, llm: str | None) -> Blip2Config:
        """Full-size preset (or the tiny config of the same classes); ``--dtype bf16`` overrides the towers."""
        if self.tiny:
            return tiny_config(llm={None: None, "opt2.7b": "opt", "flant5xl": "t5"}[llm])
        cfg = PRESETS["vitg" + (f"_{llm}" if llm else "")]
        if self.dtype == "bf16":
            llm_cfg = dataclasses.replace(cfg.llm, precision="bf16") if cfg.llm else None
            cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, precision="bf16"), llm=llm_cfg)
        return cfg

    def amp(self, cfg: Blip2Config):
        """Autocast of a step: fp16 (ViT/OPT policy) or bf16 (FlanT5 / --dtype bf16); disabled on CPU."""
        low = cfg.llm.precision if cfg.llm is not None else cfg.vision.precision
        dt = torch.bfloat16 if low == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dt, enabled=self.cuda)

    def scaler(self, cfg: Blip2Config) -> torch.amp.GradScaler:
        low = cfg.llm.precision if cfg.llm is not None else cfg.vision.precision
        # "fp16_lavis" (the ViT's default: Linear/Conv halves under fp16 autocast) trains with a scaler like "fp16".
        return torch.amp.GradScaler(self.device.type, enabled=self.cuda and low in ("fp16", "fp16_lavis"))

    def timed(self, fn, iters: int | None = None) -> float:
        """Seconds per call of ``fn`` after warm-up (CUDA events on a GPU, perf_counter on a CPU).

        With ``--profile FILE`` two more calls run afterwards under ``torch.profiler`` (outside the timing) and their
        top operators by device time are appended to FILE, one section per timed call.
        """
        iters = iters or self.sizes["iters"]
        for _ in range(self.sizes["warmup"]):
            fn()
        dt = self._time(fn, iters)
        if self.profile is not None:
            self._profile(fn, dt)
        self.calls += 1
        return dt

    def _profile(self, fn, dt: float) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                fn()
            if self.cuda:
                torch.cuda.synchronize()
        sort = "cuda_time_total" if self.cuda else "cpu_time_total"
        who = "ours" if self.calls == 0 else "transformers"  # every row times ours first, then its HF baseline
        section = f"=== {self.row}, {who} (timed call: {dt * 1e3:.2f} ms; profile of 2 calls, by {sort})\n"
        self.profile.parent.mkdir(parents=True, exist_ok=True)
        with self.profile.open("a") as f:
            f.write(section + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60) + "\n")

    def _time(self, fn, iters: int) -> float:
        if not self.cuda:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t) / iters
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        """Peak allocated memory since the last reset (None on a CPU: not measured)."""
        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None


def build(bench: Bench, cfg: Blip2Config):
    """Our model on the device with the dtype policy applied (``Blip2Base.place``), optionally compiled."""
    torch.manual_seed(0)
    if cfg.llm is None:
        model = Blip2QFormerModel(cfg, device=bench.device)
    else:
        model = Blip2(cfg, device=bench.device, tokenizer=tiny_llm_tokenizer(cfg.llm.family, _vocab(cfg)))
    model.place(bench.device).eval()  # rows that train switch to train mode themselves (dropout on the Q-Former)
    if bench.compile:  # in place: state-dict names unchanged; with the Inductor workaround (compile_inplace)
        compile_inplace(model.vision_model)
        compile_inplace(model.qformer)
    return model


def _vocab(cfg: Blip2Config) -> int:
    return cfg.llm.hf_config.get("vocab_size", 99)


def hf_twin(model: Blip2):
    """transformers ``Blip2ForConditionalGeneration`` sharing ``model``'s tensors (no second copy in memory).

    Keys and config come from :mod:`blip2lib.convert` (``ours_to_hf``, ``hf_config_dict``); ``post_layernorm`` gets
    our ``ln_vision`` eps (1e-5) so that both sides compute the same function (docs/paper_map.md §8.3 eps difference).
    """
    from transformers import Blip2Config as HFConfig
    from transformers import Blip2ForConditionalGeneration

    from blip2lib.convert import hf_config_dict, ours_to_hf

    cfg = model.config
    text = model.language_model.config.to_dict()
    hcfg = HFConfig(**hf_config_dict(cfg, text, image_token_index=text["vocab_size"] - 1))
    hcfg._attn_implementation = "sdpa"  # same kernels as ours
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(hcfg)
    sd, _ = ours_to_hf(model.state_dict(), cfg.vision)
    hf.load_state_dict(sd, strict=True, assign=True)
    hf.vision_model.post_layernorm.eps = cfg.vision.ln_vision_eps
    bad = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if bad:
        raise RuntimeError(f"transformers twin left on the meta device: {bad[:5]}")
    hf.requires_grad_(False).eval()
    return hf


# ---------------------------------------------------------------------------------------------------------------
# Driver


def _goal_met(r: dict) -> bool | None:
    name = r["row"]
    if name == "stage1_train":
        return r["ours"] >= 600
    if name == "stage2_train_opt2.7b" and "hf" in r:
        return r["ratio"] >= 2 and (r["mem_ours"] is None or r["mem_ours"] <= r["mem_hf"])
    if name.startswith("caption") and "hf" in r:
        return r["ratio"] >= 2 and r["token_agreement"] == 1.0
    if name in ("vqa_opt2.7b", "vqav2_pipeline"):
        return r["projected_vqav2_val_min"] <= 15
    return None


def run(bench: Bench, only: set[str], save=None) -> list[dict]:
    """Build each architecture once, run its selected rows, free it before the next one.

    A row that raises is recorded with its error and the others still run (one shot on a lent GPU must not lose the
    rest); ``save(rows)`` is called after every row so that a run killed at its time limit keeps what it measured.
    Returns the raw rows: :func:`finish` adds ratios, goals and verdicts.
    """
    rows: list[dict] = []
    want = only.__contains__

    def log(r):
        rows.append(r)
        print(f"  {r['row']:<24} done at {time.perf_counter() - t0:6.1f} s", flush=True)
        if save is not None:
            save(rows)

    def attempt(name, fn, *args):
        if not want(name):
            return
        bench.row, bench.calls = name, 0
        try:
            log(fn(*args))
        except Exception as e:  # noqa: BLE001 — reported in the table and the exit status
            traceback.print_exc()
            log(dict(row=name, unit="—", ours=None, batch=None, error=f"{type(e).__name__}: {e}"[:500]))
            if bench.cuda:
                torch.cuda.empty_cache()

    t0 = time.perf_counter()
    if want("vit_forward") or want("stage1_train"):
        cfg = bench.config(None)
        model = build(bench, cfg)
        attempt("vit_forward", row_vit, bench, model, cfg)
        attempt("stage1_train", row_stage1, bench, model, cfg)
        _free(model)
        del model
    opt_rows = {"stage2_train_opt2.7b", "caption_greedy", "caption_beam5", "vqa_opt2.7b", "vqav2_pipeline"}
    if opt_rows & only:
        cfg = bench.config("opt2.7b")
        model = build(bench, cfg)
        hf = hf_twin(model) if bench.hf and (only & (opt_rows - {"vqa_opt2.7b", "vqav2_pipeline"})) else None
        # Generation first: both models still hold the initial (identical, shared) weights.
        attempt("caption_greedy", row_caption, bench, model, cfg, 1, hf)
        attempt("caption_beam5", row_caption, bench, model, cfg, 5, hf)
        attempt("vqa_opt2.7b", row_vqa, bench, model, cfg, "vqa_opt2.7b")
        attempt("vqav2_pipeline", row_vqav2_pipeline, bench, model, cfg)
        attempt("stage2_train_opt2.7b", row_stage2, bench, model, cfg, "stage2_train_opt2.7b", hf)
        _free(hf, model)
        del hf, model
    if {"stage2_train_flant5xl", "vqa_flant5xl"} & only:
        cfg = bench.config("flant5xl")
        model = build(bench, cfg)
        attempt("vqa_flant5xl", row_vqa, bench, model, cfg, "vqa_flant5xl")
        attempt("stage2_train_flant5xl", row_stage2, bench, model, cfg, "stage2_train_flant5xl")
        _free(model)
        del model
    attempt("featstore_read", row_featstore, bench)  # benchmarks/rows_featstore.py
    return rows


def finish(bench: Bench, rows: list[dict]) -> list[dict]:
    """Ratio, reference, goal and verdict of each row, in table order (rows that failed get no verdict)."""
    for r in rows:
        if r.get("hf") and r.get("ours"):
            r["ratio"] = r["ours"] / r["hf"]
        r["reference"], r["goal"] = REFERENCE.get(r["row"]), GOALS.get(r["row"])
        r["goal_met"] = None if bench.tiny or "error" in r else _goal_met(r)
    return sorted(rows, key=lambda r: ROWS.index(r["row"]))


def header(bench: Bench, argv: list[str]) -> dict:
    import timm
    import transformers

    git = git_state(Path(__file__).parent)
    return dict(
        gpu=torch.cuda.get_device_name() if bench.cuda else f"none (CPU: {platform.processor() or platform.machine()})",
        mode="tiny (CPU smoke run — NOT performance)" if bench.tiny else "full size",
        torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__, timm=timm.__version__,
        python=platform.python_version(), date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=shlex.join(["python", "benchmarks/gpu.py", *argv]), commit=(git["commit"] or "")[:7],
        dirty=git["dirty"], dtype=bench.dtype, compile=bench.compile, engine=bench.engine, sizes=bench.sizes,
    )  # fmt: skip


def _fmt(x, nd=1) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _fmt_sci(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def table(rows: list[dict]) -> str:
    cols = ["row", "unit", "batch", "ours", "HF", "ratio", "GiB ours", "GiB HF", "same tokens", "max |Δlogit|",
            "VQAv2 min", "goal", "met"]  # fmt: skip
    lines = [cols] + [[r["row"], r["unit"], _fmt(r["batch"]), _fmt(r["ours"]), _fmt(r.get("hf")),
                       _fmt(r.get("ratio"), 2), _fmt(r.get("mem_ours"), 2), _fmt(r.get("mem_hf"), 2),
                       _fmt(r.get("token_agreement"), 3), _fmt_sci(r.get("max_logit_diff")),
                       _fmt(r.get("projected_vqav2_val_min")), r["goal"] or "",
                       "ERROR" if "error" in r else _fmt(r["goal_met"])] for r in rows]  # fmt: skip
    w = [max(len(str(line[i])) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(str(c).ljust(w[i]) for i, c in enumerate(line)).rstrip() for line in lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke run, seconds)")
    p.add_argument("--only", default="", help=f"comma-separated rows or prefixes from {', '.join(ROWS)}")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    p.add_argument("--dtype", choices=("policy", "bf16"), default="policy", help="precision (see the docstring)")
    p.add_argument("--compile", action="store_true", help="torch.compile our vision tower and Q-Former in place")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="our decode loop in the generation rows "
                   "(blip2lib.generation engine; transformers' generate is always the baseline)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per row")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per training/forward row")
    p.add_argument("--gen-iters", type=int, default=None, help="timed iterations per generation row")
    p.add_argument("--threads", type=int, default=1, help="CPU threads in --tiny mode")
    p.add_argument("--profile", default="", help="append a torch.profiler operator table per timed call to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench = Bench(args)
    if bench.tiny:
        torch.set_num_threads(args.threads)
    sel = [s.strip() for s in args.only.split(",") if s.strip()]
    only = {r for r in ROWS if not sel or any(r == s or r.startswith(s) for s in sel)}
    if not only:
        raise SystemExit(f"--only {args.only!r} matches no row of {ROWS}")
    meta = header(bench, argv)
    print("\n".join(f"{k:>12}: {v}" for k, v in meta.items()), flush=True)
    t = time.perf_counter()

    def save(rows: list[dict], complete: bool = False) -> dict:
        result = {"meta": {**meta, "wall_s": time.perf_counter() - t, "complete": complete},
                  "rows": finish(bench, [dict(r) for r in rows])}  # fmt: skip
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out).with_suffix(".partial")
            tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
            tmp.replace(args.out)
        return result

    result = save(run(bench, only, save), complete=True)
    rows = result["rows"]
    print("\n" + table(rows) + f"\n\ntotal {result['meta']['wall_s']:.1f} s", flush=True)
    failed = [f"{r['row']} ({r['error']})" for r in rows if "error" in r]
    bad = [r["row"] for r in rows for k in ("ours", "hf") if r.get(k) is not None and not math.isfinite(r[k])]
    if failed or bad:
        raise SystemExit(f"failed rows: {failed}; non-finite throughput in rows {bad}")
    return result


if __name__ == "__main__":
    main()
