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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import dist
from .assemble import build_data, build_model_and_task, load_init, materialize_frozen
from .checkpoint import latest_checkpoint
from .config import Params, ParamsError, config_to_dict
from .engine import run_loop
from .errors import add_verbosity, log_level, run_guarded
from .optim import LR_SCHEDULES, LRSchedule, build_optimizer, param_groups
from .precision import VIT_PRECISIONS
from .tasks import TEXT_PADDINGS
from .validate import make_eval_fn

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "caption_ft", "vqa_ft", "retrieval_ft")


@dataclass
class TrainParams(Params):
    """Flat training parameters (the stage notebooks' parameters cells hold the same keys)."""

    stage: str = "stage1"  # stage1 | stage2 | caption_ft | vqa_ft | retrieval_ft
    model: str = "toy"  # "toy" (embedded toy world), "tiny" (random, seconds) or a PRESETS key, e.g. "vitg_opt2.7b"
    llm: str = "opt"  # toy/tiny LLM family: opt | t5
    toy_world: str = "full"  # toy world size: full (make demo) | tiny (seconds, tests)
    init_from: str = ""  # parent checkpoint dir (stage 1 → stage 2 / retrieval FT; stage 2 → caption/VQA FT)
    bert_dir: str = ""  # local bert-base-uncased dir: Q-Former init + tokenizer (unused by the toy and tiny models)
    vision_weights: str = ""  # eva_vit_g.pth / clip_vit_L.pth (real presets)
    llm_path: str = ""  # local transformers LLM dir (real presets)
    image_size: int = 224  # 224 pre-training; 364 caption/retrieval FT; 490 VQA FT (docs/paper_map.md §4)
    augment: str = "paper"  # paper (random crop 0.5-1 + flip) | crop (no flip) | none (eval resize: toy world)
    freeze_vit: bool = True  # False in the fine-tunings (ViT fp32, docs/paper_map.md §10.18)
    grad_checkpointing: bool = False  # ViT gradient checkpointing when it is trained
    llm_dropout: bool = True  # frozen LLM's dropout on in training steps (LAVIS); false pins the LLM in eval mode
    train_data: str = "toy"  # "toy", "synthetic", an annotation file / manifest under data_root, or tar shards
    shard_epoch_samples: int = 0  # tar-shard train_data: samples per rank and epoch (shards are resampled)
    shuffle_buffer: int = 1000  # tar-shard train_data: sample shuffle buffer (0 keeps the shard order)
    images_root: str = ""  # image folder under data_root for annotation files
    val_data: str = ""  # validation annotation file ("toy" → the toy val split; "" → none)
    val_images: int = 64  # validation subset size (images; questions for vqa_ft)
    steps: int = 100  # optimizer steps (paper: 250k stage 1, 80k stage 2)
    batch_size: int = 32  # per GPU
    grad_accum: int = 1  # micro-batches per step
    num_workers: int = 0  # DataLoader workers
    num_nodes: int = 1  # nodes taking part; num_gpus counts one node's GPUs (docs/multinode.md)
    node_rank: int = 0  # this node's index 0..num_nodes-1 (only the static rendezvous uses it)
    rdzv_endpoint: str = ""  # several nodes: rendezvous HOST:PORT ("" → $PET_RDZV_ENDPOINT)
    rdzv_id: str = ""  # several nodes: job id shared by all nodes ("" → $PET_RDZV_ID, else from the run folder)
    rdzv_backend: str = "c10d"  # c10d (ranks assigned when nodes join) | static (node_rank decides them)
    lr: float = 1e-4  # peak LR (paper §3.4)
    min_lr: float = 1e-5  # cosine floor (1e-5 stage 1, 5e-5 stage 2 in the paper)
    warmup_lr: float = 1e-6  # LR at step 0
    warmup_steps: int = 2000  # paper 2k (LAVIS yaml 5k)
    weight_decay: float = 0.05  # AdamW weight decay (paper and LAVIS), none on 1-D params and biases
    beta2: float = 0.98  # paper 0.98 (LAVIS yamls 0.999)
    lr_layer_decay: float = 1.0  # ViT layer-wise LR decay (Tables 7–9)
    apply_layer_decay: bool = True  # multiply the ViT groups' LR by lr_layer_decay powers (paper); LAVIS never does
    lr_schedule: str = (
        "step"  # step (paper: cosine per step) | lavis_epoch (LAVIS: warmup in epoch 0, cosine per epoch)
    )
    steps_per_epoch: int = 0  # lavis_epoch: micro-batches per epoch and rank (0 → the training set's full batches)
    amp: str = (
        "bf16"  # training autocast: bf16 | fp16 (GradScaler; LAVIS amp: True) | fp32; CPU runs use fp32 regardless
    )
    vit_precision: str = (
        ""  # frozen ViT on a GPU: fp16_lavis | fp16 | bf16 | fp32 ("" → the model's; presets fp16_lavis)
    )
    clip_norm: float = 0.0  # gradient clipping norm; 0 turns it off (the paper does not clip)
    max_txt_len: int = 32  # Q-Former and LLM text length
    text_padding: str = "max_length"  # Q-Former captions in stage 1 / retrieval FT: max_length (LAVIS) | longest
    cache_vision_features: bool = False  # keep each frozen-ViT output after its first pass (needs augment none)
    cache_images: bool = False  # keep each decoded, transformed training image in memory (needs augment none)
    prompt: str = ""  # "" pre-training; "a photo of" caption FT
    question_template: str = "Question: {} Answer:"  # VQA FT prompt (docs/paper_map.md §4.2)
    use_itg: bool = True  # Table 6 ablation switch (retrieval FT)
    ckpt_every: int = 0  # steps between checkpoints (0 → only at the end)
    eval_every: int = 0  # steps between validations (0 → only at the end)
    eval_at_start: bool = True  # also validate before the first step, so each validation curve has a true start
    keep_last: int = 2  # checkpoints kept
    max_bad_steps: int = 10  # consecutive non-finite steps before stopping
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # also write the log's scalars to <run_dir>/tensorboard (needs `tensorboard`)
    dist_timeout_s: float = float(dist.DEFAULT_TIMEOUT_S)  # several processes: seconds a rank waits for a hung one
    cache_max_gib: float = 4.0  # memory budget (GiB) of cache_images and of cache_vision_features, each
    feature_store: str = ""  # frozen-ViT feature store folder (python -m blip2lib.featstore build); needs augment none
    text_len_buckets: list[int] = field(default_factory=list)  # pad captions to the smallest fitting bucket; [] → off

    # Allowed ranges (checked by from_dict / validate_values before any work). Zero keeps its documented meaning
    # where a key has one (ckpt_every / eval_every 0: only at the end; steps_per_epoch 0: from the data; ...).
    ranges = {
        "steps": "[1, inf)",
        "batch_size": "[1, inf)",
        "grad_accum": "[1, inf)",
        "num_workers": "[0, inf)",
        "image_size": "[1, inf)",
        "max_txt_len": "[1, inf)",
        "val_images": "[1, inf)",
        "lr": "[0, inf)",
        "min_lr": "[0, inf)",
        "warmup_lr": "[0, inf)",
        "warmup_steps": "[0, inf)",
        "weight_decay": "[0, inf)",
        "beta2": "[0, 1)",
        "lr_layer_decay": "(0, 1]",
        "clip_norm": "[0, inf) (0 turns clipping off)",
        "steps_per_epoch": "[0, inf) (0 takes the epoch length from the data)",
        "shard_epoch_samples": "[0, inf)",
        "shuffle_buffer": "[0, inf) (0 keeps the shard order)",
        "ckpt_every": "[0, inf) (0 saves only at the end)",
        "eval_every": "[0, inf) (0 validates only at the end)",
        "keep_last": "[0, inf) (0 keeps every checkpoint)",
        "max_bad_steps": "[1, inf)",
        "dist_timeout_s": "(0, inf)",
        "cache_max_gib": "(0, inf)",
    }

    def validate_values(self, source: str = "TrainParams") -> TrainParams:
        """Ranges (see ``ranges``) and semantic checks that types alone cannot express."""
        self.check_ranges(source)
        if self.llm not in ("opt", "t5"):  # also a folder name (stage 2 trains each family into run_dir/<llm>)
            raise ValueError(f"llm must be opt or t5, got {self.llm!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.augment not in ("paper", "crop", "none"):
            raise ValueError(f"augment must be paper, crop or none, got {self.augment!r}")
        if self.cache_vision_features and (self.augment != "none" or not self.freeze_vit):
            raise ValueError("cache_vision_features needs a frozen ViT and fixed images (freeze_vit: true, augment: "
                             f"none); got freeze_vit={self.freeze_vit}, augment={self.augment!r}")  # fmt: skip
        if self.cache_images and self.augment != "none":
            raise ValueError(f"cache_images needs fixed images (augment: none), got augment={self.augment!r}")
        if self.text_padding not in TEXT_PADDINGS:
            raise ValueError(f"text_padding must be max_length or longest, got {self.text_padding!r}")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"amp must be bf16, fp16 or fp32, got {self.amp!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.vit_precision not in ("", *VIT_PRECISIONS):
            raise ValueError(f"vit_precision must be '' or one of {VIT_PRECISIONS}, got {self.vit_precision!r}")
        return self


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
    ap = argparse.ArgumentParser(prog="python -m blip2lib.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python -m blip2lib.train --params s1.yaml --run-dir runs/s1",
                                 )  # fmt: skip
    ap.add_argument("--params", required=True, help="flat YAML of TrainParams keys")
    ap.add_argument("--run-dir", default="", help="output folder (default: the file's run_dir or runs/adhoc)")
    add_verbosity(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=log_level(args) if dist.is_main() else logging.WARNING)

    def body() -> int:
        try:
            params = TrainParams.from_yaml(args.params)
            params.validate_values(args.params)
        except ParamsError:
            raise
        except ValueError as err:  # a value the schema's own checks refuse: name the file
            raise ParamsError(f"{args.params}: {err}") from err
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
