"""Training-loop details that the mutation pass of blip2lib/engine.py showed unpinned (docs/mutation.md).

A one-parameter task with scripted losses and a fake clock make every logged number exact: the record of a step,
the averages over micro-batches, the ``no_sync`` calls of gradient accumulation, the counters carried through a
resume, the progress bar, the TensorBoard mirror and the bad-batch dump. Expected values follow from the
``run_loop`` docstring, worked out by hand below.
"""

import json
import logging
import sys
import threading

import pytest
import torch
from torch import nn

import blip2lib.checkpoint as ck
import blip2lib.engine as eng

NAN = float("nan")
# Progress bars without tqdm's monitor thread and with a plain thread lock instead of its default process-shared
# semaphore: mutmut forks one child per mutant from a parent that ran these tests, and a child killed while holding
# a shared semaphore would hang every later child on its first progress bar.
eng.tqdm.monitor_interval = 0
eng.tqdm.set_lock(threading.RLock())


class Scripted(nn.Module):
    """Loss of call ``k`` (1-based) is ``w.sum() * 0 + losses[k - 1]`` (NaN allowed); an unused parameter too."""

    def __init__(self, losses=(), grad_scale=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.unused = nn.Parameter(torch.ones(2))  # never in the graph: its grad stays None
        self.losses, self.grad_scale, self.calls, self.syncs = list(losses), grad_scale, 0, 0

    def forward(self, batch):
        self.calls += 1
        value = self.losses[self.calls - 1] if self.calls <= len(self.losses) else 1.0
        loss = (self.w * batch["x"]).sum() * self.grad_scale + (value - float((self.w * batch["x"]).sum().detach()))
        return {"loss": loss, "aux": torch.tensor(2.0 * self.calls)}


class Syncing(Scripted):
    """Counts the ``no_sync`` contexts that the loop opens (the DDP interface)."""

    def no_sync(self):
        self.syncs += 1
        return torch.enable_grad()


def loader(start):
    """Batches of 2 samples with x = (1, 1) each (grad of w = (2, 2)); endless, positions count samples."""
    while True:
        yield {"x": torch.ones(2, 2)}


class Clock:
    """perf_counter that advances by exactly 1.0 per call (only engine's reference to ``time`` is replaced)."""

    def __init__(self):
        self.t = 99.0  # not 0: a sum t1 + t0 must not pass for a difference

    def perf_counter(self):
        self.t += 1.0
        return self.t


def _opt(task, lr=0.1, weight_decay=0.05):
    return torch.optim.AdamW([{"params": [task.w, task.unused], "lr_scale": 0.5}], lr=lr, weight_decay=weight_decay)


def _run(task, tmp_path, steps=2, **kw):
    kw.setdefault("log_path", tmp_path / "log.jsonl")
    kw.setdefault("ckpt_dir", None)
    kw.setdefault("progress", False)
    return eng.run_loop(task, loader, kw.pop("optimizer", None) or _opt(task), kw.pop("schedule", lambda s: 0.1),
                        steps=steps, **kw)  # fmt: skip


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_step_record_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(eng, "time", Clock())
    task = Syncing([1.0, 3.0, 5.0, 9.0])
    out = _run(task, tmp_path, steps=2, grad_accum=2, log_path=tmp_path / "a" / "b" / "log.jsonl")
    recs = _records(tmp_path / "a" / "b" / "log.jsonl")
    # per step: t0, then (before, after) the batch for each of 2 micro-batches, then dt: 6 clock reads, dt = 5,
    # data wait = 2 × 1; 4 samples; loss and aux averaged over the 2 micro-batches
    assert recs[0] == {"step": 1, "loss": 2.0, "aux": 3.0, "lr": 0.1, "samples_per_s": 4 / 5, "data_wait_frac": 2 / 5,
                       "skipped": False, "position": 4}  # fmt: skip
    assert recs[1]["loss"] == 7.0 and recs[1]["aux"] == 7.0 and recs[1]["position"] == 8
    assert task.syncs == 2  # no_sync on the first micro-batch of each step only (not the last one)
    assert set(out) == {"step", "skipped_steps", "last", "best", "checkpoint", "resumed_from", "position"}
    assert out["last"] == {"loss": 7.0, "aux": 7.0} and out["checkpoint"] is None
    # the loop leaves no gradient behind, and the unused parameter never gets one
    assert task.w.grad is None and task.unused.grad is None


def test_defaults(tmp_path):
    task = Scripted()
    opt = _opt(task)
    calls = []
    out = _run(
        task, tmp_path, steps=2, optimizer=opt, ckpt_dir=tmp_path / "ck", eval_fn=lambda s: calls.append(s) or {}
    )
    assert out["position"] == 4  # one micro-batch of 2 samples per step
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5  # lr_scale applied
    assert calls == [2]  # eval only at the end
    assert sorted(p.name for p in (tmp_path / "ck").glob("ckpt-*")) == ["ckpt-2"]  # saved only at the end
    assert out["checkpoint"] == str(tmp_path / "ck" / "ckpt-2")
    task = Scripted()
    opt = _opt(task)
    _run(task, tmp_path, steps=1, optimizer=opt, apply_layer_decay=False)
    assert opt.param_groups[0]["lr"] == 0.1
    # five checkpoints, three kept
    _run(Scripted(), tmp_path, steps=5, ckpt_dir=tmp_path / "keep", ckpt_every=1)
    assert len(list((tmp_path / "keep").glob("ckpt-*"))) == 3
    # ten consecutive non-finite steps are tolerated, not more
    with pytest.raises(eng.NonFiniteLossError, match="^10 consecutive non-finite losses"):
        _run(Scripted([NAN] * 12), tmp_path, steps=12, ckpt_dir=tmp_path / "nan")


def test_stale_gradients_are_cleared_first(tmp_path):
    task = Scripted()
    task.unused.grad = torch.ones(2)  # a stale gradient from before the loop
    _run(task, tmp_path, steps=1)
    assert torch.equal(task.unused.detach(), torch.ones(2))  # never stepped: AdamW skips a None gradient


def test_eval_at_start_needs_a_step(tmp_path):
    calls = []
    _run(Scripted(), tmp_path, steps=0, eval_fn=calls.append, eval_at_start=True)
    assert calls == []
    _run(Scripted(), tmp_path, steps=1, eval_fn=lambda s: calls.append(s) or {}, eval_at_start=True)
    assert calls == [0, 1]


def test_best_tracking_direction_and_ties(tmp_path):
    seq = iter([{"m": 2.0}, {"m": 2.0}, {"m": 1.0}, {}])
    out = _run(Scripted(), tmp_path, steps=4, eval_fn=lambda s: next(seq), eval_every=1, best_key="m")
    assert out["best"] == {"step": 1, "metric": 2.0, "key": "m"}  # a tie does not move the best; {} is skipped
    seq = iter([{"m": 2.0}, {"m": 1.0}, {"m": 1.0}])
    out = _run(Scripted(), tmp_path, steps=3, eval_fn=lambda s: next(seq), eval_every=1, best_key="m",
               higher_is_better=False, ckpt_dir=tmp_path / "ck")  # fmt: skip
    assert out["best"] == {"step": 2, "metric": 1.0, "key": "m"}
    assert ck.best_checkpoint(tmp_path / "ck") == tmp_path / "ck" / "ckpt-2"  # best.json: lower is better too


def test_progress_bar(tmp_path, capsys):
    _run(Scripted([1.5, 2.5]), tmp_path, steps=2, progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=2.5" in err and "lr=0.1" in err and "3/2" not in err
    _run(Scripted(), tmp_path, steps=2, progress=False)
    assert capsys.readouterr().err == ""
    eng.run_loop(Scripted(), loader, _opt(Scripted()), lambda s: 0.1, steps=1, log_path=None, ckpt_dir=None)
    assert "1/1" in capsys.readouterr().err  # a bar by default


def test_resume_carries_counters_and_bar(tmp_path, capsys, caplog):
    # step 1 non-finite (skipped), step 2 non-finite, checkpoint at 2; after the resume step 3 is non-finite:
    # 3 consecutive = max_bad_steps
    ckd = tmp_path / "ck"
    _run(Scripted([NAN, NAN]), tmp_path, steps=2, ckpt_dir=ckd, max_bad_steps=3)
    manifest = ck.load_training_state(ckd / "ckpt-2", Scripted(), None, None, restore_rng=False)
    assert manifest["data_state"] == {"position": 4, "world_size": 1}
    assert manifest["extra"]["skipped"] == 2 and manifest["extra"]["bad"] == 2
    with caplog.at_level(logging.INFO, logger="blip2lib.engine"):
        with pytest.raises(eng.NonFiniteLossError, match="^3 consecutive"):
            _run(Scripted([NAN]), tmp_path, steps=4, ckpt_dir=ckd, max_bad_steps=3)
    assert f"resumed from {ckd / 'ckpt-2'} at step 2 (sample position 4)" in caplog.messages
    assert "step 3: non-finite loss {'loss': nan, 'aux': 2.0}, step skipped (3 consecutive)" in caplog.messages
    # a finite step after the resume: the skipped count continues from the checkpoint
    capsys.readouterr()
    out = _run(Scripted([NAN]), tmp_path, steps=3, ckpt_dir=ckd, max_bad_steps=5, progress=True)
    assert "3/3" in capsys.readouterr().err  # the bar starts at the resumed step 2
    assert out["skipped_steps"] == 3 and out["resumed_from"] == str(ckd / "ckpt-2")


def test_resume_from_a_checkpoint_without_loop_counters(tmp_path):
    ckd = tmp_path / "ck"
    task = Scripted()
    ck.save_training_state(ckd, model=task, optimizer=_opt(task), scheduler_state=None, scaler=None, step=1,
                           data_state={"position": 2}, extra=None, config={})  # fmt: skip
    out = _run(Scripted([NAN]), tmp_path, steps=2, ckpt_dir=ckd, max_bad_steps=2)  # 1 bad step < 2
    assert out["skipped_steps"] == 1 and out["step"] == 2


def test_schedule_state_and_plain_function_schedule(tmp_path):
    from blip2lib.optim import LRSchedule

    sched = LRSchedule(peak_lr=0.1, total_steps=1)
    _run(Scripted(), tmp_path, steps=1, ckpt_dir=tmp_path / "a", schedule=sched)
    st = ck.load_training_state(tmp_path / "a" / "ckpt-1", Scripted(), None, None, restore_rng=False)
    assert st["scheduler"] == sched.state_dict()
    _run(Scripted(), tmp_path, steps=1, ckpt_dir=tmp_path / "b")  # a lambda has no state_dict
    st = ck.load_training_state(tmp_path / "b" / "ckpt-1", Scripted(), None, None, restore_rng=False)
    assert st["scheduler"] is None


def test_fresh_run_appends_to_an_existing_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 7}\n')
    _run(Scripted(), tmp_path, steps=1)
    assert [r["step"] for r in _records(log)] == [7, 1]


def test_bad_batch_dump(tmp_path):
    # no checkpoint folder: the dump goes next to the log; with one, next to it (parents created)
    with pytest.raises(eng.NonFiniteLossError):
        _run(Scripted([NAN]), tmp_path, steps=1, max_bad_steps=1)
    assert (tmp_path / "bad_batch" / "batch.pt").exists()
    bad = tmp_path / "x" / "y" / "bad_batch"
    bad.mkdir(parents=True)  # an earlier dump is overwritten
    with pytest.raises(eng.NonFiniteLossError):
        _run(Scripted([NAN]), tmp_path, steps=1, max_bad_steps=1, ckpt_dir=tmp_path / "x" / "y" / "ck", log_path=None)
    text = (bad / "info.json").read_text()
    record = json.loads(text)
    assert text == json.dumps(record, indent=2) and record["step"] == 1 and record["skipped"] is True
    st = ck.load_training_state(ck.latest_checkpoint(bad), Scripted(), None, None, restore_rng=False)
    assert json.dumps(st["extra"]) == json.dumps(record)  # (NaN != NaN: compared as text)
    for n in (2, 3, 4):  # three more dumps into the same folder: every dump's checkpoint is kept
        with pytest.raises(eng.NonFiniteLossError):
            _run(Scripted([NAN] * n), tmp_path, steps=n, max_bad_steps=n, ckpt_dir=tmp_path / "x" / "y" / "ck",
                 log_path=None)  # fmt: skip
    assert sorted(p.name for p in bad.glob("ckpt-*")) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    with pytest.raises(eng.NonFiniteLossError):  # no folder given at all: z/ is created for the dump
        _run(Scripted([NAN]), tmp_path, steps=1, max_bad_steps=1, ckpt_dir=tmp_path / "z" / "w" / "ck", log_path=None)
    assert (tmp_path / "z" / "w" / "bad_batch" / "info.json").exists()


def test_fp16_scaler_is_resumed(tmp_path):
    # grad of w = 2 × 5e33 = 1e34 per element: scaled by 2^16 it overflows fp32, so fp16 skips step 1 and halves the
    # scale; at 2^15 it fits (3.3e38 < 3.4e38), so step 2 runs. A resume after step 1 must restore the halved scale.
    def run(steps, ckd):
        task = Scripted(grad_scale=5e33)
        sgd = torch.optim.SGD([task.w], lr=0.1)  # a plain SGD step shows whether step 2 ran: w -= 0.1 × 1e34
        _run(task, tmp_path, steps=steps, amp_dtype="fp16", ckpt_dir=ckd, ckpt_every=1, optimizer=sgd)
        return task.w.detach()

    whole = run(2, tmp_path / "whole")
    assert [r["loss_scale"] for r in _records(tmp_path / "log.jsonl")[-2:]] == [2.0**15, 2.0**15]
    assert torch.equal(whole, torch.full((2,), 1.0 - 0.1 * 1e34))
    run(1, tmp_path / "split")
    assert torch.equal(run(2, tmp_path / "split"), whole)


def test_clipped_fp16_step_logs_the_unscaled_norm(tmp_path):
    _run(Scripted(), tmp_path, steps=1, amp_dtype="fp16", clip_norm=100.0)
    rec = _records(tmp_path / "log.jsonl")[-1]
    assert rec["grad_norm"] == pytest.approx(8**0.5, rel=1e-6)  # grads (2, 2) of w, (no grad) of unused
    assert rec["loss_scale"] == 2.0**16


def test_helpers():
    assert eng.batch_size_of({"batch_size": 3, "n_bad": 2, "x": torch.zeros(9)}) == 5
    assert eng.batch_size_of({"batch_size": 3, "x": torch.zeros(9)}) == 3
    with pytest.raises(TypeError, match="^cannot infer the batch size of a str$"):
        eng.batch_size_of("abc")
    t = torch.ones(2, requires_grad=True) * 2
    out = eng._to_cpu((t, [t], {"a": t}))
    assert type(out) is tuple and type(out[1]) is list and torch.equal(out[1][0], t.detach())
    assert not out[0].requires_grad
    assert eng.amp_setup("fp16", "cpu")[1].is_enabled()
    with pytest.raises(TypeError, match=r"^run_loop needs an nn.Module \(pass model=...\) to checkpoint$"):
        eng.run_loop(lambda b: {}, loader, None, lambda s: 0.0, steps=1, log_path=None, ckpt_dir=None)
    with pytest.raises(RuntimeError, match=r"^loader_factory\(0\) yielded no batch$"):
        eng._BatchStream(lambda start: iter(()), 0).next()


def test_tensorboard_mirror(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    log = eng._JsonlLog(tmp_path / "log.jsonl", None, tb)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step), "skipped": False, "name": "x"})
    log.write({"step": 2, "eval": {"acc": 0.5, "ok": True}})
    log.close()
    log = eng._JsonlLog(tmp_path / "log.jsonl", 2, tb)  # resumed at step 2: step 3 is purged and re-written
    log.write({"step": 3, "loss": 30.0})
    log.close()
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "val/acc"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [(e.step, e.value) for e in acc.Scalars("val/acc")] == [(2, 0.5)]
    # run_loop passes its folder on
    _run(Scripted(), tmp_path, steps=1, tensorboard_dir=tmp_path / "tb2", log_path=None)
    assert list((tmp_path / "tb2").glob("events.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match=r"^tensorboard=True needs the `tensorboard` package: pip install"):
        eng._tensorboard_writer(tmp_path, None)
