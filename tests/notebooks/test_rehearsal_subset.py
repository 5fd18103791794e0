"""CI's dress rehearsal: a subset of the ``paper_*`` files that runs every notebook and reads every checkpoint
format, on tiny models in the released formats (``make rehearse`` runs them all)."""

import json

import pytest

from blip2lib.config import REHEARSAL_RUN, load_params_yaml
from blip2lib.evaluate.caption import spice_models_available
from blip2lib.rehearsal.run import ci_subset, formats, paper_params, rehearse
from blip2lib.workbook.run import load_targets


def _id(path):
    return f"{path.parent.name}/{path.stem}"


def test_ci_subset_touches_every_notebook_and_checkpoint_format():
    every, chosen = paper_params(), paper_params(only=",".join(ci_subset()))
    assert {f.parent.name for f in chosen} == {f.parent.name for f in every}
    every_format = set().union(*(formats(load_params_yaml(f)) for f in every))
    assert set().union(*(formats(load_params_yaml(f)) for f in chosen)) == every_format
    assert {"vision:vitg", "vision:vitl", "bert", "llm:opt", "llm:t5", "run folder"} <= every_format


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    only = ",".join(ci_subset())
    return rehearse(out, only, jobs=2), out, paper_params(only=only)


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_subset_runs_every_step(rehearsal):
    result, _, files = rehearsal
    assert (result["failed"], result["skipped"]) == ({}, [])
    assert sorted(result["ok"]) == sorted(_id(f) for f in files)


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_runs_take_the_params_as_written_but_the_one_override(rehearsal):
    _, out, files = rehearsal
    for f in files:
        used = json.loads((out / "runs" / f.parent.name / f.stem / "metrics.json").read_text())["params"]
        assert used["model_scale"] == "rehearsal", _id(f)
        for key, value in load_params_yaml(f).items():
            if key not in REHEARSAL_RUN:
                assert used[key] == value, f"{_id(f)}: {key} ran as {used[key]!r}, the file says {value!r}"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_paper_row_reaches_its_report_and_the_index_as_rehearsal(rehearsal):
    _, out, files = rehearsal
    values = {t["id"]: t["value"] for t in load_targets()}
    spice_ok, _ = spice_models_available()  # offline without the CoreNLP jars SPICE is None ("not measured")
    total = 0
    for f in files:
        targets = load_params_yaml(f).get("paper_targets", {})
        comparison = json.loads((out / "runs" / f.parent.name / f.stem / "metrics.json").read_text())["comparison"]
        verdicts = {row["metric"]: row["verdict"] for row in comparison}
        # every measured row says "rehearsal"; a paper row printed without a number keeps its own label
        want = {m: "rehearsal" if values[t] is not None else "no published number" for m, t in targets.items()}
        if not spice_ok:
            want.update({m: "not measured" for m in targets if "SPICE" in m})
        assert {m: verdicts.get(m) for m in targets} == want, _id(f)
        report = out / "reports" / f.stem / f"{f.parent.name}.html"
        assert report.exists(), report
        allowed = {"rehearsal", "no published number"} | (set() if spice_ok else {"not measured"})
        assert set(verdicts.values()) <= allowed, _id(f)  # goals too: never "met"
        total += len(comparison)
    index = (out / "reports" / "paper" / "index.html").read_text()
    shown = sum(index.count(f"<td>{v}</td>") for v in ("rehearsal", "no published number", "not measured"))
    assert shown == total > 0
    for f in files:
        if not f.parent.name.startswith("9"):
            assert f"{f.parent.name} · {f.stem}" in index
