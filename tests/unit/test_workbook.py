"""The workbook machinery: path mapping, validation, paper comparison, metrics, reports, index, runner."""

import json
import math
import os
import threading
import time
from dataclasses import dataclass

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from blip2lib.config import Params, ParamsError
from blip2lib.workbook import compare_to_paper, record, start_run
from blip2lib.workbook import run as run_mod
from blip2lib.workbook.report import render_html
from blip2lib.workbook.runner import _inputs_digest, is_current, job_for, load_params, main
from blip2lib.workbook.schemas import SCHEMAS
from blip2lib.workbook.summary import build_index, collect_runs

PROBE = "07_probe"


@dataclass
class ProbeParams(Params):
    fail: bool = False  # raise on purpose
    stage1_run: str = ""  # upstream run folder


PROBE_CELLS = [
    ("md", "# 07 · Probe"),
    (
        "code",
        'run_dir: str = ""  # out\nsmoke_test: bool = False  # s\nseed: int = 42  # s\nnum_gpus: int = 1  # g\n'
        'data_root: str = ""  # d\nweights_root: str = ""  # w\nfail: bool = False  # f\nstage1_run: str = ""  # u',
    ),
    (
        "code",
        "from pathlib import Path\nfrom blip2lib.workbook import record, start_run\n"
        "run = start_run({'run_dir': run_dir, 'fail': fail})\n"
        "open(Path(run_dir).parent / 'count.txt', 'a').write('x')\nrecord('answer', 42.0, 'units')\n"
        "Path(run_dir, 'kernel_cwd.txt').write_text(str(Path.cwd()))",
    ),
    ("code", "if fail:\n    raise ValueError('deliberate failure in the probe')"),
]


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A throwaway repository: notebooks/07_probe.ipynb, params/07_probe/{smoke,fail}.yaml, a registered schema."""
    monkeypatch.setitem(SCHEMAS, PROBE, ProbeParams)
    cells = [new_markdown_cell(s) if k == "md" else new_code_cell(s) for k, s in PROBE_CELLS]
    cells[1].metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})  # fmt: skip
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / f"{PROBE}.ipynb")
    (tmp_path / "params" / PROBE).mkdir(parents=True)
    (tmp_path / "params" / PROBE / "smoke.yaml").write_text("seed: 1  # test\n")
    (tmp_path / "params" / PROBE / "fail.yaml").write_text("fail: true\n")
    return tmp_path


# ---- path mapping and validation ------------------------------------------------------------------------------


def test_job_for_maps_params_path_to_notebook_run_dir_and_report(root):
    job = job_for(root / "params" / PROBE / "smoke.yaml", root=root)
    assert job.notebook == root / "notebooks" / f"{PROBE}.ipynb"
    assert job.run_dir == root / "runs" / PROBE / "smoke"
    assert job.report == root / "reports" / "smoke" / f"{PROBE}.html"
    assert (job.run_id, job.variant) == (f"{PROBE}/smoke", "smoke")
    relative = job_for(f"params/{PROBE}/smoke.yaml", root=root, runs=root / "R", reports=root / "H")
    assert (
        relative.run_dir == root / "R" / PROBE / "smoke" and relative.report == root / "H" / "smoke" / f"{PROBE}.html"
    )


def test_job_for_names_missing_notebook_and_missing_file(root):
    (root / "params" / "08_orphan").mkdir()
    (root / "params" / "08_orphan" / "x.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match="notebooks/08_orphan.ipynb"):
        job_for(root / "params" / "08_orphan" / "x.yaml", root=root)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        job_for(root / "params" / PROBE / "nope.yaml", root=root)


@pytest.mark.parametrize(("text", "key", "what"), [("seeed: 3\n", "seeed", "unknown key"),
                                                   ("seed: three\n", "seed", "must be"),
                                                   ("fail: 1\n", "fail", "must be")])  # fmt: skip
def test_validation_errors_name_file_and_key(root, text, key, what):
    path = root / "params" / PROBE / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value) and what in str(err.value)


def test_validation_error_for_folder_without_schema(tmp_path):
    path = tmp_path / "params" / "55_unregistered" / "smoke.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    with pytest.raises(ParamsError, match=r"smoke\.yaml.*55_unregistered"):
        load_params(path)


def test_load_params_returns_only_given_keys_typed(root):
    path = root / "params" / PROBE / "p.yaml"
    path.write_text("seed: 7\nfail: true\n")
    assert load_params(path) == {"seed": 7, "fail": True}


def test_main_rejects_invalid_params_before_executing(root, capsys):
    path = root / "params" / PROBE / "bad.yaml"
    path.write_text("lr: 0.1\n")
    assert main(["run", str(path), "--root", str(root)]) == 2  # a user mistake: one line, exit status 2
    err = capsys.readouterr().err
    assert "'lr'" in err and err.count("\n") == 1
    assert not (root / "runs").exists()


# ---- staleness ------------------------------------------------------------------------------------------------


def _finish(job, root):
    """Mark ``job`` finished as the runner does: status ok, metrics, report, and the inputs record."""
    from blip2lib.workbook.jobs import _inputs

    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "metrics.json").write_text("{}")
    (job.run_dir / "status.json").write_text('{"status": "ok"}')
    job.report.parent.mkdir(parents=True, exist_ok=True)
    job.report.write_text("<html></html>")
    (job.run_dir / "inputs.json").write_text(json.dumps(_inputs(job, root)))


def test_is_current_tracks_params_notebook_and_upstream_metrics(root):
    up = root / "runs" / "05_up" / "smoke"
    up.mkdir(parents=True)
    (up / "metrics.json").write_text('{"metrics": {"a": 1}}')
    params = root / "params" / PROBE / "smoke.yaml"
    params.write_text("stage1_run: runs/05_up/smoke  # upstream\n")
    job = job_for(params, root=root)
    assert not is_current(job, root)  # nothing ran yet
    _finish(job, root)
    assert is_current(job, root)
    params.write_text("stage1_run: runs/05_up/smoke  # a comment edit changes no value\n")
    assert is_current(job, root)
    (up / "metrics.json").write_text('{"metrics": {"a": 2}}')  # the upstream run was redone
    assert not is_current(job, root)
    _finish(job, root)
    params.write_text("stage1_run: runs/05_up/smoke\nseed: 3\n")  # params edited
    assert not is_current(job, root)
    _finish(job, root)
    (job.notebook).write_text(job.notebook.read_text().replace("07 · Probe", "07 · The probe"))
    assert not is_current(job, root)


# ---- compare_to_paper and record ------------------------------------------------------------------------------


@pytest.fixture
def targets(tmp_path):
    path = tmp_path / "targets.yaml"
    rows = [
        {"id": "t_vqa", "table": "Table 2", "row": "BLIP-2", "column": "VQAv2", "value": 65.0, "tolerance": 0.5},
        {"id": "t_cider", "table": "Table 3", "row": "BLIP-2", "column": "CIDEr", "value": 121.6, "tolerance": 1.0},
        {"id": "t_r1", "table": "Table 5", "row": "BLIP-2", "column": "TR@1", "value": 97.6},
    ]
    path.write_text(yaml.safe_dump({"targets": rows}))
    return path


def test_compare_to_paper_verdicts(targets, monkeypatch):
    monkeypatch.setattr(run_mod, "_CURRENT", None)
    metrics = {"vqa": 65.5, "cider": {"value": 119.0, "unit": "CIDEr"}, "acc": 0.95, "err": 3.0, "nan": math.nan}
    refs = {
        "vqa": "t_vqa",
        "cider": "t_cider",
        "r1": "t_r1",
        "acc": {"goal": 0.9, "direction": ">="},
        "err": {"goal": 2.0, "direction": "<=", "label": "error"},
        "nan": "t_r1",
    }
    table = compare_to_paper(metrics, refs, path=targets, show=False)
    got = dict(zip(table["metric"], table["verdict"]))
    assert got == {"vqa": "match", "cider": "differs", "r1": "not measured", "acc": "met", "err": "missed",
                   "nan": "not measured"}  # fmt: skip
    row = table.set_index("metric")
    assert row.loc["vqa", "delta"] == pytest.approx(0.5) and row.loc["cider", "delta"] == pytest.approx(-2.6)
    assert row.loc["cider", "target"] == "Table 3 · BLIP-2 · CIDEr" and row.loc["cider", "tolerance"] == 1.0
    assert row.loc["acc", "reproduced"] == pytest.approx(0.95) and row.loc["err", "target"] == "error"
    assert row.loc["r1", "tolerance"] == 0.5  # default tolerance
    assert compare_to_paper({"vqa": 64.4}, {"vqa": "t_vqa"}, path=targets, show=False)["verdict"][0] == "differs"
    with pytest.raises(KeyError, match="t_missing"):
        compare_to_paper({}, {"x": "t_missing"}, path=targets, show=False)


def test_compare_to_paper_rounds_to_paper_precision(targets, monkeypatch):
    monkeypatch.setattr(run_mod, "_CURRENT", None)
    row = compare_to_paper({"vqa": 65.2349}, {"vqa": "t_vqa"}, path=targets, show=False).iloc[0]
    assert row["reproduced"] == 65.2 and row["delta"] == 0.2


def _vqa_results():
    vqa = {
        "overall": 60.5,
        "per_answer_type": {"yes/no": 80.0},
        "n_questions": 4,
        "unit": "percent",
        "scorer": "official",
        "lavis": {"overall": 62.25, "per_answer_type": {"yes/no": 81.0}, "scorer": "lavis"},
    }
    gqa = {"overall": 40.0, "n_questions": 3, "unit": "percent", "scorer": "lavis"}
    return {"m": {"task": "vqa", "metrics": vqa}, "g": {"task": "gqa", "metrics": gqa}}  # fmt: skip


def test_vqa_flat_metrics_and_table_keep_both_scorers():
    from blip2lib.workbook.tables import flat_metrics, metric_table

    assert flat_metrics(_vqa_results()["m"], "m") == {
        "m_vqa_acc": 60.5, "m_per_answer_type_yes_no": 80.0,
        "m_lavis_vqa_acc": 62.25, "m_lavis_per_answer_type_yes_no": 81.0,
    }  # fmt: skip
    table = metric_table(_vqa_results(), ["overall", "scorer", "lavis.overall"])
    m, g = table.to_dict("records")
    assert m == {"model": "m", "overall": 60.5, "scorer": "official", "lavis.overall": 62.25}
    assert (g["overall"], g["scorer"]) == (40.0, "lavis") and math.isnan(g["lavis.overall"])  # GQA: no LAVIS block


def test_compare_vqa_to_paper_names_the_scorer(tmp_path, targets, monkeypatch):
    from blip2lib.workbook.run import Run
    from blip2lib.workbook.tables import compare_vqa_to_paper

    monkeypatch.setattr(run_mod, "_CURRENT", None)
    run = Run(dir=tmp_path, params={}, env={})
    run.metrics = {"m_vqa_acc": 65.2, "m_lavis_vqa_acc": 66.0, "g_vqa_acc": 40.0, "other": 1.0}
    refs = {"m_vqa_acc": "t_vqa", "m_lavis_vqa_acc@lavis": "t_vqa", "g_vqa_acc": "t_vqa", "other": "t_r1"}
    table = compare_vqa_to_paper(run, refs, _vqa_results(), path=targets, show=False)
    rows = {r["metric"]: r for r in json.loads((tmp_path / "metrics.json").read_text())["comparison"]}
    assert rows["m_vqa_acc"]["scorer"] == "official VQA evaluator (GT-Vision-Lab)"
    assert rows["m_vqa_acc"]["target"] == "Table 2 · BLIP-2 · VQAv2 (ours: official VQA evaluator (GT-Vision-Lab))"
    assert rows["m_lavis_vqa_acc@lavis"]["scorer"] == "LAVIS's VQA evaluator"
    assert rows["g_vqa_acc"]["scorer"] == "LAVIS's GQA exact match"
    assert "scorer" not in rows["other"] and rows["other"]["target"] == "Table 5 · BLIP-2 · TR@1"
    assert list(table["verdict"]) == ["match", "differs", "differs", "differs"]  # 65.2 / 66.0 / 40 vs 65.0 ± 0.5


def test_start_run_and_record_write_json_with_units(tmp_path, targets, monkeypatch):
    monkeypatch.setattr(run_mod, "_CURRENT", None)
    with pytest.raises(RuntimeError, match="start_run"):
        record("x", 1.0)
    run_dir = tmp_path / "runs" / "nb" / "v"
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text('{"variant": "v", "notebook": "nb"}')
    run = start_run({"run_dir": str(run_dir), "seed": 3})
    assert run.job == {"variant": "v", "notebook": "nb"}
    assert yaml.safe_load((run_dir / "config.resolved.yaml").read_text()) == {"run_dir": str(run_dir), "seed": 3}
    assert "torch" in json.loads((run_dir / "env.json").read_text())
    assert record("txt_r1", 12.5, "%") == 12.5
    record("steps", 3)
    record("bad", math.nan, "%")
    compare_to_paper(run.metrics, {"txt_r1": "t_r1"}, path=targets, show=False)
    data = json.loads((run_dir / "metrics.json").read_text())
    assert data["metrics"] == {"txt_r1": {"value": 12.5, "unit": "%"}, "steps": {"value": 3, "unit": ""},
                               "bad": {"value": None, "unit": "%"}}  # fmt: skip
    assert [r["verdict"] for r in data["comparison"]] == ["differs"]
    assert data["params"]["seed"] == 3 and data["wall_time_s"] >= 0


def test_start_run_takes_the_runners_thread_share(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(run_mod, "_CURRENT", None)
    before = torch.get_num_threads()
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "job.json").write_text('{"threads": 1}')
    try:
        run = start_run({"run_dir": str(run_dir)})
        assert torch.get_num_threads() == 1 and run.env["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)


# ---- report and index (no kernel) -----------------------------------------------------------------------------


def _marked(role: str, text: str):
    return new_output("display_data", data={"text/html": text}, metadata={"blip2": {"role": role}})


def test_render_html_places_sections_in_d8_order(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "env.json").write_text('{"git_commit": "abc1234", "device": "CPU (2 cores)", "torch": "2.x"}')
    (run_dir / "config.resolved.yaml").write_text("seed: 42\n")
    comparison = [{"metric": "vqa", "target": "Table 2", "reproduced": 60.1, "paper / goal": 65.0, "delta": -4.9,
                   "tolerance": 0.5, "baseline": None, "verdict": "differs"}]  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps({"metrics": {}, "comparison": comparison}))
    cells = [
        new_markdown_cell("# 42 · The title"),
        new_code_cell("x = 1"),
        new_code_cell("start_run()"),
        new_code_cell("plot()"),
        new_code_cell("compare_to_paper()"),
        new_code_cell("provenance()"),
    ]
    cells[2].outputs = [_marked("header", "<p>KERNEL-HEADER</p>")]
    cells[3].outputs = [new_output("display_data", data={"text/html": "<p>THE-PLOT</p>"})]
    cells[4].outputs = [_marked("paper-table", "<p>KERNEL-TABLE</p>")]
    cells[5].outputs = [_marked("provenance", "<p>KERNEL-PROVENANCE</p>")]
    nb = new_notebook(cells=cells)
    nbformat.write(nb, run_dir / "executed.ipynb")
    ctx = {"run_id": "42_x/toy", "params_file": "params/42_x/toy.yaml", "params_text": "seed: 42  # s\n",
           "status": "ok", "wall_time_s": 12.34, "finished": "2026-01-01 00:00:00"}  # fmt: skip
    out = render_html(run_dir / "executed.ipynb", tmp_path / "r" / "x.html", context=ctx)
    page = out.read_text()
    order = [page.index(s) for s in ("The title", "abc1234", "12.3 s", "Paper vs reproduced", ">differs<",
                                     "THE-PLOT", "params/42_x/toy.yaml</h4>", "seed: 42  # s")]  # fmt: skip
    assert order == sorted(order)
    assert "KERNEL-HEADER" not in page and "KERNEL-TABLE" not in page and "KERNEL-PROVENANCE" not in page
    assert "<script src" not in page and "cdnjs" not in page and "start_run()" not in page  # inputs hidden
    failed = render_html(run_dir / "executed.ipynb", tmp_path / "f.html", hide_input=False,
                         context={**ctx, "status": "failed"}).read_text()  # fmt: skip
    assert "FAILED" in failed and 'class="highlight' in failed and 'class="highlight' not in page  # code shown


def test_render_html_hides_library_stderr_but_keeps_errors_and_says_so(tmp_path):
    """tqdm / transformers / kernel notices on stderr stay out of the report; a traceback and stdout stay in."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cells = [new_markdown_cell("# 10 · Title"), new_code_cell("train()"), new_code_cell("boom()")]
    cells[1].outputs = [
        new_output("stream", name="stderr", text="IProgress not found. Please update jupyter and ipywidgets.\n"),
        new_output("stream", name="stderr", text="Loading weights: 100%|##########| 3/3\n"),
        new_output("stream", name="stdout", text="STEP-LINE loss 1.25\n"),
    ]
    cells[2].outputs = [
        new_output("error", ename="ValueError", evalue="USER-ERROR-TEXT", traceback=["ValueError: USER-ERROR-TEXT"])
    ]
    nbformat.write(new_notebook(cells=cells), run_dir / "executed.ipynb")
    ctx = {"run_id": "10_x/smoke", "params_file": "p.yaml", "params_text": "", "status": "failed", "wall_time_s": 1}
    page = render_html(run_dir / "executed.ipynb", tmp_path / "x.html", context=ctx).read_text()
    assert "IProgress" not in page and "Loading weights" not in page
    assert "STEP-LINE loss 1.25" in page and "USER-ERROR-TEXT" in page
    assert "2 stderr message(s) of libraries are not shown here; they are in executed.ipynb" in page
    clean = tmp_path / "clean"
    clean.mkdir()
    nbformat.write(new_notebook(cells=[cells[0], new_code_cell("x")]), clean / "executed.ipynb")
    assert "not shown here" not in render_html(clean / "executed.ipynb", tmp_path / "c.html", context=ctx).read_text()


def _fake_run(runs, nb, variant, status, comparison=(), metrics=None):
    d = runs / nb / variant
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"metrics": metrics or {}, "comparison": list(comparison),
                                                "env": {"git_commit": "abc"}}))  # fmt: skip
    if status:
        (d / "status.json").write_text(json.dumps({"status": status, "wall_time_s": 3.0, "finished": "today"}))


def test_build_index_links_existing_reports_and_counts_verdicts(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    _fake_run(runs, "01_a", "toy", "ok", [{"verdict": "match"}, {"verdict": "differs"}],
              {"acc": {"value": 0.5, "unit": "%"}})  # fmt: skip
    _fake_run(runs, "02_b", "toy", "failed", [{"verdict": "not measured"}])
    _fake_run(runs, "03_c", "toy", None)
    _fake_run(runs, "04_d", "other", "ok", [{"verdict": "met"}])
    (reports / "toy").mkdir(parents=True)
    (reports / "toy" / "01_a.html").write_text("<html></html>")
    (reports / "toy" / "02_b.html").write_text("<html>stale</html>")  # an old report of a now-failed run
    index = build_index(runs, reports, "toy")
    page = index.read_text()
    assert index == reports / "toy" / "index.html"
    assert '<a href="01_a.html">01_a</a>' in page
    assert 'href="02_b.html"' not in page and "03_c" in page and "04_d" not in page
    assert "1 match, 1 differs, 0 met, 0 missed, 1 not measured" in page and "acc = 0.5 %" in page
    rows = collect_runs(runs, "toy")
    assert [(r["notebook"], r["status"]) for r in rows] == [("01_a", "ok"), ("02_b", "failed"), ("03_c", "incomplete")]
    assert "<script" not in page


# ---- the runner end to end (papermill) ------------------------------------------------------------------------


def test_inputs_digest_follows_params_notebook_and_library_code(root, tmp_path, monkeypatch):
    from blip2lib.workbook import jobs

    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    (lib / "sub" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(jobs, "LIBRARY_ROOT", lib)
    job = job_for(root / "params" / PROBE / "smoke.yaml", root=root)
    first = _inputs_digest(job, root)
    assert _inputs_digest(job, root) == first
    (lib / "sub" / "a.py").write_text("x = 2\n")  # a library edit makes every run stale
    second = _inputs_digest(job, root)
    assert second != first
    job.params_path.write_text("seed: 2  # test\n")
    third = _inputs_digest(job, root)
    assert third not in (first, second)
    (lib / "sub" / "b.py").write_text("")  # a new library file counts too
    assert _inputs_digest(job, root) not in (first, second, third)


def test_upstream_runs_are_found_in_any_params_value(root):
    from blip2lib.workbook.runner import _upstream_metrics

    (root / "params" / PROBE / "down.yaml").write_text(
        "stage1_run: runs/07_probe/up/checkpoints/x, runs/07_probe/up2\n"
    )
    job = job_for(root / "params" / PROBE / "down.yaml", root=root)
    runs = (root / "runs" / PROBE).resolve()
    assert _upstream_metrics(job, root) == [runs / "up" / "metrics.json", runs / "up2" / "metrics.json"]
    before = _inputs_digest(job, root)
    (runs / "up").mkdir(parents=True)
    (runs / "up" / "metrics.json").write_text("{}")  # an upstream run (re)written: this step is stale
    assert _inputs_digest(job, root) != before


@pytest.mark.notebook
@pytest.mark.timeout(120)
def test_run_skips_current_outputs_and_force_reruns(root):
    params = root / "params" / PROBE / "smoke.yaml"
    count = root / "runs" / PROBE / "count.txt"
    assert main(["run", str(params), "--root", str(root), "--no-progress"]) == 0
    job = job_for(params, root=root)
    assert json.loads((job.run_dir / "metrics.json").read_text())["metrics"]["answer"] == {
        "value": 42.0,
        "unit": "units",
    }
    assert job.report.exists() and (job.run_dir / "executed.ipynb").exists() and count.read_text() == "x"
    assert json.loads((job.run_dir / "status.json").read_text())["status"] == "ok"
    assert (job.report.parent / "index.html").exists()
    assert main(["run", str(params), "--root", str(root), "--no-progress"]) == 0
    assert count.read_text() == "x"  # skipped: up to date
    (job.run_dir / "checkpoints").mkdir()  # a finished run's training state must not be resumed by a redo
    assert main(["run", str(params), "--root", str(root), "--no-progress", "--force"]) == 0
    assert count.read_text() == "xx" and not (job.run_dir / "checkpoints").exists()
    (prev,) = job.run_dir.parent.glob("smoke.prev-*")  # ... nor deleted: --force moved it aside
    assert (prev / "checkpoints").is_dir() and (prev / "inputs.json").exists()
    assert json.loads((job.run_dir / "status.json").read_text())["status"] == "ok"


@pytest.mark.notebook
@pytest.mark.timeout(120)
def test_kernel_starts_in_root_and_the_process_cwd_never_moves(root, tmp_path_factory, monkeypatch):
    # parallel runs (-j) share one process: a run that chdir()ed it would move the other runs' kernels
    elsewhere = tmp_path_factory.mktemp("caller")
    monkeypatch.chdir(elsewhere)
    seen: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.add(os.getcwd())
            time.sleep(0.005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        assert main(["run", str(root / "params" / PROBE / "smoke.yaml"), "--root", str(root), "--no-progress"]) == 0
    finally:
        stop.set()
        watcher.join()
    assert seen == {str(elsewhere)}
    job = job_for(root / "params" / PROBE / "smoke.yaml", root=root)
    assert (job.run_dir / "kernel_cwd.txt").read_text() == str(root)


@pytest.mark.notebook
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["curve", "ipc", "tcp"])
def test_console_shows_no_kernel_tcp_notice(root, capfd, monkeypatch, transport):
    """A real run prints no "running over TCP without encryption" line: the kernel's transport is encrypted (or IPC).

    ``tcp`` is the old launch (an empty kernel config): its notice reaches the captured console, so the check can fail.
    """
    from pathlib import Path

    import ipykernel.kernelapp
    from traitlets.config import Config

    from blip2lib.workbook import kernel

    if transport == "curve" and not kernel.curve_available("python3"):
        pytest.skip("no CurveZMQ here (pyzmq, jupyter_client or the kernelspec): the ipc case covers this machine")
    if transport == "ipc":  # a pyzmq without CurveZMQ, or an older jupyter_client or kernelspec: the IPC fallback
        monkeypatch.setattr(kernel, "curve_available", lambda name: False)
    if transport == "tcp":
        if "running over TCP without encryption" not in Path(ipykernel.kernelapp.__file__).read_text():
            pytest.skip("this ipykernel prints no TCP notice")
        monkeypatch.setattr(kernel, "kernel_config", lambda name: Config())
    config = dict(kernel.kernel_config("python3").get("KernelManager", {}))
    if transport == "ipc":  # an absolute socket prefix: the kernel starts in root, this process may be elsewhere
        assert os.path.isabs(config.pop("ip"))
    assert config == {"curve": {"transport_encryption": "required"}, "ipc": {"transport": "ipc"}, "tcp": {}}[transport]
    capfd.readouterr()
    assert main(["run", str(root / "params" / PROBE / "smoke.yaml"), "--root", str(root), "--no-progress"]) == 0
    out, err = capfd.readouterr()  # file-descriptor level: the kernel process writes to the inherited stderr
    assert ("running over TCP without encryption" in out + err) == (transport == "tcp"), err[-2000:]
    job = job_for(root / "params" / PROBE / "smoke.yaml", root=root)
    assert json.loads((job.run_dir / "metrics.json").read_text())["metrics"]["answer"]["value"] == 42.0


@pytest.mark.notebook
@pytest.mark.timeout(120)
def test_failed_run_keeps_notebook_renders_failure_page_and_exits_nonzero(root, capsys):
    params = root / "params" / PROBE / "fail.yaml"
    assert main(["run", str(params), "--root", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err  # the kernel's exception in one line, not papermill's cell dump cut mid-word
    assert f"error: {PROBE}/fail failed after " in err and "s: ValueError: deliberate failure in the probe (" in err
    assert err.count("\n") == 1 and "Traceback" not in err and "----" not in err
    job = job_for(params, root=root)
    executed = nbformat.read(job.run_dir / "executed.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for c in executed.cells for o in c.get("outputs", []))
    page = (job.run_dir / "failed.html").read_text()
    assert "FAILED" in page and "deliberate failure in the probe" in page
    assert not job.report.exists() and not (job.run_dir / "inputs.json").exists()
    assert json.loads((job.run_dir / "status.json").read_text())["status"] == "failed"
    index = (job.report.parent / "index.html").read_text()
    assert "failed" in index and f'href="{PROBE}.html"' not in index
    (job.run_dir / "checkpoints").mkdir()  # a failed run keeps its training state for the retry to resume
    assert main(["run", str(params), "--root", str(root), "--no-progress"]) == 1
    assert (job.run_dir / "checkpoints").is_dir()


def test_ablation_passes_eval_settings_to_every_evaluation(tmp_path):
    from blip2lib.workbook.ablation import run_ablation
    from blip2lib.workbook.schemas import ITGAblationParams

    params = ITGAblationParams.from_yaml("params/45_ablation_itg/smoke.yaml")
    params.eval_settings = {"k": 3}
    out = run_ablation(params, tmp_path)
    assert set(out) == {"itc_itm", "itc_itm_itg"} and all(set(v) == {0} for v in out.values())
    for variant in out:
        result = json.loads((tmp_path / variant / "seed0" / "eval" / "m" / "result.json").read_text())
        assert result["config"]["k"] == 3 and result["config"]["fusion"] == "itm+itc"
    params.eval_settings = {"kk": 3}
    with pytest.raises(ParamsError, match="unknown key 'kk'"):
        run_ablation(params, tmp_path / "bad")


def test_parallel_dependencies_of_the_toy_variant():
    from blip2lib.workbook.run import REPO_ROOT
    from blip2lib.workbook.runner import _dependencies, variant_params

    jobs = [job_for(p) for p in variant_params("toy")]
    deps = {j.notebook.stem: {d.notebook.stem for d in ds} for j, ds in _dependencies(jobs, REPO_ROOT).items()}
    names = set(deps)
    data = {"01_toy_world", "02_prepare_data"}
    assert deps["01_toy_world"] == deps["02_prepare_data"] == set()
    assert deps["10_stage1_pretrain"] == data
    assert deps["20_stage2_pretrain"] == data | {"10_stage1_pretrain"}  # init_from names the stage-1 run
    assert {"10_stage1_pretrain", "20_stage2_pretrain"} <= deps["00_explore"]  # it loads the trained models
    assert "20_stage2_pretrain" in deps["41_zeroshot_vqa"]
    assert deps["90_summary"] == names - {"90_summary"}
    from blip2lib.workbook.runner import _plan

    threads, _ = _plan(jobs, _dependencies(jobs, REPO_ROOT), jobs=2, cores=8)
    assert {j.notebook.stem for j, t in threads.items() if t == 8} == {"10_stage1_pretrain", "90_summary"}
    assert set(threads.values()) == {4, 8}  # the rest can run beside another step: half the cores each
    left = dict(deps)
    while left:  # no cycles: some step can always start once its inputs are done
        ready = [n for n, ds in left.items() if not ds & set(left)]
        assert ready, left
        for n in ready:
            del left[n]


def test_parallel_run_all_respects_inputs_and_stops_launching_after_a_failure(root, monkeypatch):
    import os
    import threading
    import time

    from blip2lib.workbook import runner

    for name, text in {"a": "seed: 1\n", "b": "stage1_run: runs/07_probe/a\n", "c": "seed: 3\n",
                       "d": "stage1_run: runs/07_probe/b, runs/07_probe/c\n"}.items():  # fmt: skip
        (root / "params" / PROBE / f"{name}.yaml").write_text(text)
    jobs = [job_for(root / "params" / PROBE / f"{n}.yaml", root=root) for n in "abcd"]
    events, lock, running, peak, given, omp = [], threading.Lock(), [0], [0], {}, set()

    def fake_run(params_path, threads=None, **kw):
        name = params_path.stem
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            events.append(("start", name))
            given[name] = threads
            omp.add(os.environ.get("OMP_NUM_THREADS"))
        time.sleep(0.05 if name == "c" else 0.2)
        with lock:
            running[0] -= 1
            events.append(("end", name))
        if name == fail_name:
            raise runner.RunFailed(f"{name} broke")

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fail_name = ""
    assert runner._run_parallel(jobs, 2, False, root, None, None) == jobs
    order = [n for e, n in events if e == "start"]
    assert sorted(order) == list("abcd") and peak[0] == 2
    assert (
        events.index(("end", "a"))
        < events.index(("start", "b"))
        < events.index(("end", "b"))
        < events.index(("start", "d"))
    )
    cores = os.cpu_count() or 1
    # "07_probe" is a 0x name: a and c read no run, so they are data steps that every other step waits for; they
    # may run side by side (a share of the cores), b and d can never run beside anything (all cores).
    half = max(1, cores // 2)
    assert given == {"a": half, "c": half, "b": cores, "d": cores}
    assert omp == {str(half)} and "OMP_NUM_THREADS" not in os.environ
    events.clear()
    (jobs[2].run_dir).mkdir(parents=True, exist_ok=True)  # c took long last time: it starts before a
    (jobs[2].run_dir / "status.json").write_text('{"status": "ok", "wall_time_s": 500}')
    fail_name = "x"
    runner._run_parallel(jobs, 1, False, root, None, None)
    assert [n for e, n in events if e == "start"] == list("cabd")
    events.clear()
    (jobs[2].run_dir / "status.json").unlink()  # a fresh clone: no previous run, the caller's estimate orders
    runner._run_parallel(jobs, 1, False, root, None, None)
    assert [n for e, n in events if e == "start"] == list("acbd")
    events.clear()
    runner._run_parallel(jobs, 1, False, root, None, None, {f"{PROBE}/c": 500.0})
    assert [n for e, n in events if e == "start"] == list("cabd")
    events.clear()
    fail_name = "a"
    with pytest.raises(runner.RunFailed, match="a broke"):
        runner._run_parallel(jobs, 2, False, root, None, None)
    assert {n for e, n in events if e == "end"} == {"a", "c"}  # c ran alongside; b and d never start


# ---- stage 2: per-family steps --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "what"), [("llms: [opt, t5]\nllm_steps: {flant5: 8}\n", "'flant5: 8'"),
                                            ("llms: [opt, t5]\nllm_steps: {t5: 0}\n", "'t5: 0'"),
                                            ("llm_steps: {t5: 8}\n", "'t5: 8'"),  # llms empty: the family is llm=opt
                                            ("llms: [t5]\nllm_steps: {t5: '8'}\n", "must be")])  # fmt: skip
def test_llm_steps_errors_name_file_key_and_entry(tmp_path, text, what):
    from blip2lib.workbook.schemas import Stage2Params

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        Stage2Params.from_yaml(path)
    assert str(path) in str(err.value) and "'llm_steps'" in str(err.value) and what in str(err.value)


def test_run_stage_trains_each_family_for_its_own_steps(tmp_path, monkeypatch):
    from blip2lib.workbook import stages
    from blip2lib.workbook.schemas import Stage2Params

    seen = []
    monkeypatch.setattr(stages, "run_training", lambda tp, sub: seen.append((tp.llm, tp.steps, tp.lr, sub)))
    params = Stage2Params.from_dict({"llms": ["opt", "t5"], "steps": 5, "lr": 0.01, "llm_steps": {"t5": 9}})
    out = stages.run_stage(params, tmp_path)
    assert seen == [("opt", 5, 0.01, tmp_path / "opt"), ("t5", 9, 0.01, tmp_path / "t5")]
    assert out == {"opt": tmp_path / "opt", "t5": tmp_path / "t5"}


def test_smoke_runs_are_never_judged_and_results_show_as_one_table(tmp_path, targets, monkeypatch):
    """A smoke run's goal rows read "plumbing only" (never met/missed); results_table formats by unit."""
    from blip2lib.workbook.run import Run, compare_to_paper, format_value, record, results_table

    monkeypatch.setattr(run_mod, "_CURRENT", None)
    goals = {"acc": {"goal": 50.0, "direction": ">="}, "err": {"goal": 1.0, "direction": "<="}}
    for d in ("s", "r", "t"):
        (tmp_path / d).mkdir()
    smoke = Run(dir=tmp_path / "s", params={"smoke_test": True}, env={})
    table = compare_to_paper({"acc": 0.0, "err": 0.5, "vqa": 65.1}, {**goals, "vqa": "t_vqa"}, path=targets,
                             run=smoke, show=False)  # fmt: skip
    assert list(table["verdict"]) == ["plumbing only"] * 3
    real = Run(dir=tmp_path / "r", params={"smoke_test": False}, env={})
    table = compare_to_paper({"acc": 0.0, "err": 0.5}, goals, path=targets, run=real, show=False)
    assert list(table["verdict"]) == ["missed", "met"]  # the same numbers judged outside a smoke run

    assert [format_value(v, u) for v, u in [(1.8759269714355469, ""), (65.1234, "%"), (12345, "images"),
                                            (0.0, ""), (2048.5, "s"), (None, ""), (True, "")]] == [
        "1.876", "65.12", "12,345", "0.0", "2,048.5", "—", "True"]  # fmt: skip
    run = Run(dir=tmp_path / "t", params={}, env={})
    record("itc_loss_start", 1.8759269714355469, run=run)
    record("vqa_acc", 65.1234, "%", run=run)
    record("n_images", 12345, "images", run=run)
    shown = results_table(run).data
    assert shown.to_dict("records") == [
        {"measured": "itc_loss_start", "value": "1.876", "unit": ""},
        {"measured": "vqa_acc", "value": "65.12", "unit": "%"},
        {"measured": "n_images", "value": "12,345", "unit": "images"},
    ]
    assert list(results_table(run, keys=["vqa_acc"]).data["measured"]) == ["vqa_acc"]
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["metrics"]["vqa_acc"] == {
        "value": 65.1234, "unit": "%"}  # fmt: skip
