"""One shared smoke tree per session: each ``params/*/smoke.yaml`` is executed at most once.

The per-notebook tests (``test_smoke.py``) fill it; the browser test then only opens the reports (it runs any
notebook not yet run, e.g. when selected alone with ``-k browser``).
"""

from pathlib import Path

import pytest

from blip2lib.workbook.runner import Job, run


@pytest.fixture(scope="session")
def smoke_tree(tmp_path_factory):
    """``get(params_path) -> Job`` running into one temporary ``runs/``+``reports/`` tree; ``get.root`` is it."""
    root = tmp_path_factory.mktemp("smoke-tree")
    done: dict[Path, Job] = {}

    def get(params: Path) -> Job:
        if params not in done:  # a failed run raises and is retried by the next caller
            done[params] = run(params, force=True, runs=root / "runs", reports=root / "reports")
        return done[params]

    get.root = root
    return get
