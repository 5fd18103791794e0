"""CLI: ``python -m blip2lib.data {prepare,dedup,formats} ...`` (no network access)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .dedup import dedup_report, image_paths
from .prepare import DATASETS, prepare
from .readers import FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m blip2lib.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert an official download to the reader formats and check its sizes")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--src", required=True, help="folder with the official files (as unzipped)")
    p.add_argument("--out", required=True, help="data_root to write under (e.g. data/)")
    p.add_argument("--link-images", action="store_true", help="symlink the official image folders into data_root")

    d = sub.add_parser("dedup", help="report pre-training images that also appear in evaluation splits")
    d.add_argument("--pretrain", nargs="+", required=True, help="LAVIS-format annotation files used for training")
    d.add_argument("--eval", nargs="+", required=True, metavar="NAME=FILE", help="evaluation splits, e.g. test=a.json")
    d.add_argument("--by", choices=("coco_id", "hash"), default="coco_id")
    d.add_argument("--pretrain-root", default=None, help="image folder of the pre-training paths (--by hash)")
    d.add_argument("--eval-root", default=None, help="image folder of the evaluation paths (--by hash)")
    d.add_argument("--report", default=None, help="write the JSON report here (default: stdout)")

    sub.add_parser("formats", help="print the annotation formats the readers take (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
    print(json.dumps(FORMATS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
