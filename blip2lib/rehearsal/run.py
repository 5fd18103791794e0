"""The dress rehearsal's driver: build the tree, then run every ``paper_*`` params file through the normal runner.

Layout of the rehearsal tree ``DIR`` (default ``runs/rehearsal``)::

    DIR/notebooks -> <repo>/notebooks        # the real notebooks (a symlink)
    DIR/weights/...                          # every name the params give under weights/ (weights.py)
    DIR/data/...                             # every dataset they name under data_root (data.py)
    DIR/runs/<notebook>/<variant>/           # the runner's run folders
    DIR/reports/<variant>/<notebook>.html    # the runner's reports; DIR/reports/paper/index.html lists them all

Each repository ``params/*/paper_*.yaml`` file runs as it is, through the normal runner, with ONE override:
``-p model_scale=rehearsal`` (``blip2lib.config``): the loaders build the tiny architectures of the same families
from the same files, and the run length is cut (``REHEARSAL_RUN``). Every value is measured from tiny random
models: the paper comparison's verdict is ``rehearsal``, never ``met`` or ``match``.

How relative paths resolve: the runner executes each notebook with its root as the working directory, and the
rehearsal passes ``root=DIR``; so ``weights/...``, ``data`` and ``runs/...`` written in the params files resolve
inside the tree exactly as they resolve in a clone on the real host, with no path rewritten.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from pathlib import Path

from ..config import LLMS, load_params_yaml
from ..workbook.run import REPO_ROOT

log = logging.getLogger(__name__)

OVERRIDE = {"model_scale": "rehearsal"}  # the dress rehearsal's one size override (-p model_scale=rehearsal)
DEFAULT_OUT = REPO_ROOT / "runs" / "rehearsal"


def paper_params(root: Path = REPO_ROOT, only: str = "") -> list[Path]:
    """``params/*/paper_*.yaml`` in dependency order (notebook number, then name).

    ``only`` keeps the files whose ``<notebook>/<file stem>`` matches the glob (or one of several comma-separated
    globs), plus every run they read (their ``runs/<notebook>/<variant>`` values), transitively.
    """
    files = sorted(root.glob("params/*/paper_*.yaml"), key=lambda p: (p.parent.name, p.name))
    if not only:
        return files
    globs = [g.strip() for g in only.split(",") if g.strip()]  # several globs: comma-separated
    chosen = {p for p in files if any(fnmatch.fnmatch(f"{p.parent.name}/{p.stem}", g) for g in globs)}
    todo = list(chosen)
    while todo:  # add the upstream runs the chosen files read, transitively
        for upstream in _upstream(todo.pop(), root):
            if upstream not in chosen:
                chosen.add(upstream)
                todo.append(upstream)
    return [p for p in files if p in chosen]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _upstream(path: Path, root: Path) -> list[Path]:
    out = []
    for s in _strings(load_params_yaml(path)):
        parts = Path(s).parts
        if len(parts) >= 3 and parts[0] == "runs":
            p = root / "params" / parts[1] / f"{parts[2]}.yaml"
            if p.exists():
                out.append(p)
    return out


def weight_names(values: dict) -> set[str]:
    """Every string value under ``weights/`` (nested dicts and lists included), without a trailing slash."""
    return {s.rstrip("/") for s in _strings(values) if s.startswith("weights/")}


def _format(name: str) -> str:
    from .weights import HUB_DIRS, LAVIS_FILES, LLM_DIRS, VISION_FILES, kind_of

    base, kind = Path(name).name, kind_of(name)
    if kind == "vision":
        return f"vision:{VISION_FILES[base]}"
    if kind == "llm":
        return f"llm:{LLMS[LLM_DIRS[base]].family}"
    if kind == "lavis":
        preset, with_vit = LAVIS_FILES[base]
        return f"lavis:{'stage2' if '_' in preset else 'stage1'}" + ("+vit" if with_vit else "")
    if kind == "hub":
        return f"hub:{'stage2' if '_' in HUB_DIRS[base][0] else 'retrieval'}"
    return kind


def formats(values: dict) -> set[str]:
    """The checkpoint formats a params file reads: ``weights.kind_of`` refined by tower, LLM family and contents."""
    out = {_format(name) for name in weight_names(values)}
    if any(Path(s).parts[:1] == ("runs",) for s in _strings(values)):
        out.add("run folder")
    return out


def ci_subset(root: Path = REPO_ROOT) -> list[str]:
    """A cheap set of ``<notebook>/<stem>`` names whose runs touch every notebook and every checkpoint format.

    Greedy set cover: repeatedly the file whose closure (itself plus the upstream runs it reads) touches the most
    new notebooks and formats per run it adds. Derived from the params files, so new files or formats join it.
    """
    files = paper_params(root)
    closure = {f: paper_params(root, f"{f.parent.name}/{f.stem}") for f in files}
    covers = {f: {c.parent.name for c in closure[f]} | set().union(*(formats(load_params_yaml(c)) for c in closure[f]))
              for f in files}  # fmt: skip
    todo = set().union(*covers.values())
    chosen: set[Path] = set()
    picks: list[Path] = []
    while todo:
        best = max((f for f in files if covers[f] & todo),
                   key=lambda f: (len(covers[f] & todo) / max(1, len(set(closure[f]) - chosen)), f.name))  # fmt: skip
        chosen |= set(closure[best])
        todo -= set().union(*(covers[c] for c in chosen))
        picks.append(best)
    picks = [p for p in picks if not any(p in closure[q] for q in picks if q != p)]  # upstream of a later pick
    return [f"{p.parent.name}/{p.stem}" for p in picks]


def build_tree(out: Path, files: list[Path], root: Path = REPO_ROOT) -> None:
    """Write the rehearsal tree for ``files``: the notebooks link, every named weight file and dataset."""
    from .data import write_data
    from .weights import write_weight

    out.mkdir(parents=True, exist_ok=True)
    link = out / "notebooks"
    if not link.is_symlink():
        os.symlink(root / "notebooks", link, target_is_directory=True)
    values, data = {}, {}
    for f in files:
        v = load_params_yaml(f)
        values[f"{f.parent.name}/{f.name}"] = v
        data.setdefault(v.get("data_root") or "data", {})[f"{f.parent.name}/{f.name}"] = v
    for name in sorted(set().union(*(weight_names(v) for v in values.values()))):
        write_weight(out, name)
    for data_root, named in data.items():
        write_data(out / data_root, named)


def rehearse(out: Path = DEFAULT_OUT, only: str = "", force: bool = False, root: Path = REPO_ROOT,
             jobs: int = 1) -> dict:  # fmt: skip
    """Build the tree and run the chosen ``paper_*`` files in dependency order; returns a summary dict.

    A failed (or stale) step is recorded and the others still run, except those reading its run (``skipped``), so one
    rehearsal lists every break of the paper path at once. ``jobs > 1`` runs that many steps at once, each as soon
    as the runs it reads are done (one torch thread each); ``90_summary`` always runs last.

    Returns:
        ``{"out", "ok": [run ids], "failed": {run id: first error line}, "skipped": [...], "wall_s"}``.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from ..workbook.runner import RunFailed, StaleRun, run

    out = Path(out).resolve()
    t0 = time.time()
    files = paper_params(root, only)  # the repository's files, run as they are
    if not files:
        raise FileNotFoundError(f"no params/*/paper_*.yaml under {root} matches {only!r}")
    build_tree(out, files, root)
    log.info("[rehearsal] tree ready in %.0f s: %s (%d params files)", time.time() - t0, out, len(files))
    ids = {c: f"{c.parent.name}/{c.stem}" for c in files}
    deps = {c: {u for u in _upstream(c, root) if u in ids} for c in files}
    last = {c for c in files if c.parent.name.startswith("9")}  # collectors read every other run
    for c in last:
        deps[c] |= set(files) - last
    ok, failed, skipped = [], {}, []
    done: set[Path] = set()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        running: dict = {}
        while len(done) < len(files):
            for c in files:
                if c in done or c in running.values() or len(running) >= max(1, jobs):
                    continue
                if deps[c] <= done:
                    if any(ids[d] in failed or ids[d] in skipped for d in deps[c] if c not in last):
                        skipped.append(ids[c])
                        done.add(c)
                        continue
                    threads = None if jobs <= 1 else 1
                    running[pool.submit(run, c, force=force, root=out, threads=threads, overrides=OVERRIDE)] = c
            if not running:
                if len(done) < len(files) and not any(deps[c] <= done for c in files if c not in done):
                    raise RuntimeError(f"steps that can never start: {[ids[c] for c in files if c not in done]}")
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                c = running.pop(fut)
                done.add(c)
                try:
                    fut.result()
                    ok.append(ids[c])
                except (RunFailed, StaleRun) as e:  # stale: a finished run of other inputs (--force redoes it)
                    failed[ids[c]] = str(e).splitlines()[0]
                    log.error("[rehearsal] %s failed: %s", ids[c], failed[ids[c]])
    return {"out": str(out), "ok": ok, "failed": failed, "skipped": skipped, "wall_s": round(time.time() - t0, 1)}
