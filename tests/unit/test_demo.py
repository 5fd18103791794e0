"""`make demo` wrapper: lists the steps, runs them in order with progress, exits 1 with the failure on a failed step."""

from pathlib import Path

from blip2lib import demo
from blip2lib.workbook import runner


def test_demo_runs_the_variant_in_order_and_reports_the_index(monkeypatch, capsys):
    calls = []

    def fake_run_all(variant, force=False, progress=False, jobs=1, estimates=None, **kw):
        calls.append((variant, force, progress, jobs, estimates))
        return [runner.Job(params_path=Path(f"p/{variant}.yaml"), notebook=Path("n.ipynb"), run_dir=Path("runs/x"),
                           report=Path("reports/smoke/x.html"))]  # fmt: skip

    monkeypatch.setattr(runner, "run_all", fake_run_all)
    assert demo.main(["--variant", "smoke", "--force"]) == 0
    assert calls == [("smoke", True, True, 2, None)]  # two notebooks at a time by default; no timing hints
    out = capsys.readouterr().out
    assert "params/10_stage1_pretrain/smoke.yaml" in out and "demo finished" in out


def test_demo_exits_1_with_the_failure(monkeypatch, capsys):
    def failing(*a, **kw):
        raise runner.RunFailed("10_stage1_pretrain/smoke failed after 3 s: boom")

    monkeypatch.setattr(runner, "run_all", failing)
    assert demo.main(["--variant", "smoke"]) == 1
    assert "demo stopped: 10_stage1_pretrain/smoke failed after 3 s: boom" in capsys.readouterr().err


def test_demo_orders_a_first_toy_run_by_every_toy_steps_measured_wall():
    """The launch-order hints name exactly the toy variant's steps (a new or renamed notebook must be timed)."""
    from blip2lib.workbook.run import REPO_ROOT

    steps = {f"{p.parent.name}/toy" for p in runner.variant_params("toy", REPO_ROOT)}
    assert set(demo.TOY_WALLS) == steps
    assert all(1 <= s <= 600 for s in demo.TOY_WALLS.values())


def test_demo_stops_on_stale_runs_with_exit_2_and_says_how_to_redo_them(monkeypatch, capsys):
    def stale(*a, **kw):
        raise runner.StaleRuns("1 finished run is stale: 10_stage1_pretrain/toy (library files changed: viz.py)")

    monkeypatch.setattr(runner, "run_all", stale)
    assert demo.main(["--variant", "toy"]) == 2
    err = capsys.readouterr().err
    assert "demo stopped: 1 finished run is stale: 10_stage1_pretrain/toy" in err
    assert "nothing was deleted; `make demo FORCE=1` moves the stale runs aside" in err
