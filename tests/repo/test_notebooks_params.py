"""Notebook templates, their schemas and params files stay in sync.

Stripped outputs are checked in test_repo_hygiene.py; this file checks the parameters cell, the schema sync, the
params files and the thinness rules.
"""

import ast
import dataclasses
import json
import re
from pathlib import Path

import papermill as pm
import pytest
import yaml

from blip2lib.workbook.runner import job_for, load_params, validate_all
from blip2lib.workbook.schemas import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))  # explore/ is not a template: not checked
PARAMS = sorted((ROOT / "params").glob("*/*.yaml"))
REQUIRED = {"run_dir": "", "smoke_test": False, "seed": 42, "num_gpus": 1, "data_root": "", "weights_root": ""}
LOCAL_PREFIXES = ("runs/", "data/", "params/", "reports/", "weights/", "notebooks/")
ids = [p.stem for p in NOTEBOOKS]


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    # IPython magics and shell escapes are not Python; blank them so ast can parse the rest
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())


def _params_cell(path: Path) -> dict:
    return _code_cells(path)[0]


def test_there_are_notebooks_and_params():
    assert NOTEBOOKS and PARAMS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_parameters_cell_is_first_tagged_and_literal_only(path):
    cells = _code_cells(path)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [0], f"{path.name}: exactly one `parameters` cell, and it must be the first code cell"
    src = _source(cells[0])
    for node in ast.parse(src).body:
        line = src.splitlines()[node.lineno - 1]
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None, (
            f"{path.name} line {node.lineno}: write `name: type = value  # help`, got {line!r}"
        )
        try:
            ast.literal_eval(node.value)
        except ValueError:
            pytest.fail(f"{path.name} line {node.lineno}: default is not a literal: {line!r}")
        assert "#" in line.split("=", 1)[1], f"{path.name} line {node.lineno}: missing `# help` comment"
        assert node.target.id == node.target.id.lower(), f"{path.name}: parameter names are lowercase"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_parameters_equal_schema_fields_and_defaults(path):
    assert path.stem in SCHEMAS, f"{path.name}: no schema registered with @register('{path.stem}')"
    schema = SCHEMAS[path.stem]
    inspected = pm.inspect_notebook(str(path))
    fields = {f.name: f for f in dataclasses.fields(schema)}
    assert list(inspected) == list(fields), f"{path.name}: parameter names/order differ from {schema.__name__}"
    for name, p in inspected.items():
        f = fields[name]
        assert p["inferred_type_name"] == str(f.type), f"{path.name}: {name} type {p['inferred_type_name']} != {f.type}"
        default = ast.literal_eval(p["default"])
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert default == want and type(default) is type(want), f"{path.name}: {name} default differs"
    for name, value in REQUIRED.items():
        assert ast.literal_eval(inspected[name]["default"]) == value, f"{path.name}: every notebook has {name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_hub_ids_or_absolute_paths_in_defaults(path):
    for name, p in pm.inspect_notebook(str(path)).items():
        value = ast.literal_eval(p["default"])
        if not isinstance(value, str):
            continue
        assert not value.startswith(("/", "~")) and not re.match(r"^[A-Za-z]:\\", value), f"{name}: absolute path"
        looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None
        assert not looks_like_hub_id or value.startswith(LOCAL_PREFIXES), f"{path.name}: {name}={value!r} is a hub id"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_thin(path):
    for i, cell in enumerate(_code_cells(path)):
        src = _source(cell)
        assert "sys.path" not in src, f"{path.name} cell {i}: no sys.path edits (the package is installed editable)"
        for node in ast.walk(ast.parse(src)):
            assert not isinstance(node, ast.ClassDef), f"{path.name} cell {i}: class {node.name} belongs in blip2lib"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 5, f"{path.name} cell {i}: def {node.name} has {length} lines (max 5)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_metadata(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert re.fullmatch(r"\d\d_[a-z0-9_]+", path.stem), f"{path.name}: name as NN_verb_object.ipynb"
    assert nb["cells"][0]["cell_type"] == "markdown", f"{path.name}: starts with a Markdown title"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_every_notebook_has_a_smoke_yaml_and_declares_its_metrics(path):
    assert (ROOT / "params" / path.stem / "smoke.yaml").exists(), f"params/{path.stem}/smoke.yaml missing"
    assert SCHEMAS[path.stem].records, f"{SCHEMAS[path.stem].__name__}.records: the metrics the smoke test expects"


@pytest.mark.parametrize("path", PARAMS, ids=[f"{p.parent.name}/{p.name}" for p in PARAMS])
def test_params_file_validates_and_maps_to_a_notebook(path):
    load_params(path)
    assert job_for(path).notebook.exists()


def test_validate_all_checks_every_params_file():
    assert validate_all() == len(PARAMS)


def _paper_files() -> list[Path]:
    return sorted((ROOT / "params").glob("*/paper_*.yaml"))


def _target_ids() -> list[str]:
    return [t["id"] for t in yaml.safe_load((ROOT / "params" / "paper_targets.yaml").read_text())["targets"]]


def _referenced() -> dict[str, list[str]]:
    refs = {}
    for f in _paper_files():
        value = (yaml.safe_load(f.read_text()) or {}).get("paper_targets", {})
        refs[str(f.relative_to(ROOT))] = list(value.values()) if isinstance(value, dict) else list(value)
    return refs


def test_paper_target_ids_are_unique():
    ids_ = _target_ids()
    assert len(ids_) == len(set(ids_))


def test_referenced_paper_ids_exist():
    known = set(_target_ids())
    for f, refs in _referenced().items():
        assert set(refs) <= known, f"{f}: unknown paper target ids {sorted(set(refs) - known)}"


def test_every_paper_number_is_referenced_by_a_paper_params_file():
    used = {i for refs in _referenced().values() for i in refs}
    missing = [i for i in _target_ids() if i not in used]
    assert not missing, f"{len(missing)} paper targets are reproduced by no params/*/paper_*.yaml: {missing[:10]}"
