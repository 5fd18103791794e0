"""The runner's console progress lines: read from the run's ``log.jsonl``, with throughput and time left."""

import json
import threading

from blip2lib.workbook.progress import TrainingProgress, _duration, last_step


def _append(path, rows, torn: str = ""):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(torn)


def test_lines_have_step_loss_throughput_and_time_left(tmp_path):
    now = [100.0]
    lines = []
    p = TrainingProgress("10_stage1_pretrain/paper_vitg", tmp_path, 250_000, interval_s=30, emit=lines.append,
                         clock=lambda: now[0])  # fmt: skip
    assert p.poll() is None  # nothing written yet
    _append(tmp_path / "log.jsonl", [{"step": 0, "eval": {"r": 1.0}}, {"step": 1, "loss": 11.9078, "lr": 1e-6}])
    assert p.poll() == "[train] 10_stage1_pretrain/paper_vitg: step 1/250,000 (0.0 %), loss 11.91"
    now[0] = 130.0
    assert p.poll() is None  # no new step: no line
    _append(tmp_path / "log.jsonl", [{"step": 61, "loss": 2.5, "samples_per_s": 590.25}], torn='{"step": 62, "lo')
    now[0] = 160.0
    # 60 steps in 60 s: 1 step/s; 249,939 steps left = 2 d 21 h
    assert p.poll() == ("[train] 10_stage1_pretrain/paper_vitg: step 61/250,000 (0.0 %), loss 2.5, 590.2 samples/s, "
                        "1.00 steps/s, about 2 d 21 h left")  # fmt: skip
    assert lines == [
        "[train] 10_stage1_pretrain/paper_vitg: step 1/250,000 (0.0 %), loss 11.91",
        "[train] 10_stage1_pretrain/paper_vitg: step 61/250,000 (0.0 %), loss 2.5, 590.2 samples/s, 1.00 steps/s, "
        "about 2 d 21 h left",
    ]


def test_the_newest_family_log_is_named_and_unknown_totals_are_fine(tmp_path):
    lines = []
    p = TrainingProgress("20_stage2_pretrain/toy", tmp_path, None, emit=lines.append, clock=lambda: 0.0)
    _append(tmp_path / "opt" / "log.jsonl", [{"step": 5, "loss": 1.0}])
    assert p.poll() == "[train] 20_stage2_pretrain/toy opt: step 5, loss 1"
    assert last_step(tmp_path / "missing.jsonl") is None


def test_durations_read_naturally():
    assert [_duration(s) for s in (5, 89, 600, 5400, 7 * 3600 + 5 * 60, 3 * 86400 + 4 * 3600)] == [
        "5 s", "89 s", "10 min", "1 h 30 min", "7 h 05 min", "3 d 4 h"]  # fmt: skip


def test_watcher_thread_logs_while_the_run_trains_and_stops_with_it(tmp_path):
    got = threading.Event()
    lines = []

    def emit(text):
        lines.append(text)
        got.set()

    _append(tmp_path / "log.jsonl", [{"step": 3, "loss": 0.5}])
    with TrainingProgress("x/y", tmp_path, 10, interval_s=0.05, emit=emit):
        assert got.wait(5)
    assert lines[0] == "[train] x/y: step 3/10 (30.0 %), loss 0.5"
    with TrainingProgress("x/y", tmp_path, 10, interval_s=0, emit=emit) as off:  # 0: no watcher thread
        assert off._thread is None
