"""Run training from a notebook: in-process on a CPU / one GPU, or torchrun as a subprocess for several GPUs or nodes.

The only place that builds the torchrun command. A notebook must not touch CUDA before a multi-GPU
launch; after it, read ``metrics``/``log.jsonl`` from the run folder.

Several nodes (docs/multinode.md): every node runs the same training with the same params and the same run folder
(a filesystem all nodes share). Node 0 usually runs the notebook through the workbook runner; every other node runs
this module for the same params file, which makes the same sequence of torchrun launches (stage 2 trains one run per
LLM family)::

    python -m blip2lib.launch params/10_stage1_pretrain/two_nodes.yaml --node-rank 1

``num_gpus`` counts the GPUs of one node, so the world size is ``num_gpus × num_nodes`` and the global batch
``batch_size × grad_accum × num_gpus × num_nodes``. The rendezvous endpoint and id may also come from torchrun's own
environment variables ``PET_RDZV_ENDPOINT`` / ``PET_RDZV_ID`` (what a SLURM script exports once for all nodes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

RDZV_BACKENDS = ("c10d", "static")  # c10d: ranks assigned at the rendezvous; static: node_rank decides them
TRAIN_JSON_WAIT_S = 120  # how long a node waits for rank 0's train.json after its own workers are done


def torchrun_command(
    params_file: str | Path,
    run_dir: str | Path,
    num_gpus: int,
    nnodes: int = 1,
    *,
    node_rank: int = 0,
    rdzv_endpoint: str = "",
    rdzv_id: str = "",
    rdzv_backend: str = "c10d",
) -> list[str]:
    """The torchrun command line that trains ``params_file`` into ``run_dir`` on this node.

    One node: ``torchrun --nproc_per_node=N --standalone -m blip2lib.train --params FILE --run-dir DIR``. Several
    nodes: ``--nnodes``, ``--node_rank``, ``--rdzv_backend``, ``--rdzv_endpoint``, ``--rdzv_id`` instead of
    ``--standalone`` (an empty endpoint or id is left out, so torchrun reads ``PET_RDZV_ENDPOINT`` / ``PET_RDZV_ID``).

    Args:
        params_file: flat YAML of ``TrainParams`` keys, read by ``blip2lib.train`` in every process.
        run_dir: the run folder (the same path on every node).
        num_gpus: processes on this node (one per GPU).
        nnodes: nodes taking part.
        node_rank: this node's index (only the static rendezvous uses it; c10d assigns ranks when nodes join).
        rdzv_endpoint: ``HOST:PORT`` of the rendezvous, reachable from every node.
        rdzv_id: job id shared by all nodes.
        rdzv_backend: ``c10d`` or ``static``.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_gpus}"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--rdzv_backend={rdzv_backend}"]
        cmd += [f"--rdzv_endpoint={rdzv_endpoint}"] if rdzv_endpoint else []
        cmd += [f"--rdzv_id={rdzv_id}"] if rdzv_id else []
    return cmd + ["-m", "blip2lib.train", "--params", str(params_file), "--run-dir", str(run_dir)]


def check_nodes(params) -> None:
    """Reject an impossible multi-node setting before anything starts; the message names the key.

    Raises:
        ValueError: ``num_nodes`` < 1, ``node_rank`` outside ``0..num_nodes-1``, an unknown ``rdzv_backend``, or
            several nodes without a rendezvous endpoint (neither ``rdzv_endpoint`` nor ``PET_RDZV_ENDPOINT``).
    """
    if params.num_nodes < 1:
        raise ValueError(f"key 'num_nodes' must be >= 1, got {params.num_nodes}")
    if not 0 <= params.node_rank < params.num_nodes:
        raise ValueError(f"key 'node_rank' must be in 0..{params.num_nodes - 1} (num_nodes), got {params.node_rank}")
    if params.rdzv_backend not in RDZV_BACKENDS:
        raise ValueError(f"key 'rdzv_backend' must be one of {RDZV_BACKENDS}, got {params.rdzv_backend!r}")
    if params.num_nodes > 1 and not (params.rdzv_endpoint or os.environ.get("PET_RDZV_ENDPOINT")):
        raise ValueError(
            f"key 'rdzv_endpoint': num_nodes={params.num_nodes} needs the rendezvous HOST:PORT (a port on one of "
            "the nodes that every node can reach), or PET_RDZV_ENDPOINT in the environment"
        )


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a process reading ``path`` never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_training(params, run_dir: str | Path | None = None):
    """Train ``params`` (a ``TrainParams``) into ``run_dir``.

    ``num_gpus <= 1`` on one node: in-process, returns :class:`blip2lib.train.RunResult` with the live task and
    model. Otherwise: writes the params into the run folder (``params.yaml``; node k > 0 writes
    ``params.node<k>.yaml``, since the files differ in ``node_rank`` and the folder may be shared), runs torchrun as
    a subprocess (its output streams through), raises ``RuntimeError`` on a non-zero exit, and returns the summary
    dict from ``train.json`` (written by global rank 0, whichever node holds it: the folder must be shared).
    """
    from .train import train

    check_nodes(params)
    run_dir = Path(run_dir or params.run_dir or "runs/adhoc")
    if params.num_gpus <= 1 and params.num_nodes == 1:
        return train(params, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pfile = run_dir / ("params.yaml" if params.node_rank == 0 else f"params.node{params.node_rank}.yaml")
    _write_atomic(pfile, yaml.safe_dump(params.to_dict(), sort_keys=True))
    # one id per run folder unless the job gives one: stage 2's successive runs (one per LLM family) then never
    # meet the previous run's rendezvous
    rdzv_id = params.rdzv_id or os.environ.get("PET_RDZV_ID") or f"blip2lib-{run_dir.resolve().name}"
    cmd = torchrun_command(
        pfile,
        run_dir,
        max(params.num_gpus, 1),
        params.num_nodes,
        node_rank=params.node_rank,
        rdzv_endpoint=params.rdzv_endpoint,
        rdzv_id=rdzv_id,
        rdzv_backend=params.rdzv_backend,
    )
    print("launching:", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}; see {run_dir}/log.jsonl and the output above")
    # global rank 0 writes train.json just after the last checkpoint barrier, so this node's workers may be done first
    train_json = run_dir / "train.json"
    deadline = time.monotonic() + TRAIN_JSON_WAIT_S
    while not train_json.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not train_json.exists():
        raise RuntimeError(
            f"{train_json} is missing {TRAIN_JSON_WAIT_S} s after torchrun ended: global rank 0 ran on another node "
            "and wrote there; the run folder must be one folder that every node shares"
        )
    return json.loads(train_json.read_text())


def _load(params_path: Path, notebook: str):
    """The params file as its notebook's schema (``params/<notebook>/X.yaml``) or as plain ``TrainParams``."""
    from .config import load_params_yaml
    from .train import TrainParams
    from .workbook.schemas import SCHEMAS

    notebook = notebook or params_path.parent.name
    schema = SCHEMAS.get(notebook, TrainParams)
    if not issubclass(schema, TrainParams):
        raise ValueError(f"{params_path}: notebook {notebook} is not a training notebook (its schema has no stage)")
    return schema.from_dict(load_params_yaml(params_path), source=str(params_path)), notebook in SCHEMAS


def main(argv: list[str] | None = None) -> int:
    """``python -m blip2lib.launch PARAMS [--run-dir DIR] [--node-rank K] [--rdzv-endpoint H:P] [--rdzv-id ID]``."""
    ap = argparse.ArgumentParser(prog="python -m blip2lib.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example (node 1 of 2): python -m blip2lib.launch "
                                        "params/10_stage1_pretrain/paper_vitg.yaml --node-rank 1 "
                                        "--rdzv-endpoint node0:29500")  # fmt: skip
    ap.add_argument("params", help="params/<training notebook>/<variant>.yaml, or a flat YAML of TrainParams keys")
    ap.add_argument("--notebook", default="", help="schema of a params file outside params/<notebook>/")
    ap.add_argument("--run-dir", default="", help="run folder (default: the runner's runs/<notebook>/<variant>/)")
    ap.add_argument("--runs", default="runs", help="runs root for the default run folder (as the runner's --runs)")
    ap.add_argument("--node-rank", type=int, default=None, help="this node's index (overrides node_rank)")
    ap.add_argument("--rdzv-endpoint", default=None, help="rendezvous HOST:PORT (overrides rdzv_endpoint)")
    ap.add_argument("--rdzv-id", default=None, help="job id shared by all nodes (overrides rdzv_id)")
    args = ap.parse_args(argv)
    path = Path(args.params)
    params, is_notebook = _load(path, args.notebook)
    overrides = {"node_rank": args.node_rank, "rdzv_endpoint": args.rdzv_endpoint, "rdzv_id": args.rdzv_id}
    params = dataclasses.replace(params, **{k: v for k, v in overrides.items() if v is not None})
    run_dir = Path(args.run_dir or params.run_dir or Path(args.runs) / (args.notebook or path.parent.name) / path.stem)
    if is_notebook:  # the notebook's own sequence of runs (stage 2: one per LLM family)
        from .workbook.stages import run_stage

        print(json.dumps({k: str(v) for k, v in run_stage(params, run_dir).items()}))
    else:
        result = run_training(params, run_dir)
        print(json.dumps(result if isinstance(result, dict) else result.summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
