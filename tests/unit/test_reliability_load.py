"""Reliability of checkpoint loading: one grouped error naming the file, never a bare ``size mismatch``.

An attack run found that a checkpoint with one mis-shaped key failed with torch's raw ``size mismatch`` (the missing
and extra keys of the same file unreported), and a truncated safetensors file with ``incomplete metadata`` and no
path. Each test rebuilds such a file and pins the message.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blip2lib import checkpoint as ck
from blip2lib.config import tiny_config
from blip2lib.model import Blip2
from blip2lib.pretrained import LoadError, from_pretrained, save_pretrained_hf

torch.set_num_threads(1)


def _hf_dir(tmp_path):
    torch.manual_seed(0)
    save_pretrained_hf(Blip2(tiny_config("opt")).eval(), tmp_path / "hf", check=False)
    return tmp_path / "hf"


def test_released_checkpoint_reports_mis_shaped_missing_and_unexpected_keys_together(tmp_path):
    d = _hf_dir(tmp_path)
    sd = load_file(d / "model.safetensors")
    assert tuple(sd["query_tokens"].shape) == (1, 4, 32)
    sd["query_tokens"] = torch.zeros(1, 5, 32)  # one query token too many
    del sd["qformer.encoder.layer.0.crossattention.attention.key.weight"]
    sd["qformer.extra.weight"] = torch.zeros(1)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LoadError) as err:  # was: RuntimeError "size mismatch for query_tokens" only
        from_pretrained(d)
    assert str(err.value) == (
        f"{d}: hf checkpoint does not fit: mis-shaped {{'query_tokens': 'file (1, 5, 32) vs model (1, 4, 32)'}} "
        "missing {'qformer': ['qformer.encoder.layer.0.crossattention.attention.key.weight']} "
        "unexpected {'qformer': ['qformer.extra.weight']}"
    )
    model, rep = from_pretrained(d, strict=False, return_report=True)  # non-strict: reported, the model keeps its own
    assert rep.mis_shaped == {"query_tokens": "file (1, 5, 32) vs model (1, 4, 32)"}
    assert rep.summary()["file"] == str(d) and tuple(model.query_tokens.shape) == (1, 4, 32)


def test_truncated_safetensors_names_the_file(tmp_path):
    d = _hf_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # cut inside the header (was: "incomplete metadata", no path)
    with pytest.raises(LoadError, match=rf"^{f}: unreadable safetensors file \(truncated or corrupt\?\): "):
        from_pretrained(d)


def _save(tmp_path, model):
    return ck.save_training_state(tmp_path / "ckpts", model=model, optimizer=None, scheduler_state=None, scaler=None,
                                  step=1, data_state=None, extra=None, config={})  # fmt: skip


def test_training_checkpoint_lists_every_gap_in_one_load_error(tmp_path):
    d = _save(tmp_path, nn.ModuleDict({"a": nn.Linear(2, 3), "b": nn.Linear(3, 1)}))
    other = nn.ModuleDict({"a": nn.Linear(2, 4), "c": nn.Linear(1, 1)})  # a: wider; b: gone; c: new
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ck.CheckpointError) as err:  # was: RuntimeError "size mismatch for a.weight"
        ck.load_training_state(d, other)
    assert isinstance(err.value, LoadError)  # one error type for every load failure
    assert str(err.value) == (
        f"{d}: missing trainable keys ['c.bias', 'c.weight'], unexpected keys ['b.bias', 'b.weight'], mis-shaped keys "
        "{'a.bias': 'file (3,) vs model (4,)', 'a.weight': 'file (3, 2) vs model (4, 2)'}"
    )
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_truncated_training_files_name_their_path(tmp_path):
    d = _save(tmp_path, nn.Linear(2, 2))
    weights, state = d / ck.MODEL_FILE, d / ck.STATE_FILE
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ck.CheckpointError, match=rf"^{weights}: sha256 mismatch"):  # verified: caught by the digest
        ck.load_training_state(d, nn.Linear(2, 2))
    with pytest.raises(ck.CheckpointError, match=rf"^{weights}: unreadable safetensors file"):
        ck.load_training_state(d, nn.Linear(2, 2), verify=False)
    d = _save(tmp_path / "2", nn.Linear(2, 2))
    state = d / ck.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match=rf"^{state}: unreadable \(truncated or corrupt\?\): "):
        ck.load_training_state(d, nn.Linear(2, 2), verify=False)


def test_vision_weights_and_init_from_name_their_file(tmp_path):
    from blip2lib.assemble import load_init
    from blip2lib.vision import build_vision_tower, load_vision_weights

    cfg = tiny_config().vision
    tower = build_vision_tower(cfg)
    vit = tmp_path / "vit.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 16)}, str(vit))  # EVA name, half the tiny width 32
    with pytest.raises(LoadError) as err:  # was: RuntimeError "size mismatch for cls_token", no file
        load_vision_weights(tower, vit, cfg)
    assert str(err.value) == (
        f"{vit}: vision weights do not fit the eva tower (width 32, image size 28): mis-shaped "
        "{'cls_token': 'file (1, 1, 16) vs model (1, 1, 32)'}"
    )
    vit.write_bytes(vit.read_bytes()[:20])
    with pytest.raises(LoadError, match=rf"^{vit}: unreadable safetensors file"):
        load_vision_weights(tower, vit, cfg)
    with pytest.raises(LoadError, match=rf"^{vit}: unreadable safetensors file"):  # init_from a truncated file
        load_init(tower, str(vit))
