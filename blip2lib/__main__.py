"""``python -m blip2lib``: list the command-line entry points (each has ``--help`` with an example).

Kept free of heavy imports: printing this list must be instant.
"""

from __future__ import annotations

import sys

# (module, what it does, an example) — the order a new user meets them.
COMMANDS: list[tuple[str, str, str]] = [
    ("blip2lib.demo", "the toy-world demo: every notebook on the toy variant, then the report index",
     "python -m blip2lib.demo"),
    ("blip2lib.workbook", "run notebooks from params files (run, run-all, validate) and render HTML reports",
     "python -m blip2lib.workbook run params/10_stage1_pretrain/smoke.yaml"),
    ("blip2lib.workbook.gallery", "screenshots of a variant's reports for docs/gallery (headless Chromium)",
     "python -m blip2lib.workbook.gallery --variant toy"),
    ("blip2lib.toy", "build the embedded toy world (datasets in the official formats, frozen stage-0 models)",
     "python -m blip2lib.toy build --size tiny"),
    ("blip2lib.data", "prepare official dataset downloads into the layout the loaders read",
     "python -m blip2lib.data prepare coco_karpathy --src /data/raw/coco --out data/"),
    ("blip2lib.train", "train one stage from a params file (torchrun-ready)",
     "python -m blip2lib.train --params my_stage1.yaml --run-dir runs/my_stage1"),
    ("blip2lib.launch", "one node's share of a multi-node training run, same params and run folder (docs/multinode.md)",
     "python -m blip2lib.launch params/10_stage1_pretrain/my_2x8.yaml --node-rank 1"),
    ("blip2lib.featstore", "store the frozen ViT's features of the training images once (runs without augmentation)",
     "python -m blip2lib.featstore build my_stage2.yaml --out features/my_stage2"),
    ("blip2lib.evaluate", "evaluate a checkpoint on VQA, captioning or retrieval with the official scoring",
     "python -m blip2lib.evaluate vqa --params my_eval.yaml"),
    ("blip2lib.convert", "convert checkpoints between LAVIS, transformers and ours, verified numerically",
     "python -m blip2lib.convert lavis-to-hf blip2_pretrained_opt2.7b.pth --out blip2-opt-2.7b ..."),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Print the commands; any argument other than ``-h``/``--help`` is an error (exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("-h", "--help"):
        print(f"python -m blip2lib: unknown argument {argv[0]!r}; the commands are listed below", file=sys.stderr)
    print("blip2lib commands (python -m MODULE --help for each):\n")
    width = max(len(m) for m, _, _ in COMMANDS)
    for module, what, example in COMMANDS:
        print(f"  {module:<{width}}  {what}\n  {'':<{width}}  e.g. {example}")
    return 2 if argv and argv[0] not in ("-h", "--help") else 0


if __name__ == "__main__":
    sys.exit(main())
