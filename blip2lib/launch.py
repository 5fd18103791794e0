"""Run training from a notebook: in-process on a CPU / one GPU, or torchrun as a subprocess for several GPUs.

The only place that builds the torchrun command. A notebook must not touch CUDA before a multi-GPU
launch; after it, read ``metrics``/``log.jsonl`` from the run folder.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml


def torchrun_command(params_file: str | Path, run_dir: str | Path, num_gpus: int, nnodes: int = 1) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m blip2lib.train --params FILE --run-dir DIR``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_gpus}"]
    cmd += ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}"]
    return cmd + ["-m", "blip2lib.train", "--params", str(params_file), "--run-dir", str(run_dir)]


def run_training(params, run_dir: str | Path | None = None):
    """Train ``params`` (a ``TrainParams``) into ``run_dir``.

    ``num_gpus <= 1``: in-process, returns :class:`blip2lib.train.RunResult` with the live task and model.
    ``num_gpus > 1``: writes ``params.yaml`` into the run folder, runs torchrun as a subprocess (its output streams
    through), raises ``RuntimeError`` on a non-zero exit, and returns the summary dict from ``train.json``.
    """
    from .train import train

    run_dir = Path(run_dir or params.run_dir or "runs/adhoc")
    if params.num_gpus <= 1:
        return train(params, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pfile = run_dir / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.to_dict(), sort_keys=True))
    cmd = torchrun_command(pfile, run_dir, params.num_gpus)
    print("launching:", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}; see {run_dir}/log.jsonl and the output above")
    return json.loads((run_dir / "train.json").read_text())
