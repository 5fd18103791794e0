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

    def dotted(path) -> str:  # blip2lib/workbook/gallery.py -> blip2lib.workbook.gallery
        return ".".join(("blip2lib", *path.relative_to(root).with_suffix("").parts))

    clis = {dotted(p.parent / "x").rsplit(".", 1)[0] for p in root.rglob("*/__main__.py")}  # packages, any depth
    clis |= {dotted(p) for p in root.rglob("*.py")
             if p.name != "__main__.py" and 'if __name__ == "__main__":' in p.read_text()}  # fmt: skip
    internal = {"blip2lib.toy.stage0"}  # a worker process the toy build starts, not a user command
    assert {m for m, _, _ in COMMANDS} == clis - internal
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
        package = importlib.util.find_spec(module).submodule_search_locations is not None
        main_fn = importlib.import_module(defined_in.get(module, f"{module}.__main__" if package else module))
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
