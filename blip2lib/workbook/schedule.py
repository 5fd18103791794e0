"""``run-all``'s plan: which steps wait for which, each step's torch threads and launch priority.

Pure functions of the jobs and their params (and of the previous runs' ``status.json`` wall times), plus ``_here``,
the in-thread stand-in for ``pool.submit`` that ``-j 1`` uses. The loop that launches the steps, ``_run_parallel``,
stays in :mod:`blip2lib.workbook.runner` beside the ``run`` it submits (tests replace ``runner.run``).
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

from .jobs import Job, _collects, _upstream_metrics


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


def _here(fn, *args, **kw) -> Future:
    """Run ``fn`` in this thread; its result or exception in a finished Future (as ``pool.submit`` would give)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args, **kw))
    except BaseException as e:  # also KeyboardInterrupt: the loop stops launching and raises it
        fut.set_exception(e)
    return fut
