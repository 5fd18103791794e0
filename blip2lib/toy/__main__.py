"""``python -m blip2lib.toy build [--out DIR] [--seed N] [--size full|tiny] [--force]``: build and summarise.

Example: ``python -m blip2lib.toy build --size tiny`` (seconds) or ``python -m blip2lib.toy build`` (the demo's world).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import add_verbosity, log_level, run_guarded


def _table(world) -> str:
    b = world.baselines
    rows = [f"toy world: {world.root}", f"data_root: {world.data_root}", ""]
    rows.append(f"{'split':<7} {'model':<22} {'overall':>8} {'attr':>7} {'count':>7} {'exist':>7} {'relation':>8}")
    for split, res in b["vqa"].items():
        for name in ("opt_blind", "opt_oracle", "t5_blind", "t5_oracle", "majority_per_family"):
            r = res[name]
            rows.append(
                f"{split:<7} {name:<22} {r['overall']:>8.2f} {r.get('attribute', 0):>7.2f} {r.get('count', 0):>7.2f} "
                f"{r.get('exist', 0):>7.2f} {r.get('relation', 0):>8.2f}"
            )
    rows.append("")
    for split, res in b["vision_probe"].items():
        rows.append(f"vision probe ({split}): " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
    for split, res in b["retrieval_chance"].items():
        rows.append(f"retrieval chance ({split}): " + json.dumps(res))
    rows.append("build seconds: " + json.dumps(b["build_seconds"]))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Build (or load) the toy world and print its baselines; exit status 2 on a user error (bad ``--out``)."""
    parser = argparse.ArgumentParser(prog="python -m blip2lib.toy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build", help="build (or load from cache) the toy world and print its baselines",
                       epilog="examples:\n  python -m blip2lib.toy build --size tiny   # seconds\n"
                       "  python -m blip2lib.toy build               # the demo's world",
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default=None, help="world folder (default: $BLIP2LIB_CACHE/toy/<key>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    add_verbosity(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(args), format="%(message)s")

    def body() -> int:
        from .build import build_toy_world  # after parsing: --help stays free of torch

        print(_table(build_toy_world(args.out, seed=args.seed, force=args.force, size=args.size)))
        return 0

    return run_guarded(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
