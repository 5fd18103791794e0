"""The training notebooks' one library call per step: train a stage, then summarise its logs for the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..launch import run_training
from ..paths import safe_name


def run_stage(params, run_dir: str | Path) -> dict[str, Path]:
    """Train ``params`` (a stage schema) into ``run_dir``; stage 2 trains each family of ``params.llms`` in turn.

    ``params.llm_steps`` may give a family its own number of steps.

    Returns:
        family (or "model") → the folder holding that run's ``log.jsonl``, ``val.jsonl`` and ``checkpoints/``.
    """
    run_dir = Path(run_dir)
    families = (params.llms or [params.llm]) if params.stage == "stage2" else [None]
    for fam in families if len(families) > 1 else ():  # each family trains into run_dir/<family>
        safe_name(fam, "llms", "stage params")
    out = {}
    for fam in families:
        tp = params.train_params()
        sub = run_dir if len(families) == 1 else run_dir / fam
        if fam is not None:
            tp = dataclasses.replace(tp, llm=fam, steps=params.llm_steps.get(fam, tp.steps))
        run_training(tp, sub)
        out[fam or "model"] = sub
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def stage_summary(folder: str | Path) -> dict[str, float]:
    """First/last training loss terms and first/last validation metrics of one run folder (for ``record``)."""
    folder = Path(folder)
    train = [r for r in _read(folder / "log.jsonl") if "loss" in r and not r.get("skipped")]
    val = _read(folder / "val.jsonl")
    out: dict[str, float] = {"steps": float(train[-1]["step"]) if train else 0.0}
    if train:
        terms = [k for k in train[-1] if k.endswith("_loss") or k in ("loss", "itm_acc")]
        k = max(1, len(train) // 10)  # average the first/last 10% of steps: single steps are noisy
        for t in terms:
            out[f"{t}_start"] = sum(r[t] for r in train[:k]) / k
            out[f"{t}_end"] = sum(r[t] for r in train[-k:]) / k
    if val:
        for key, value in val[-1].items():
            if isinstance(value, (int, float)) and key != "step":
                out[f"{key}_end"] = float(value)
                if len(val) > 1 and isinstance(val[0].get(key), (int, float)):
                    out[f"{key}_start"] = float(val[0][key])
    train_json = folder / "train.json"
    if train_json.exists():
        info = json.loads(train_json.read_text())
        out["bad_samples"] = float(info.get("bad_samples", 0))
        out["trainable_params"] = float(info.get("trainable_params", 0))
    return out
