"""Our training checkpoints: trainable weights + optimizer/scaler/RNG/data position, atomic, verified.

See docs/paper_map.md §7, §8.

Layout of ``<ckpt_dir>/ckpt-<step>/``: ``model.safetensors`` (only ``requires_grad`` tensors, as LAVIS
``_save_checkpoint`` drops frozen ones; frozen towers are re-built from the config named in the manifest),
``train_state.pt`` (``torch.load(weights_only=True)``-safe), ``manifest.json`` (config, versions, git commit, sha256
of each file; written last). A checkpoint is built in a hidden ``.tmp-*`` sibling and renamed into place, so a
crash never leaves a directory that :func:`latest_checkpoint` would pick. ``best.json`` points at the best one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata as md
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .pretrained import LoadError

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "read_safetensors", "shape_mismatches", "trainable_state_dict", "save_training_state",
           "latest_checkpoint", "best_checkpoint", "load_training_state", "get_rng_state", "set_rng_state"]  # fmt: skip

MODEL_FILE, STATE_FILE, MANIFEST_FILE, BEST_FILE = "model.safetensors", "train_state.pt", "manifest.json", "best.json"
_CKPT = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(LoadError):
    """A checkpoint is missing, incomplete, tampered with or does not fit the model (a ``LoadError``)."""


def read_safetensors(path: Path, error: type[Exception] = LoadError) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` on the CPU; a truncated or corrupt file raises ``error`` naming ``path``.

    (safetensors' own message, e.g. "incomplete metadata", names no file.)
    """
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: which file matters more than the exception type
        raise error(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from e


def shape_mismatches(own: dict, tensors: dict) -> dict[str, str]:
    """Keys in both whose shapes differ -> ``"file (a, b) vs model (c, d)"`` (sorted by key)."""
    return {k: f"file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(tensors) if k in own and tuple(own[k].shape) != tuple(tensors[k].shape)}  # fmt: skip


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_state_dict(model: nn.Module, buffers: tuple[str, ...] | list[str] = ()) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the trainable parameters (tied ones once) plus the listed buffers (DDP unwrapped)."""
    model = _unwrap(model)
    sd = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    named_buffers = dict(model.named_buffers())
    for n in buffers:
        if n not in named_buffers:
            raise KeyError(f"buffer {n!r} not found in the model")
        sd[n] = named_buffers[n].detach().contiguous()
    return sd


def get_rng_state() -> dict:
    """Torch CPU/CUDA, numpy and python ``random`` states as ``weights_only``-loadable objects (lists, tensors)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`get_rng_state` (CUDA states are restored for the devices present in both)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        n = min(len(state["cuda"]), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(state["cuda"][:n])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # files and directories alike (POSIX)
    os.fsync(fd)
    os.close(fd)


def git_state(where: Path | None = None) -> dict:
    """Commit and dirty flag (tracked files only) of the checkout at ``where`` (default: the one holding blip2lib).

    ``{"commit": None, "dirty": None}`` outside a git checkout or when git is missing or slow — provenance must
    never fail a run. Untracked files are not scanned: a busy ``runs/`` or ``.venv/`` would make that slow.
    """
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=30)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def _git_info() -> dict:
    return git_state()


def _versions() -> dict:
    import timm
    import transformers

    # Under pytest the editable install may resolve blip2lib as a namespace package (__init__ not run).
    ours = getattr(sys.modules[__package__], "__version__", None)
    with contextlib.suppress(md.PackageNotFoundError):
        ours = ours or md.version("blip2lib")
    return {"torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
            "blip2lib": ours}  # fmt: skip


def _write_tensors(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / MODEL_FILE))


def _write_train_state(tmp: Path, state: dict) -> None:
    torch.save(state, tmp / STATE_FILE)


def _complete(d: Path) -> bool:
    """A checkpoint dir counts only with a readable manifest whose files all exist."""
    try:
        files = json.loads((d / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((d / f).is_file() for f in files)


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in ckpt_dir.iterdir() if d.is_dir() and (m := _CKPT.match(d.name))]
    return sorted((s, d) for s, d in found if _complete(d))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete ``ckpt-<step>`` in ``run_dir`` (temporary and incomplete directories are ignored)."""
    ckpts = _checkpoints(Path(run_dir))
    return ckpts[-1][1] if ckpts else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """Checkpoint named by ``best.json`` (None when absent or pruned)."""
    try:
        d = Path(run_dir) / json.loads((Path(run_dir) / BEST_FILE).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None
    return d if _complete(d) else None


def save_training_state(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler_state: dict | None,
    scaler: torch.amp.GradScaler | None, step: int, data_state: object, extra: dict | None, config: dict,
    keep_last: int = 3, best_metric: float | None = None, higher_is_better: bool = True, buffers: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """Write ``<path>/ckpt-<step>/`` atomically, prune to the newest ``keep_last`` (+ best), update ``best.json``.

    Main rank only. ``scheduler_state``, ``data_state`` (see ``engine``) and ``extra`` must hold plain Python types
    and tensors (read back with ``weights_only=True``); ``optimizer`` / ``scaler`` may be None. ``config`` is the
    resolved run config (non-JSON values stringified); its ``stage`` / ``parent`` keys go to the manifest (the
    parent checkpoint holds the frozen weights this one references). ``keep_last <= 0`` keeps all; the best
    checkpoint is never pruned. ``best_metric`` updates ``best.json`` when it beats the recorded best (direction
    ``higher_is_better``). ``buffers`` are buffer names saved with the trainable parameters.

    Returns:
        The final checkpoint directory.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-ckpt-*"):  # leftovers of a crashed save: never a valid checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    final, tmp = root / f"ckpt-{step}", root / f".tmp-ckpt-{step}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_tensors(tmp, trainable_state_dict(model, buffers))
        state = {"step": int(step), "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None, "scheduler": scheduler_state,
                 "rng": get_rng_state(), "data_state": data_state, "extra": extra}  # fmt: skip
        _write_train_state(tmp, state)
        files = {f: _sha256(tmp / f) for f in (MODEL_FILE, STATE_FILE)}
        manifest = {"format": 1, "step": int(step), "stage": config.get("stage"), "parent": config.get("parent"),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "best_metric": best_metric, "config": config,
                    "versions": _versions(), "git": _git_info(), "files": files}  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
        for f in (*files, MANIFEST_FILE):
            _fsync(tmp / f)
        if final.exists():  # re-save of a step (after a resume); a crash right here falls back to an older one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    best = _update_best(root, final, step, best_metric, higher_is_better)
    if keep_last > 0:
        ckpts = _checkpoints(root)
        for _, d in ckpts[:-keep_last]:
            if best is None or d.resolve() != best.resolve():
                shutil.rmtree(d, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def _update_best(root: Path, final: Path, step: int, metric: float | None, higher: bool) -> Path | None:
    try:
        rec = json.loads((root / BEST_FILE).read_text())
    except (OSError, ValueError):
        rec = None
    if metric is not None and (rec is None or (metric > rec["metric"] if higher else metric < rec["metric"])):
        rec = {"checkpoint": final.name, "step": int(step), "metric": float(metric)}
        (root / f".tmp-{BEST_FILE}").write_text(json.dumps(rec, indent=2))
        os.replace(root / f".tmp-{BEST_FILE}", root / BEST_FILE)
    return root / rec["checkpoint"] if rec else None


def load_training_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None, verify: bool = True, restore_rng: bool = True,
) -> dict:  # fmt: skip
    """Load a checkpoint written by :func:`save_training_state` into ``model`` (and optimizer/scaler, RNG).

    Every trainable parameter of ``model`` must be in the file and every file tensor must exist in the model;
    frozen parameters are left untouched (they come from the model's construction / parent weights). The optimizer's
    groups must match the saved ``param_names``. ``verify`` checks each file's sha256 against the manifest first;
    ``restore_rng`` restores torch/CUDA/numpy/python RNG states (``engine`` restores them itself, later).

    Returns:
        ``{"step", "data_state", "extra", "scheduler", "rng", "manifest", "path"}``.

    Raises:
        CheckpointError: incomplete checkpoint, sha256 mismatch or unreadable file (naming the file), or keys
            that do not fit: missing trainable, unexpected and mis-shaped keys (both shapes) in one message, raised
            before anything is loaded into ``model``.
    """
    d = Path(path)
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: unreadable or missing {MANIFEST_FILE} (incomplete checkpoint?)") from e
    for f, digest in manifest["files"].items():
        if not (d / f).is_file():
            raise CheckpointError(f"{d / f}: file listed in the manifest is missing")
        if verify and _sha256(d / f) != digest:
            raise CheckpointError(f"{d / f}: sha256 mismatch with {MANIFEST_FILE} (corrupted or modified file)")
    model = _unwrap(model)
    tensors = read_safetensors(d / MODEL_FILE, CheckpointError)
    own = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # every way the file can fail to fit, in one error (load_state_dict would stop at the first size mismatch)
    missing, unexpected = sorted(trainable - set(tensors)), sorted(k for k in tensors if k not in own)
    mis_shaped = shape_mismatches(own, tensors)
    if missing or unexpected or mis_shaped:
        shaped = f", mis-shaped keys {dict(list(mis_shaped.items())[:5])}" if mis_shaped else ""
        raise CheckpointError(f"{d}: missing trainable keys {missing[:5]}, unexpected keys {unexpected[:5]}{shaped}")
    model.load_state_dict(tensors, strict=False)
    try:
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:  # truncated zip / archive; a refused pickle keeps its own type
        raise CheckpointError(f"{d / STATE_FILE}: unreadable (truncated or corrupt?): {e}") from e
    if optimizer is not None and state["optimizer"] is not None:
        saved = [g.get("param_names") for g in state["optimizer"]["param_groups"]]
        have = [g.get("param_names") for g in optimizer.param_groups]
        if saved != have:
            raise CheckpointError(f"{d}: optimizer param groups differ from the checkpoint's")
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": state["step"], "data_state": state["data_state"], "extra": state["extra"],
            "scheduler": state["scheduler"], "rng": state["rng"], "manifest": manifest, "path": d}  # fmt: skip
