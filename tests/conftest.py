"""Shared test set-up: offline mode, CPU only, seeds, tiny configs, marker handling, threads under pytest-xdist."""

import os

# No test may reach the network or a GPU; set before transformers/torch are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`make test`: one worker per core) each worker gets its share of the cores for torch's intra-op
# threads, and so do the processes it starts (notebook kernels, gloo ranks, toy-world builders), which read the same
# variables. Why: with torch's default of one thread per core, 2 workers on 2 cores run 4+ busy threads and every
# test slows down more than the parallelism gains. Set before torch is imported; an explicit setting is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = str(max(1, _cores // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `browser` tests without Chromium; long tiers first, browser tests last."""
    import shutil

    has_cuda = torch.cuda.is_available()
    has_chromium = shutil.which("chromium") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (run `make gpu-check` on a GPU host)"))
        if "browser" in item.keywords and not has_chromium:
            item.add_marker(pytest.mark.skip(reason="needs Debian's chromium (.ci/run installs it)"))
    # Long tiers first, so that no xdist worker starts a minute-long test when the others are about to finish; browser
    # tests last: they open the reports of the smoke runs (tests/notebooks/conftest.py waits for any still running).
    items.sort(key=lambda item: ("browser" in item.keywords, not ({"slow", "dist", "notebook"} & set(item.keywords))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d
