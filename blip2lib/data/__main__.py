"""CLI: ``python -m blip2lib.data {prepare,dedup,formats} ...`` (no network access).

Examples::

    python -m blip2lib.data prepare coco_karpathy --src /data/raw/coco --out data/
    python -m blip2lib.data dedup --pretrain laion/ann.json --eval test=coco/annotations/coco_karpathy_test.json
    python -m blip2lib.data formats

A user mistake (a missing folder, a malformed file) is one ``error:`` line and exit status 2; ``-v`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import add_verbosity, log_level, run_guarded
from .dedup import dedup_report, image_paths
from .prepare import DATASETS, prepare


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m blip2lib.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    def example(line: str) -> dict:  # each subcommand's --help ends with an example of it
        return {"epilog": f"example:\n  python -m blip2lib.data {line}",
                "formatter_class": argparse.RawDescriptionHelpFormatter}  # fmt: skip

    p = sub.add_parser("prepare", help="convert an official download to the reader formats and check its sizes",
                       **example("prepare coco_karpathy --src /data/raw/coco --out data/"))  # fmt: skip
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--src", required=True, help="folder with the official files (as unzipped)")
    p.add_argument("--out", required=True, help="data_root to write under (e.g. data/)")
    p.add_argument("--link-images", action="store_true", help="symlink the official image folders into data_root")

    d = sub.add_parser("dedup", help="report pre-training images that also appear in evaluation splits",
                       **example("dedup --pretrain laion/ann.json --eval test=coco/karpathy_test.json"))  # fmt: skip
    d.add_argument("--pretrain", nargs="+", required=True, help="LAVIS-format annotation files used for training")
    d.add_argument("--eval", nargs="+", required=True, metavar="NAME=FILE", help="evaluation splits, e.g. test=a.json")
    d.add_argument("--by", choices=("coco_id", "hash"), default="coco_id")
    d.add_argument("--pretrain-root", default=None, help="image folder of the pre-training paths (--by hash)")
    d.add_argument("--eval-root", default=None, help="image folder of the evaluation paths (--by hash)")
    d.add_argument("--report", default=None, help="write the JSON report here (default: stdout)")

    f = sub.add_parser("formats", help="print the annotation formats the readers take (JSON)",
                       **example("formats > formats.json"))  # fmt: skip
    for one in (p, d, f):
        add_verbosity(one)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; exit status 2 on a user error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=log_level(args), format="%(levelname)s %(name)s: %(message)s")
    return run_guarded(lambda: _command(args), args.verbose)


def _command(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        result = prepare(args.dataset, args.src, args.out, link_images=args.link_images)
        for what, n in result["counts"].items():
            print(f"{args.dataset}: {what}: {n:,}")
        for msg in result["warnings"]:
            print(f"WARNING {msg}", file=sys.stderr)
        return 0
    if args.command == "dedup":
        evaluation = {}
        for item in args.eval:
            name, sep, path = item.partition("=")
            if not sep:
                name, path = item, item
            evaluation[name] = image_paths(path)
        report = dedup_report(image_paths(args.pretrain), evaluation, args.by, args.pretrain_root, args.eval_root)
        text = json.dumps(report, indent=2)
        if args.report:
            with open(args.report, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        else:
            print(text)
        return 0
    from .readers import FORMATS  # after parsing: the readers import torch

    print(json.dumps(FORMATS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
