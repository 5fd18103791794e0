"""Outside the kernel: execute notebooks with papermill and render HTML reports.

The params file's path alone decides everything: ``params/<notebook>/<variant>.yaml`` runs
``notebooks/<notebook>.ipynb`` into ``runs/<notebook>/<variant>/`` and renders
``reports/<variant>/<notebook>.html`` (input cells hidden). Usage::

    python -m blip2lib.workbook run params/10_stage1_pretrain/toy.yaml [--force]
    python -m blip2lib.workbook run-all toy [--force] [-j 2]   # every notebook with a toy.yaml, in order
    python -m blip2lib.workbook validate                       # check every params file against its schema

A run folder holds ``executed.ipynb``, ``metrics.json``, ``config.resolved.yaml``, ``env.json``, ``job.json`` (where
the runner put things), ``status.json`` (ok/failed, wall time), ``stdout.log``/``stderr.log`` (kernel streams) and
``.inputs.sha256`` (what "current" means: same params file, notebook and upstream ``metrics.json``). A failed run
keeps its executed notebook and gets ``failed.html`` (code visible, error banner); it never writes ``reports/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ParamsError, load_params_yaml
from .report import render_html
from .run import REPO_ROOT
from .schemas import schema_for
from .summary import build_index

log = logging.getLogger(__name__)
_INDEX_LOCK = threading.Lock()


@dataclass(frozen=True)
class Job:
    """Where one params file's outputs go."""

    params_path: Path
    notebook: Path
    run_dir: Path
    report: Path

    @property
    def variant(self) -> str:
        """The params file's stem (``toy``, ``smoke``, ``vitg``…)."""
        return self.params_path.stem

    @property
    def run_id(self) -> str:
        """``<notebook>/<variant>``."""
        return f"{self.notebook.stem}/{self.params_path.stem}"


def job_for(
    params_path: str | Path, root: Path = REPO_ROOT, runs: Path | None = None, reports: Path | None = None
) -> Job:
    """Map ``params/<notebook>/<variant>.yaml`` to its notebook, run folder and report path."""
    p = Path(params_path)
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    if not p.exists():
        raise FileNotFoundError(f"{params_path}: no such params file")
    p = p.resolve()
    nb_name, variant = p.parent.name, p.stem
    nb = root / "notebooks" / f"{nb_name}.ipynb"
    if not nb.exists():
        raise FileNotFoundError(f"{params_path}: no notebook notebooks/{nb_name}.ipynb for this params folder")
    runs = runs or root / "runs"
    reports = reports or root / "reports"
    return Job(p, nb, runs / nb_name / variant, reports / variant / f"{nb_name}.html")


class RunFailed(RuntimeError):
    """A notebook raised; the executed notebook and ``failed.html`` are kept in the run folder."""


def load_params(path: Path) -> dict:
    """Validate a params file against its notebook's schema; returns the flat values present in the file.

    Raises:
        ParamsError: unknown notebook folder, invalid YAML, unknown key or wrong type (the message names the file
            and the key).
    """
    path = Path(path)
    try:
        schema = schema_for(path.parent.name)
    except KeyError as e:
        raise ParamsError(f"{path}: {e.args[0]}") from None
    params = schema.from_yaml(path)  # unknown key / wrong type → ParamsError naming file and key
    given = load_params_yaml(path)
    return {k: getattr(params, k) for k in given}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]  # init_from may list two folders
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _upstream_metrics(job: Job, root: Path) -> list[Path]:
    """``metrics.json`` of the runs this job reads, or of every run of the variant for collectors.

    A run is read when any params value (``*_run``, ``init_from``, ``checkpoints`` entries, an ablation's
    ``base`` …) names a folder inside another run of the runs root, e.g. ``runs/20_stage2_pretrain/toy/opt``.
    """
    runs_root = job.run_dir.parents[1].resolve()
    found: list[Path] = []
    for text in _strings(load_params_yaml(job.params_path)):
        path = (Path(text) if Path(text).is_absolute() else root / text).resolve()
        if path == runs_root or runs_root not in path.parents:
            continue
        parts = path.relative_to(runs_root).parts
        run = runs_root.joinpath(*parts[:2]) if len(parts) >= 2 else None  # runs/<notebook>/<variant>
        if run is not None and run != job.run_dir.resolve() and run / "metrics.json" not in found:
            found.append(run / "metrics.json")
    if _collects(job):
        found += [m for m in sorted(job.run_dir.parents[1].glob(f"*/{job.variant}/metrics.json"))
                  if m.parent != job.run_dir and m.resolve() not in found]  # fmt: skip
    return found


LIBRARY_ROOT = Path(__file__).resolve().parents[1]  # blip2lib/: its code is an input of every run


def _inputs_digest(job: Job, root: Path = REPO_ROOT) -> str:
    """Hash of what a run's outputs depend on: params file, notebook, upstream metrics and the library's code.

    The library is included so that a changed training recipe or toy-world builder re-runs the steps (and their
    dependants) instead of leaving reports of the old code marked current.
    """
    h = hashlib.sha256()
    for f in (job.params_path, job.notebook, *_upstream_metrics(job, root), *sorted(LIBRARY_ROOT.rglob("*.py"))):
        h.update(str(f.name).encode())
        h.update(f.read_bytes() if f.exists() else b"<missing>")
    return h.hexdigest()


def is_current(job: Job, root: Path = REPO_ROOT) -> bool:
    """True when the run succeeded with the same params file and notebook and its upstream runs are unchanged."""
    stamp = job.run_dir / ".inputs.sha256"
    if not (stamp.exists() and (job.run_dir / "metrics.json").exists() and job.report.exists()):
        return False
    return stamp.read_text() == _inputs_digest(job, root)


def _context(job: Job, root: Path, status: str, wall: float) -> dict:
    try:
        shown = str(job.params_path.relative_to(root))
    except ValueError:
        shown = str(job.params_path)
    return {
        "run_id": job.run_id,
        "params_file": shown,
        "params_text": job.params_path.read_text(),
        "status": status,
        "wall_time_s": round(wall, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _finished(run_dir: Path) -> bool:
    """The folder holds a run that completed (``status.json`` says ok)."""
    try:
        return json.loads((run_dir / "status.json").read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def run(params_path: str | Path, force: bool = False, root: Path = REPO_ROOT, runs: Path | None = None,
        reports: Path | None = None, progress: bool = False, threads: int | None = None) -> Job:  # fmt: skip
    """Validate a params file, execute its notebook with papermill and render its report.

    Args:
        params_path: ``params/<notebook>/<variant>.yaml``.
        force: run even when the outputs are current.
        root: repository root (``notebooks/`` and the kernel's working directory).
        runs: runs root (default ``<root>/runs``; tests point it at a temporary folder).
        reports: reports root (default ``<root>/reports``).
        progress: papermill's progress bar.
        threads: torch threads for the kernel (``start_run`` applies it); None keeps torch's default.

    Returns:
        The job (paths of the run folder and report).

    Raises:
        ParamsError: the params file is invalid (nothing is executed).
        RunFailed: the notebook raised; ``failed.html`` and the executed notebook are in the run folder.
    """
    import papermill as pm

    job = job_for(params_path, root, runs, reports)
    values = load_params(job.params_path)  # validation BEFORE execution
    if not force and is_current(job, root):
        log.info("[skip] %s: outputs are current (use --force to redo)", job.run_id)
        return job
    if _finished(job.run_dir):
        # A finished run redone (--force, or changed params / notebook / upstream runs) must train again from
        # scratch: resuming its final checkpoint would report the old training under the new params.
        log.info("[redo] %s: clearing the previous finished run in %s", job.run_id, job.run_dir)
        shutil.rmtree(job.run_dir)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("executed.ipynb", "metrics.json", "status.json", "failed.html", ".inputs.sha256"):
        (job.run_dir / stale).unlink(missing_ok=True)  # a failed / killed run keeps checkpoints and logs (resume)
    _write_json(job.run_dir / "job.json", {"run_id": job.run_id, "notebook": job.notebook.stem,
                                           "variant": job.variant, "params_file": str(job.params_path),
                                           "runs_root": str(job.run_dir.parents[1]), "report": str(job.report),
                                           "reports_root": str(job.report.parents[1]),
                                           "threads": threads})  # fmt: skip
    executed = job.run_dir / "executed.ipynb"
    values["run_dir"] = str(job.run_dir)
    log.info("[run ] %s → %s", job.run_id, job.run_dir)
    t0 = time.time()
    try:
        with open(job.run_dir / "stdout.log", "w") as out, open(job.run_dir / "stderr.log", "w") as err:
            pm.execute_notebook(str(job.notebook), str(executed), parameters=values, kernel_name="python3",
                                cwd=str(root), progress_bar=progress, stdout_file=out, stderr_file=err)  # fmt: skip
    except Exception as e:  # papermill has saved the executed notebook with its error banner
        ctx = _context(job, root, "failed", time.time() - t0)
        _write_json(job.run_dir / "status.json", {"status": "failed", "wall_time_s": ctx["wall_time_s"],
                                                  "finished": ctx["finished"], "error": str(e)[-2000:]})  # fmt: skip
        failed = job.run_dir / "failed.html"
        if executed.exists():
            render_html(executed, failed, hide_input=False, context=ctx)
        with _INDEX_LOCK:
            build_index(job.run_dir.parents[1], job.report.parents[1], job.variant)
        raise RunFailed(
            f"{job.run_id} failed after {ctx['wall_time_s']:.0f} s: {type(e).__name__}: "
            f"{str(e).strip()[-800:]}\nexecuted notebook: {executed}\nfailure page: {failed}"
        ) from e
    ctx = _context(job, root, "ok", time.time() - t0)
    _write_json(job.run_dir / "status.json", {"status": "ok", "wall_time_s": ctx["wall_time_s"],
                                              "finished": ctx["finished"]})  # fmt: skip
    render_html(executed, job.report, context=ctx)
    (job.run_dir / ".inputs.sha256").write_text(_inputs_digest(job, root))
    with _INDEX_LOCK:  # parallel run-all: one index writer at a time
        build_index(job.run_dir.parents[1], job.report.parents[1], job.variant)  # the index always lists this run
    log.info("[done] %s in %.0f s → %s", job.run_id, ctx["wall_time_s"], job.report)
    return job


def variant_params(variant: str, root: Path = REPO_ROOT) -> list[Path]:
    """Every ``params/*/<variant>.yaml``, in notebook (dependency) order: 0x → 1x → 2x → 3x → 4x → 9x."""
    variant = Path(variant).name
    return sorted((root / "params").glob(f"*/{variant}.yaml"), key=lambda p: p.parent.name)


def _collects(job: Job) -> bool:
    return getattr(schema_for(job.notebook.stem), "collects_variant", False)


def _dependencies(jobs: list[Job], root: Path) -> dict[Job, set[Job]]:
    """The steps each job must wait for: the runs its params name, the ``0x`` data steps, all others (collectors)."""
    by_dir = {j.run_dir.resolve(): j for j in jobs}
    reads = {j: {by_dir[m.parent.resolve()] for m in _upstream_metrics(j, root) if m.parent.resolve() in by_dir}
             for j in jobs}  # fmt: skip
    # 0x steps that read no run build the toy world / prepare datasets: everything else reads their outputs.
    data_steps = {j for j in jobs if j.notebook.stem.startswith("0") and not reads[j] and not _collects(j)}
    deps = {}
    for j in jobs:
        d = set(reads[j])
        if _collects(j):
            d |= {k for k in jobs if not _collects(k)}
        if j not in data_steps:
            d |= data_steps
        deps[j] = d - {j}
    return deps


def run_all(variant: str, force: bool = False, root: Path = REPO_ROOT, runs: Path | None = None,
            reports: Path | None = None, progress: bool = False, jobs: int = 1,
            estimates: dict[str, float] | None = None) -> list[Job]:  # fmt: skip
    """Run a whole variant in dependency order, skipping current steps; stops at the first failure.

    Every executed step rebuilds ``reports/<variant>/index.html`` (a failed step shows as such, without a link).

    Args:
        variant: params variant (``toy``, ``smoke`` …).
        force: redo current steps too.
        root: repository root.
        runs: runs root.
        reports: reports root.
        progress: papermill's per-cell bar (sequential runs only).
        jobs: steps executed at once. With ``jobs > 1`` a step starts as soon as the steps it reads are done
            (:func:`_dependencies`), longest remaining chain first, with the torch threads :func:`_plan` gives it;
            a failure lets the running steps finish but starts no new one. Why: the toy models are too small for
            two threads to help one notebook much, so two notebooks at once use 2 cores better.
        estimates: expected wall seconds per run id (``"45_ablation_itg/toy"``) for steps that have no previous
            run to time, so that a fresh clone starts its long branches early too (only the launch order uses it).
    """
    paths = variant_params(variant, root)
    if not paths:
        raise FileNotFoundError(f"no params/*/{variant}.yaml files under {root}")
    for p in paths:  # validate everything before executing anything
        load_params(p)
    if jobs <= 1:
        return [run(p, force=force, root=root, runs=runs, reports=reports, progress=progress) for p in paths]
    return _run_parallel([job_for(p, root, runs, reports) for p in paths], jobs, force, root, runs, reports,
                         estimates)  # fmt: skip


def _plan(todo: list[Job], deps: dict[Job, set[Job]], jobs: int, cores: int,
          estimates: dict[str, float] | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Torch threads and launch priority of each step.

    Threads: all cores for a step that can never run beside another one (every other step is upstream or
    downstream of it: stage 1, the summary), else ``cores // jobs``. A structural rule, not "whatever is idle
    now", so a step's thread count — and with it its floating-point results — does not depend on timing.
    Priority: the longest chain of estimated wall times from the step to the end (the previous run's
    ``status.json``, else ``estimates[run_id]``, else 60 s), so long branches such as the ablations start early
    instead of last.
    """
    upstream: dict[Job, set[Job]] = {}

    def ups(j: Job) -> set[Job]:
        if j not in upstream:
            upstream[j] = set(deps[j]).union(*(ups(d) for d in deps[j]))
        return upstream[j]

    everything = set(todo)
    threads = {}
    for j in todo:
        downstream = {k for k in todo if j in ups(k)}
        threads[j] = cores if ups(j) | downstream | {j} == everything else max(1, cores // jobs)
    estimate = {j: _previous_wall(j, estimates) for j in todo}
    chain: dict[Job, float] = {}
    for j in sorted(todo, key=lambda j: len(ups(j)), reverse=True):  # downstream steps first
        chain[j] = estimate[j] + max((chain[k] for k in todo if j in deps[k]), default=0.0)
    return threads, chain


def _previous_wall(job: Job, estimates: dict[str, float] | None) -> float:
    try:
        return float(json.loads((job.run_dir / "status.json").read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return float((estimates or {}).get(job.run_id, 60.0))


def _run_parallel(todo: list[Job], jobs: int, force: bool, root: Path, runs: Path | None,
                  reports: Path | None, estimates: dict[str, float] | None = None) -> list[Job]:  # fmt: skip
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    deps = _dependencies(todo, root)
    cores = os.cpu_count() or 1
    threads, priority = _plan(todo, deps, jobs, cores, estimates)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // jobs))  # BLAS etc. in every kernel started from now on
    log.info("[plan] %d steps, up to %d at a time", len(todo), jobs)
    done: set[Job] = set()
    failure: BaseException | None = None
    started: dict = {}
    try:
        with ThreadPoolExecutor(jobs) as pool:
            while len(done) < len(todo):
                if failure is None:
                    ready = [j for j in todo if j not in done and j not in started.values() and deps[j] <= done]
                    for j in sorted(ready, key=priority.get, reverse=True)[: jobs - len(started)]:
                        fut = pool.submit(run, j.params_path, force=force, root=root, runs=runs, reports=reports,
                                          threads=threads[j])  # fmt: skip
                        started[fut] = j
                if not started:
                    if failure is None:
                        waiting = [j.run_id for j in todo if j not in done]
                        raise RuntimeError(f"steps that can never start (circular inputs): {waiting}")
                    break  # a failure stopped the launches and nothing is running
                finished, _ = wait(list(started), timeout=60, return_when=FIRST_COMPLETED)
                if not finished:
                    log.info("[....] running: %s", ", ".join(j.run_id for j in started.values()))
                for fut in finished:
                    done.add(started.pop(fut))
                    try:
                        fut.result()
                    except BaseException as e:  # keep the first failure; let the running steps finish
                        failure = failure or e
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    if failure is not None:
        raise failure
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
    """Command line: ``run``, ``run-all``, ``validate``, ``rehearse``; returns the exit status (1 on any error)."""
    ap = argparse.ArgumentParser(prog="python -m blip2lib.workbook", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (notebooks/, params/)")
    common.add_argument("--runs", type=Path, default=None, help="runs root (default <root>/runs)")
    common.add_argument("--reports", type=Path, default=None, help="reports root (default <root>/reports)")
    common.add_argument("--force", action="store_true", help="run even when the outputs are current")
    common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    common.add_argument("-j", "--jobs", type=int, default=1, help="run-all: steps executed at once (default 1)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="execute one params file", parents=[common]).add_argument("params")
    sub.add_parser("run-all", help="execute every notebook of a variant in order", parents=[common]).add_argument(
        "variant"
    )
    v = sub.add_parser("validate", help="validate every params file")
    v.add_argument("--root", type=Path, default=REPO_ROOT)
    r = sub.add_parser("readme", help="write a variant's measured goals into README.md's results block")
    r.add_argument("variant")
    r.add_argument("--runs", type=Path, default=REPO_ROOT / "runs")
    h = sub.add_parser(
        "rehearse", help="dress rehearsal: every paper_* params file on tiny models (blip2lib/rehearsal)"
    )
    h.add_argument("--out", type=Path, default=None, help="rehearsal tree (default runs/rehearsal)")
    h.add_argument("--only", default="", help="glob over <notebook>/<paper file stem>; the runs they read come too")
    h.add_argument("--force", action="store_true", help="redo steps whose outputs are current")
    h.add_argument("-j", "--jobs", type=int, default=1, help="steps executed at once (default 1)")
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "validate":
            print(f"{validate_all(args.root)} params files valid")
            return 0
        if args.cmd == "rehearse":
            from ..rehearsal.run import DEFAULT_OUT, rehearse

            result = rehearse(args.out or DEFAULT_OUT, args.only, args.force, jobs=args.jobs)
            print(json.dumps(result, indent=2))
            return 1 if result["failed"] or result["skipped"] else 0
        if args.cmd == "readme":
            from .summary import update_readme

            changed = update_readme(REPO_ROOT / "README.md", args.runs, args.variant)
            print(f"README.md results block {'updated' if changed else 'unchanged'} from {args.runs}/*/{args.variant}")
            return 0
        kw = {"force": args.force, "root": args.root, "runs": args.runs, "reports": args.reports,
              "progress": args.progress}  # fmt: skip
        if args.cmd == "run":
            run(args.params, **kw)
        else:
            jobs = run_all(args.variant, jobs=args.jobs, **kw)
            print(json.dumps({"reports": [str(j.report) for j in jobs]}, indent=2))
    except (ParamsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
