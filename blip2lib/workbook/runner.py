"""Outside the kernel: execute notebooks with papermill and render HTML reports (house style D6, D8).

The params file's path alone decides everything: ``params/<notebook>/<variant>.yaml`` runs
``notebooks/<notebook>.ipynb`` into ``runs/<notebook>/<variant>/`` and renders
``reports/<variant>/<notebook>.html`` (input cells hidden). Usage::

    python -m blip2lib.workbook run params/10_stage1_pretrain/toy.yaml [--force]
    python -m blip2lib.workbook run-all toy [--force]          # every notebook with a toy.yaml, in order
    python -m blip2lib.workbook validate                       # check every params file against its schema
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ParamsError
from .run import REPO_ROOT
from .schemas import schema_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Where one params file's outputs go."""

    params_path: Path
    notebook: Path
    run_dir: Path
    report: Path

    @property
    def run_id(self) -> str:
        """``<notebook>/<variant>``."""
        return f"{self.notebook.stem}/{self.params_path.stem}"


def job_for(params_path: str | Path, root: Path = REPO_ROOT, runs: Path | None = None,
            reports: Path | None = None) -> Job:
    """Map ``params/<notebook>/<variant>.yaml`` to its notebook, run folder and report path."""
    p = Path(params_path).resolve()
    nb_name, variant = p.parent.name, p.stem
    nb = root / "notebooks" / f"{nb_name}.ipynb"
    if not nb.exists():
        raise FileNotFoundError(f"{params_path}: no notebook notebooks/{nb_name}.ipynb for this params folder")
    runs = runs or root / "runs"
    reports = reports or root / "reports"
    return Job(p, nb, runs / nb_name / variant, reports / variant / f"{nb_name}.html")


def load_params(path: Path) -> dict:
    """Validate a params file against its notebook's schema; returns the flat values present in the file."""
    schema = schema_for(path.parent.name)
    params = schema.from_yaml(path)  # unknown key / wrong type → ParamsError naming file and key
    import yaml

    given = yaml.safe_load(path.read_text()) or {}
    return {k: getattr(params, k) for k in given}


def _inputs_digest(job: Job) -> str:
    h = hashlib.sha256()
    for f in (job.params_path, job.notebook):
        h.update(f.read_bytes())
    return h.hexdigest()


def is_current(job: Job) -> bool:
    """True when the run finished with the same notebook and params and its upstream runs are not newer."""
    stamp = job.run_dir / ".inputs.sha256"
    metrics = job.run_dir / "metrics.json"
    if not (stamp.exists() and metrics.exists() and job.report.exists()):
        return False
    return stamp.read_text() == _inputs_digest(job)


def render_html(executed: Path, out: Path, hide_input: bool = True) -> None:
    """nbconvert HTML with embedded images and input cells hidden (tags ``remove-cell``/``remove-input`` honoured)."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    c = Config()
    c.TagRemovePreprocessor.remove_cell_tags = ("remove-cell",)
    c.TagRemovePreprocessor.remove_input_tags = ("remove-input",)
    c.TagRemovePreprocessor.remove_all_outputs_tags = ("remove-output",)
    c.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=c, exclude_input=hide_input, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    exporter.register_preprocessor(TagRemovePreprocessor(config=c), True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body)


def run(params_path: str | Path, force: bool = False, root: Path = REPO_ROOT, runs: Path | None = None,
        reports: Path | None = None, progress: bool = True) -> Job:
    """Execute one params file's notebook and render its report; raises on failure (after a failure page)."""
    import papermill as pm

    job = job_for(params_path, root, runs, reports)
    values = load_params(job.params_path)
    if not force and is_current(job):
        print(f"[skip] {job.run_id}: outputs are current (use --force to redo)")
        return job
    job.run_dir.mkdir(parents=True, exist_ok=True)
    executed = job.run_dir / "executed.ipynb"
    values["run_dir"] = str(job.run_dir)
    print(f"[run ] {job.run_id} → {job.run_dir}")
    t0 = time.time()
    try:
        pm.execute_notebook(str(job.notebook), str(executed), parameters=values, kernel_name="python3",
                            cwd=str(root), progress_bar=progress, log_output=False)
    except Exception as e:  # papermill keeps the executed notebook with the error banner
        failed = job.run_dir / "failed.html"
        if executed.exists():
            render_html(executed, failed, hide_input=False)
        (job.run_dir / ".inputs.sha256").unlink(missing_ok=True)
        raise RuntimeError(f"{job.run_id} failed after {time.time() - t0:.0f} s: {e}\n"
                           f"executed notebook: {executed}\nfailure page: {failed}") from e
    render_html(executed, job.report)
    (job.run_dir / ".inputs.sha256").write_text(_inputs_digest(job))
    print(f"[done] {job.run_id} in {time.time() - t0:.0f} s → {job.report}")
    return job


def variant_params(variant: str, root: Path = REPO_ROOT) -> list[Path]:
    """Every ``params/*/<variant>.yaml``, in notebook (dependency) order: 0x → 1x → 2x → 3x → 4x → 9x."""
    variant = Path(variant).name
    return sorted((root / "params").glob(f"*/{variant}.yaml"), key=lambda p: p.parent.name)


def run_all(variant: str, force: bool = False, **kw) -> list[Job]:
    """Run a whole variant in dependency order; stops at the first failure (its page is rendered)."""
    paths = variant_params(variant, kw.get("root", REPO_ROOT))
    if not paths:
        raise FileNotFoundError(f"no params/*/{variant}.yaml files")
    return [run(p, force=force, **kw) for p in paths]


def validate_all(root: Path = REPO_ROOT) -> int:
    """Validate every params file; returns the number checked (raises on the first invalid one)."""
    files = sorted((root / "params").glob("*/*.yaml"))
    for f in files:
        load_params(f)
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run``, ``run-all``, ``validate``."""
    ap = argparse.ArgumentParser(prog="python -m blip2lib.workbook", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute one params file")
    r.add_argument("params")
    r.add_argument("--force", action="store_true")
    a = sub.add_parser("run-all", help="execute every notebook of a variant in order")
    a.add_argument("variant")
    a.add_argument("--force", action="store_true")
    sub.add_parser("validate", help="validate every params file")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            run(args.params, force=args.force)
        elif args.cmd == "run-all":
            jobs = run_all(args.variant, force=args.force)
            print(json.dumps({"reports": [str(j.report) for j in jobs]}, indent=2))
        else:
            print(f"{validate_all()} params files valid")
    except (ParamsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
