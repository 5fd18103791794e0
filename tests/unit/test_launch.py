import sys

import pytest

from blip2lib.launch import run_training, torchrun_command
from blip2lib.train import TrainParams


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


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_cpu_launch_through_torchrun(tmp_path):
    p = TrainParams(
        stage="stage1",
        model="tiny",
        train_data="synthetic",
        steps=2,
        batch_size=2,
        warmup_steps=1,
        image_size=28,
        max_txt_len=12,
        progress=False,
        num_gpus=2,
    )
    summary = run_training(p, tmp_path)  # gloo on CPU: the same code path as N GPUs
    assert summary["step"] == 2 and (tmp_path / "checkpoints").exists()
