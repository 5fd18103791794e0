"""Runner semantics: ``-p`` overrides, params files anywhere, ``--runs``, stale runs and ``--force``, ad-hoc folders.

No kernel starts here: ``papermill.execute_notebook`` is replaced by a fake executor that writes what a finished
notebook leaves behind (executed notebook, ``metrics.json``, a checkpoint of random bytes, so that any rewrite
of it would show). The real papermill path is covered by the ``notebook``-marked tests in ``test_workbook.py``.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from blip2lib.config import Params, ParamsError
from blip2lib.workbook import jobs as jobs_mod
from blip2lib.workbook import run as run_mod
from blip2lib.workbook import runner
from blip2lib.workbook.runner import job_for, load_params, main
from blip2lib.workbook.schemas import SCHEMAS, ExploreParams

PROBE = "07_probe"


@dataclass
class ProbeParams(Params):
    lr: float = 1e-4
    fail: bool = False
    stage1_run: str = ""  # upstream run folder
    llms: list[str] = field(default_factory=list)
    llm_steps: dict[str, int] = field(default_factory=dict)
    checkpoints: dict = field(default_factory=dict)


def _notebook(path: Path) -> None:
    cells = [new_markdown_cell("# probe"), new_code_cell('run_dir = ""')]
    cells[1].metadata["tags"] = ["parameters"]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}}), path)  # fmt: skip


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A throwaway repository: notebooks 07_probe, 08_down, 09_other (one schema) and 20_stage2_pretrain."""
    for name in (PROBE, "08_down", "09_other"):
        monkeypatch.setitem(SCHEMAS, name, ProbeParams)
    (tmp_path / "notebooks").mkdir()
    for name in (PROBE, "08_down", "09_other", "20_stage2_pretrain"):
        _notebook(tmp_path / "notebooks" / f"{name}.ipynb")
    (tmp_path / "params" / PROBE).mkdir(parents=True)
    (tmp_path / "params" / PROBE / "smoke.yaml").write_text("seed: 1  # test\n")
    return tmp_path


@pytest.fixture
def lib(tmp_path_factory, monkeypatch):
    """The library the runner hashes: a small copy the test may edit."""
    lib = tmp_path_factory.mktemp("lib") / "blip2lib"
    lib.mkdir()
    (lib / "viz.py").write_text("# draws things\nX = 1\n")
    (lib / "model.py").write_text("Y = 2\n")
    monkeypatch.setattr(jobs_mod, "LIBRARY_ROOT", lib)
    return lib


@pytest.fixture
def commit(monkeypatch):
    """The checkout's git commit as the runner sees it; set ``commit["now"]`` to move it."""
    now = {"now": "aaaaaaa"}
    monkeypatch.setattr(jobs_mod, "git_commit", lambda root: now["now"])
    monkeypatch.setattr(runner, "git_commit", lambda root: now["now"])
    return now


@pytest.fixture
def executed(monkeypatch, lib, commit):
    """Replace papermill's executor; returns the list of parameter dicts it was called with."""
    calls: list[dict] = []

    def execute(input_path, output_path, parameters=None, **kw):
        calls.append(dict(parameters))
        run_dir = Path(parameters["run_dir"])
        shutil.copy(input_path, output_path)
        (run_dir / "env.json").write_text('{"git_commit": "fake"}')
        (run_dir / "metrics.json").write_text(json.dumps({"metrics": {}, "comparison": [], "params": parameters}))
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / f"ckpt-{len(calls)}.pt").write_bytes(os.urandom(256))

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    # Fake runs: their params name files that do not exist (data_root=/x) and their checkpoints are not real ones, so
    # the preflight (tests/unit/test_preflight.py) is left out of these tests of the runner's own semantics.
    monkeypatch.setattr(runner, "preflight", lambda *args, **kw: [])
    return calls


def _cli(root, *args) -> int:
    return main([*args, "--root", str(root), "--no-progress"])


def _tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


# ---- -p overrides ---------------------------------------------------------------------------------------------------


def test_overrides_are_read_as_yaml_and_typed_by_the_schema(root):
    path = root / "params" / PROBE / "smoke.yaml"
    values = load_params(path, overrides=["seed=7", "lr=1e-3", "stage1_run=2017", "fail=yes", "llms=[opt, t5]",
                                          "llm_steps={t5: 800}", "data_root=/x=y", "weights_root="])  # fmt: skip
    assert values == {"seed": 7, "lr": 0.001, "stage1_run": "2017", "fail": True, "llms": ["opt", "t5"],
                      "llm_steps": {"t5": 800}, "data_root": "/x=y", "weights_root": ""}  # fmt: skip
    assert type(values["lr"]) is float and type(values["seed"]) is int
    assert load_params(path, overrides={"lr": 2, "llms": ["opt"]}) == {"seed": 1, "lr": 2.0, "llms": ["opt"]}


@pytest.mark.parametrize(("text", "message"), [
    ("seeed=3", "-p seeed=3: unknown key 'seeed' for ProbeParams (did you mean 'seed'?)"),
    ("zzzz=3", "-p zzzz=3: unknown key 'zzzz' for ProbeParams (known keys: checkpoints, data_root, fail,"),
    ("seed=three", "-p seed=three: key 'seed' must be int, got str 'three'"),
    ("fail=1", "-p fail=1: key 'fail' must be bool, got int 1"),
    ("lr=fast", "-p lr=fast: key 'lr' must be float, got str 'fast'"),
    ("llms=opt", "-p llms=opt: key 'llms' must be list of str, got str 'opt'"),
    ("llm_steps={t5: x}", "key 'llm_steps' must be mapping of str to int, got dict {'t5': 'x'}"),
    ("seed", "-p 'seed': expected KEY=VALUE"),
    ("=3", "-p '=3': expected KEY=VALUE"),
])  # fmt: skip
def test_override_errors_name_the_key_and_the_type_in_words(root, text, message):
    with pytest.raises(ParamsError) as err:
        load_params(root / "params" / PROBE / "smoke.yaml", overrides=[text])
    assert message in str(err.value) and "<class" not in str(err.value)


def test_file_errors_use_the_same_words(root):
    path = root / "params" / PROBE / "bad.yaml"
    path.write_text("lr: [1]\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: key 'lr' must be float, got list \[1\]$"):
        load_params(path)
    path.write_text("fial: true\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: unknown key 'fial' for ProbeParams \(did you mean 'fail'\?\)"):
        load_params(path)


def test_run_passes_overrides_to_the_kernel_and_records_them(root, executed, capsys):
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml", "-p", "data_root=/x", "-p", "seed=5") == 0
    run_dir = root / "runs" / PROBE / "smoke"
    assert executed[0] == {"seed": 5, "data_root": "/x", "run_dir": str(run_dir)}
    assert json.loads((run_dir / "job.json").read_text())["overrides"] == ["data_root=/x", "seed=5"]
    assert json.loads((run_dir / "inputs.json").read_text())["params"] == {"seed": 5, "data_root": "/x"}
    assert "# -p data_root=/x" in (root / "reports" / "smoke" / f"{PROBE}.html").read_text()
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml", "-p", "data_root=/x", "-p", "seed=5") == 0
    assert len(executed) == 1  # same overrides: up to date
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml", "-p", "data_root=/y", "-p", "seed=5") == 2
    assert 'params: data_root: "/x" -> "/y"' in capsys.readouterr().err  # overrides count as params
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml", "-p", "sed=5") == 2
    assert capsys.readouterr().err == "error: -p sed=5: unknown key 'sed' for ProbeParams (did you mean 'seed'?)\n"
    assert len(executed) == 1


def test_run_all_gives_each_notebook_the_overrides_its_schema_has(root, executed, monkeypatch):
    from blip2lib.workbook.schemas import SummaryParams

    monkeypatch.setitem(SCHEMAS, "09_other", SummaryParams)
    (root / "params" / "09_other").mkdir()
    (root / "params" / "09_other" / "smoke.yaml").write_text("{}\n")
    assert runner.run_all("smoke", root=root, overrides=["lr=0.5", "seed=3"])
    assert [c.get("lr") for c in executed] == [0.5, None] and [c["seed"] for c in executed] == [3, 3]
    with pytest.raises(ParamsError, match=r"-p stepz=1: unknown key 'stepz' for the 'smoke' notebooks"):
        runner.run_all("smoke", root=root, overrides=["stepz=1"])


# ---- params files anywhere ------------------------------------------------------------------------------------------


def test_params_file_outside_params_needs_a_notebook(root, tmp_path_factory, executed, capsys):
    mine = tmp_path_factory.mktemp("elsewhere") / "my_exp.yaml"
    mine.write_text("seed: 3\n")
    assert _cli(root, "run", str(mine)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {mine}: which notebook runs this file? Pass --notebook NAME or add a 'notebook:")
    assert f"(notebooks: {PROBE}, 08_down, 09_other, 20_stage2_pretrain)\n" in err and err.count("\n") == 1
    assert _cli(root, "run", str(mine), "--notebook", "08_down") == 0
    job = job_for(mine, root=root, notebook="08_down")
    assert job.run_dir == root / "runs" / "08_down" / "my_exp" and (job.run_dir / "status.json").exists()
    assert job.report == root / "reports" / "my_exp" / "08_down.html" and job.report.exists()
    assert executed[-1] == {"seed": 3, "run_dir": str(job.run_dir)}
    mine.write_text("notebook: 09_other  # the runner reads this key\nseed: 4\n")
    assert _cli(root, "run", str(mine)) == 0
    assert executed[-1] == {"seed": 4, "run_dir": str(root / "runs" / "09_other" / "my_exp")}  # key not passed on
    assert _cli(root, "run", str(mine), "--notebook", PROBE) == 2
    assert "--notebook 07_probe contradicts the file's 'notebook: 09_other'" in capsys.readouterr().err
    mine.write_text("notebook: 99_nope\n")
    with pytest.raises(FileNotFoundError, match=r"no notebook notebooks/99_nope\.ipynb for '99_nope'"):
        job_for(mine, root=root)


# ---- --runs ---------------------------------------------------------------------------------------------------------


def test_runs_rebases_run_paths_inside_params(root, tmp_path_factory, executed):
    scratch = tmp_path_factory.mktemp("scratch")
    stage2 = root / "params" / "20_stage2_pretrain" / "paper.yaml"
    stage2.parent.mkdir()
    stage2.write_text("init_from: runs/10_stage1_pretrain/paper_vitg  # stage-1 hand-off\n"
                      "vision_weights: weights/runs/eva.pth\nllms: [opt]\n")  # fmt: skip
    up = scratch / "10_stage1_pretrain" / "paper_vitg"
    up.mkdir(parents=True)
    (up / "metrics.json").write_text("{}")
    assert main(["run", str(stage2), "--root", str(root), "--runs", str(scratch), "--no-progress"]) == 0
    assert executed[-1]["init_from"] == f"{scratch}/10_stage1_pretrain/paper_vitg"
    assert executed[-1]["vision_weights"] == "weights/runs/eva.pth"  # only values that start with runs/
    assert executed[-1]["run_dir"] == f"{scratch}/20_stage2_pretrain/paper"
    job = job_for(stage2, root=root, runs=scratch)
    assert runner._upstream_metrics(job, root) == [up.resolve() / "metrics.json"]
    assert list(json.loads((job.run_dir / "inputs.json").read_text())["upstream"]) == ["10_stage1_pretrain/paper_vitg"]
    nested = root / "params" / PROBE / "nested.yaml"
    nested.write_text("checkpoints: {a: runs/10_x/toy, b: [runs/y, tiny]}\nstage1_run: runs/a, runs/b/c, other\n")
    assert load_params(nested, runs=scratch) == {
        "checkpoints": {"a": f"{scratch}/10_x/toy", "b": [f"{scratch}/y", "tiny"]},
        "stage1_run": f"{scratch}/a, {scratch}/b/c, other",
    }
    assert load_params(nested)["stage1_run"] == "runs/a, runs/b/c, other"  # without --runs: as written


# ---- finished runs are never deleted --------------------------------------------------------------------------------


def test_library_edit_makes_a_finished_run_stale_and_force_moves_it_aside(root, lib, commit, executed, capsys):
    params = f"params/{PROBE}/smoke.yaml"
    assert _cli(root, "run", params) == 0
    run_dir = root / "runs" / PROBE / "smoke"
    before = _tree(run_dir)
    assert "checkpoints/ckpt-1.pt" in before
    assert _cli(root, "run", params) == 0 and len(executed) == 1  # unchanged: up to date, skipped
    commit["now"] = "bbbbbbb"
    assert _cli(root, "run", params) == 0 and len(executed) == 1  # a commit touching no input: still up to date
    viz = lib / "viz.py"
    viz.write_text(viz.read_text().replace("# draws things", "# draws things (a comment edit)"))
    capsys.readouterr()
    assert _cli(root, "run", params) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"[stale] {PROBE}/smoke finished ")
        and "at commit aaaaaaa; the checkout is now at bbbbbbb" in err
    )
    assert "    library files changed: blip2lib/viz.py\n" in err and "params:" not in err
    assert f"the run in {run_dir} was not touched; --force moves it aside" in err
    assert _tree(run_dir) == before and len(executed) == 1  # byte-identical, nothing executed
    assert _cli(root, "run", params, "--force") == 0
    (prev,) = run_dir.parent.glob("smoke.prev-*")
    assert _tree(prev) == before  # the old run, untouched, under its new name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt-2.pt"]  # a fresh start
    assert json.loads((run_dir / "inputs.json").read_text())["library"]["blip2lib/viz.py"] != json.loads(
        (prev / "inputs.json").read_text())["library"]["blip2lib/viz.py"]  # fmt: skip


def test_stale_message_lists_params_key_by_key_notebook_and_upstream(root, executed, capsys):
    params = root / "params" / PROBE / "smoke.yaml"
    up = root / "runs" / "09_other" / "smoke"
    up.mkdir(parents=True)
    (up / "metrics.json").write_text("{}")
    params.write_text("seed: 1\nlr: 0.1\nstage1_run: runs/09_other/smoke\n")
    assert _cli(root, "run", str(params)) == 0
    params.write_text("seed: 2  # edited\nstage1_run: runs/09_other/smoke\nllms: [opt]\n")
    (up / "metrics.json").write_text('{"redone": 1}')
    nb = root / "notebooks" / f"{PROBE}.ipynb"
    nb.write_text(nb.read_text().replace("# probe", "# probe, edited"))
    assert _cli(root, "run", str(params)) == 2
    err = capsys.readouterr().err
    assert '    params: llms: (default) -> ["opt"]; lr: 0.1 -> (default); seed: 1 -> 2\n' in err
    assert "    notebook changed\n" in err and "    upstream runs changed: 09_other/smoke\n" in err
    assert "library files changed" not in err and len(executed) == 1


def test_an_interrupted_run_resumes_in_place_and_an_old_record_is_stale(root, executed, capsys):
    run_dir = root / "runs" / PROBE / "smoke"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "ckpt-0.pt").write_bytes(b"half-way")
    (run_dir / "status.json").write_text('{"status": "failed"}')
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml") == 0
    assert (run_dir / "checkpoints" / "ckpt-0.pt").read_bytes() == b"half-way"  # kept for the notebook to resume
    assert not list(run_dir.parent.glob("smoke.prev-*")) and len(executed) == 1
    (run_dir / "inputs.json").unlink()  # a run finished before inputs.json existed
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml") == 2
    assert "no inputs.json (finished before the runner recorded its inputs)" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "ckpt-0.pt").exists() and len(executed) == 1


def test_run_all_holds_stale_runs_and_their_readers_and_exits_2(root, executed, capsys, caplog):
    caplog.set_level(logging.INFO)
    for name, text in {PROBE: "seed: 1\n", "08_down": "stage1_run: runs/07_probe/v\n", "09_other": "seed: 3\n"}.items():
        (root / "params" / name).mkdir(exist_ok=True)
        (root / "params" / name / "v.yaml").write_text(text)
    assert _cli(root, "run-all", "v") == 0 and len(executed) == 3
    (root / "params" / PROBE / "v.yaml").write_text("seed: 2\n")
    shutil.rmtree(root / "runs" / "09_other" / "v")  # never ran (or removed by hand): it runs
    down = _tree(root / "runs" / "08_down" / "v")
    capsys.readouterr()
    assert _cli(root, "run-all", "v") == 2
    err = capsys.readouterr().err
    assert [Path(c["run_dir"]).parent.name for c in executed[3:]] == ["09_other"]
    assert "[stale] 07_probe/v finished" in caplog.text and "params: seed: 1 -> 2" in caplog.text
    assert "[hold] 08_down/v: reads a stale run, not run" in caplog.text
    assert err.rstrip().endswith("error: stale, not rerun: 07_probe/v; not run because they read a stale run: "
                                 "08_down/v (--force redoes them, moving each old run aside)")  # fmt: skip
    assert _tree(root / "runs" / "08_down" / "v") == down


def test_user_mistakes_are_one_line_with_exit_2_and_v_adds_the_traceback(root, capsys):
    assert _cli(root, "run", "params/07_probe/nope.yaml") == 2
    assert capsys.readouterr().err == "error: params/07_probe/nope.yaml: no such params file\n"
    assert _cli(root, "run", "params/07_probe/nope.yaml", "-v") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("no such params file\n")


# ---- notebooks executed outside the runner --------------------------------------------------------------------------


def test_each_interactive_execution_gets_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(run_mod, "_CURRENT", None)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    first, second = run_mod.start_run({"seed": 1}), run_mod.start_run({"seed": 1})
    assert first.dir != second.dir and first.dir.parent == second.dir.parent == tmp_path / "runs" / "adhoc"
    assert all(r.dir.name.startswith("interactive-2") and r.dir.name.endswith("Z") for r in (first, second))
    assert len(first.dir.name) == len("interactive-20261205T213012.123456Z")  # UTC time with microseconds
    explore = run_mod.start_run(ExploreParams())  # the notebook, known from the params' schema
    assert explore.dir.name.startswith("00_explore-") and (explore.dir / "config.resolved.yaml").exists()
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/notebooks/20_stage2_pretrain.ipynb")  # JupyterLab's kernel
    assert run_mod.start_run({}).dir.name.startswith("20_stage2_pretrain-")


def test_an_up_to_date_run_missing_its_report_gets_it_rendered_not_rerun(root, executed):
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml") == 0
    report = root / "reports" / "smoke" / f"{PROBE}.html"
    report.unlink()
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml") == 0
    assert report.exists() and len(executed) == 1
    elsewhere = root / "other-reports"
    assert _cli(root, "run", f"params/{PROBE}/smoke.yaml", "--reports", str(elsewhere)) == 0
    assert (elsewhere / "smoke" / f"{PROBE}.html").exists() and len(executed) == 1


def test_validate_checks_files_anywhere_with_overrides(root, tmp_path_factory, capsys):
    mine = tmp_path_factory.mktemp("elsewhere") / "mine.yaml"
    mine.write_text(f"notebook: {PROBE}\nseed: 2\n")
    assert main(["validate", str(mine), "-p", "lr=0.5", "--root", str(root)]) == 0
    assert capsys.readouterr().out == "1 params files valid\n"
    assert main(["validate", str(mine), "-p", "lr=fast", "--root", str(root)]) == 2
    assert capsys.readouterr().err == "error: -p lr=fast: key 'lr' must be float, got str 'fast'\n"


@pytest.mark.parametrize("jobs", [1, 2])
def test_readers_of_readers_of_a_stale_run_are_held_whatever_their_name_order(root, executed, monkeypatch, jobs):
    # 00_c reads 10_b, which reads 08_down, which reads 07_probe (a data step); 00_c comes first by name
    chain = {PROBE: "seed: 1\n", "08_down": "stage1_run: runs/07_probe/v\n", "10_b": "stage1_run: runs/08_down/v\n",
             "00_c": "stage1_run: runs/10_b/v\n"}  # fmt: skip
    for name, text in chain.items():
        monkeypatch.setitem(SCHEMAS, name, ProbeParams)
        _notebook(root / "notebooks" / f"{name}.ipynb")
        (root / "params" / name).mkdir(exist_ok=True)
        (root / "params" / name / "v.yaml").write_text(text)
    assert runner.run_all("v", root=root, jobs=jobs)
    assert [Path(c["run_dir"]).parent.name for c in executed] == [PROBE, "08_down", "10_b", "00_c"]
    (root / "params" / "08_down" / "v.yaml").write_text("stage1_run: runs/07_probe/v\nseed: 5\n")
    for name in ("10_b", "00_c"):
        shutil.rmtree(root / "runs" / name / "v")  # would run if nothing held them
    with pytest.raises(runner.StaleRuns, match=r"^stale, not rerun: 08_down/v; not run because they read a stale "
                                               r"run: 00_c/v, 10_b/v \("):  # fmt: skip
        runner.run_all("v", root=root, jobs=jobs)
    assert len(executed) == 4


def test_the_console_gets_training_progress_from_the_runs_log(root, executed, monkeypatch, caplog):
    """While (and when) a notebook trains, the runner logs a progress line read from the run's ``log.jsonl``."""
    import papermill

    fake = papermill.execute_notebook

    def training(input_path, output_path, parameters=None, **kw):
        fake(input_path, output_path, parameters=parameters, **kw)
        rows = [{"step": s, "loss": 3.0 / s, "samples_per_s": 100.0} for s in (1, 2, 3)]
        (Path(parameters["run_dir"]) / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(papermill, "execute_notebook", training)
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.05)
    with caplog.at_level("INFO", logger="blip2lib.workbook.runner"):
        assert _cli(root, "run", str(root / "params" / PROBE / "smoke.yaml")) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[train]")]
    assert lines and lines[-1] == f"[train] {PROBE}/smoke: step 3, loss 1, 100.0 samples/s"
