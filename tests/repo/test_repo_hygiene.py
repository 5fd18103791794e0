"""Repository hygiene: one dependency source, stripped notebooks, CI wiring."""

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_package_with_all_extras():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert {re.split(r"[=<>]", d)[0] for d in conda} == {"python", "pip"}, "conda may only provide python and pip"
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip_sections == [["-e .[all]"]], "environment.yml must install this package's extras, not its own list"
    extras = _pyproject()["project"]["optional-dependencies"]
    # `all` must name every other extra, so `.[all]` equals the union the conda users get — except `mutation`, which
    # only `make mutate` needs and installs on demand (CI and users never pay for mutmut and its dependencies).
    all_names = re.search(r"\[(.*)\]", extras["all"][0]).group(1).split(",")
    assert sorted(all_names) == sorted(k for k in extras if k not in ("all", "mutation"))
    assert extras["mutation"] == ["mutmut>=3.8,<4"]


def test_required_extras_exist():
    extras = _pyproject()["project"]["optional-dependencies"]
    want = {
        "eval": {"pycocoevalcap"},
        "data": {"webdataset"},
        "notebooks": {"papermill", "nbconvert", "nbformat", "ipykernel", "jupyterlab"},
        "dev": {"pytest", "pytest-timeout", "pytest-xdist", "ruff", "nbstripout"},
    }
    for extra, names in want.items():
        got = {re.split(r"[=<>\[ ]", r)[0] for r in extras[extra]}
        assert names <= got, f"extra '{extra}' lacks {names - got}"


def test_torch_bounds_admit_the_local_wheels():
    deps = _pyproject()["project"]["dependencies"]
    torch = next(d for d in deps if d.startswith("torch") and not d.startswith("torchvision"))
    vision = next(d for d in deps if d.startswith("torchvision"))
    assert "<=2.14.1" in torch and "<=0.29.1" in vision


def test_committed_notebooks_are_stripped():
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell.get("outputs", []) == [], f"{path.name}: outputs committed"
                assert cell.get("execution_count") is None, f"{path.name}: execution count committed"


def test_ci_calls_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make demo" in readme


def test_gitignore_keeps_runs_and_venv_out():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in (".venv/", "runs/", "__pycache__/"):
        assert entry in ignored


def test_ruff_lint_and_format_are_clean():
    """`make lint` passes on the committed tree (ruff is in the `dev` extra)."""
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"ruff {' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-1000:]}"


def test_gpu_check_script_names_every_file_with_gpu_tests():
    """benchmarks/gpu_check.sh names the gpu test files (so collection skips papermill-only notebook tests)."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    with_gpu = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
                if re.search(r"^@pytest\.mark\.gpu", p.read_text(), re.M)}  # fmt: skip
    assert with_gpu and all(f in script for f in with_gpu), sorted(with_gpu)
