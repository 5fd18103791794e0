"""Shared test set-up: offline mode, CPU only, seeds, tiny configs, and marker handling."""

import os

# No test may reach the network or a GPU (house style D7); set before transformers/torch are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are skipped (never silently passed) when CUDA is missing; `browser` when Chromium is."""
    import shutil

    has_cuda = torch.cuda.is_available()
    has_chromium = shutil.which("chromium") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (run `make gpu-check` on a GPU host)"))
        if "browser" in item.keywords and not has_chromium:
            item.add_marker(pytest.mark.skip(reason="needs Debian's chromium (.ci/run installs it)"))
    # Browser tests last: they open the reports the smoke notebook tests produced (tests/notebooks/conftest.py).
    items.sort(key=lambda item: "browser" in item.keywords)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d
