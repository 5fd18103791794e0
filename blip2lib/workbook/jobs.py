"""Which notebook, run folder, params and inputs a params file means: the runner's jobs, before any kernel starts.

A params file in ``params/<notebook>/`` belongs to that notebook; one elsewhere names it with ``--notebook`` or a
``notebook:`` key. Its run folder is ``<runs>/<notebook>/<file stem>``. The inputs record of a finished run
(``inputs.json``) is compared with the present one to tell "up to date" from "stale, and what changed".
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import ParamsError, load_params_yaml
from .inputs import (
    NOTEBOOK_KEY,
    check_values,
    describe_changes,
    field_types,
    inputs_record,
    override_texts,
    overrides_for,
    rebase_runs,
    record_digest,
    split_override,
    typed_override,
)
from .run import REPO_ROOT, git_commit
from .schemas import schema_for

LIBRARY_ROOT = Path(__file__).resolve().parents[1]  # blip2lib/: its code is an input of every run


@dataclass(frozen=True)
class Job:
    """Where one params file's outputs go, and what the command line adds to it."""

    params_path: Path
    notebook: Path
    run_dir: Path
    report: Path
    overrides: tuple[str, ...] = ()  # -p KEY=VALUE texts, applied after the file's values
    rebase: Path | None = None  # --runs: the file's runs/... values move onto this folder

    @property
    def variant(self) -> str:
        """The params file's stem (``toy``, ``smoke``, ``vitg``…)."""
        return self.params_path.stem

    @property
    def run_id(self) -> str:
        """``<notebook>/<variant>``."""
        return f"{self.notebook.stem}/{self.params_path.stem}"


def _notebooks(root: Path) -> str:
    return ", ".join(sorted(p.stem for p in (root / "notebooks").glob("*.ipynb")))


def _notebook_for(path: Path, root: Path, notebook: str | None) -> str:
    """``--notebook``, else the file's ``notebook:`` key, else the params folder's name."""
    named = load_params_yaml(path).get(NOTEBOOK_KEY)
    if named is not None and not isinstance(named, str):
        raise ParamsError(f"{path}: key '{NOTEBOOK_KEY}' must be str (a notebook name), got {named!r}")
    if notebook and named and notebook != named:
        raise ParamsError(f"{path}: --notebook {notebook} contradicts the file's '{NOTEBOOK_KEY}: {named}'")
    name = notebook or named
    if name is None and (root / "notebooks" / f"{path.parent.name}.ipynb").exists():
        return path.parent.name
    if name is None and path.parent.parent != (root / "params").resolve():
        raise ParamsError(f"{path}: which notebook runs this file? Pass --notebook NAME or add a "
                          f"'{NOTEBOOK_KEY}: NAME' key (notebooks: {_notebooks(root)})")  # fmt: skip
    name = name or path.parent.name
    if not (root / "notebooks" / f"{name}.ipynb").exists():
        where = "this params folder" if name == path.parent.name else f"'{name}'"
        raise FileNotFoundError(f"{path}: no notebook notebooks/{name}.ipynb for {where} "
                                f"(notebooks: {_notebooks(root)})")  # fmt: skip
    return name


def job_for(params_path: str | Path, root: Path = REPO_ROOT, runs: Path | None = None, reports: Path | None = None,
            notebook: str | None = None,
            overrides: Iterable[str] | Mapping[str, Any] | None = None) -> Job:  # fmt: skip
    """Map a params file to its notebook, run folder ``<runs>/<notebook>/<stem>`` and report path."""
    p = Path(params_path).expanduser()
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    if not p.exists():
        raise FileNotFoundError(f"{params_path}: no such params file")
    p = p.resolve()
    name = _notebook_for(p, root, notebook)
    rebase = Path(runs).absolute() if runs is not None else None  # the kernel's cwd is root, not the caller's
    runs_root = rebase or root / "runs"
    reports = Path(reports).absolute() if reports is not None else root / "reports"
    return Job(p, root / "notebooks" / f"{name}.ipynb", runs_root / name / p.stem, reports / p.stem / f"{name}.html",
               override_texts(overrides), rebase)  # fmt: skip


def load_params(path: str | Path, notebook: str | None = None, overrides: Iterable[str] | Mapping = (),
                runs: Path | None = None) -> dict:  # fmt: skip
    """Validate a params file (plus overrides) against its notebook's schema; returns the values given, typed.

    Args:
        path: the params file.
        notebook: its notebook (default: the file's ``notebook:`` key, else its folder's name).
        overrides: ``KEY=VALUE`` texts applied after the file's values.
        runs: rebase the ``runs/...`` values onto this folder (``--runs``).

    Raises:
        ParamsError: unknown notebook, invalid YAML, unknown key or wrong type (the message names the file or the
            override, and the key).
    """
    path = Path(path)
    given = load_params_yaml(path)
    name = notebook or given.pop(NOTEBOOK_KEY, None) or path.parent.name
    given.pop(NOTEBOOK_KEY, None)  # consumed by the runner, never a schema key
    try:
        schema = schema_for(name)
    except KeyError as e:
        raise ParamsError(f"{path}: {e.args[0]}") from None
    check_values(given, schema, str(path))
    given.update(typed_override(t, schema) for t in override_texts(overrides))
    if runs is not None:
        given = rebase_runs(given, Path(runs))
    params = schema.from_dict(given, source=str(path))  # the schema's own cross-key checks
    return {k: getattr(params, k) for k in given}


def variant_params(variant: str, root: Path = REPO_ROOT) -> list[Path]:
    """Every ``params/*/<variant>.yaml``, in notebook (dependency) order: 0x → 1x → 2x → 3x → 4x → 9x."""
    variant = Path(variant).name
    return sorted((root / "params").glob(f"*/{variant}.yaml"), key=lambda p: p.parent.name)


def variant_jobs(variant: str, root: Path, runs: Path | None, reports: Path | None,
                  overrides: Iterable[str] | Mapping[str, Any] | None) -> list[Job]:  # fmt: skip
    """The variant's jobs, each with the overrides its schema has; every params file validated first."""
    paths = variant_params(variant, root)
    if not paths:
        raise FileNotFoundError(f"no params/*/{variant}.yaml files under {root}")
    texts = override_texts(overrides)
    schemas = [schema_for(p.parent.name) for p in paths]
    known = set().union(*(field_types(s) for s in schemas))
    for text in texts:  # a key no notebook of the variant has is a typo, not "applies nowhere"
        key = split_override(text)[0]
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean '{near[0]}'?" if near else "no notebook of the variant has it"
            raise ParamsError(f"-p {text}: unknown key '{key}' for the '{variant}' notebooks ({hint})")
    todo = [job_for(p, root, runs, reports, overrides=overrides_for(s, texts)) for p, s in zip(paths, schemas)]
    for j in todo:  # validate everything before executing anything
        _values(j)
    return todo


def _values(job: Job) -> dict:
    return load_params(job.params_path, job.notebook.stem, job.overrides, job.rebase)


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
    for text in _strings(_values(job)):
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


def _inputs(job: Job, root: Path = REPO_ROOT, commit: str = "") -> dict:
    """The record of what the outputs depend on: params values, notebook, upstream metrics, library code.

    The library is included so that a changed training recipe or toy-world builder marks the steps stale instead
    of leaving reports of the old code looking current.
    """
    runs_root = job.run_dir.parents[1].resolve()
    upstream = {str(m.parent.resolve().relative_to(runs_root)) if runs_root in m.resolve().parents else str(m.parent):
                m for m in _upstream_metrics(job, root)}  # fmt: skip
    return inputs_record(_values(job), job.notebook, upstream, LIBRARY_ROOT, commit)


def _inputs_digest(job: Job, root: Path = REPO_ROOT) -> str:
    """Digest of :func:`_inputs` (the git commit left out: a commit touching no input keeps a run current)."""
    return record_digest(_inputs(job, root))


def stale_changes(job: Job, root: Path = REPO_ROOT) -> list[str]:
    """What changed since the finished run recorded its ``inputs.json`` ([] when nothing did)."""
    try:
        then = json.loads((job.run_dir / "inputs.json").read_text())
    except (OSError, ValueError):
        return ["no inputs.json (finished before the runner recorded its inputs): what changed cannot be told"]
    now = _inputs(job, root)
    return [] if record_digest(then) == record_digest(now) else describe_changes(then, now) or ["inputs differ"]


def is_current(job: Job, root: Path = REPO_ROOT) -> bool:
    """True when the run finished and its params, notebook, upstream runs and library code are unchanged."""
    return finished(job.run_dir) and (job.run_dir / "metrics.json").exists() and not stale_changes(job, root)


def _stale_message(job: Job, root: Path, changes: list[str]) -> str:
    then = json.loads((job.run_dir / "inputs.json").read_text()) if (job.run_dir / "inputs.json").exists() else {}
    status = json.loads((job.run_dir / "status.json").read_text())
    lines = [
        f"[stale] {job.run_id} finished {status.get('finished', '?')} at commit "
        f"{then.get('git_commit') or 'unknown'}; the checkout is now at {git_commit(root)}. Changed since:"
    ]
    lines += [f"    {c}" for c in changes]
    lines.append(f"    the run in {job.run_dir} was not touched; --force moves it aside to "
                 f"{job.run_dir.name}.prev-<UTC time> and runs afresh")  # fmt: skip
    return "\n".join(lines)


def _move_aside(run_dir: Path) -> Path:
    """Rename a run folder to ``<name>.prev-<UTC time>`` (never deleted: its checkpoints may be days of training)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest, n = run_dir.with_name(f"{run_dir.name}.prev-{stamp}"), 1
    while dest.exists():
        dest, n = run_dir.with_name(f"{run_dir.name}.prev-{stamp}-{n}"), n + 1
    run_dir.rename(dest)
    return dest


def _collects(job: Job) -> bool:
    return getattr(schema_for(job.notebook.stem), "collects_variant", False)


def finished(run_dir: Path) -> bool:
    """The folder holds a run that completed (``status.json`` says ok)."""
    try:
        return json.loads((run_dir / "status.json").read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False
