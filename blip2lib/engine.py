"""Model-agnostic training loop: AMP, gradient accumulation, non-finite guard, JSONL log, exact resume.

See docs/paper_map.md §7.

Data-position protocol (exact resume): ``loader_factory(start_position) -> iterable of batches`` must yield the
batches that follow the first ``start_position`` samples THIS rank has consumed since step 0, and its order and
augmentations must be a function of its own seed and the position only (never of the global RNG; e.g. a sampler
permutation from ``torch.Generator().manual_seed(seed + epoch)``). The iterable may be finite (one epoch): the loop
calls the factory again at the current position when it is exhausted. The position is counted in samples
(:func:`batch_size_of`), so it stays meaningful if the per-rank batch size changes; global position = position ×
world size. A ``Collate`` batch with ``batch_size`` 0 (every sample unreadable) counts toward the position and is
then passed over, so skipping is part of the position. The task moves batches to its device.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import dist
from .batch_stream import BatchStream as _BatchStream
from .batch_stream import batch_size_of
from .checkpoint import get_rng_state, latest_checkpoint, load_training_state, save_training_state, set_rng_state
from .optim import apply_lr

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "amp_setup", "batch_size_of", "run_loop"]

_AMP = {None: None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def amp_setup(amp_dtype: str | None, device_type: str) -> tuple[Callable[[], object], torch.amp.GradScaler]:
    """Training autocast factory and loss scaler for ``amp_dtype`` (params ``amp``).

    ``"fp16"`` is LAVIS's ``amp: True``: fp16 autocast around each micro-batch and a ``GradScaler`` with torch's
    defaults (initial scale 2^16, growth 2 every 2000 finite steps, backoff 0.5 — LAVIS's ``torch.cuda.amp
    .GradScaler()``), which skips overflowing steps. ``"bf16"``: bf16 autocast, no scaler (bf16 has fp32's range).
    None / ``"fp32"``: no autocast, a disabled scaler (its ``scale``/``step`` pass through).

    Args:
        amp_dtype: None, ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        device_type: ``"cuda"`` or ``"cpu"`` (the trained model's device).

    Returns:
        ``(autocast, scaler)``: ``autocast()`` gives a fresh context manager per micro-batch.
    """
    if amp_dtype not in _AMP:
        raise ValueError(f"amp_dtype must be one of {list(_AMP)}, got {amp_dtype!r}")
    dtype = _AMP[amp_dtype]
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    return autocast, torch.amp.GradScaler(device_type, enabled=amp_dtype == "fp16")


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive optimizer steps with a non-finite loss."""


def _to_cpu(x: object) -> object:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _tensorboard_writer(folder: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's wrapper imports the tensorboard package itself
        raise ImportError(
            "tensorboard=True needs the `tensorboard` package: pip install tensorboard (or -e '.[all]')"
        ) from err
    # purge_step: after a resume, TensorBoard hides the events the killed run wrote past the checkpoint
    return SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1, flush_secs=10)


def _trim_jsonl(path: Path, last_step: int | None) -> None:
    """Keep the records of an append-only JSONL log up to ``last_step`` (None: all); drop a torn last line.

    A run killed (or out of disk space) in the middle of an append leaves a last line without its newline that may
    not parse: it is dropped with a warning. A line that does not parse anywhere else is damage this function does
    not guess about: :class:`ValueError` naming the file and line. Records without a ``step`` are kept. The trimmed
    log replaces the old one atomically (a crash here leaves one of the two, never half of one).
    """
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    keep = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines) or all(not rest.strip() for rest in lines[lineno:]):
                log.warning("%s:%d: dropping a torn last line (%d bytes; the run stopped mid-write)", path, lineno,
                            len(line))  # fmt: skip
                continue
            raise ValueError(f"{path}:{lineno}: not a JSON record ({err.msg}); the log is damaged before its end — "
                             "fix or remove that line to resume") from None  # fmt: skip
        step = record.get("step") if isinstance(record, dict) else None
        if last_step is None or not isinstance(step, int) or step <= last_step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.trim-{os.getpid()}")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _append_line(path: Path, line: str) -> None:
    """Append one line; a full disk becomes an error that says so and names the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device while appending to {path} (a resume drops the "
                                        "torn last line)", str(path)) from err  # fmt: skip
        raise


class _JsonlLog:
    """Append-only JSONL log on the main rank; on resume, drops records past the resumed step.

    ``also_trim``: other append-only step logs of the run (``val.jsonl``), trimmed to the same step on resume. A
    fresh run appends to an existing log, minus a torn last line (the next record would otherwise be glued to it).
    Optionally mirrored to TensorBoard: a step record's numeric fields as ``train/<key>``, validation metrics as
    ``val/<key>``.
    """

    def __init__(self, path: str | Path | None, resume_step: int | None, tensorboard_dir: str | Path | None = None,
                 also_trim: tuple = ()):  # fmt: skip
        self.path = Path(path) if path and dist.is_main() else None
        self.tb = (
            _tensorboard_writer(Path(tensorboard_dir), resume_step) if tensorboard_dir and dist.is_main() else None
        )
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for p in (self.path, *map(Path, also_trim)):
            if p.exists():
                _trim_jsonl(p, resume_step)

    def write(self, record: dict) -> None:
        if self.path is not None:
            _append_line(self.path, json.dumps(record))
        if self.tb is not None:
            prefix, values = ("val", record["eval"]) if "eval" in record else ("train", record)
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _save_checkpoint(ckpt_dir: Path, **kw) -> Path:
    """:func:`save_training_state`, with a full disk reported as such (path, free bytes) instead of a stream error.

    torch's writer reports a failed write as ``RuntimeError: ... file write failed`` (or ``basic_ios::clear``)
    without an errno, so the free space of the folder's file system decides whether a failure was a full disk. The
    half-written checkpoint is already removed by ``save_training_state``; the previous ones stay resumable.
    """
    try:
        return save_training_state(ckpt_dir, **kw)
    except (OSError, RuntimeError) as err:
        try:
            free = shutil.disk_usage(ckpt_dir).free
        except OSError:
            free = -1
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or 0 <= free < 2**20
        if not full:
            raise
        raise OSError(errno.ENOSPC, f"no space left on device while writing checkpoint step {kw.get('step')} in "
                                    f"{ckpt_dir} ({free} bytes free; the earlier checkpoints are intact): {err}",
                      str(ckpt_dir)) from err  # fmt: skip


def _optimizer_step(optimizer, scaler, clip_norm: float | None) -> float | None:
    """Unscale, clip (optional), step through the scaler (which skips fp16 overflow steps), update the scale."""
    norm = None
    if clip_norm:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
    scaler.step(optimizer)
    scaler.update()
    return norm


def _dump_bad_batch(bad_dir: Path, batches: list, record: dict, model: nn.Module, config: dict) -> None:
    """Save each rank's offending micro-batches; the main rank adds the loss record and the trainable state."""
    bad_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    torch.save([_to_cpu(b) for b in batches], bad_dir / ("batch.pt" if rank == 0 else f"batch_rank{rank}.pt"))
    if dist.is_main():
        (bad_dir / "info.json").write_text(json.dumps(record, indent=2))
        save_training_state(bad_dir, model=model, optimizer=None, scheduler_state=None, scaler=None,
                            step=record["step"], data_state=None, extra=record, config=config, keep_last=0)  # fmt: skip


@dataclass
class _LoopState:
    """The loop's counters; a checkpoint carries them (``extra``) across a resume."""

    step: int = 0  # optimizer steps done
    position: int = 0  # samples this rank consumed (the data-position protocol) at the resume
    skipped: int = 0  # non-finite steps skipped in all
    bad: int = 0  # consecutive non-finite steps
    best: dict | None = None  # {"step", "metric", "key"} of the best validation
    resumed: str | None = None  # the checkpoint resumed from
    rng: object = None  # this rank's RNG state at the resume


def _resume(ckpt_dir: Path, model: nn.Module, optimizer, scaler) -> _LoopState:
    """Load the newest checkpoint of ``ckpt_dir`` into model / optimizer / scaler; its counters (fresh when none)."""
    ck = latest_checkpoint(ckpt_dir)
    if ck is None:
        return _LoopState()
    st = load_training_state(ck, model, optimizer, scaler, restore_rng=False)
    position, ex = st["data_state"]["position"], st["extra"] or {}
    ranks = ex.get("rng_ranks", [])
    # each rank gets back its own RNG stream; with another world size, rank 0's state is all we have
    rng = ranks[dist.get_rank()] if len(ranks) == dist.get_world_size() else st["rng"]
    # likewise its own data position: a rank that passed over an empty batch is ahead of the others
    positions = ex.get("positions", [])
    position = positions[dist.get_rank()] if len(positions) == dist.get_world_size() else position
    log.info("resumed from %s at step %d (sample position %d)", ck, st["step"], position)
    return _LoopState(step=st["step"], position=position, skipped=ex.get("skipped", 0), bad=ex.get("bad", 0),
                      best=ex.get("best"), resumed=str(ck), rng=rng)  # fmt: skip


def _accumulate(task, stream: _BatchStream, amp, scaler, grad_accum: int) -> tuple[dict, int, float, list]:
    """Forward and backward ``grad_accum`` micro-batches (DDP ``no_sync`` on all but the last).

    Returns:
        ``(terms, samples, data-wait seconds, batches)``: each loss term averaged over the micro-batches (0-d fp32
        tensors), the samples consumed, the time spent waiting for batches, the batches (for a bad-batch dump).
    """
    wait, n, terms, batches = 0.0, 0, {}, []
    for i in range(grad_accum):
        tw = time.perf_counter()
        batch = stream.next()
        wait += time.perf_counter() - tw
        batches.append(batch)
        n += batch_size_of(batch)
        sync = task.no_sync() if i < grad_accum - 1 and hasattr(task, "no_sync") else contextlib.nullcontext()
        with sync:
            with amp():
                out = task(batch)
            scaler.scale(out["loss"] / grad_accum).backward()
        for k, v in out.items():
            terms[k] = terms.get(k, 0.0) + torch.as_tensor(v).detach().float() / grad_accum
    return terms, n, wait, batches


def _guard_non_finite(st: _LoopState, max_bad_steps: int, last: dict, rec: dict, batches: list, model: nn.Module,
                      config: dict, jlog: _JsonlLog, ckpt_dir: Path | None, log_path) -> None:  # fmt: skip
    """Warn about a skipped step; after ``max_bad_steps`` in a row, dump the batches and state and raise."""
    log.warning("step %d: non-finite loss %s, step skipped (%d consecutive)", st.step, last, st.bad)
    if st.bad >= max_bad_steps:
        bad_dir = (ckpt_dir.parent if ckpt_dir is not None else Path(log_path).parent) / "bad_batch"
        _dump_bad_batch(bad_dir, batches, rec, model, config)
        jlog.close()
        raise NonFiniteLossError(
            f"{st.bad} consecutive non-finite losses (last at step {st.step}: {last}); batch and state in {bad_dir}"
        )


def _validate(eval_fn, task, jlog: _JsonlLog, st: _LoopState, best_key: str | None, higher_is_better: bool):
    """``eval_fn(step)``, logged; updates ``st.best``. Returns ``(improved, metric)`` (metric None: not reported)."""
    metrics = eval_fn(st.step)
    if isinstance(task, nn.Module):
        task.train()
    jlog.write({"step": st.step, "eval": metrics})
    improved, metric = False, None
    if best_key is not None and best_key in metrics:  # a probe may skip (e.g. no Java for CIDEr)
        metric = float(metrics[best_key])
        best = st.best
        better = best is None or (metric > best["metric"] if higher_is_better else metric < best["metric"])
        if better:
            st.best, improved = {"step": st.step, "metric": metric, "key": best_key}, True
    return improved, metric


def _checkpoint(ckpt_dir: Path, st: _LoopState, position: int, model, optimizer, schedule, scaler, config: dict, *,
                keep_last: int, metric: float | None, higher_is_better: bool) -> str | None:  # fmt: skip
    """Save a resumable checkpoint (every rank's RNG state and data position; the main rank writes).

    Returns:
        The checkpoint folder on the main rank, None on the others.
    """
    rng_ranks = dist.all_gather_object(get_rng_state())
    extra = {"skipped": st.skipped, "bad": st.bad, "best": st.best, "rng_ranks": rng_ranks,
             "positions": dist.all_gather_object(position)}  # fmt: skip
    path = None
    if dist.is_main():
        data_state = {"position": position, "world_size": dist.get_world_size()}
        sched = schedule.state_dict() if hasattr(schedule, "state_dict") else None
        kw = dict(keep_last=keep_last, best_metric=metric, higher_is_better=higher_is_better)
        path = str(_save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, scheduler_state=sched, scaler=scaler,
                                    step=st.step, data_state=data_state, extra=extra, config=config, **kw))  # fmt: skip
    dist.barrier()
    return path


def run_loop(
    task: Callable[[object], dict],
    loader_factory: Callable[[int], Iterable],
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    *,
    steps: int,
    grad_accum: int = 1,
    amp_dtype: str | None = None,
    clip_norm: float | None = None,
    log_path: str | Path | None,
    ckpt_dir: str | Path | None,
    ckpt_every: int = 0,
    resume: bool = True,
    max_bad_steps: int = 10,
    eval_fn: Callable[[int], dict] | None = None,
    eval_every: int = 0,
    best_key: str | None = None,
    higher_is_better: bool = True,
    progress: bool = True,
    model: nn.Module | None = None,
    config: dict | None = None,
    keep_last: int = 3,
    apply_layer_decay: bool = True,
    tensorboard_dir: str | Path | None = None,
    eval_at_start: bool = False,
    side_logs: tuple = (),
) -> dict:
    """Train ``task`` for ``steps`` optimizer steps (resuming from the newest checkpoint in ``ckpt_dir``).

    Each optimizer step: ``lr = schedule(step)`` (0-based) via :func:`~blip2lib.optim.apply_lr`; ``grad_accum``
    micro-batches with ``loss / grad_accum`` backpropagated (DDP ``no_sync`` on all but the last, docs/paper_map.md §7);
    if the averaged loss is non-finite the step is skipped (still counted: the LR schedule and data move on) and after
    ``max_bad_steps`` consecutive skips the batches + state go to ``<ckpt_dir>/../bad_batch/`` and
    :class:`NonFiniteLossError` is raised. fp16 uses ``torch.amp.GradScaler``; bf16 runs without one. One JSONL record
    per step (loss terms averaged over micro-batches, lr, samples/s, data-wait fraction, peak CUDA memory).

    Args:
        task: ``task(batch) -> {"loss": scalar tensor, **other terms}``; an ``nn.Module`` is put in train mode.
        loader_factory: See the module docstring (data-position protocol).
        optimizer: Optimizer (groups may carry ``lr_scale``).
        schedule: ``step -> base lr`` (e.g. :class:`~blip2lib.optim.LRSchedule`).
        steps: Total optimizer steps of the run (the loop stops there, also when resumed).
        grad_accum: Micro-batches per optimizer step.
        amp_dtype: None/"fp32", "fp16" (with a GradScaler) or "bf16" autocast around the task call (:func:`amp_setup`).
        clip_norm: Max global grad norm (None: no clipping, as LAVIS).
        log_path: JSONL log file (None: no log).
        ckpt_dir: Checkpoint directory (None: never save or resume).
        ckpt_every: Save every this many steps (0: only at the end); also saved on a new best eval.
        resume: Resume from :func:`~blip2lib.checkpoint.latest_checkpoint` when one exists.
        max_bad_steps: Consecutive non-finite steps tolerated.
        eval_fn: ``eval_fn(step) -> metrics`` called every ``eval_every`` steps and at the end.
        eval_every: Eval period in steps (0: only at the end when ``eval_fn`` is given).
        best_key: Metric used for best tracking (``best.json``); None: no best tracking.
        higher_is_better: Direction of ``best_key``.
        progress: tqdm bar with ETA (main rank only).
        model: Module whose trainable weights are checkpointed (default: ``task``).
        config: Resolved run config recorded in checkpoint manifests.
        keep_last: Checkpoints kept (plus the best one).
        apply_layer_decay: Multiply by each group's ``lr_scale`` (paper) or not (LAVIS never reads it).
        tensorboard_dir: Also write the step records' scalars there (main rank; None: no TensorBoard).
        eval_at_start: A fresh run also calls ``eval_fn(0)`` before its first step (logged as step 0), so every
            validation curve starts from the untrained model; not used for best tracking.
        side_logs: Other append-only JSONL files with a ``step`` per record that ``eval_fn`` writes (``val.jsonl``):
            trimmed with ``log_path`` to the resumed step, so a resumed run never repeats a step in them.

    Returns:
        ``{"step", "skipped_steps", "last", "best", "checkpoint", "resumed_from", "position"}``.
    """
    model = model if model is not None else task
    if not isinstance(model, nn.Module):
        raise TypeError("run_loop needs an nn.Module (pass model=...) to checkpoint")
    device = next(model.parameters()).device
    amp, scaler = amp_setup(amp_dtype, device.type)
    config = dict(config or {})
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    st = _resume(ckpt_dir, model, optimizer, scaler) if resume and ckpt_dir is not None else _LoopState()
    jlog = _JsonlLog(log_path, st.step if st.resumed else None, tensorboard_dir, also_trim=side_logs)
    stream = _BatchStream(loader_factory, st.position)
    if st.rng is not None:  # after the factory call, so its RNG use cannot shift the restored state
        set_rng_state(st.rng)
    if isinstance(task, nn.Module):
        task.train()
    optimizer.zero_grad(set_to_none=True)
    if eval_fn is not None and eval_at_start and st.step == 0 and steps > 0:
        jlog.write({"step": 0, "eval": eval_fn(0)})
        if isinstance(task, nn.Module):
            task.train()
    bar = tqdm(total=steps, initial=st.step, disable=not (progress and dist.is_main()), dynamic_ncols=True)
    last, ckpt_path = {}, st.resumed
    while st.step < steps:
        # one optimizer step: LR, grad_accum micro-batches, one finite-loss verdict for all ranks, the update
        lr = schedule(st.step)
        apply_lr(optimizer, lr, apply_layer_decay)
        t0 = time.perf_counter()
        terms, n, wait, batches = _accumulate(task, stream, amp, scaler, grad_accum)
        # one verdict for all ranks: DDP has already averaged the (possibly NaN) gradients everywhere
        finite = dist.all_reduce_sum((~torch.isfinite(terms["loss"])).float()).item() == 0
        grad_norm = _optimizer_step(optimizer, scaler, clip_norm) if finite else None
        optimizer.zero_grad(set_to_none=True)
        st.step, st.bad, st.skipped = st.step + 1, 0 if finite else st.bad + 1, st.skipped + (not finite)
        dt = time.perf_counter() - t0
        # the step's record, the progress bar, the non-finite guard
        last = {k: float(v) for k, v in terms.items()}
        rec = {"step": st.step, **last, "lr": lr, "samples_per_s": n / dt, "data_wait_frac": wait / dt,
               "skipped": not finite, "position": stream.position}  # fmt: skip
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        if scaler.is_enabled():
            rec["loss_scale"] = scaler.get_scale()
        if device.type == "cuda":
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        jlog.write(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4g}", lr=f"{lr:.3g}")
        if not finite:
            _guard_non_finite(st, max_bad_steps, last, rec, batches, model, config, jlog, ckpt_dir, log_path)
        # validation, then a checkpoint (periodic, final, or on a new best)
        improved, metric = False, None
        if eval_fn is not None and ((eval_every and st.step % eval_every == 0) or st.step == steps):
            improved, metric = _validate(eval_fn, task, jlog, st, best_key, higher_is_better)
        if ckpt_dir is not None and ((ckpt_every and st.step % ckpt_every == 0) or st.step == steps or improved):
            saved = _checkpoint(ckpt_dir, st, stream.position, model, optimizer, schedule, scaler, config,
                                keep_last=keep_last, metric=metric, higher_is_better=higher_is_better)  # fmt: skip
            ckpt_path = saved or ckpt_path  # None on the other ranks: only the main rank writes
    bar.close()
    jlog.close()
    return {"step": st.step, "skipped_steps": st.skipped, "last": last, "best": st.best, "checkpoint": ckpt_path,
            "resumed_from": st.resumed, "position": stream.position}  # fmt: skip
