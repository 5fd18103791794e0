"""The README's "What survives what" table names tests that exist (a renamed test must not leave a dead claim)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_named_in_what_survives_what_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What survives what", 1)[1].split("\n## ", 1)[0]
    named = 0
    for row in section.splitlines():
        current = None
        # `file.py::test_a`, `::test_b` (the same file as the previous reference in the row)
        for file, name in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", row):
            current = file or current
            assert current, f"README 'What survives what': `::{name}` without a file before it"
            source = (ROOT / "tests" / "unit" / current).read_text()
            assert f"def {name}(" in source, f"README names {current}::{name}, which does not exist"
            named += 1
    assert named >= 8
