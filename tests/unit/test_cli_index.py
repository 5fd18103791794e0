"""``python -m blip2lib`` lists every command-line entry point, instantly, with an example that parses."""

import importlib.util
import subprocess
import sys
import time

from blip2lib.__main__ import COMMANDS, main


def test_every_cli_module_of_the_package_is_listed():
    # A module is a CLI when it has a __main__.py or an ``if __name__ == "__main__"`` block at top level.
    import blip2lib

    root = __import__("pathlib").Path(blip2lib.__file__).parent
    clis = {f"blip2lib.{p.parent.name}" for p in root.glob("*/__main__.py")}
    clis |= {f"blip2lib.{p.stem}" for p in root.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()}
    clis.discard("blip2lib.__main__")
    assert {m for m, _, _ in COMMANDS} == clis
    for module, _, example in COMMANDS:
        assert importlib.util.find_spec(module) is not None
        assert example.startswith(f"python -m {module}")


def test_listing_is_fast_and_exit_codes(capsys):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "blip2lib"], capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - t0 < 2.0  # no torch import on this path
    assert all(m in out for m, _, _ in COMMANDS)
    assert main(["--help"]) == 0
    assert main(["bogus"]) == 2
    assert "unknown argument 'bogus'" in capsys.readouterr().err


def test_every_help_names_its_command_and_shows_an_example(capsys):
    """``--help`` of each command: the usage names ``python -m <module>`` (not ``train.py``) and an example follows;
    ``run --help`` does not offer ``-j`` (only ``run-all`` runs several steps)."""
    import importlib

    import pytest

    defined_in = {"blip2lib.workbook": "blip2lib.workbook.runner"}  # its __main__ runs main() when imported
    for module, _, _ in COMMANDS:
        plain = module.endswith(("demo", "train", "launch"))
        main_fn = importlib.import_module(defined_in.get(module, module if plain else f"{module}.__main__"))
        with pytest.raises(SystemExit) as done:
            main_fn.main(["--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python -m {module} "), (module, out[:80])
        assert out.count(f"python -m {module}") >= 2, f"{module} --help shows no example"
    from blip2lib.workbook.runner import main as workbook

    for sub, has_jobs in (("run", False), ("run-all", True)):
        with pytest.raises(SystemExit):
            workbook([sub, "--help"])
        assert ("-j JOBS" in capsys.readouterr().out) is has_jobs, sub
