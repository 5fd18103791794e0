"""Frozen-feature store: the frozen ViT's output for each training image, computed once, read by later runs.

For runs without image augmentation (augment: none — evaluation, ablations, your choice; never the stage-1 paper
recipe's random crop + flip). Build it with the run's params file, then set ``feature_store: DIR`` in that file:
the run checks the store was made by the same tower, precision, image size and transform, and refuses it otherwise.
An interrupted build continues where it stopped when run again.

examples:
  python -m blip2lib.featstore build params/20_stage2_pretrain/my_run.yaml --out features/coco_vitg
  python -m blip2lib.featstore info features/coco_vitg
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import add_verbosity, log_level, run_guarded


def main(argv: list[str] | None = None) -> int:
    """``python -m blip2lib.featstore build PARAMS --out DIR`` | ``info DIR``; exit 2 on a user error."""
    ap = argparse.ArgumentParser(prog="python -m blip2lib.featstore", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compute and store the tower's features of a params file's training images",
                       epilog="example: python -m blip2lib.featstore build my.yaml --out features/my")  # fmt: skip
    b.add_argument("params", help="flat YAML of TrainParams keys (the run that will read the store)")
    b.add_argument("--out", required=True, help="store folder: new, empty, or a store this command started")
    b.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024)")
    b.add_argument("--batch-size", type=int, default=64, help="images per tower pass (default 64)")
    b.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    add_verbosity(b)
    i = sub.add_parser("info", help="print a store's tower identity and size (JSON)",
                       epilog="example: python -m blip2lib.featstore info features/my_run")  # fmt: skip
    i.add_argument("store", help="store folder")
    add_verbosity(i)
    args = ap.parse_args(argv)
    logging.basicConfig(level=log_level(args), format="%(message)s")

    def body() -> int:
        from .store import FeatureStore

        if args.cmd == "info":
            store = FeatureStore(args.store, require_complete=False)
            info = {**store.meta, "images": len(store), "bad": len(store.bad), "shards": len(store.shards),
                    "feature_shape": store.feature_shape}  # fmt: skip
            print(json.dumps(info, indent=1))
            return 0
        from ..train_params import load_train_params
        from .build import build_store

        params = load_train_params(args.params)
        print(json.dumps(build_store(params, args.out, args.shard_size, args.batch_size, args.device)))
        return 0

    return run_guarded(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
