"""Training checkpoints: trainable-only weights, sha256 verification, atomic writes, pruning, RNG round trip."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import blip2lib.checkpoint as ck
from blip2lib.optim import build_optimizer, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Linear(4, 4)  # frozen tower
        self.vision_model.requires_grad_(False)
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.head.weight = nn.Parameter(torch.randn(2, 3))
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.register_buffer("counter", torch.zeros(2))

    def forward(self, x):
        return self.head(self.fc(self.vision_model(x))).sum() * self.temp


def _trained():
    net = Net()
    opt = build_optimizer(param_groups(net, 0.05), lr=1e-3)
    for _ in range(2):
        net(torch.randn(5, 4)).backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def _save(root, net, opt, step, **kw):
    kw.setdefault("config", {"stage": "stage1", "parent": "runs/x/ckpt-9", "lr": 1e-3})
    kw.update(scheduler_state={"peak_lr": 1e-3}, scaler=None, data_state={"position": 10 * step}, extra={"note": "hi"})
    return ck.save_training_state(root, model=net, optimizer=opt, step=step, **kw)


def test_only_trainable_keys_saved_and_manifest(tmp_path):
    net, opt = _trained()
    d = _save(tmp_path, net, opt, 2, buffers=("counter",))
    assert d == tmp_path / "ckpt-2"
    tensors = load_file(str(d / ck.MODEL_FILE))
    assert set(tensors) == {"fc.weight", "fc.bias", "head.weight", "head.bias", "temp", "counter"}
    assert torch.equal(tensors["fc.weight"], net.fc.weight)
    man = json.loads((d / ck.MANIFEST_FILE).read_text())
    assert man["stage"] == "stage1" and man["parent"] == "runs/x/ckpt-9" and man["step"] == 2
    assert man["config"]["lr"] == 1e-3
    assert set(man["versions"]) == {"torch", "transformers", "timm", "blip2lib"}
    assert "commit" in man["git"] and isinstance(man["versions"]["blip2lib"], str)
    for f, digest in man["files"].items():
        assert hashlib.sha256((d / f).read_bytes()).hexdigest() == digest


def test_round_trip_restores_weights_optimizer_rng(tmp_path):
    torch.manual_seed(1)
    net, opt = _trained()
    d = _save(tmp_path, net, opt, 2)
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(2)  # a fresh model: different trainable weights, same frozen ones copied over
    net2 = Net()
    net2.vision_model.load_state_dict(net.vision_model.state_dict())
    opt2 = build_optimizer(param_groups(net2, 0.05), lr=1e-3)
    np.random.seed(99)
    random.seed(99)
    out = ck.load_training_state(d, net2, opt2)
    assert out["step"] == 2 and out["data_state"] == {"position": 20} and out["extra"] == {"note": "hi"}
    assert out["scheduler"] == {"peak_lr": 1e-3}
    for (n, p), p2 in zip(net.named_parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, p2), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for kk in s1["state"][k]:
            assert torch.equal(s1["state"][k][kk], s2["state"][k][kk])
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]


def test_sha256_tamper_names_the_file(tmp_path):
    net, opt = _trained()
    d = _save(tmp_path, net, opt, 2)
    for name in (ck.MODEL_FILE, ck.STATE_FILE):
        raw = bytearray((d / name).read_bytes())
        orig = bytes(raw)
        raw[-1] ^= 0xFF
        (d / name).write_bytes(bytes(raw))
        with pytest.raises(ck.CheckpointError, match=name.replace(".", r"\.") + ".*sha256"):
            ck.load_training_state(d, Net())
        (d / name).write_bytes(orig)
    ck.load_training_state(d, Net())  # intact again → loads


def test_optimizer_group_mismatch_is_an_error(tmp_path):
    net, opt = _trained()
    d = _save(tmp_path, net, opt, 2)
    net2 = Net()
    opt2 = build_optimizer(param_groups(net2, 0.05, no_decay_rule="lavis_head"), lr=1e-3)  # temp moves group
    with pytest.raises(ck.CheckpointError, match="param groups"):
        ck.load_training_state(d, net2, opt2)


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    net, opt = _trained()
    _save(tmp_path, net, opt, 1)

    def boom(*a, **k):
        raise OSError("disk died after the tensor file")

    monkeypatch.setattr(ck, "_write_train_state", boom)
    with pytest.raises(OSError, match="disk died"):
        _save(tmp_path, net, opt, 2)
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "ckpt-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1"]
    # A hard crash (no Python cleanup) leaves a temp dir and a dir without manifest: both ignored.
    (tmp_path / ".tmp-ckpt-5-123").mkdir()
    (tmp_path / ".tmp-ckpt-5-123" / ck.MODEL_FILE).write_bytes(b"x")
    (tmp_path / "ckpt-7").mkdir()
    (tmp_path / "ckpt-7" / ck.MODEL_FILE).write_bytes(b"x")
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "ckpt-1"
    with pytest.raises(ck.CheckpointError, match="manifest"):
        ck.load_training_state(tmp_path / "ckpt-7", Net())
    monkeypatch.undo()
    _save(tmp_path, net, opt, 3)  # next save sweeps the stale temp dir
    assert not (tmp_path / ".tmp-ckpt-5-123").exists()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "ckpt-3"
    assert ck.latest_checkpoint(tmp_path / "nothing-here") is None


def test_keep_last_and_best_pointer(tmp_path):
    net, opt = _trained()
    metrics = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.8}
    for step, m in metrics.items():
        _save(tmp_path, net, opt, step, keep_last=2, best_metric=m)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["ckpt-2", "ckpt-4", "ckpt-5"]  # last 2 + best
    best = json.loads((tmp_path / ck.BEST_FILE).read_text())
    assert best == {"checkpoint": "ckpt-2", "step": 2, "metric": 0.9}
    assert ck.best_checkpoint(tmp_path) == tmp_path / "ckpt-2"
    _save(tmp_path, net, opt, 6, keep_last=2, best_metric=0.1, higher_is_better=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ckpt-2", "ckpt-5", "ckpt-6"]
    _save(tmp_path, net, opt, 6, keep_last=2)  # re-saving the same step replaces it in place
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "ckpt-6"


def test_lower_is_better(tmp_path):
    net, opt = _trained()
    for step, m in {1: 3.0, 2: 1.0, 3: 2.0}.items():
        _save(tmp_path, net, opt, step, keep_last=1, best_metric=m, higher_is_better=False)
    assert ck.best_checkpoint(tmp_path) == tmp_path / "ckpt-2"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ckpt-2", "ckpt-3"]


def test_missing_trainable_key_is_an_error(tmp_path):
    net, opt = _trained()
    d = _save(tmp_path, net, opt, 1)
    bigger = Net()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(ck.CheckpointError, match="missing trainable keys.*extra"):
        ck.load_training_state(d, bigger)
