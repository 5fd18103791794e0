"""Every torch.distributed call of blip2lib lives here.

Each helper is an exact no-op at world size 1 (no process group needed, no collective issued), which fixes
the LAVIS single-GPU crash (docs/paper_map.md §10.16: unguarded ``dist.get_rank()``). Launch recipe: see
``blip2lib.train``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator

import torch
import torch.distributed as tdist

from .options import DEFAULT_TIMEOUT_S

__all__ = [
    "is_dist",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main",
    "init_distributed",
    "DEFAULT_TIMEOUT_S",
    "CollectiveTimeoutError",
    "is_collective_timeout",
    "explain_timeouts",
    "cleanup",
    "barrier",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_sum",
    "all_reduce_mean",
    "all_gather_object",
    "broadcast_object",
]


def is_dist() -> bool:
    """True when a process group exists and has more than one member."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def get_world_size() -> int:
    """World size (1 without a process group)."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def get_local_rank() -> int:
    """Local rank from torchrun's ``LOCAL_RANK`` (0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on global rank 0 (and in every single-process run)."""
    return get_rank() == 0


class CollectiveTimeoutError(RuntimeError):
    """A collective waited longer than the process group's timeout: another rank is hung, stopped or gone."""


def init_distributed(backend: str | None = None, timeout_min: int = 30, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is available, else gloo.
        timeout_min: collective timeout in minutes (used when ``timeout_s`` is None).
        timeout_s: collective timeout in seconds (params ``dist_timeout_s``): how long a rank waits in a
            collective (gradient all-reduce, gather, barrier) for the others before it gives up. gloo then raises
            in the waiting rank; NCCL's watchdog aborts the process. Either way the rank exits non-zero and torchrun
            stops the rest of the job (see :func:`explain_timeouts` for the message).

    Returns:
        True when a process group with world size > 1 was (or already is) initialised; False for a plain
        single-process run (no ``WORLD_SIZE`` > 1 in the environment), in which case nothing is initialised.
    """
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    seconds = timeout_min * 60 if timeout_s is None else timeout_s
    if seconds <= 0:
        raise ValueError(f"dist_timeout_s must be > 0 seconds, got {seconds}")
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    _TIMEOUT_S[0] = seconds
    return True


_TIMEOUT_S = [float(DEFAULT_TIMEOUT_S)]  # the process group's timeout, for messages


_TIMEOUT_TEXT = re.compile(r"timed out waiting|timeout caused pair closure|watchdog caught collective", re.IGNORECASE)


def is_collective_timeout(err: BaseException) -> bool:
    """True for a collective timeout: gloo's ``Timed out waiting``, ``timeout caused pair closure``, NCCL's watchdog."""
    return isinstance(err, RuntimeError) and _TIMEOUT_TEXT.search(str(err)) is not None


@contextlib.contextmanager
def explain_timeouts(what: str = "training") -> Iterator[None]:
    """Turn a collective timeout raised inside the block into :class:`CollectiveTimeoutError` that says what it means.

    What a user sees when one rank hangs (stopped, deadlocked, stuck in I/O): the other ranks block in their next
    collective; after ``dist_timeout_s`` each of them fails with this message (rank, timeout, likely causes),
    exits non-zero, and torchrun ends the job (SIGTERM, then SIGKILL to a rank that cannot react). Nothing is
    saved at that point: the run resumes from its last checkpoint.
    """
    try:
        yield
    except RuntimeError as err:
        if not is_collective_timeout(err):
            raise
        raise CollectiveTimeoutError(
            f"rank {get_rank()} of {get_world_size()}: {what} stopped: a collective waited more than "
            f"dist_timeout_s={_TIMEOUT_S[0]:g} s for the other ranks; one of them is hung, stopped or dead (look at "
            "its log, memory, I/O). The job ends here; rerun to resume from the last checkpoint, or raise "
            f"dist_timeout_s if a step legitimately takes that long. ({str(err).strip()[:200]})"
        ) from err


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    """Synchronise all ranks (no-op at world size 1)."""
    if is_dist():
        tdist.barrier()


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without gradient (LAVIS ``concat_all_gather``).

    At world size 1 the input is returned detached (same values, no collective), so one process on the whole
    batch computes exactly what W processes compute together: gradients reach the local rows only (docs/paper_map.md §2
    ITC).
    """
    if not is_dist():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    tdist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces the full gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        tdist.all_gather(parts, x.contiguous())
        ctx.batch = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        start = get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping gradients for every slice.

    Gradients of remote slices are summed back to their owner (LAVIS ``all_gather_with_grad``, docs/paper_map.md §2 ITM:
    negative images mined on other GPUs send gradient back to each rank's ``ln_vision``).
    """
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if not is_dist():
        return x
    y = x.detach().clone()
    tdist.all_reduce(y, op=op)
    return y


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks (returns a new tensor; identity at world size 1)."""
    return _all_reduce(x, tdist.ReduceOp.SUM)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``x`` over ranks (returns a new tensor; identity at world size 1)."""
    return _all_reduce(x, tdist.ReduceOp.MAX)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average ``x`` over ranks (returns a new tensor; identity at world size 1)."""
    if not is_dist():
        return x
    return all_reduce_sum(x) / get_world_size()


def all_gather_object(obj: object) -> list:
    """Gather a picklable Python object from every rank (``[obj]`` at world size 1)."""
    if not is_dist():
        return [obj]
    out: list = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Broadcast a picklable Python object from ``src`` (identity at world size 1)."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
