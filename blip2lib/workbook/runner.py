"""Outside the kernel: execute notebooks with papermill and render HTML reports.

``params/<notebook>/<variant>.yaml`` runs ``notebooks/<notebook>.ipynb`` into ``runs/<notebook>/<variant>/`` and
renders ``reports/<variant>/<notebook>.html`` (input cells hidden). A params file elsewhere names its notebook with
``--notebook NAME`` or a ``notebook: NAME`` key; its variant is the file's stem. Usage::

    python -m blip2lib.workbook run params/10_stage1_pretrain/toy.yaml [-p KEY=VALUE ...] [--runs DIR] [--force]
    python -m blip2lib.workbook run ~/exp/my.yaml --notebook 20_stage2_pretrain
    python -m blip2lib.workbook run-all toy [-p KEY=VALUE ...] [-j 2]   # every notebook with a toy.yaml, in order
    python -m blip2lib.workbook validate                                # check every params file against its schema

``-p`` values are read as YAML and typed by the notebook's schema; ``--runs DIR`` also moves the ``runs/...`` paths
written inside params files onto DIR. A run folder holds ``executed.ipynb``, ``metrics.json``,
``config.resolved.yaml``, ``env.json``, ``job.json`` (where the runner put things, the overrides), ``status.json``
(ok/failed, wall time), ``stdout.log``/``stderr.log`` and, once finished, ``inputs.json`` (params, git commit and a
hash per notebook, upstream ``metrics.json`` and library file). A finished run is never deleted: unchanged inputs
→ skipped; changed inputs → reported stale with what changed (exit status 2); ``--force`` moves it aside to
``<run>.prev-<UTC time>`` and starts afresh. An unfinished run resumes in place. A failed run keeps its executed
notebook and gets ``failed.html`` (code visible, error banner); it never writes ``reports/``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import ParamsError
from .cli import _check_command, build_parser
from .jobs import (  # noqa: F401  (re-exported: tests, tools)
    LIBRARY_ROOT,
    Job,
    _collects,
    _inputs,
    _inputs_digest,
    _move_aside,
    _stale_message,
    _upstream_metrics,
    _values,
    is_current,
    job_for,
    load_params,
    stale_changes,
    variant_jobs,
    variant_params,
)
from .jobs import finished as _finished
from .progress import TrainingProgress
from .report import render_html
from .run import REPO_ROOT, git_commit
from .schedule import _dependencies, _here, _plan, _previous_wall  # noqa: F401  (moved out of this module; tests import them here)
from .summary import build_index

log = logging.getLogger(__name__)
_INDEX_LOCK = threading.Lock()


# The preflight is imported when a run starts, not with this module: its weight checks import torch, and
# ``python -m blip2lib.workbook --help`` must not.
def preflight(*args: Any, **kwargs: Any) -> list:
    """:func:`blip2lib.workbook.preflight.preflight` (raises ``PreflightFailed`` listing every finding)."""
    from . import preflight as checks

    return checks.preflight(*args, **kwargs)


def _preflight_failed() -> type[BaseException] | tuple[()]:
    """``PreflightFailed`` once the preflight module is loaded (only it raises one); before that, nothing to catch."""
    checks = sys.modules.get(f"{__package__}.preflight")
    return checks.PreflightFailed if checks is not None else ()


class RunFailed(RuntimeError):
    """A notebook raised; the executed notebook and ``failed.html`` are kept in the run folder."""


class StaleRun(RuntimeError):
    """A finished run whose inputs changed since: reported, left untouched (``--force`` redoes it)."""


def _context(job: Job, root: Path, status: str, wall: float) -> dict:
    try:
        shown = str(job.params_path.relative_to(root))
    except ValueError:
        shown = str(job.params_path)
    text = job.params_path.read_text()
    if job.overrides:
        text += "\n# command-line overrides\n" + "\n".join(f"# -p {t}" for t in job.overrides) + "\n"
    return {
        "run_id": job.run_id,
        "params_file": shown,
        "params_text": text,
        "overrides": list(job.overrides),
        "status": status,
        "wall_time_s": round(wall, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


# Seconds between the console's training-progress lines (``--progress-every``; 0: none). See workbook/progress.py.
PROGRESS_EVERY_S = 30.0


def _set_progress_every(seconds: float) -> None:
    global PROGRESS_EVERY_S
    PROGRESS_EVERY_S = seconds


def run(params_path: str | Path, force: bool = False, root: Path = REPO_ROOT, runs: Path | None = None,
        reports: Path | None = None, progress: bool = False, threads: int | None = None, notebook: str | None = None,
        overrides: Iterable[str] | Mapping[str, Any] | None = None) -> Job:  # fmt: skip
    """Validate a params file, execute its notebook with papermill and render its report.

    Args:
        params_path: ``params/<notebook>/<variant>.yaml``, or any file with ``notebook`` or a ``notebook:`` key.
        force: redo a finished run; the old folder is moved aside to ``<run>.prev-<UTC time>``, never deleted.
        root: repository root (``notebooks/`` and the kernel's working directory).
        runs: runs root (default ``<root>/runs``); the ``runs/...`` values of the params file move onto it.
        reports: reports root (default ``<root>/reports``).
        progress: papermill's progress bar.
        threads: torch threads for the kernel (``start_run`` applies it); None keeps torch's default.
        notebook: the notebook, for a params file outside ``params/<notebook>/``.
        overrides: ``KEY=VALUE`` texts (or a mapping) applied after the file, typed by the notebook's schema.

    Returns:
        The job (paths of the run folder and report).

    Raises:
        ParamsError: the params file or an override is invalid (nothing is executed).
        StaleRun: the run finished with other inputs; nothing is touched.
        RunFailed: the notebook raised; ``failed.html`` and the executed notebook are in the run folder.
    """
    import papermill as pm

    from .kernel import kernel_config  # here, not at the top: the import block is shared with other changes

    job = job_for(params_path, root, runs, reports, notebook, overrides)
    values = _values(job)  # validation BEFORE execution
    # every file the effective params name, before anything is moved or started (PreflightFailed)
    preflight([job.params_path], root, runs, notebooks=[job.notebook.stem], overrides=[values])
    if force and job.run_dir.exists():
        log.info("[force] %s: previous run moved aside to %s", job.run_id, _move_aside(job.run_dir))
    elif _finished(job.run_dir):
        changes = stale_changes(job, root)
        if changes:
            raise StaleRun(_stale_message(job, root, changes))
        if not job.report.exists() and (job.run_dir / "executed.ipynb").exists():  # e.g. a new --reports root
            status = json.loads((job.run_dir / "status.json").read_text())
            render_html(job.run_dir / "executed.ipynb", job.report,
                        context=_context(job, root, "ok", float(status.get("wall_time_s", 0.0))))  # fmt: skip
        log.info("[skip] %s: up to date (--force redoes it)", job.run_id)
        return job
    job.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("executed.ipynb", "metrics.json", "status.json", "failed.html", "inputs.json", ".inputs.sha256"):
        (job.run_dir / stale).unlink(missing_ok=True)  # a failed / killed run keeps checkpoints and logs (resume)
    inputs = _inputs(job, root, git_commit(root))  # taken now: the code and upstream runs this execution reads
    _write_json(job.run_dir / "job.json", {"run_id": job.run_id, "notebook": job.notebook.stem,
                                           "variant": job.variant, "params_file": str(job.params_path),
                                           "overrides": list(job.overrides),
                                           "runs_root": str(job.run_dir.parents[1]), "report": str(job.report),
                                           "reports_root": str(job.report.parents[1]),
                                           "threads": threads})  # fmt: skip
    executed = job.run_dir / "executed.ipynb"
    values["run_dir"] = str(job.run_dir)
    log.info("[run ] %s → %s", job.run_id, job.run_dir)
    t0 = time.time()
    steps = values.get("steps") if isinstance(values.get("steps"), int) else None
    try:
        with (open(job.run_dir / "stdout.log", "w") as out, open(job.run_dir / "stderr.log", "w") as err,
              TrainingProgress(job.run_id, job.run_dir, steps, PROGRESS_EVERY_S)):  # fmt: skip
            # the kernel starts in root through nbclient's resources, not papermill's cwd=: that chdir()s this whole
            # process for the run, and with parallel jobs (-j) one run's exit restores the cwd under another's
            # kernel start, which then begins in the caller's folder and misses data/ and weights/. kernel_config():
            # an encrypted (or IPC) transport, so the kernel prints no "running over TCP without encryption" notice
            pm.execute_notebook(str(job.notebook), str(executed), parameters=values, kernel_name="python3",
                                resources={"metadata": {"path": str(root)}}, progress_bar=progress,
                                stdout_file=out, stderr_file=err, config=kernel_config("python3"))  # fmt: skip
    except Exception as e:  # papermill has saved the executed notebook with its error banner
        ctx = _context(job, root, "failed", time.time() - t0)
        # the kernel's exception, not papermill's cell dump (the traceback is in the executed notebook and -v)
        error = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', str(e))}".strip()
        _write_json(job.run_dir / "status.json", {"status": "failed", "wall_time_s": ctx["wall_time_s"],
                                                  "finished": ctx["finished"], "error": error})  # fmt: skip
        failed = job.run_dir / "failed.html"
        if executed.exists():
            render_html(executed, failed, hide_input=False, context=ctx)
        with _INDEX_LOCK:
            build_index(job.run_dir.parents[1], job.report.parents[1], job.variant)
        wall = ctx["wall_time_s"]
        raise RunFailed(f"{job.run_id} failed after {wall:.0f} s: {error} (failure page: {failed})") from e
    ctx = _context(job, root, "ok", time.time() - t0)
    _write_json(job.run_dir / "status.json", {"status": "ok", "wall_time_s": ctx["wall_time_s"],
                                              "finished": ctx["finished"]})  # fmt: skip
    render_html(executed, job.report, context=ctx)
    _write_json(job.run_dir / "inputs.json", inputs)
    with _INDEX_LOCK:  # parallel run-all: one index writer at a time
        build_index(job.run_dir.parents[1], job.report.parents[1], job.variant)  # the index always lists this run
    log.info("[done] %s in %.0f s → %s", job.run_id, ctx["wall_time_s"], job.report)
    return job


class StaleRuns(StaleRun):
    """``run-all`` met stale runs: it ran everything else, not them nor the steps that read them."""


def run_all(variant: str, force: bool = False, root: Path = REPO_ROOT, runs: Path | None = None,
            reports: Path | None = None, progress: bool = False, jobs: int = 1,
            estimates: dict[str, float] | None = None,
            overrides: Iterable[str] | Mapping[str, Any] | None = None) -> list[Job]:  # fmt: skip
    """Run a whole variant in dependency order, skipping up-to-date steps; stops launching at the first failure.

    Every executed step rebuilds ``reports/<variant>/index.html`` (a failed step shows as such, without a link).
    A stale step (finished, inputs changed) is reported and left as it is, and so are the steps that read it; the
    others run, then :class:`StaleRuns` lists them.

    Args:
        variant: params variant (``toy``, ``smoke`` …).
        force: redo finished steps too (each old run folder is moved aside, never deleted).
        root: repository root.
        runs: runs root (the ``runs/...`` values of the params files move onto it).
        reports: reports root.
        progress: papermill's per-cell bar (sequential runs only).
        jobs: steps executed at once. With ``jobs > 1`` a step starts as soon as the steps it reads are done
            (:func:`_dependencies`), longest remaining chain first, with the torch threads :func:`_plan` gives it;
            a failure lets the running steps finish but starts no new one. Why: the toy models are too small for
            two threads to help one notebook much, so two notebooks at once use 2 cores better.
        estimates: expected wall seconds per run id (``"45_ablation_itg/toy"``) for steps that have no previous
            run to time, so that a fresh clone starts its long branches early too (only the launch order uses it).
        overrides: ``KEY=VALUE`` texts; each reaches the notebooks whose schema has the key (``-p steps=10``: the
            training notebooks); a key no notebook has is an error.

    Raises:
        StaleRuns: after everything else ran, when stale steps were met.
    """
    todo = variant_jobs(variant, root, runs, reports, overrides)
    preflight(
        [j.params_path for j in todo],
        root,
        runs,
        notebooks=[j.notebook.stem for j in todo],
        overrides=[_values(j) for j in todo],
    )  # one batch: upstream run folders are "produced by"
    return _run_parallel(todo, jobs, force, root, runs, reports, estimates, progress)


def _run_parallel(todo: list[Job], jobs: int, force: bool, root: Path, runs: Path | None,
                  reports: Path | None, estimates: dict[str, float] | None = None,
                  progress: bool = False) -> list[Job]:  # fmt: skip
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    deps = _dependencies(todo, root)
    cores = os.cpu_count() or 1
    threads, priority = _plan(todo, deps, jobs, cores, estimates)
    old = os.environ.get("OMP_NUM_THREADS")
    if jobs > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // jobs))  # BLAS etc. in every kernel started from now on
        log.info("[plan] %d steps, up to %d at a time", len(todo), jobs)
    done: set[Job] = set()
    stale: list[Job] = []
    held: set[Job] = set()  # stale steps and every step that reads one: not run
    failure: BaseException | None = None
    started: dict = {}
    try:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            while len(done) < len(todo):
                if failure is None:
                    while hold := [j for j in todo if j not in done and deps[j] & held]:  # readers of readers too
                        for j in hold:
                            log.info("[hold] %s: reads a stale run, not run", j.run_id)
                        held.update(hold)
                        done.update(hold)
                    ready = [j for j in todo if j not in done and j not in started.values() and deps[j] <= done]
                    for j in sorted(ready, key=priority.get, reverse=True)[: max(1, jobs) - len(started)]:
                        submit = pool.submit if jobs > 1 else _here  # -j 1: Ctrl-C reaches papermill at once
                        fut = submit(run, j.params_path, force=force, root=root, runs=runs, reports=reports,
                                     threads=threads[j] if jobs > 1 else None, notebook=j.notebook.stem,
                                     overrides=j.overrides, progress=progress and jobs <= 1)  # fmt: skip
                        started[fut] = j
                if not started:
                    if len(done) == len(todo):
                        break  # the last steps were held
                    if failure is None:
                        waiting = [j.run_id for j in todo if j not in done]
                        raise RuntimeError(f"steps that can never start (circular inputs): {waiting}")
                    break  # a failure stopped the launches and nothing is running
                finished, _ = wait(list(started), timeout=60, return_when=FIRST_COMPLETED)
                if not finished:
                    log.info("[....] running: %s", ", ".join(j.run_id for j in started.values()))
                for fut in finished:
                    j = started.pop(fut)
                    done.add(j)
                    try:
                        fut.result()
                    except StaleRun as e:  # reported and left as it is; the other branches go on
                        log.warning("%s", e)
                        stale.append(j)
                        held.add(j)
                    except BaseException as e:  # keep the first failure; let the running steps finish
                        failure = failure or e
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    if failure is not None:
        raise failure
    if stale:
        others = sorted(j.run_id for j in held - set(stale))
        raise StaleRuns(f"stale, not rerun: {', '.join(j.run_id for j in stale)}"
                        + (f"; not run because they read a stale run: {', '.join(others)}" if others else "")
                        + " (--force redoes them, moving each old run aside)")  # fmt: skip
    return todo


def validate_all(root: Path = REPO_ROOT) -> int:
    """Validate every params file; returns the number checked (one ParamsError lists every invalid file)."""
    files = sorted((root / "params").glob("*/*.yaml"))
    errors = []
    for f in files:
        try:
            load_params(f)
        except ParamsError as e:
            errors.append(str(e))
    if errors:
        raise ParamsError("\n".join(errors))
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run``, ``run-all``, ``validate``, ``readme``, ``rehearse``; returns the exit status.

    0: done. 1: a notebook failed (its failure page is named). 2: a user mistake (a bad params file, override or
    path: one line, ``-v`` adds the traceback) or a stale run left untouched.
    """
    ap = build_parser(__doc__, PROGRESS_EVERY_S)
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "check":
            return _check_command(args)
        if args.cmd == "validate":
            if args.files:
                for f in args.files:
                    _values(job_for(f, args.root, args.runs, None, args.notebook, args.overrides))
                print(f"{len(args.files)} params files valid")
            else:
                print(f"{validate_all(args.root)} params files valid")
            return 0
        if args.cmd == "rehearse":
            from ..rehearsal.run import DEFAULT_OUT, rehearse

            result = rehearse(args.out or DEFAULT_OUT, ",".join(args.only), args.force, jobs=args.jobs)
            print(json.dumps(result, indent=2))
            return 1 if result["failed"] or result["skipped"] else 0
        if args.cmd == "readme":
            from .summary import update_readme

            changed = update_readme(REPO_ROOT / "README.md", args.runs, args.variant)
            print(f"README.md results block {'updated' if changed else 'unchanged'} from {args.runs}/*/{args.variant}")
            return 0
        _set_progress_every(args.progress_every)
        kw = {"force": args.force, "root": args.root, "runs": args.runs, "reports": args.reports,
              "progress": args.progress, "overrides": args.overrides}  # fmt: skip
        if args.cmd == "run":
            run(args.params, notebook=args.notebook, **kw)
        else:
            jobs = run_all(args.variant, jobs=args.jobs, **kw)
            print(json.dumps({"reports": [str(j.report) for j in jobs]}, indent=2))
    except _preflight_failed() as e:  # every problem of the params' files, listed at once
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ParamsError, FileNotFoundError, StaleRun, RunFailed, RuntimeError) as e:
        if args.verbose:
            traceback.print_exception(e)
        print(str(e) if type(e) is StaleRun else f"error: {e}", file=sys.stderr)  # a stale report has its own head
        return 2 if isinstance(e, (ParamsError, FileNotFoundError, StaleRun)) else 1
    return 0
