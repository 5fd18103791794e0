"""Run bookkeeping used inside notebooks: run folder, watermark, metrics, paper comparison."""

from __future__ import annotations

import html
import importlib.metadata
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGETS = REPO_ROOT / "params" / "paper_targets.yaml"

_CURRENT: Run | None = None


def git_commit(root: Path = REPO_ROOT) -> str:
    """Short git commit of the checkout ("unknown" outside a repository), with "+dirty" for local changes."""
    from ..checkpoint import git_state

    state = git_state(root)
    return (state["commit"][:7] if state["commit"] else "unknown") + ("+dirty" if state["dirty"] else "")


def environment() -> dict:
    """Library versions and hardware, for the report header and every result file."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
    }
    for name in ("transformers", "timm", "blip2lib"):
        try:  # package metadata, not an import: importing transformers/timm costs seconds per notebook
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    env["git_commit"] = git_commit()
    return env


@dataclass
class Run:
    """One executed notebook: its folder, params and metrics."""

    dir: Path
    params: dict
    env: dict
    started: float = field(default_factory=time.time)
    metrics: dict = field(default_factory=dict)
    comparison: list[dict] = field(default_factory=list)
    job: dict = field(default_factory=dict)  # the runner's ``job.json`` (run id, params file, report path), if any

    @property
    def metrics_path(self) -> Path:
        """``<run_dir>/metrics.json``."""
        return self.dir / "metrics.json"

    def save(self) -> None:
        """Write ``metrics.json`` atomically (units stated per value)."""
        payload = {
            "metrics": self.metrics,
            "comparison": self.comparison,
            "params": self.params,
            "env": self.env,
            "job": self.job,
            "wall_time_s": round(time.time() - self.started, 1),
        }
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, self.metrics_path)


def _notebook_name(params: Any) -> str:
    """The notebook a params object belongs to: its registered schema, else JupyterLab's session name, else ""."""
    from .schemas import SCHEMAS

    for name, cls in SCHEMAS.items():
        if type(params) is cls:
            return name
    session = os.environ.get("JPY_SESSION_NAME", "")  # JupyterLab sets it to the notebook's path in the kernel
    return Path(session).stem if session.endswith(".ipynb") else ""


def adhoc_run_dir(notebook: str = "") -> Path:
    """A new folder ``runs/adhoc/<notebook>-<UTC time, microseconds>`` for a notebook executed outside the runner.

    Why one per execution: with one shared folder, stage 2 started in JupyterLab found stage 1's checkpoints there
    and tried to resume them. ``interactive`` stands in for a notebook whose name is unknown.
    """
    base = REPO_ROOT / "runs" / "adhoc"
    base.mkdir(parents=True, exist_ok=True)
    while True:  # mkdir without exist_ok claims the name: two kernels started in the same microsecond differ
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        run_dir = base / f"{notebook or 'interactive'}-{stamp}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue


def start_run(params: Any, notebook: str = "") -> Run:
    """Create the run folder, write ``config.resolved.yaml`` and ``env.json``, show a header; returns the Run.

    Args:
        params: the notebook's params (a schema instance or a dict); its ``run_dir`` is the runner's folder.
        notebook: notebook name for the header and an ad-hoc folder (default: found from the params' schema).

    Without a ``run_dir`` (JupyterLab, papermill without the runner) every call gets a fresh
    :func:`adhoc_run_dir`, so two executions never share checkpoints.
    """
    global _CURRENT
    values = params.to_dict() if hasattr(params, "to_dict") else dict(params)
    notebook = notebook or _notebook_name(params)
    run_dir = Path(values["run_dir"]) if values.get("run_dir") else adhoc_run_dir(notebook)
    run_dir.mkdir(parents=True, exist_ok=True)
    values["run_dir"] = str(run_dir)
    job_path = run_dir / "job.json"
    job = json.loads(job_path.read_text()) if job_path.exists() else {}
    if job.get("threads"):  # run-all -j N: the runner's share of the cores for this step
        import torch

        torch.set_num_threads(int(job["threads"]))
    run = Run(dir=run_dir, params=values, env=environment(), job=job)
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(values, sort_keys=True))
    (run_dir / "env.json").write_text(json.dumps(run.env, indent=2))
    run.save()
    _CURRENT = run
    _display_header(run, notebook or job.get("notebook", ""))
    return run


def _display_header(run: Run, notebook: str) -> None:
    try:
        from IPython.display import HTML, display
    except ImportError:
        return
    rows = "".join(
        f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>"
        for k, v in [
            ("notebook", notebook),
            ("run folder", run.dir),
            ("git commit", run.env["git_commit"]),
            ("hardware", run.env["device"]),
            ("torch / transformers / timm", f"{run.env['torch']} / {run.env['transformers']} / {run.env['timm']}"),
            ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started))),
        ]
    )
    # the runner renders its own header (with wall time) at the top of the report and drops this one
    display(HTML(f"<table>{rows}</table>"), metadata={"blip2": {"role": "header"}})


def record(name: str, value: Any, unit: str = "", run: Run | None = None) -> Any:
    """Append a measured value to ``metrics.json`` (``{"value", "unit"}``) and display it; returns ``value``."""
    run = run or _CURRENT
    if run is None:
        raise RuntimeError("record() needs start_run() first")
    if isinstance(value, float) and not math.isfinite(value):
        value = None if math.isnan(value) else value
    run.metrics[name] = {"value": value, "unit": unit}
    run.save()
    try:
        from IPython.display import display

        display(
            {
                "application/vnd.blip2.metric+json": {"name": name, "value": value, "unit": unit},
                "text/plain": f"{name} = {value} {unit}".strip(),
            },
            raw=True,
        )
    except ImportError:
        pass
    return value


def load_targets(path: Path = TARGETS) -> list[dict]:
    """All paper numbers: list of ``{id, table, row, column, value, tolerance, source}``."""
    data = yaml.safe_load(Path(path).read_text())
    return data["targets"]


def _decimals(x: float) -> int:
    """Decimals of a number as printed in the paper (65.0 → 1, 121.6 → 1, 89 → 0)."""
    text = repr(float(x)) if not isinstance(x, int) else str(x)
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def _measured(value: Any) -> float | None:
    if isinstance(value, dict):  # a record() entry {"value", "unit"}
        value = value.get("value")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare_to_paper(metrics: dict[str, Any], targets: dict[str, str | dict], path: Path = TARGETS,
                     run: Run | None = None, show: bool = True):  # fmt: skip
    """The "paper vs reproduced" table: one row per metric; stored in ``metrics.json`` under ``comparison``.

    Verdicts: ``match`` / ``differs`` (paper target: ``|value - paper| <= tolerance``), ``met`` / ``missed``
    (inline goal with ``direction`` ``">="`` or ``"<="``), ``not measured`` (metric missing, None or NaN),
    ``no published number`` (a paper row whose ``value`` is null, e.g. a Figure 5 curve: listed with our value).

    Args:
        metrics: measured values by metric name (floats, or ``record``-style ``{"value", "unit"}`` entries).
        targets: metric name → a paper-target id from ``paper_targets.yaml``, or an inline goal
            ``{"goal": float, "direction": ">=" | "<=", "label": str, "baseline": float | None}`` (toy goals).
        path: the targets file.
        run: the run to store the rows in (default: the current run, if any).
        show: display the table (marked, so the runner can move it to the top of the report).

    Returns:
        A pandas DataFrame (metric, target, reproduced, paper / goal, delta, tolerance, baseline, verdict), with
        values and deltas rounded to the paper's printed precision.
    """
    import pandas as pd

    by_id = {t["id"]: t for t in load_targets(path)} if any(isinstance(r, str) for r in targets.values()) else {}
    rows = []
    for name, ref in targets.items():
        value = _measured(metrics.get(name, metrics.get(name.split("@")[0])))  # "x@table1": same cell
        if isinstance(ref, dict):
            goal, label, tol, direction = float(ref["goal"]), ref.get("label", name), None, ref.get("direction", ">=")
            base = ref.get("baseline")
        else:
            if ref not in by_id:
                raise KeyError(f"paper target id '{ref}' (for metric '{name}') is not in {path}")
            t = by_id[ref]
            label, base = f"{t['table']} · {t['row']} · {t['column']}", None
            if t["value"] is None:  # a paper row printed without a number (Figure 5's curves): listed, not judged
                goal, tol, direction = None, None, "none"
            else:
                goal, tol, direction = float(t["value"]), float(t.get("tolerance", 0.5)), "≈"
        # paper numbers at the paper's printed precision; toy goals (often 0.9-like) keep 3 more decimals
        if isinstance(ref, str):  # a row without a paper number shows ours to 2 decimals
            digits = 2 if goal is None else _decimals(by_id[ref]["value"])
        else:
            digits = max(_decimals(ref["goal"]), 3)
        if goal is None:
            verdict = "no published number"
        elif value is None:
            verdict = "not measured"
        elif direction == ">=":
            verdict = "met" if value >= goal else "missed"
        elif direction == "<=":
            verdict = "met" if value <= goal else "missed"
        else:
            verdict = "match" if abs(value - goal) <= tol + 1e-9 else "differs"
        rows.append({"metric": name, "target": label, "reproduced": None if value is None else round(value, digits),
                     "paper / goal": goal, "delta": None if None in (value, goal) else round(value - goal, digits),
                     "tolerance": tol, "baseline": base, "verdict": verdict})  # fmt: skip
    run = run or _CURRENT
    if run is not None:
        run.comparison = rows
        run.save()
    table = pd.DataFrame(rows)
    if show:
        try:
            from IPython.display import display

            display(table, metadata={"blip2": {"role": "paper-table"}})
        except ImportError:
            pass
    return table


def provenance(run: Run | None = None) -> None:
    """Display the resolved config and environment (the runner re-renders both at the end of the report)."""
    from IPython.display import HTML, display

    run = run or _CURRENT
    if run is None:
        raise RuntimeError("provenance() needs start_run() first")
    cfg = html.escape(yaml.safe_dump(run.params, sort_keys=True))
    env = html.escape(json.dumps(run.env, indent=2))
    display(
        HTML(f"<h4>config</h4><pre>{cfg}</pre><h4>environment</h4><pre>{env}</pre>"),
        metadata={"blip2": {"role": "provenance"}},
    )
