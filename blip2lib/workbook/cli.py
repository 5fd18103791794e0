"""The command line of ``python -m blip2lib.workbook``: its argument parser and the ``check`` subcommand.

:func:`blip2lib.workbook.runner.main` parses with :func:`build_parser` and dispatches; only the parser's text and
options live here, so that ``--help`` stays torch-free (the preflight is imported when ``check`` runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .jobs import Job, _values, job_for, variant_jobs
from .run import REPO_ROOT


def build_parser(description: str | None, progress_every: float) -> argparse.ArgumentParser:
    """The parser of every subcommand: ``run``, ``run-all``, ``check``, ``validate``, ``readme``, ``rehearse``.

    Args:
        description: the ``--help`` text above the subcommands (the runner module's docstring).
        progress_every: the default of ``--progress-every`` (seconds between training-progress lines).

    Returns:
        The parser; each subcommand's ``--help`` ends with an example of it.
    """
    ap = argparse.ArgumentParser(prog="python -m blip2lib.workbook", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    params = argparse.ArgumentParser(add_help=False)  # what decides a run's params: shared by run, run-all, validate
    params.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (notebooks/, params/)")
    params.add_argument("--runs", type=Path, default=None,
                        help="runs root (default <root>/runs); the params' runs/... paths move onto it")  # fmt: skip
    params.add_argument(
        "-p",
        "--param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key (repeatable); VALUE is YAML, typed by the notebook's schema",
    )
    params.add_argument("-v", "--verbose", action="store_true", help="tracebacks with error messages")
    common = argparse.ArgumentParser(add_help=False, parents=[params])
    common.add_argument("--reports", type=Path, default=None, help="reports root (default <root>/reports)")
    common.add_argument(
        "--force",
        action="store_true",
        help="redo finished runs; each old run folder is moved aside to <run>.prev-<UTC time>",
    )
    common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    common.add_argument("--progress-every", type=float, default=progress_every, metavar="SECONDS",
                        help="a training-progress line (step, loss, throughput, time left) every SECONDS while a "
                             "notebook trains (default 30; 0: none)")  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)

    def example(line: str) -> dict:  # each subcommand's --help ends with an example of it
        return {"epilog": f"example:\n  python -m blip2lib.workbook {line}",
                "formatter_class": argparse.RawDescriptionHelpFormatter}  # fmt: skip

    one = sub.add_parser("run", help="execute one params file", parents=[common],
                         **example("run params/10_stage1_pretrain/toy.yaml -p steps=20"))  # fmt: skip
    one.add_argument("params")
    one.add_argument("--notebook", default=None, help="the notebook of a params file outside params/<notebook>/")
    every = sub.add_parser("run-all", help="execute every notebook of a variant in order", parents=[common],
                           **example("run-all toy -j 2"))  # fmt: skip
    every.add_argument("variant")
    every.add_argument("-j", "--jobs", type=int, default=1, help="steps executed at once (default 1)")
    c = sub.add_parser("check", help="preflight: check every file the params name, without loading a model",
                       parents=[params], **example("check paper_vitg.yaml --notebook 10_stage1_pretrain"))  # fmt: skip
    c.add_argument("params", nargs="+", help="params files, or a variant name (every params/*/<variant>.yaml)")
    c.add_argument("--notebook", default=None, help="the notebook of files outside params/<notebook>/")
    c.add_argument("--no-hardware", dest="hardware", action="store_false", help="skip the GPU count / memory checks")
    v = sub.add_parser("validate", help="validate params files (default: every file under params/)", parents=[params],
                       **example("validate ~/exp/my.yaml --notebook 20_stage2_pretrain"))  # fmt: skip
    v.add_argument("files", nargs="*", help="params files to validate with the overrides (any folder)")
    v.add_argument("--notebook", default=None, help="the notebook of files outside params/<notebook>/")
    r = sub.add_parser("readme", help="write a variant's measured goals into README.md's results block",
                       **example("readme toy --runs runs"))  # fmt: skip
    r.add_argument("variant")
    r.add_argument("--runs", type=Path, default=REPO_ROOT / "runs")
    r.add_argument("-v", "--verbose", action="store_true", help="tracebacks with error messages")
    h = sub.add_parser("rehearse", help="every paper_* params file on tiny models (blip2lib/rehearsal)",
                       **example("rehearse --only '10_stage1_pretrain/*' -j 2"))  # fmt: skip
    h.add_argument("--out", type=Path, default=None, help="rehearsal tree (default runs/rehearsal)")
    h.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="glob over <notebook>/<paper file stem> (repeatable, or comma-separated); the runs they read "
                        "come too")  # fmt: skip
    h.add_argument("-v", "--verbose", action="store_true", help="tracebacks with error messages")
    h.add_argument("--force", action="store_true", help="redo finished steps (their old folders are moved aside)")
    h.add_argument("-j", "--jobs", type=int, default=1, help="steps executed at once (default 1)")
    return ap


def _check_command(args) -> int:
    """``check``: print every finding of the given params files (one batch); 2 when any is an error."""
    from .preflight import check

    todo: list[Job] = []
    for arg in args.params:
        if Path(arg).suffix in (".yaml", ".yml"):
            todo.append(job_for(arg, args.root, args.runs, None, args.notebook, args.overrides))
        else:  # a variant: its files with the overrides each schema has, as run-all takes them
            todo += variant_jobs(arg, args.root, args.runs, None, args.overrides)
    t0 = time.time()
    problems = check([j.params_path for j in todo], args.root, args.runs, hardware=args.hardware,
                     notebooks=[j.notebook.stem for j in todo], overrides=[_values(j) for j in todo])  # fmt: skip
    for p in problems:
        print(p, file=sys.stderr if p.level == "error" else sys.stdout)
    errors = sum(p.level == "error" for p in problems)
    print(f"preflight: {len(todo)} params files, {errors} problem(s), {time.time() - t0:.1f} s")
    return 2 if errors else 0
