"""The variant index: every run's ``metrics.json`` → ``reports/<variant>/index.html``.

One row per notebook run of a variant (status, wall time, verdict counts of its "paper vs reproduced" table, its
headline metrics), each linking its report by a relative link, so the folder can be committed, copied or served
as is. The page is self-contained: inline CSS, no scripts, no network.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from .run import REPO_ROOT

VERDICTS = ("match", "differs", "met", "missed", "not measured", "no published number", "rehearsal", "plumbing only")
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:75em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.ok{color:#17692b}.failed{color:#b00020}.incomplete{color:#a15c00}
td.n{text-align:right}small{color:#666}"""


def collect_runs(runs_root: str | Path, variant: str, exclude: tuple[str, ...] = ()) -> list[dict]:
    """Read ``<runs_root>/<notebook>/<variant>/metrics.json`` of every notebook, in notebook order.

    Args:
        runs_root: the ``runs/`` folder.
        variant: the params variant (``toy``, ``smoke``, ``vitg``…).
        exclude: notebook names to leave out.

    Returns:
        One dict per run: ``notebook``, ``status`` (``ok``/``failed``/``incomplete``), ``wall_time_s``,
        ``finished``, ``git_commit``, ``metrics`` (name → ``{"value", "unit"}``), ``comparison`` (rows of
        :func:`blip2lib.workbook.compare_to_paper`) and ``verdicts`` (verdict → count).
    """
    rows = []
    for metrics_path in sorted(Path(runs_root).glob(f"*/{variant}/metrics.json")):
        run_dir = metrics_path.parent
        notebook = run_dir.parent.name
        if notebook in exclude:
            continue
        data = json.loads(metrics_path.read_text())
        status_path = run_dir / "status.json"
        status = json.loads(status_path.read_text()) if status_path.exists() else {"status": "incomplete"}
        comparison = data.get("comparison", [])
        verdicts = {v: sum(r.get("verdict") == v for r in comparison) for v in VERDICTS}
        rows.append({"notebook": notebook, "variant": run_dir.name, "status": status["status"], "run_dir": str(run_dir),
                     "wall_time_s": status.get("wall_time_s", data.get("wall_time_s")),
                     "finished": status.get("finished", ""), "git_commit": data.get("env", {}).get("git_commit", ""),
                     "metrics": data.get("metrics", {}), "comparison": comparison, "verdicts": verdicts})  # fmt: skip
    return rows


def roots_for(run: Any, runs_root: str = "", reports_root: str = "", variant: str = "") -> tuple[Path, Path, str]:
    """Resolve the summary notebook's ``""`` defaults.

    From the runner's ``job.json`` when there is one, else ``runs/``, ``reports/`` and the run folder's name.
    """
    job = getattr(run, "job", {}) or {}
    return (Path(runs_root or job.get("runs_root") or REPO_ROOT / "runs"),
            Path(reports_root or job.get("reports_root") or REPO_ROOT / "reports"),
            variant or job.get("variant") or Path(run.dir).name)  # fmt: skip


def verdict_totals(rows: list[dict]) -> dict[str, int]:
    """Verdict → count over all runs' "paper vs reproduced" rows."""
    return {v: sum(r["verdicts"][v] for r in rows) for v in VERDICTS}


def overview(rows: list[dict]):
    """The overview as a pandas DataFrame (one row per run: status, wall time, verdict counts, metric count)."""
    import pandas as pd

    return pd.DataFrame([{"notebook": r["notebook"], "status": r["status"], "wall time (s)": r["wall_time_s"],
                          **r["verdicts"], "metrics": len(r["metrics"])} for r in rows])  # fmt: skip


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _headline(metrics: dict, limit: int = 6) -> str:
    items = [f"{html.escape(k)} = {_fmt(m.get('value'))} {html.escape(m.get('unit') or '')}".strip()
             for k, m in list(metrics.items())[:limit]]  # fmt: skip
    more = f" <small>(+{len(metrics) - limit} more)</small>" if len(metrics) > limit else ""
    return "<br>".join(items) + more


def index_folder(variant: str) -> str:
    """Folder of a variant's index: the variant, or for a glob (``paper_*``) its literal prefix (``paper``)."""
    cut = min((variant.index(c) for c in "*?[" if c in variant), default=len(variant))
    return variant[:cut].rstrip("_-.") or "all"


def build_index(runs_root: str | Path, reports_root: str | Path, variant: str) -> Path:
    """Write ``<reports_root>/<variant>/index.html`` linking every report of the variant.

    Args:
        runs_root: the ``runs/`` folder holding ``<notebook>/<variant>/metrics.json``.
        reports_root: the ``reports/`` folder; reports are ``<reports_root>/<variant>/<notebook>.html``.
        variant: the params variant, or a glob over variants (``paper_*``: every paper run; the index goes to
            :func:`index_folder`'s folder, ``reports/paper/``).

    Returns:
        The path of the index. A run whose report does not exist (failed, or still running) is listed without a
        link, so the page never holds a broken link.
    """
    out_dir = Path(reports_root) / index_folder(variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(runs_root, variant)
    totals = verdict_totals(rows)
    several = any(c in variant for c in "*?[")  # a glob collects several variants: name each run's own
    body, cells = [], []
    for r in rows:
        report = Path(reports_root) / r["variant"] / f"{r['notebook']}.html"
        name = html.escape(f"{r['notebook']} · {r['variant']}" if several else r["notebook"])
        cells += [f"<tr><td>{name}</td><td>{html.escape(str(c.get('target', c.get('metric'))))}</td>"
                  f"<td class=\"n\">{_fmt(c.get('reproduced'))}</td><td class=\"n\">{_fmt(c.get('paper / goal'))}</td>"
                  f"<td>{html.escape(str(c.get('verdict')))}</td></tr>" for c in r["comparison"]]  # fmt: skip
        if report.exists() and r["status"] == "ok":
            link = os.path.relpath(report, out_dir)
            name = f'<a href="{html.escape(link)}">{name}</a>'
        wall = "" if r["wall_time_s"] is None else f"{float(r['wall_time_s']):.0f} s"
        counts = "".join(f'<td class="n">{r["verdicts"][v]}</td>' for v in VERDICTS)
        body.append(
            f'<tr><td>{name}</td><td class="{r["status"]}">{r["status"]}</td>{counts}'
            f'<td class="n">{wall}</td><td>{_headline(r["metrics"])}</td>'
            f"<td>{html.escape(r['git_commit'])}<br><small>{html.escape(r['finished'])}</small></td></tr>"
        )
    head = "".join(f"<th>{v}</th>" for v in VERDICTS)
    summary = ", ".join(f"{totals[v]} {v}" for v in VERDICTS)
    n_ok = sum(r["status"] == "ok" for r in rows)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>BLIP-2 workbook: {html.escape(variant)}</title>
<style>{_CSS}</style></head><body>
<h1>BLIP-2 workbook — variant <code>{html.escape(variant)}</code></h1>
<p>{len(rows)} runs ({n_ok} ok). Paper comparisons: {summary}.</p>
<table><thead><tr><th>notebook</th><th>status</th>{head}<th>wall time</th><th>metrics</th><th>commit</th></tr>
</thead><tbody>
{"".join(body) or '<tr><td colspan="10">no runs yet</td></tr>'}
</tbody></table>
<h2>Paper and goal rows</h2>
<table><thead><tr><th>run</th><th>paper cell / goal</th><th>reproduced</th><th>paper / goal</th><th>verdict</th></tr>
</thead><tbody>
{"".join(cells) or '<tr><td colspan="5">no comparison rows</td></tr>'}
</tbody></table>
</body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page)
    return index


START, END = "<!-- results:start -->", "<!-- results:end -->"


def results_markdown(runs_root: str | Path, variant: str) -> str:
    """Markdown table of every goal / paper row of a variant's runs (measured values only, from metrics.json)."""
    rows = collect_runs(runs_root, variant, exclude=("90_summary",))
    lines = [
        f"Measured by `make demo` (variant `{variant}`), commit {rows[0]['git_commit'] if rows else '–'}; "
        f"generated by `python -m blip2lib.workbook readme {variant}`.",
        "",
        "| notebook | goal / paper cell | reproduced | goal / paper | baseline | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for c in r["comparison"]:
            lines.append(
                f"| {r['notebook']} | {c.get('target', c.get('metric'))} | {_fmt(c.get('reproduced'))} | "
                f"{_fmt(c.get('paper / goal'))} | {_fmt(c.get('baseline')) if c.get('baseline') is not None else ''} "
                f"| {c.get('verdict')} |"
            )
    if len(lines) == 4:
        lines.append("| – | no run of this variant yet: run `make demo` | | | | |")
    return "\n".join(lines)


def update_readme(readme: str | Path, runs_root: str | Path, variant: str) -> bool:
    """Replace the block between the results markers of ``readme``; returns whether it changed."""
    path = Path(readme)
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path}: no {START} … {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{results_markdown(runs_root, variant)}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text
