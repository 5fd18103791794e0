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
