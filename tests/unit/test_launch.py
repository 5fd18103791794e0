import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from blip2lib.checkpoint import MODEL_FILE, STATE_FILE, latest_checkpoint
from blip2lib.launch import check_nodes, main, run_training, torchrun_command
from blip2lib.train import TrainParams
from blip2lib.workbook.schemas import Stage2Params

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_command_is_the_documented_form(tmp_path):
    cmd = torchrun_command(tmp_path / "p.yaml", tmp_path, 8)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == [
        "--nproc_per_node=8",
        "--standalone",
        "-m",
        "blip2lib.train",
        "--params",
        str(tmp_path / "p.yaml"),
        "--run-dir",
        str(tmp_path),
    ]


def test_torchrun_command_for_several_nodes_names_the_rendezvous(tmp_path):
    cmd = torchrun_command(
        "p.yaml", "runs/x", 8, 2, node_rank=1, rdzv_endpoint="node0:29500", rdzv_id="job7", rdzv_backend="static"
    )
    assert cmd[3:] == [
        "--nproc_per_node=8",
        "--nnodes=2",
        "--node_rank=1",
        "--rdzv_backend=static",
        "--rdzv_endpoint=node0:29500",
        "--rdzv_id=job7",
        "-m",
        "blip2lib.train",
        "--params",
        "p.yaml",
        "--run-dir",
        "runs/x",
    ]
    # an empty endpoint / id is left to torchrun's own PET_RDZV_ENDPOINT / PET_RDZV_ID
    cmd = torchrun_command("p.yaml", "runs/x", 4, 2)
    assert cmd[3:7] == ["--nproc_per_node=4", "--nnodes=2", "--node_rank=0", "--rdzv_backend=c10d"]
    assert not [a for a in cmd if a.startswith(("--rdzv_endpoint", "--rdzv_id", "--standalone"))]


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"num_nodes": 0}, "'num_nodes'"),
        ({"num_nodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "'node_rank' must be in 0..1"),
        ({"node_rank": -1}, "'node_rank'"),
        ({"num_nodes": 2, "rdzv_endpoint": "h:1", "rdzv_backend": "etcd"}, "'rdzv_backend'"),
        ({"num_nodes": 2}, "'rdzv_endpoint'"),
    ],
)
def test_impossible_node_settings_are_refused_naming_the_key(values, key, monkeypatch, tmp_path):
    monkeypatch.delenv("PET_RDZV_ENDPOINT", raising=False)
    p = TrainParams(**values)
    with pytest.raises(ValueError, match=key):
        check_nodes(p)
    with pytest.raises(ValueError, match=key):  # refused before any process starts or anything is written
        run_training(p, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_endpoint_may_come_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "node0:29500")
    check_nodes(TrainParams(num_nodes=2))  # no error: torchrun reads the variable itself


def test_launch_cli_runs_the_notebooks_sequence_into_the_runners_folder(tmp_path, monkeypatch):
    """A stage-2 params file with two LLM families: the other nodes must make the same two launches, in order,
    into the folders the notebook on node 0 uses (runs/<notebook>/<variant>/<family>), with the overrides applied."""
    folder = tmp_path / "params" / "20_stage2_pretrain"
    folder.mkdir(parents=True)
    (folder / "two_nodes.yaml").write_text(
        yaml.safe_dump({"llms": ["opt", "t5"], "llm_steps": {"t5": 3}, "num_gpus": 8, "num_nodes": 2})
    )
    calls = []
    monkeypatch.setattr("blip2lib.workbook.stages.run_training", lambda p, d: calls.append((p, Path(d))))
    argv = [str(folder / "two_nodes.yaml"), "--runs", str(tmp_path / "runs"), "--node-rank", "1"]
    assert main([*argv, "--rdzv-endpoint", "n0:29500", "--rdzv-id", "j1"]) == 0
    run = tmp_path / "runs" / "20_stage2_pretrain" / "two_nodes"
    assert [(p.llm, p.steps, d) for p, d in calls] == [("opt", Stage2Params.steps, run / "opt"), ("t5", 3, run / "t5")]
    for p, _ in calls:
        assert (p.stage, p.min_lr) == ("stage2", Stage2Params.min_lr)  # the notebook schema's defaults
        assert (p.num_gpus, p.num_nodes, p.node_rank, p.rdzv_endpoint, p.rdzv_id) == (8, 2, 1, "n0:29500", "j1")


def test_launch_cli_refuses_a_notebook_that_does_not_train(tmp_path):
    folder = tmp_path / "params" / "41_zeroshot_vqa"
    folder.mkdir(parents=True)
    (folder / "x.yaml").write_text("seed: 1\n")
    with pytest.raises(ValueError, match="41_zeroshot_vqa is not a training notebook"):
        main([str(folder / "x.yaml")])


TINY = dict(
    stage="stage1",
    model="tiny",
    train_data="synthetic",
    steps=2,
    batch_size=2,
    warmup_steps=1,
    image_size=28,
    max_txt_len=12,
    progress=False,
)


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_cpu_launch_through_torchrun(tmp_path):
    p = TrainParams(**TINY, num_gpus=2)
    summary = run_training(p, tmp_path)  # gloo on CPU: the same code path as N GPUs
    assert summary["step"] == 2 and (tmp_path / "checkpoints").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[dict]:
    """The per-step loss terms of log.jsonl (timings and throughput differ between runs)."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "loss" in k or k in ("step", "lr")} for r in rows if "loss" in r]


def _final_state(run: Path) -> tuple[dict, dict]:
    """The trainable weights and the data position of the newest checkpoint."""
    newest = latest_checkpoint(run / "checkpoints")
    state = torch.load(newest / STATE_FILE, map_location="cpu", weights_only=True)
    return load_file(str(newest / MODEL_FILE)), state["data_state"]


@pytest.mark.dist
@pytest.mark.slow
def test_two_nodes_of_one_process_train_as_one_two_process_node(tmp_path):
    """Two nodes simulated on localhost (torchrun --nnodes=2, node_rank 0 and 1, c10d rendezvous, gloo), each started
    through the per-node entry point, into one shared run folder; the result must equal one node with two processes:
    the same world size, bit-identical weights and the same per-step losses."""
    steps = 3
    ref = tmp_path / "one_node"
    run_training(TrainParams(**{**TINY, "steps": steps}, num_gpus=2), ref)

    shared = tmp_path / "two_nodes"
    pfile = tmp_path / "two_nodes.yaml"
    port = _free_port()
    values = {**TINY, "steps": steps, "num_gpus": 1, "num_nodes": 2, "rdzv_endpoint": f"127.0.0.1:{port}"}
    pfile.write_text(yaml.safe_dump({**values, "rdzv_id": "test-two-nodes"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PET_RDZV_ENDPOINT", None)
    logs = [tmp_path / f"node{k}.out" for k in (0, 1)]  # files, not pipes: a full pipe would stall a node
    nodes = []
    for k, log in enumerate(logs):
        cmd = [sys.executable, "-m", "blip2lib.launch", str(pfile), "--run-dir", str(shared), "--node-rank", str(k)]
        with log.open("w") as out:
            nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
    for k, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.wait(timeout=300) == 0, f"node {k} failed:\n{log.read_text()[-4000:]}"
        want = f"--nnodes=2 --node_rank={k} --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:{port} --rdzv_id=test-two"
        assert want in log.read_text()
    # each node wrote its own params file (they differ in node_rank) into the shared folder
    assert yaml.safe_load((shared / "params.yaml").read_text())["node_rank"] == 0
    assert yaml.safe_load((shared / "params.node1.yaml").read_text())["node_rank"] == 1

    weights, data_state = _final_state(shared)
    ref_weights, ref_data_state = _final_state(ref)
    assert data_state["world_size"] == 2 and data_state == ref_data_state
    assert json.loads((shared / "train.json").read_text())["step"] == steps
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        assert torch.equal(w, ref_weights[name]), name
    assert _losses(shared) == _losses(ref) and len(_losses(ref)) == steps
