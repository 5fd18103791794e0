"""One shared smoke tree per test session: each ``params/*/smoke.yaml`` is executed at most once, by any worker.

The per-notebook tests (``test_smoke.py``) fill it and ``test_smoke_values.py`` reads it; the browser test only opens
the reports. Under pytest-xdist the workers share the tree (it lives in the session's common temporary folder): a
per-notebook file lock makes a second worker wait for the run in progress instead of repeating it, and a notebook
that collects its variant (``90_summary``) first gets every other run, so its tables never depend on timing.
"""

import fcntl
from pathlib import Path

import pytest

from blip2lib.workbook.runner import Job, job_for, run, variant_params
from blip2lib.workbook.schemas import schema_for


@pytest.fixture(scope="session")
def smoke_tree(tmp_path_factory):
    """``get(params_path) -> Job`` running into one temporary ``runs/``+``reports/`` tree; ``get.root`` is it."""
    import os

    base = tmp_path_factory.getbasetemp()  # under xdist: <session temp>/popen-gwN, one per worker
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "smoke-tree"
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    trees = {"runs": root / "runs", "reports": root / "reports"}

    def get(params: Path) -> Job:
        params = Path(params).resolve()
        name = params.parent.name
        if getattr(schema_for(name), "collects_variant", False):  # it reads every other run of the variant
            for other in variant_params(params.stem):
                if other.parent.name != name:
                    get(other)
        with open(locks / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the run raises
            done = locks / f"{name}.done"
            if done.exists():
                return job_for(params, **trees)
            job = run(params, force=True, **trees)  # a failed run raises, writes no marker: the next caller retries
            done.touch()
            return job

    get.root = root
    return get
