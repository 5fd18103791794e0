"""The dress rehearsal's driver: build the tree, then run every ``paper_*`` params file through the normal runner.

Layout of the rehearsal tree ``DIR`` (default ``runs/rehearsal``)::

    DIR/notebooks -> <repo>/notebooks        # the real notebooks (a symlink)
    DIR/params/<notebook>/paper_*.yaml       # the repository's file + one line: "model_scale: rehearsal"
    DIR/weights/...                          # every name the params give under weights/ (weights.py)
    DIR/data/...                             # every dataset they name under data_root (data.py)
    DIR/runs/<notebook>/<variant>/           # the runner's run folders
    DIR/reports/<variant>/<notebook>.html    # the runner's reports; DIR/reports/paper/index.html lists them all

How relative paths resolve: the runner executes each notebook with its root as the working directory, and the
rehearsal passes ``root=DIR``; so ``weights/...``, ``data`` and ``runs/...`` written in the params files resolve
inside the tree exactly as they resolve in a clone on the real host, with no path rewritten.

The only difference from a real run is the appended ``model_scale: rehearsal`` (``blip2lib.config``): the loaders
build the tiny architectures of the same families from the same files, and the run length is cut
(``REHEARSAL_RUN``). Every value is measured from tiny random models: the paper comparison's verdict is
``rehearsal``, never ``met`` or ``match``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from pathlib import Path

from ..config import load_params_yaml
from ..workbook.run import REPO_ROOT

log = logging.getLogger(__name__)

OVERRIDE = "model_scale: rehearsal  # the dress rehearsal's one size override (blip2lib/rehearsal)\n"
DEFAULT_OUT = REPO_ROOT / "runs" / "rehearsal"


def paper_params(root: Path = REPO_ROOT, only: str = "") -> list[Path]:
    """``params/*/paper_*.yaml`` in dependency order (notebook number, then name).

    ``only`` keeps the files whose ``<notebook>/<file stem>`` matches the glob, plus every run they read (their
    ``runs/<notebook>/<variant>`` values), transitively.
    """
    files = sorted(root.glob("params/*/paper_*.yaml"), key=lambda p: (p.parent.name, p.name))
    if not only:
        return files
    chosen = {p for p in files if fnmatch.fnmatch(f"{p.parent.name}/{p.stem}", only)}
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


def build_tree(out: Path, files: list[Path], root: Path = REPO_ROOT) -> list[Path]:
    """Write the rehearsal tree for ``files``; returns the tree's copies of the params files (same order)."""
    from .data import write_data
    from .weights import write_weight

    out.mkdir(parents=True, exist_ok=True)
    link = out / "notebooks"
    if not link.is_symlink():
        os.symlink(root / "notebooks", link, target_is_directory=True)
    copies, values, data = [], {}, {}
    for f in files:
        copy = out / "params" / f.parent.name / f.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        text = f.read_text()
        copy.write_text(text + ("" if text.endswith("\n") else "\n") + OVERRIDE)
        copies.append(copy)
        v = load_params_yaml(f)
        values[f"{f.parent.name}/{f.name}"] = v
        data.setdefault(v.get("data_root") or "data", {})[f"{f.parent.name}/{f.name}"] = v
    for name in sorted(set().union(*(weight_names(v) for v in values.values()))):
        write_weight(out, name)
    for data_root, named in data.items():
        write_data(out / data_root, named)
    return copies


def rehearse(out: Path = DEFAULT_OUT, only: str = "", force: bool = False, root: Path = REPO_ROOT) -> dict:
    """Build the tree and run the chosen ``paper_*`` files in order; returns ``{"ok", "failed", "wall_s"}``.

    A failed step is recorded and the rest still run (steps that read its run then fail too), so one rehearsal
    lists every break of the paper path at once.
    """
    from ..workbook.runner import RunFailed, run

    out = Path(out).resolve()
    t0 = time.time()
    files = paper_params(root, only)
    if not files:
        raise FileNotFoundError(f"no params/*/paper_*.yaml under {root} matches {only!r}")
    copies = build_tree(out, files, root)
    log.info("[rehearsal] tree ready in %.0f s: %s (%d params files)", time.time() - t0, out, len(copies))
    ok, failed = [], {}
    for copy in copies:
        run_id = f"{copy.parent.name}/{copy.stem}"
        try:
            run(copy, force=force, root=out)
            ok.append(run_id)
        except RunFailed as e:
            failed[run_id] = str(e).splitlines()[0]
            log.error("[rehearsal] %s failed: %s", run_id, failed[run_id])
    return {"out": str(out), "ok": ok, "failed": failed, "wall_s": round(time.time() - t0, 1)}
