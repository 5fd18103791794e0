"""``python -m blip2lib.convert {lavis-to-hf,hf-to-lavis} ...``: convert a checkpoint, verify it, write it.

The command line lives here so the conversion library (``blip2lib.convert``) never imports the loaders
(``blip2lib.pretrained``): the loaders use the key maps, the command uses both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from ..errors import add_verbosity, log_level, run_guarded
from ..pretrained import from_pretrained, save_lavis, save_pretrained_hf  # torch-free until called
from . import CHECK_TOL
from . import __doc__ as _LIBRARY_DOC

_EXAMPLES = {  # each subcommand's --help ends with its own; the command's --help shows both
    "lavis-to-hf": "  python -m blip2lib.convert lavis-to-hf blip2_pretrained_opt2.7b.pth \\\n"
    "      --vision-weights eva_vit_g.pth --llm-path opt-2.7b --bert-dir bert-base-uncased \\\n"
    "      --out blip2-opt-2.7b-from-lavis",
    "hf-to-lavis": "  python -m blip2lib.convert hf-to-lavis blip2-opt-2.7b --out blip2_opt2.7b_from_hf.pth",
}


def main(argv: list[str] | None = None) -> int:
    """``python -m blip2lib.convert {lavis-to-hf,hf-to-lavis} ...``: convert, verify, write only if verified."""
    ap = argparse.ArgumentParser(
        prog="python -m blip2lib.convert",
        description=_LIBRARY_DOC.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(_EXAMPLES.values()),
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("lavis-to-hf", help="LAVIS .pth (+ ViT file, LLM dir, BERT dir) or our ckpt → transformers dir",
                       epilog="example:\n" + _EXAMPLES["lavis-to-hf"],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a.add_argument("checkpoint", help="LAVIS .pth (blip2_pretrained_opt2.7b.pth ...) or our ckpt-<step>/ dir")
    a.add_argument("--vision-weights", default=None, help="eva_vit_g.pth (pre-training files hold no ViT)")
    a.add_argument("--llm-path", default=None, help="local LLM dir (facebook/opt-2.7b, google/flan-t5-xl ...)")
    a.add_argument("--bert-dir", default=None, help="local bert-base-uncased dir (Q-Former tokenizer)")
    a.add_argument("--image-size", type=int, default=None, help="input resolution (default: from the files)")
    a.add_argument("--out", required=True, help="output directory (must not exist)")
    b = sub.add_parser("hf-to-lavis", help="transformers BLIP-2 dir → LAVIS checkpoint {'model': state_dict}",
                       epilog="example:\n" + _EXAMPLES["hf-to-lavis"],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    b.add_argument("hf_dir")
    b.add_argument("--out", required=True, help="output .pth (visual_encoder.* included, like a fine-tuned file)")
    b.add_argument("--llm-out", default=None, help="also save the LLM (+ tokenizer) as a transformers dir here")
    for p in (a, b):
        p.add_argument("--tol", type=float, default=CHECK_TOL, help="max-abs bar of the fp32 check (default 1e-4)")
        p.add_argument("--no-check", action="store_true", help="skip the numerical check (not recommended)")
    for p in (a, b):
        add_verbosity(p)
    args = ap.parse_args(argv)
    logging.basicConfig(level=log_level(args), format="%(levelname)s %(name)s: %(message)s")
    return run_guarded(lambda: _convert(args), args.verbose)


def _convert(args: argparse.Namespace) -> int:
    import torch  # after parsing: --help stays free of torch

    from . import load_hf_reference

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "lavis-to-hf":
        model, report = from_pretrained(
            args.checkpoint,
            vision_weights=args.vision_weights,
            llm_path=args.llm_path,
            bert_dir=args.bert_dir,
            image_size=args.image_size,
            return_report=True,
        )
        diffs = save_pretrained_hf(model, args.out, check=not args.no_check, tol=args.tol)
    else:
        model, report = from_pretrained(args.hf_dir, return_report=True)
        ref = None if args.no_check else load_hf_reference(args.hf_dir)
        diffs = save_lavis(model, args.out, llm_out=args.llm_out, check=not args.no_check, tol=args.tol, reference=ref)
    print(json.dumps({"out": args.out, "load_report": report.summary(), "max_abs": diffs}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
