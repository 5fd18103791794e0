"""Every notebook's smoke.yaml runs through the runner on CPU, outputs in a temporary tree."""

import json
import math
from pathlib import Path

import pytest

from blip2lib.workbook.schemas import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
SMOKE = sorted((ROOT / "params").glob("*/smoke.yaml"))


@pytest.mark.notebook
@pytest.mark.timeout(600)  # a run takes < 1 min; 90_summary (and xdist workers) may first wait for the others
@pytest.mark.parametrize("params", SMOKE, ids=[p.parent.name for p in SMOKE])
def test_smoke_run_records_expected_finite_metrics(params, smoke_tree):
    job = smoke_tree(params)
    assert job.run_dir.is_relative_to(smoke_tree.root) and job.report.is_relative_to(smoke_tree.root)
    metrics = json.loads((job.run_dir / "metrics.json").read_text())["metrics"]
    for key in SCHEMAS[params.parent.name].records:
        assert key in metrics, f"{job.run_id}: metric {key} not recorded"
        value = metrics[key]["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{job.run_id}: {key} = {value!r}"
    assert job.report.exists() and job.report.stat().st_size < 2_000_000
    assert json.loads((job.run_dir / "status.json").read_text())["status"] == "ok"
