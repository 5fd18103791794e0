"""Faults injected into real training processes: SIGKILL at a chosen step, torn logs, disk full, a frozen rank.

Each run is ``python -m blip2lib.train`` in its own process (tiny stage-2 model, 28-px images). A killed run is
stopped by a real ``SIGKILL`` that the process sends itself right after it has logged a chosen step (so the kill
point is exact, not a race with a timer), then resumed by a fresh process; the result is compared bit for bit with
an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

Completed = subprocess.CompletedProcess
ROOT = Path(__file__).resolve().parents[2]
WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "circle", "square", "left", "right", "small", "big"]

# Run blip2lib.train; with KILL_AT_STEP set, SIGKILL this process right after the step record of that step is
# written (the checkpoint of that step, if any, comes later in the step and is therefore NOT written).
_RUNNER = """
import os, signal, sys
from blip2lib import engine
kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
if kill_at:
    write = engine._JsonlLog.write
    def write_then_die(self, record):
        write(self, record)
        if record.get("step") == kill_at and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)
    engine._JsonlLog.write = write_then_die
full_at = int(os.environ.get("DISK_FULL_LOG_AT_STEP", "0"))
if full_at:  # the disk fills while log.jsonl gets step full_at: half the line lands, then ENOSPC
    import builtins, errno
    class HalfFile:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, text):
            if f'"step": {full_at},' in text and '"loss"' in text:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)
    engine.open = lambda *a, **k: HalfFile(builtins.open(*a, **k))
ckpt_at = int(os.environ.get("DISK_FULL_CKPT_AT_STEP", "0"))
if ckpt_at:  # the disk fills while the checkpoint of step ckpt_at writes its train state
    import errno
    from blip2lib import checkpoint
    write_state = checkpoint._write_train_state
    def half_state(tmp, state):
        if state["step"] == ckpt_at:
            (tmp / checkpoint.STATE_FILE).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        write_state(tmp, state)
    checkpoint._write_train_state = half_state
stop_at = int(os.environ.get("STOP_RANK1_AT_STEP", "0"))
if stop_at:  # rank 1 freezes (SIGSTOP) after logging that step; the others go on into the next collective
    write_before_stop = engine._JsonlLog.write
    def write_then_freeze(self, record):
        write_before_stop(self, record)
        if record.get("step") == stop_at and "loss" in record and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGSTOP)
    engine._JsonlLog.write = write_then_freeze
from blip2lib.train import main
sys.exit(main(sys.argv[1:]))
"""


def _write_images(folder: Path, n: int, bad: set[int]) -> None:
    """``n`` random 28-px PNGs ``img{i}.png``; the indices in ``bad`` hold bytes no decoder reads."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"img{i}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(path)


def _caption_data(root: Path, n: int, bad: set[int]) -> None:
    _write_images(root / "images", n, bad)
    rng = np.random.default_rng(1)
    ann = [{"image": f"img{i}.png", "caption": " ".join(rng.choice(WORDS, 4)), "image_id": f"i{i}"} for i in range(n)]
    (root / "ann.json").write_text(json.dumps(ann))


def _params(root: Path, **kw) -> Path:
    p = dict(stage="stage2", model="tiny", llm="opt", train_data="ann.json", data_root=str(root),
             images_root="images", steps=12, batch_size=4, image_size=28, max_txt_len=12, augment="none",
             warmup_steps=1, progress=False, ckpt_every=4, eval_every=0, val_data="", seed=3, keep_last=0)  # fmt: skip
    p.update(kw)
    path = root / f"params_{len(list(root.glob('params_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def _train(params: Path, run_dir: Path, kill_at: int = 0, timeout: float = 240, **faults) -> Completed:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "KILL_AT_STEP": str(kill_at), **{k.upper(): str(v) for k, v in faults.items()}}  # fmt: skip
    cmd = [sys.executable, "-c", _RUNNER, "--params", str(params), "--run-dir", str(run_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"ckpt-{step}" / "model.safetensors"))


def _assert_same_run(full: Path, resumed: Path, step: int) -> None:
    a, b = _final_weights(full, step), _final_weights(resumed, step)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _records(full / "log.jsonl"), _records(resumed / "log.jsonl")
    key = [(r["step"], r.get("loss"), r.get("position"), json.dumps(r.get("eval"))) for r in ra]
    assert key == [(r["step"], r.get("loss"), r.get("position"), json.dumps(r.get("eval"))) for r in rb]


def _epoch0_batches(n: int, batch: int, seed: int) -> list[list[int]]:
    """Dataset indices of each batch of epoch 0, from the sampler's definition: a torch.randperm seeded seed + 0."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i : i + batch] for i in range(0, n - n % batch, batch)]


@pytest.mark.parametrize("empty_batch", [1, 2])  # 2: the last batch of the epoch (the run used to crash there)
def test_all_bad_batch_is_part_of_the_position_and_resume_is_exact(tmp_path, empty_batch):
    """Issue 23 item 2: 12 images, batch 4; one batch of epoch 0 wholly unreadable, one more bad image elsewhere.

    Killed (SIGKILL) after step 5 (checkpoint 4) and resumed: the same weights and losses, bit for bit, as the
    uninterrupted run; the skipped batch moves the position (4 per batch, empty or not); ``bad_samples`` equals the
    number of skipped-image warnings the process printed.
    """
    batches = _epoch0_batches(12, 4, seed=3)
    bad = set(batches[empty_batch]) | {batches[0][0]}
    _caption_data(tmp_path, 12, bad)
    params = _params(tmp_path)
    full = _ok(_train(params, tmp_path / "full"))
    summary = json.loads((tmp_path / "full" / "train.json").read_text())
    assert summary["bad_samples"] == full.stderr.count("skipping unreadable sample") >= 5
    log = [r for r in _records(tmp_path / "full" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 13))
    # step 2's batch follows the empty one: its position jumps by 8 (4 skipped + 4 used); otherwise by 4
    steps_before_gap = empty_batch  # batches 0..empty_batch-1 were used by steps 1..empty_batch
    expected = [4 * s + (4 if s > steps_before_gap else 0) for s in range(1, 13)]
    assert [r["position"] for r in log][: steps_before_gap + 2] == expected[: steps_before_gap + 2]
    _killed(_train(params, tmp_path / "killed", kill_at=5))
    _ok(_train(params, tmp_path / "killed"))
    _assert_same_run(tmp_path / "full", tmp_path / "killed", 12)


def test_validation_log_is_truncated_to_the_resumed_step(tmp_path):
    """Issue 23 item 12: eval_every 5, checkpoints every 10, killed after step 37 → resumed from step 30.

    ``val.jsonl`` (and ``log.jsonl``) must hold each step once, exactly as the uninterrupted run's.
    """
    _caption_data(tmp_path, 8, set())
    params = _params(tmp_path, steps=40, batch_size=2, ckpt_every=10, eval_every=5, val_data="synthetic",
                     val_images=4, eval_at_start=False)  # fmt: skip
    _ok(_train(params, tmp_path / "full"))
    _killed(_train(params, tmp_path / "killed", kill_at=37))
    assert [r["step"] for r in _records(tmp_path / "killed" / "val.jsonl")] == [5, 10, 15, 20, 25, 30, 35]
    _ok(_train(params, tmp_path / "killed"))
    va, vb = _records(tmp_path / "full" / "val.jsonl"), _records(tmp_path / "killed" / "val.jsonl")
    assert [r["step"] for r in vb] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [(r["step"], r["val_lm_loss"]) for r in va] == [(r["step"], r["val_lm_loss"]) for r in vb]
    _assert_same_run(tmp_path / "full", tmp_path / "killed", 40)


def test_disk_full_mid_log_line_then_resume_trims_the_torn_line(tmp_path):
    """Issue 23 item 11 (log): the disk fills while step 6 is appended to ``log.jsonl``; half a line stays.

    The process stops with an error that says "no space left" and names the log; the resumed run (from checkpoint
    4) drops the torn line and ends with the uninterrupted run's log and weights. A torn last line of ``val.jsonl``
    (same cause) is dropped as well.
    """
    _caption_data(tmp_path, 8, set())
    params = _params(tmp_path, steps=8, eval_every=2, val_data="synthetic", val_images=4)
    _ok(_train(params, tmp_path / "full"))
    run = tmp_path / "run"
    proc = _train(params, run, disk_full_log_at_step=6)
    assert proc.returncode == 1 and f"no space left on device while appending to {run / 'log.jsonl'}" in proc.stderr
    torn = (run / "log.jsonl").read_text().split("\n")[-1]
    assert torn.startswith('{"step": 6,')  # half a record after the last newline
    with pytest.raises(json.JSONDecodeError):
        json.loads(torn)
    with open(run / "val.jsonl", "a") as f:
        f.write('{"step": 6, "val_lm')
    _ok(_train(params, run))
    assert [r["step"] for r in _records(run / "val.jsonl")] == [0, 2, 4, 6, 8]
    _assert_same_run(tmp_path / "full", run, 8)


def test_disk_full_during_a_checkpoint_names_it_and_the_older_ones_resume(tmp_path):
    """Issue 23 item 11 (checkpoint): ENOSPC while checkpoint 8 writes its state → "no space left" with the path.

    No partial ``ckpt-8`` (or temporary folder) stays; a resume starts at checkpoint 4 and matches the
    uninterrupted run bit for bit.
    """
    _caption_data(tmp_path, 8, set())
    params = _params(tmp_path, steps=12)
    _ok(_train(params, tmp_path / "full"))
    run = tmp_path / "run"
    proc = _train(params, run, disk_full_ckpt_at_step=8)
    assert proc.returncode == 1
    assert f"no space left on device while writing checkpoint step 8 in {run / 'checkpoints'}" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-4"]
    _ok(_train(params, run))
    _assert_same_run(tmp_path / "full", run, 12)


@pytest.mark.dist
def test_a_frozen_rank_ends_the_job_after_dist_timeout_s(tmp_path):
    """Issue 23 item 13: 2 gloo ranks under torchrun; rank 1 SIGSTOPs itself after step 2, dist_timeout_s 5.

    Rank 0 blocks in step 3's gradient all-reduce, gives up after 5 s with a message naming the rank, the timeout
    and what to do, and torchrun then ends the job (SIGKILL reaches the stopped rank): the whole job is over well
    within a minute of the freeze instead of the 30 minutes of torch's default.
    """
    import time

    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    params = _params(tmp_path, stage="stage1", train_data="synthetic", steps=30, batch_size=2, ckpt_every=0,
                     dist_timeout_s=5)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "STOP_RANK1_AT_STEP": "2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--params", str(params), "--run-dir", str(tmp_path / "run")]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # the test failed: take down the job we started (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = _records(tmp_path / "run" / "log.jsonl")
    assert proc.returncode != 0 and [r["step"] for r in log] == [1, 2]  # step 3 never completed
    assert (
        "CollectiveTimeoutError: rank 0 of 2: training stopped: a collective waited more than dist_timeout_s=5 s" in err
    )
    assert "rerun to resume from the last checkpoint, or raise dist_timeout_s" in err
    assert time.monotonic() - t0 < 240  # torch's default timeout would have kept rank 0 waiting for 30 minutes
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b""  # frozen rank gone
