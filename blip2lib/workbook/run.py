"""Run bookkeeping used inside notebooks: run folder, watermark, metrics, paper comparison."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGETS = REPO_ROOT / "params" / "paper_targets.yaml"

_CURRENT: Run | None = None


def git_commit(root: Path = REPO_ROOT) -> str:
    """Short git commit of the checkout ("unknown" outside a repository), with "+dirty" for local changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Library versions and hardware, for the report header and every result file."""
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"}
    for name in ("transformers", "timm", "blip2lib"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
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

    @property
    def metrics_path(self) -> Path:
        """``<run_dir>/metrics.json``."""
        return self.dir / "metrics.json"

    def save(self) -> None:
        """Write ``metrics.json`` atomically (units stated per value)."""
        payload = {"metrics": self.metrics, "params": self.params, "env": self.env,
                   "wall_time_s": round(time.time() - self.started, 1)}
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, self.metrics_path)


def start_run(params: Any, notebook: str = "") -> Run:
    """Create the run folder, write ``config.resolved.yaml`` and ``env.json``, show a header; returns the Run."""
    global _CURRENT
    values = params.to_dict() if hasattr(params, "to_dict") else dict(params)
    run_dir = Path(values.get("run_dir") or REPO_ROOT / "runs" / (notebook or "adhoc") / "interactive")
    run_dir.mkdir(parents=True, exist_ok=True)
    values["run_dir"] = str(run_dir)
    run = Run(dir=run_dir, params=values, env=environment())
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(values, sort_keys=True))
    (run_dir / "env.json").write_text(json.dumps(run.env, indent=2))
    run.save()
    _CURRENT = run
    _display_header(run, notebook)
    return run


def _display_header(run: Run, notebook: str) -> None:
    try:
        from IPython.display import HTML, display
    except ImportError:
        return
    rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in
                   [("notebook", notebook), ("run folder", run.dir), ("git commit", run.env["git_commit"]),
                    ("hardware", run.env["device"]), ("torch / transformers / timm",
                     f"{run.env['torch']} / {run.env['transformers']} / {run.env['timm']}"),
                    ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started)))])
    display(HTML(f"<table>{rows}</table>"))


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

        display({"application/vnd.blip2.metric+json": {"name": name, "value": value, "unit": unit},
                 "text/plain": f"{name} = {value} {unit}".strip()}, raw=True)
    except ImportError:
        pass
    return value


def load_targets(path: Path = TARGETS) -> list[dict]:
    """All paper numbers: list of ``{id, table, row, column, value, tolerance, source}``."""
    data = yaml.safe_load(Path(path).read_text())
    return data["targets"]


def compare_to_paper(metrics: dict[str, float], targets: dict[str, str | dict], path: Path = TARGETS):
    """The "paper vs reproduced" table: one row per metric.

    Args:
        metrics: measured values by metric name.
        targets: metric name → a paper-target id from ``paper_targets.yaml``, or an inline goal
            ``{"goal": float, "direction": ">=", "label": str, "baseline": float | None}`` (toy variant goals).
        path: the targets file.

    Returns:
        A pandas DataFrame (value, target, delta, verdict).
    """
    import pandas as pd

    by_id = {t["id"]: t for t in load_targets(path)}
    rows = []
    for name, ref in targets.items():
        value = metrics.get(name)
        if isinstance(ref, dict):
            goal, label, tol, direction = ref["goal"], ref.get("label", name), 0.0, ref.get("direction", ">=")
            base = ref.get("baseline")
        else:
            t = by_id[ref]
            goal, label, tol, direction = t["value"], f"{t['table']} · {t['row']} · {t['column']}", t.get(
                "tolerance", 0.5), "≈"
            base = None
        if value is None:
            verdict = "not measured"
        elif direction == ">=":
            verdict = "met" if value >= goal else "missed"
        else:
            verdict = "match" if abs(value - goal) <= tol else "differs"
        rows.append({"metric": name, "target": label, "reproduced": value, "paper / goal": goal,
                     "delta": None if value is None else round(value - goal, 2), "baseline": base,
                     "verdict": verdict})
    return pd.DataFrame(rows)
