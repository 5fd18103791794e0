"""``make demo``: build the embedded toy world and run the whole ``toy`` variant, then print the index report.

Runs every ``params/*/toy.yaml`` (stage 0 → stage 1 → stage 2 OPT and T5 → fine-tunings → every table → summary)
through the papermill runner, two at a time in dependency order, skipping steps whose outputs are current. A finished
step whose inputs changed since (a ``git pull`` touching the library, an edited params file) is stale: the demo lists
what changed and stops without touching it; ``make demo FORCE=1`` (``--force``) moves each stale run aside to
``<run>.prev-<time>`` and runs it again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

# Wall seconds of each toy step in a fresh-clone demo (measured at c7518e6, 2 cores, toy world v10; 32_finetune_vqa's
# 104 s scaled from its 1200 steps then to the 1800 it has now). Only the launch order of a first run uses them
# (runner._plan; later runs time their own previous run): with every step estimated at 60 s the two ablations started
# last and ran alone at the end (simulated 1076 → 1037 s).
TOY_WALLS = {
    "01_toy_world/toy": 153, "02_prepare_data/toy": 5, "10_stage1_pretrain/toy": 57, "20_stage2_pretrain/toy": 54,
    "30_finetune_caption/toy": 31, "31_finetune_retrieval/toy": 42, "32_finetune_vqa/toy": 132,
    "00_explore/toy": 7, "41_zeroshot_vqa/toy": 12, "42_captioning/toy": 11, "43_vqa_finetuned/toy": 10,
    "44_retrieval/toy": 22, "45_ablation_itg/toy": 86, "46_ablation_stage1/toy": 70, "50_parity/toy": 6,
    "90_summary/toy": 6,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the demo variant; exit status 0 on success, 1 with the failure page's path otherwise."""
    from .workbook.run import REPO_ROOT
    from .workbook.runner import StaleRun, run_all, variant_params

    ap = argparse.ArgumentParser(prog="python -m blip2lib.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python -m blip2lib.demo -j 2   (what `make demo` runs)")  # fmt: skip
    ap.add_argument("--variant", default="toy", help="params variant to run (default: toy)")
    ap.add_argument("--force", action="store_true",
                    help="redo stale and current steps, each old run moved aside to <run>.prev-<time>")  # fmt: skip
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no per-cell progress bar")
    ap.add_argument("-j", "--jobs", type=int, default=2,
                    help="notebooks executed at once (default 2: the toy models are too small for 2 threads to "
                         "help one notebook much; runner._plan gives each its threads)")  # fmt: skip
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:  # the runner's "[run ] / [done] / [skip]" lines
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    steps = variant_params(args.variant)
    print(
        f"==> blip2-workbook demo: {len(steps)} notebooks of the '{args.variant}' variant, {args.jobs} at a time "
        "(a step starts once the runs it reads are done):"
    )
    for p in steps:
        print(f"    {p.relative_to(REPO_ROOT)}")
    t0 = time.time()
    try:
        estimates = TOY_WALLS if args.variant == "toy" else None
        jobs = run_all(args.variant, force=args.force, progress=args.progress, jobs=args.jobs, estimates=estimates)
    except StaleRun as e:
        print(f"==> demo stopped: {e}", file=sys.stderr)
        print("==> nothing was deleted; `make demo FORCE=1` moves the stale runs aside and runs them again",
              file=sys.stderr)  # fmt: skip
        return 2
    except RuntimeError as e:
        print(f"==> demo stopped: {e}", file=sys.stderr)
        return 1
    index = REPO_ROOT / "reports" / args.variant / "index.html"
    if args.variant == "toy":
        from .workbook.summary import update_readme

        update_readme(REPO_ROOT / "README.md", REPO_ROOT / "runs", "toy")  # measured numbers, never typed in
        print("==> README.md 'Toy results' block updated from runs/*/toy/metrics.json")
    print(f"==> demo finished in {time.time() - t0:.0f} s: {len(jobs)} notebooks executed or current")
    print(f"==> open the reports: {index if index.exists() else jobs[-1].report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
