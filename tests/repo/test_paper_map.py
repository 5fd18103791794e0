"""docs/paper_map.md is the repository's own paper-to-code map; every citation of it must resolve.

Code, params, notebooks and docs cite it as ``docs/paper_map.md §N`` (a list such as ``§3, §7`` cites each number;
a citation may wrap onto the next comment or notebook-source line). Each cited number must be a heading of the map,
every module, function, params file and test the map names must exist, and no file may cite a document the
repository does not contain.
"""

import ast
import importlib
import inspect
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAP = ROOT / "docs" / "paper_map.md"
SECTION = r"§(\d+(?:\.\d+)*)"
# "paper_map.md", optional closing backticks, then whatever a line wrap puts between it and "§" in a comment,
# docstring or notebook JSON source: spaces, newlines, "#", quotes, commas, "\n" escapes.
CITATION = re.compile(r"paper_map\.md`{0,2}(?:\s|#|\"|,|\\n)*" + SECTION + r"((?:\s*(?:,|and|/|–)\s*§\d+(?:\.\d+)*)*)")
# Documents that were never part of the repository: citing them leaves a user without the source.
FOREIGN = ("spec §", "house style", "hf_transformers_blip2", "blip2_spec", "user_needs", "helper report", "schema gap",
           "toy_world_probe", "hf md §")  # fmt: skip
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", ".cfg", ".txt", ".sh", ".json", ""}


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    paths = [ROOT / p for p in out.stdout.splitlines()]
    return [p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES and "/.git/" not in str(p)]


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def citations(text: str) -> list[str]:
    """Every section number cited as ``paper_map.md §N`` (lists and wrapped lines included)."""
    found = []
    for m in CITATION.finditer(text):
        found.append(m.group(1))
        found += re.findall(SECTION, m.group(2))
    return found


def headings() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^#{2,6} " + SECTION + r"\b", MAP.read_text(), re.MULTILINE)}


def test_citation_pattern_reads_every_form_the_repository_uses():
    text = (
        "see docs/paper_map.md §4.3.\n"  # sentence full stop
        "(docs/paper_map.md §3, §7 and §10.18)\n"  # a list
        "``docs/paper_map.md`` §1 (architecture)\n"  # reST literal
        "    # retrieval-mode ITC (docs/paper_map.md\n    # §10.15)\n"  # wrapped comment
        '    "x (docs/paper_map.md\\n",\n    "§5.2) y"\n'  # wrapped notebook source (JSON)
        "docs/paper_map.md has no section here\n"
    )
    assert citations(text) == ["4.3", "3", "7", "10.18", "1", "10.15", "5.2"]


def test_every_cited_section_is_a_heading_of_the_map():
    have = headings()
    missing = {}
    total = 0
    for path in _tracked_text_files():
        for n in citations(_read(path)):
            total += 1
            if n not in have:
                missing.setdefault(n, []).append(str(path.relative_to(ROOT)))
    assert total > 400, f"only {total} citations found: the pattern no longer matches the repository's form"
    assert not missing, f"cited sections without a heading in docs/paper_map.md: {missing}"


def test_map_numbers_its_sections_in_order_without_gaps():
    nums = [tuple(int(x) for x in n.split(".")) for n in re.findall(r"^#{2,6} " + SECTION, MAP.read_text(), re.M)]
    assert nums == sorted(nums) and len(set(nums)) == len(nums), "headings out of order or repeated"
    assert {(n,) for n in range(13)} <= set(nums), "every top-level section 0-12 has a heading"
    assert {(10, k) for k in range(1, 21)} <= set(nums), "the twenty details of §10 each have a heading"


def _cites(path: Path, line: str, form: str) -> bool:
    """``form`` occurs in ``line``; a test's quoted ``"form"`` (a guard asserting its absence) does not count."""
    low = line.lower()
    if form.lower() not in low:
        return False
    quoted = f'"{form.lower()}"' in low or f"'{form.lower()}'" in low
    return not (quoted and path.relative_to(ROOT).parts[0] == "tests")


@pytest.mark.parametrize("form", FOREIGN)
def test_no_file_cites_a_document_the_repository_does_not_contain(form):
    this = Path(__file__).resolve()
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _tracked_text_files()
        if p.resolve() != this
        for i, line in enumerate(_read(p).splitlines(), 1)
        if _cites(p, line, form)
    ]
    assert not hits, f"{form!r} cites a document that is not in the repository: {hits}"


def _resolve(dotted: str):
    """Import the longest module prefix of ``blip2lib.a.b.C.f`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_python_name_in_the_map_exists():
    text = MAP.read_text()
    names = sorted(set(re.findall(r"`(blip2lib(?:\.\w+)+)`", text)))
    assert len(names) > 100
    broken = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            broken.append(f"{name}: {e}")
    assert not broken, "\n".join(broken)


def test_members_listed_after_a_name_exist():
    """``blip2lib.model.Blip2 (`soft_prompt`, `lm_loss`)``: each listed name is an attribute or a parameter."""
    text = MAP.read_text()
    checked, broken = 0, []
    for m in re.finditer(r"`(blip2lib(?:\.\w+)+)`\s\(((?:`\w+`(?:,\s)?)+)\)", text):
        obj = _resolve(m.group(1))
        params = set(inspect.signature(obj).parameters) if callable(obj) else set()
        for name in re.findall(r"`(\w+)`", m.group(2)):
            checked += 1
            if not hasattr(obj, name) and name not in params:
                broken.append(f"{m.group(1)}: {name}")
    assert checked > 10 and not broken, broken


def test_every_path_and_test_in_the_map_exists():
    text = MAP.read_text()
    paths = set(re.findall(r"`((?:blip2lib|params|tests|docs|notebooks|benchmarks)/[\w./-]+)`", text))
    paths |= set(re.findall(r"\]\(([\w./-]+\.md)\)", text))  # markdown links, relative to docs/
    missing = [p for p in sorted(paths) if not ((ROOT / p).exists() or (MAP.parent / p).exists())]
    assert not missing, f"paths named in docs/paper_map.md that do not exist: {missing}"
    # notebooks are named bare (`10_stage1_pretrain`)
    notebooks = set(re.findall(r"notebooks? `(\d\d_\w+)`", text)) | set(re.findall(r"`(\d\d_[a-z]\w+)`", text))
    assert notebooks and not [n for n in notebooks if not (ROOT / "notebooks" / f"{n}.ipynb").exists()]
    # tests named as `tests/.../test_x.py::test_name` or as a parenthesised list after the file
    missing_tests = []
    for m in re.finditer(r"`(tests/[\w/]+\.py)(?:::(\w+))?`(?:\s\(((?:`\w+`(?:,\s)?)+)\))?", text):
        defined = {
            n.name for n in ast.walk(ast.parse((ROOT / m.group(1)).read_text())) if isinstance(n, ast.FunctionDef)
        }
        wanted = ([m.group(2)] if m.group(2) else []) + re.findall(r"`(\w+)`", m.group(3) or "")
        missing_tests += [f"{m.group(1)}::{t}" for t in wanted if t not in defined]
    assert not missing_tests, f"tests named in docs/paper_map.md that do not exist: {missing_tests}"


def test_map_is_linked_from_the_readme_and_the_fidelity_ledger():
    assert "(docs/paper_map.md)" in (ROOT / "README.md").read_text()
    assert "(paper_map.md)" in (ROOT / "docs" / "fidelity.md").read_text()
