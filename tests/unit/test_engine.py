"""Training loop: bit-exact resume (incl. a crash while checkpointing), non-finite guard, accumulation, logging."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import blip2lib.checkpoint as ck
import blip2lib.engine as eng
from blip2lib.optim import LRSchedule, build_optimizer, param_groups

M, B, SEED = 36, 8, 7  # 36 samples per epoch, batches of 8 → a partial batch of 4 closes each epoch
X = torch.randn(M, 6, generator=torch.Generator().manual_seed(123))
Y = torch.randn(M, 1, generator=torch.Generator().manual_seed(321))


def loader_factory(start, batch=B):
    """Data-position protocol: shuffled per epoch from (SEED, epoch) only; finite (ends at the epoch boundary)."""
    epoch, offset = divmod(start, M)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(SEED + epoch))
    for i in range(offset, M, batch):
        idx = perm[i : i + batch]
        yield {"x": X[idx], "y": Y[idx], "idx": idx}


class Task(nn.Module):
    """Small MLP with a frozen 'tower', dropout (torch RNG) and numpy/python-random input noise."""

    def __init__(self, p_drop=0.3, noise=True):
        super().__init__()
        self.vision_model = nn.Linear(6, 6)
        self.vision_model.requires_grad_(False)
        self.fc1, self.drop, self.fc2 = nn.Linear(6, 16), nn.Dropout(p_drop), nn.Linear(16, 1)
        self.noise = noise

    def forward(self, batch):
        dev = self.fc1.weight.device
        x = self.vision_model(batch["x"].to(dev))
        if self.noise:
            x = x + 0.01 * torch.from_numpy(np.random.randn(*x.shape)).float().to(dev) * random.random()
        pred = self.fc2(self.drop(torch.relu(self.fc1(x))))
        mse = ((pred.float() - batch["y"].to(dev)) ** 2).mean()
        return {"loss": mse + 0.0, "mse": mse}


class Kill(Exception):
    pass


class Faulty(nn.Module):
    """Wraps a task: raises Kill / returns NaN loss on chosen (1-based) calls."""

    def __init__(self, task, kill_at=None, nan_at=()):
        super().__init__()
        self.task, self.kill_at, self.nan_at, self.calls = task, kill_at, set(nan_at), 0

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Kill
        out = self.task(batch)
        if self.calls in self.nan_at:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out


def _setup(seed=0, device="cpu", **task_kw):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    task = Task(**task_kw).to(device)
    opt = build_optimizer(param_groups(task, 0.05), lr=1e-3)
    sched = LRSchedule(peak_lr=1e-2, total_steps=12, warmup_steps=3, warmup_lr=1e-4, min_lr=1e-3)
    return task, opt, sched


def _run(tmp, wrapper=None, steps=12, device="cpu", **kw):
    task, opt, sched = _setup(device=device)
    run_task = wrapper(task) if wrapper else task
    kw = {"ckpt_every": 4, "grad_accum": 2, "progress": False, **kw}
    out = eng.run_loop(run_task, loader_factory, opt, sched, steps=steps, log_path=tmp / "log.jsonl",
                       ckpt_dir=tmp / "ckpt", model=task, **kw)  # fmt: skip
    return task, out


def _losses(log_path):
    recs = [json.loads(ln) for ln in log_path.read_text().splitlines()]
    return [(r["step"], r["loss"], r["mse"], r["lr"], r["position"]) for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    task, out = _run(tmp)
    return task, out, _losses(tmp / "log.jsonl")


def _assert_same(task, ref_task):
    for (n, p), q in zip(task.state_dict().items(), ref_task.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_reference_run_shape(reference):
    task, out, losses = reference
    assert out["step"] == 12 and out["skipped_steps"] == 0 and out["resumed_from"] is None
    assert [s for s, *_ in losses] == list(range(1, 13))
    # 12 steps × 2 = 24 micro-batches; an epoch of 36 is served as 8,8,8,8,4 (5 batches): 4 epochs + 4 × 8 = 176
    assert out["position"] == 4 * 36 + 4 * 8 == losses[-1][4]
    assert [pos for *_, pos in losses[:3]] == [16, 32, 36 + 8]  # step 3 = the partial batch (4) + next epoch's 8


@pytest.mark.parametrize("accum", [1, 2])
def test_exact_resume_after_kill(tmp_path, reference, accum):
    if accum == 1:  # own uninterrupted baseline for accum 1
        ref_task, _ = _run(tmp_path / "ref1", grad_accum=1)
        ref_losses = _losses(tmp_path / "ref1" / "log.jsonl")
    else:
        ref_task, _, ref_losses = reference
    run = tmp_path / "run"
    with pytest.raises(Kill):  # dies inside step 7 (last checkpoint: step 4)
        _run(run, wrapper=lambda t: Faulty(t, kill_at=6 * accum + 1), grad_accum=accum)
    assert ck.latest_checkpoint(run / "ckpt") == run / "ckpt" / "ckpt-4"
    task, out = _run(run, grad_accum=accum)  # fresh process state: new model, reseeded RNGs
    assert out["resumed_from"].endswith("ckpt-4") and out["step"] == 12
    assert _losses(run / "log.jsonl") == ref_losses  # log truncated at 4, steps 5..12 bit-identical
    _assert_same(task, ref_task)


def test_exact_resume_after_crash_during_checkpoint_write(tmp_path, reference, monkeypatch):
    ref_task, _, ref_losses = reference
    run = tmp_path / "run"
    real, calls = ck._write_train_state, []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise Kill  # dies after model.safetensors of ckpt-8 is written
        return real(*a, **k)

    monkeypatch.setattr(ck, "_write_train_state", crash_on_second)
    with pytest.raises(Kill):
        _run(run)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["ckpt-4"]
    task, out = _run(run)
    assert out["resumed_from"].endswith("ckpt-4")
    assert _losses(run / "log.jsonl") == ref_losses
    _assert_same(task, ref_task)


def test_resume_without_rng_restore_differs(tmp_path, reference, monkeypatch):
    """Control: the exact-resume tests would fail if RNG states were not restored (dropout + noise matter)."""
    ref_task, _, ref_losses = reference
    run = tmp_path / "run"
    _run(run, steps=4)
    monkeypatch.setattr(eng, "set_rng_state", lambda state: None)
    _run(run)
    assert _losses(run / "log.jsonl")[4:] != ref_losses[4:]


def test_resume_at_end_is_a_no_op(tmp_path):
    _run(tmp_path, steps=4)
    task, out = _run(tmp_path, steps=4)
    assert out["step"] == 4 and out["resumed_from"].endswith("ckpt-4") and len(_losses(tmp_path / "log.jsonl")) == 4


def test_nan_step_skipped_and_counted(tmp_path):
    # NaN on step 3 (accum 1): that step must not touch the weights → equal to a clean 2-step run's weights.
    task, out = _run(tmp_path / "a", wrapper=lambda t: Faulty(t, nan_at={3}), steps=3, grad_accum=1)
    clean, _ = _run(tmp_path / "b", steps=2, grad_accum=1)
    _assert_same(task, clean)
    assert out["skipped_steps"] == 1
    recs = [json.loads(ln) for ln in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, False, True]
    # non-consecutive NaNs never reach the limit of 2
    _, out = _run(tmp_path / "c", wrapper=lambda t: Faulty(t, nan_at={2, 4, 6}), steps=7, grad_accum=1,
                  max_bad_steps=2)  # fmt: skip
    assert out["skipped_steps"] == 3


def test_consecutive_nans_raise_and_dump_batch(tmp_path):
    with pytest.raises(eng.NonFiniteLossError, match="3 consecutive"):
        _run(tmp_path, wrapper=lambda t: Faulty(t, nan_at={3, 4, 5}), steps=10, grad_accum=1, max_bad_steps=3)
    bad = tmp_path / "bad_batch"
    batches = torch.load(bad / "batch.pt", weights_only=True)
    expected = list(loader_factory(0))[4]  # 5th batch of epoch 0 = step 5's batch
    assert len(batches) == 1 and torch.equal(batches[0]["idx"], expected["idx"])
    assert json.loads((bad / "info.json").read_text())["step"] == 5
    assert ck.latest_checkpoint(bad) == bad / "ckpt-5"


def test_grad_accumulation_matches_large_batch(tmp_path):
    """2 micro-batches of b == 1 batch of 2b for SGD (loss divided by accum; no dropout/noise)."""
    results = []
    for accum, batch in ((2, 4), (1, 8)):
        torch.manual_seed(0)
        task = Task(p_drop=0.0, noise=False)
        opt = torch.optim.SGD(task.parameters(), lr=0.5)
        eng.run_loop(task, lambda s, b=batch: loader_factory(s, b), opt, lambda s: 0.5, steps=3, grad_accum=accum,
                     log_path=None, ckpt_dir=None, progress=False)  # fmt: skip
        results.append([p.detach().clone() for p in task.parameters()])
    torch.manual_seed(0)
    untouched = [p.detach().clone() for p in Task(p_drop=0.0, noise=False).parameters()]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert any((a - u).abs().max() > 1e-3 for a, u in zip(results[0], untouched, strict=True))


def test_eval_hook_best_tracking_and_log_fields(tmp_path):
    scores = {2: 0.5, 4: 0.9, 6: 0.7}
    _, out = _run(tmp_path, steps=6, grad_accum=1, ckpt_every=0, eval_every=2, eval_fn=lambda s: {"acc": scores[s]},
                  best_key="acc", keep_last=1)  # fmt: skip
    assert out["best"] == {"step": 4, "metric": 0.9, "key": "acc"}
    assert ck.best_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "ckpt-4"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["ckpt-4", "ckpt-6"]
    recs = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["eval"]["acc"] for r in recs if "eval" in r] == [0.5, 0.9, 0.7]
    step = recs[0]
    assert {"step", "loss", "mse", "lr", "samples_per_s", "data_wait_frac", "position"} <= step.keys()
    assert 0.0 <= step["data_wait_frac"] <= 1.0 and step["lr"] == pytest.approx(1e-4)


def test_eval_at_start_logs_step_zero_once_and_is_never_best(tmp_path):
    scores = {0: 5.0, 2: 0.5, 4: 0.9, 6: 0.7}  # the untrained start scores highest on purpose
    calls = []

    def eval_fn(s):
        calls.append(s)
        return {"acc": scores[s]}

    kw = dict(steps=6, grad_accum=1, ckpt_every=2, eval_every=2, eval_fn=eval_fn, best_key="acc", eval_at_start=True)
    with pytest.raises(Kill):  # dies in step 5, after the step-4 checkpoint
        _run(tmp_path, wrapper=lambda t: Faulty(t, kill_at=5), **kw)
    assert calls == [0, 2, 4]
    _, out = _run(tmp_path, **kw)  # the resumed run does not evaluate its "start" again
    assert calls == [0, 2, 4, 6] and out["resumed_from"].endswith("ckpt-4")
    assert out["best"] == {"step": 4, "metric": 0.9, "key": "acc"}
    recs = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval"]["acc"]) for r in recs if "eval" in r] == [(0, 5.0), (2, 0.5), (4, 0.9), (6, 0.7)]


def test_bf16_autocast_runs(tmp_path):
    _, out = _run(tmp_path, steps=2, grad_accum=1, amp_dtype="bf16", clip_norm=1.0)
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert out["step"] == 2 and "grad_norm" in rec and "loss_scale" not in rec


def test_fp16_grad_scaler_path(tmp_path):
    _, out = _run(tmp_path, steps=2, grad_accum=1, amp_dtype="fp16")
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert out["step"] == 2 and rec["loss_scale"] == 2.0**16
    state = torch.load(tmp_path / "ckpt" / "ckpt-2" / ck.STATE_FILE, weights_only=True)
    assert state["scaler"]["scale"] == 2.0**16


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_exact_resume_cuda(tmp_path, amp):
    """CUDA RNG (dropout) restore + fused AdamW state + GradScaler state: resumed run bit-identical on GPU."""
    ref_task, _ = _run(tmp_path / "ref", device="cuda", amp_dtype=amp)
    ref_losses = _losses(tmp_path / "ref" / "log.jsonl")
    run = tmp_path / "run"
    with pytest.raises(Kill):
        _run(run, wrapper=lambda t: Faulty(t, kill_at=13), device="cuda", amp_dtype=amp)
    task, out = _run(run, device="cuda", amp_dtype=amp)
    assert out["resumed_from"].endswith("ckpt-4")
    assert _losses(run / "log.jsonl") == ref_losses
    _assert_same(task, ref_task)
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert rec["max_mem_gib"] > 0


def test_batch_size_of():
    assert eng.batch_size_of({"a": torch.zeros(3, 2)}) == 3
    assert eng.batch_size_of((torch.zeros(5), 1)) == 5
    assert eng.batch_size_of({"text": ["a", "b"]}) == 2
    with pytest.raises(TypeError):
        eng.batch_size_of(3)


@pytest.mark.parametrize(
    ("amp", "dtype", "scaled"), [("fp16", torch.float16, True), ("bf16", torch.bfloat16, False), ("fp32", None, False),
                                 (None, None, False)],
)  # fmt: skip
def test_amp_setup_selects_autocast_and_scaler(amp, dtype, scaled):
    autocast, scaler = eng.amp_setup(amp, "cpu")
    with autocast():
        assert torch.is_autocast_enabled("cpu") is (dtype is not None)
        if dtype is not None:
            assert torch.get_autocast_dtype("cpu") == dtype
    assert scaler.is_enabled() is scaled
    if scaled:  # LAVIS's torch.cuda.amp.GradScaler() defaults
        assert scaler.get_scale() == 2.0**16
        assert (scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()) == (
            2.0,
            0.5,
            2000,
        )
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        eng.amp_setup("fp8", "cpu")
