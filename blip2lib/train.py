"""One training entry point for stage 1, stage 2 and the three fine-tunings (docs/paper_map.md §2–4, §7).

In-process (CPU, one GPU, a JupyterLab kernel that wants the live objects)::

    from blip2lib.train import TrainParams, train
    result = train(TrainParams.from_yaml("params/10_stage1_pretrain/toy.yaml"))

Several GPUs on one node (``launch.run_training`` builds exactly this command from a notebook)::

    torchrun --standalone --nproc_per_node=8 -m blip2lib.train --params FILE.yaml

Several nodes: the same module on every node with ``--nnodes=N --node_rank=i --rdzv_backend=c10d
--rdzv_endpoint=HOST:PORT`` instead of ``--standalone`` (``launch`` builds it from ``num_nodes`` and the ``rdzv_*``
keys; docs/multinode.md). ``batch_size`` is per GPU; the global batch is
``batch_size × grad_accum × world size`` (paper stage 1: 1680 for ViT-g, docs/paper_map.md §7).

Data (``train_data``): the toy world, an annotation file / manifest under ``data_root``, or WebDataset tar shards
(``"laion/{000000..000999}.tar"``, with ``shard_epoch_samples`` per rank; see ``assemble.build_data``). Logs:
``<run_dir>/log.jsonl`` every step, ``val.jsonl`` per validation, and with ``tensorboard: true`` the same scalars
under ``<run_dir>/tensorboard``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import add_verbosity, log_level, run_guarded
from .train_params import STAGES, TrainParams, load_train_params  # noqa: F401  (STAGES re-exported; torch-free)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m blip2lib.train`` (torch-free: ``--help`` is answered before torch loads)."""
    ap = argparse.ArgumentParser(prog="python -m blip2lib.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python -m blip2lib.train --params s1.yaml --run-dir runs/s1",
                                 )  # fmt: skip
    ap.add_argument("--params", required=True, help="flat YAML of TrainParams keys")
    ap.add_argument("--run-dir", default="", help="output folder (default: the file's run_dir or runs/adhoc)")
    add_verbosity(ap)
    return ap


if __name__ == "__main__":  # python -m: --help and usage errors exit here, before the torch imports below
    build_parser().parse_args()

import torch  # noqa: E402

from . import dist  # noqa: E402
from .assemble import build_data, build_model_and_task, load_init, materialize_frozen  # noqa: E402
from .checkpoint import latest_checkpoint  # noqa: E402
from .config import ParamsError, config_to_dict  # noqa: E402
from .engine import run_loop  # noqa: E402
from .optim import LRSchedule, build_optimizer, param_groups  # noqa: E402
from .validate import make_eval_fn  # noqa: E402

log = logging.getLogger(__name__)

# Keys a resumed (or finished, then extended) run may change: they steer how long, how often and how visibly the
# run goes on, not what a step computes. More ``steps`` moves the cosine horizon from the resume step on (LAVIS's
# resume with a larger max_epoch does the same); the change is recorded in the manifest's ``params_history``.
# ``run_dir`` is the folder itself, so it is never compared.
RESUME_MAY_CHANGE = frozenset(
    {"steps", "ckpt_every", "eval_every", "eval_at_start", "keep_last", "progress", "tensorboard", "num_workers",
     "max_bad_steps", "smoke_test", "dist_timeout_s", "cache_max_gib"}
)  # fmt: skip


def _saved_params(run_dir: Path) -> tuple[Path, dict] | None:
    """(newest complete checkpoint, its manifest) of ``run_dir``, or None for a fresh folder."""
    ck = latest_checkpoint(run_dir / "checkpoints")
    if ck is None:
        return None
    try:
        return ck, json.loads((ck / "manifest.json").read_text())
    except (OSError, ValueError) as e:  # latest_checkpoint read it a moment ago: a concurrent writer or bad disk
        raise ParamsError(f"{ck}/manifest.json: unreadable ({e}); cannot tell which params the run used") from e


def check_resume_params(params: TrainParams, run_dir: Path) -> list[dict]:
    """Refuse to continue a run folder with params that would change what its steps compute; return the history.

    The newest checkpoint's manifest holds the params the run used. A key outside :data:`RESUME_MAY_CHANGE` with
    another value raises; so does ``steps`` below the checkpoint's step. A key the saved params lack (added to the
    schema later) counts as changed only when it differs from its default. Allowed changes are appended to the
    ``params_history`` carried from manifest to manifest (``[{"at_step", "from_checkpoint", "changed": {key:
    [old, new]}}]``).

    Raises:
        ParamsError: naming the run folder, the checkpoint and every changed key with both values.
    """
    found = _saved_params(run_dir)
    if found is None:
        return []
    ck, manifest = found
    config = manifest.get("config") or {}
    old = config.get("params")
    history = list(config.get("params_history") or [])
    if not isinstance(old, dict):
        log.warning("%s: manifest records no params; cannot check this resume against them", ck)
        return history
    new = json.loads(json.dumps(params.to_dict(), default=str))  # the manifest's JSON view (tuples -> lists)
    defaults = json.loads(json.dumps(TrainParams().to_dict(), default=str))
    changed = {}
    for key, value in new.items():
        before = old.get(key, defaults.get(key, value))
        if key != "run_dir" and before != value:
            changed[key] = [before, value]
    refused = sorted(k for k in changed if k not in RESUME_MAY_CHANGE)
    step = int(manifest.get("step", 0))
    if refused or params.steps < step:
        what = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        if params.steps < step:
            what = ", ".join(filter(None, [what, f"steps: {params.steps} is below the checkpoint's step {step}"]))
        raise ParamsError(
            f"run folder {run_dir} already holds a run (checkpoint {ck.name}) trained with other params ({what}); "
            f"resuming would mix two runs. Use a new run_dir (or move this folder away), or restore these keys. Keys a "
            f"resume may change: "
            f"{sorted(RESUME_MAY_CHANGE)}"
        )
    if changed:
        log.warning("resuming %s from %s with changed params %s (recorded in params_history)", run_dir, ck, changed)
        history.append({"at_step": step, "from_checkpoint": ck.name, "changed": changed})
    return history


@dataclass
class RunResult:
    """What :func:`train` returns: the live objects plus the run's summary."""

    task: torch.nn.Module
    model: torch.nn.Module
    summary: dict
    run_dir: Path


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _lr_schedule(params: TrainParams, data: dict, groups: list[dict]) -> LRSchedule:
    """The run's :class:`LRSchedule`; ``lavis_epoch`` takes its epoch length from the data unless given."""
    spe = None
    if params.lr_schedule == "lavis_epoch":
        found = data.get("batches_per_epoch")
        spe = params.steps_per_epoch or found
        if not spe:
            raise ValueError("lr_schedule lavis_epoch: set steps_per_epoch (this training data has no epoch length)")
        if found and spe != found:
            log.warning("steps_per_epoch %d differs from the data's %d full batches per epoch and rank: LR epochs "
                        "and data epochs will drift apart (LAVIS's coincide)", spe, found)  # fmt: skip
        if params.apply_layer_decay and any(g["lr_scale"] != 1.0 for g in groups):
            log.warning(
                "lr_schedule lavis_epoch with apply_layer_decay true: the ViT's layer-wise LR decay is applied, "
                "which LAVIS's scheduler never does (apply_layer_decay: false reproduces it)"
            )
    return LRSchedule(
        params.lr,
        params.steps,
        warmup_steps=params.warmup_steps,
        warmup_lr=params.warmup_lr,
        min_lr=params.min_lr,
        mode=params.lr_schedule,
        steps_per_epoch=spe,
        grad_accum=params.grad_accum,
    )


def train(params: TrainParams, run_dir: str | Path | None = None) -> RunResult:
    """Train one stage; returns the live task/model and the summary (also written to ``<run_dir>/train.json``)."""
    params.validate_values()
    run_dir = Path(run_dir or params.run_dir or "runs/adhoc")
    history = check_resume_params(params, run_dir)  # before any work: a changed finished run is refused
    run_dir.mkdir(parents=True, exist_ok=True)
    dist.init_distributed(timeout_s=params.dist_timeout_s)
    _seed_all(params.seed + dist.get_rank() * 0)  # identical model init on every rank (DDP replicas)
    device = torch.device(f"cuda:{dist.get_local_rank()}" if torch.cuda.is_available() else "cpu")
    model, task, components = build_model_and_task(params, device)
    init_report = load_init(model, params.init_from) if params.init_from else None
    if params.model == "tiny" and dist.is_main():
        materialize_frozen(model, components, run_dir)
    if dist.is_dist():
        task = torch.nn.parallel.DistributedDataParallel(
            task, device_ids=[device.index] if device.index is not None else None, find_unused_parameters=True
        )
    data = build_data(params, components, device)
    vit_depth = model.config.vision.depth
    groups = param_groups(model, params.weight_decay, lr_layer_decay=params.lr_layer_decay, vit_depth=vit_depth)
    optimizer = build_optimizer(groups, params.lr, betas=(0.9, params.beta2))
    schedule = _lr_schedule(params, data, groups)
    eval_fn = make_eval_fn(params, model, task, components, data, device, run_dir)
    amp = params.amp if device.type == "cuda" else None
    config = {
        "model": config_to_dict(model.config),
        "stage": params.stage,
        "parent": params.init_from,
        "vision_weights": components.get("vision_weights", params.vision_weights),
        "llm_path": components.get("llm_path", params.llm_path),
        "bert_dir": components.get("bert_dir", params.bert_dir),
        "params": params.to_dict(),
        "params_history": history,  # every params change at a resume: the manifest never claims a mixed run
    }
    summary = run_loop(
        task,
        data["loader_factory"],
        optimizer,
        schedule,
        steps=params.steps,
        grad_accum=params.grad_accum,
        amp_dtype=amp,
        clip_norm=params.clip_norm or None,
        log_path=run_dir / "log.jsonl",
        ckpt_dir=run_dir / "checkpoints",
        ckpt_every=params.ckpt_every or params.steps,
        max_bad_steps=params.max_bad_steps,
        eval_fn=eval_fn,
        eval_every=params.eval_every or params.steps,
        best_key=components["best_key"],
        higher_is_better=components["higher_is_better"],
        progress=params.progress and dist.is_main(),
        model=model,
        config=config,
        keep_last=params.keep_last,
        apply_layer_decay=params.apply_layer_decay,
        tensorboard_dir=run_dir / "tensorboard" if params.tensorboard else None,
        eval_at_start=params.eval_at_start,
        side_logs=(run_dir / "val.jsonl",),
    )
    summary["init"] = init_report
    summary["params_history"] = history
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["bad_samples"] = data["bad_log"].total
    if dist.is_main():
        (run_dir / "train.json").write_text(json.dumps(summary, indent=2, default=str))
    return RunResult(task=task, model=model, summary=summary, run_dir=run_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m blip2lib.train --params FILE [--run-dir DIR]`` (also under torchrun); exit 2 on a user error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=log_level(args) if dist.is_main() else logging.WARNING)

    def body() -> int:
        params = load_train_params(args.params)
        try:
            # a finished run folder with other params is a ParamsError saying what changed
            with dist.explain_timeouts("training"):
                result = train(params, args.run_dir or None)
            if dist.is_main():
                out = {
                    "run_dir": str(result.run_dir),
                    "step": result.summary["step"],
                    "best": result.summary.get("best"),
                }
                print(json.dumps(out, default=str))
        finally:
            dist.cleanup()
        return 0

    return run_guarded(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
