"""Ablation notebooks (Table 6, Figure 5): train each variant for several seeds, evaluate, report mean ± spread."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from ..launch import run_training
from ..paths import safe_name
from ..train import TrainParams
from .tables import evaluate_checkpoints, flat_metrics, resolve_data_root


def run_ablation(params, run_dir: str | Path) -> dict[str, dict[int, dict]]:
    """Train ``params.variants`` × ``params.seeds`` (``params.base`` + the variant's overrides), evaluate each.

    Returns:
        variant → seed → flat metrics (``<metric>``: value, percent).
    """
    run_dir = Path(run_dir)
    for variant in params.variants:  # each variant trains into run_dir/<variant>/seed<N>
        safe_name(variant, "variants", "ablation params")
    data_root = resolve_data_root(params.data_root, params.toy_world)
    parent = ""
    if params.parent:  # e.g. the stage-1 run the "with stage 1" variant starts from (self-contained smoke runs)
        parent = str(run_dir / "parent")
        values = {"progress": False, "num_gpus": params.num_gpus, **params.parent}
        run_training(TrainParams.from_dict(values, source="ablation parent"), parent)
    out: dict[str, dict[int, dict]] = {}
    for variant, overrides in params.variants.items():
        overrides = {k: v.replace("{parent}", parent) if isinstance(v, str) else v for k, v in overrides.items()}
        out[variant] = {}
        for seed in params.seeds:
            folder = run_dir / variant / f"seed{seed}"
            values = {**params.base, **overrides, "seed": seed, "progress": False, "num_gpus": params.num_gpus}
            run_training(TrainParams.from_dict(values, source=f"ablation {variant} seed {seed}"), folder)
            res = evaluate_checkpoints(
                params.eval_task,
                {"m": str(folder)},
                folder / "eval",
                split=params.eval_split,
                data_root=data_root,
                batch_size=params.batch_size,
                progress=False,
                **params.eval_settings,
            )["m"]
            out[variant][seed] = {k[2:]: v for k, v in flat_metrics(res, "m").items()}
    return out


def summarize(results: dict[str, dict[int, dict]], metrics: list[str]) -> dict[str, float]:
    """``<variant>_<metric>_mean`` / ``_std`` over seeds, and ``delta_<metric>`` = last variant − first variant."""
    out: dict[str, float] = {}
    for variant, by_seed in results.items():
        for m in metrics:
            vals = [r[m] for r in by_seed.values() if m in r]
            if vals:
                out[f"{variant}_{m}_mean"] = statistics.fmean(vals)
                out[f"{variant}_{m}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    names = list(results)
    if len(names) >= 2:
        for m in metrics:
            a, b = out.get(f"{names[0]}_{m}_mean"), out.get(f"{names[-1]}_{m}_mean")
            if a is not None and b is not None:
                out[f"delta_{m}"] = b - a
    return out


def replace_base(params, **kw):
    """A copy of ``params`` whose ``base`` has ``kw`` merged in (smoke runs)."""
    return dataclasses.replace(params, base={**params.base, **kw})
