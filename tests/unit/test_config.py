from dataclasses import dataclass

import pytest

from blip2lib.config import PRESETS, Params, ParamsError, config_from_dict, config_to_dict, tiny_config


@dataclass
class _DemoParams(Params):
    lr: float = 1e-4
    steps: int = 10
    prompt: str = ""
    datasets: list[str] | None = None


def test_params_yaml_roundtrip_and_int_to_float(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("lr: 1\nsteps: 3\ndatasets: [a, b]\n")
    got = _DemoParams.from_yaml(p)
    assert got.lr == 1.0 and isinstance(got.lr, float) and got.steps == 3 and got.datasets == ["a", "b"]
    assert got.seed == 42 and got.run_dir == ""


def test_params_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("lr: 1.0e-4\nlearning_rate: 3\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: unknown key 'learning_rate'"):
        _DemoParams.from_yaml(p)


def test_params_duplicate_key_names_file_key_and_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("lr: 1.0e-4\nsteps: 3\n# a comment\nlr: 2.0e-4\n")
    with pytest.raises(ParamsError, match=r"dup\.yaml: invalid YAML: key 'lr' given twice \(first on line 1\)") as e:
        _DemoParams.from_yaml(p)
    assert "line 4" in str(e.value)
    p.write_text("lr: 1.0e-4\nsteps: 3\n")
    assert _DemoParams.from_yaml(p).steps == 3


@pytest.mark.parametrize(
    "text,key",
    [
        ("steps: 1.5\n", "steps"),
        ("steps: true\n", "steps"),
        ("prompt: 3\n", "prompt"),
        ("datasets: [1, 2]\n", "datasets"),
        ("smoke_test: 1\n", "smoke_test"),
    ],
)
def test_params_wrong_type_names_key(tmp_path, text, key):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(ParamsError, match=rf"t\.yaml: key '{key}' must be"):
        _DemoParams.from_yaml(p)


def test_params_not_a_mapping(tmp_path):
    p = tmp_path / "l.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        _DemoParams.from_yaml(p)


def test_presets_and_dict_roundtrip():
    assert set(PRESETS) == {
        "vitg",
        "vitl",
        "vitg_opt2.7b",
        "vitg_opt6.7b",
        "vitg_flant5xl",
        "vitg_flant5xxl",
        "vitl_opt2.7b",
        "vitl_flant5xl",
    }
    assert PRESETS["vitl"].qformer.encoder_hidden_size == 1024 and PRESETS["vitg"].vision.depth == 39
    assert PRESETS["vitl"].vision.depth == 23 and PRESETS["vitg_opt2.7b"].qformer.use_text_input is False
    for cfg in (PRESETS["vitg_flant5xl"], tiny_config("opt"), tiny_config()):
        assert config_from_dict(config_to_dict(cfg)) == cfg


# ---- training params: the schedule / precision keys (blip2lib.train.TrainParams) ----


def test_train_params_schedule_and_precision_keys_are_validated():
    from blip2lib.train import TrainParams

    with pytest.raises(ParamsError, match="unknown key 'schedule'"):  # renamed to lr_schedule
        TrainParams.from_dict({"schedule": "step"}, "f.yaml")
    for key, bad in [("lr_schedule", "cosine"), ("vit_precision", "half"), ("amp", "fp8")]:
        with pytest.raises(ValueError, match=f"{key} must be"):
            TrainParams(**{key: bad}).validate_values()
    ok = TrainParams(lr_schedule="lavis_epoch", vit_precision="fp16_lavis", amp="fp16").validate_values()
    assert (ok.lr_schedule, ok.vit_precision, ok.amp, ok.apply_layer_decay) == (
        "lavis_epoch",
        "fp16_lavis",
        "fp16",
        True,
    )


def _tiny(**kw):
    from blip2lib.train import TrainParams

    base = dict(stage="stage1", model="tiny", train_data="synthetic", val_data="", image_size=28, max_txt_len=12,
                batch_size=32, progress=False, eval_at_start=False, lr=1e-3, min_lr=1e-4, warmup_lr=1e-6)  # fmt: skip
    return TrainParams(**{**base, **kw})


@pytest.mark.parametrize("accum", [1, 2])
def test_lavis_epoch_run_takes_its_epoch_from_the_data_and_logs_lavis_rates(tmp_path, accum):
    import json
    import math

    from blip2lib.train import train

    # 256 synthetic samples / batch 32 = 8 micro-batches per epoch; 3 epochs; warmup 5 micro-batches.
    train(_tiny(lr_schedule="lavis_epoch", steps=24 // accum, grad_accum=accum, warmup_steps=5), tmp_path)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    want = []
    for e in range(3):  # LAVIS: the rate set before the last micro-batch of each accumulation group is used
        for i in range(accum - 1, 8, accum):
            cos = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * e / 3))
            want.append(min(1e-3, 1e-6 + (1e-3 - 1e-6) * i / 5) if e == 0 else cos)
    assert lrs == pytest.approx(want, rel=1e-12, abs=0)


def test_lavis_epoch_run_must_be_whole_epochs(tmp_path):
    from blip2lib.train import train

    with pytest.raises(ValueError, match="lr_schedule lavis_epoch: steps × grad_accum = 12 micro-batches"):
        train(_tiny(lr_schedule="lavis_epoch", steps=12), tmp_path)


@pytest.mark.parametrize(
    ("freeze", "key", "want"), [(True, "", "fp32"), (True, "fp16", "fp16"), (False, "bf16", "fp32")]
)
def test_vit_precision_reaches_the_model_config(freeze, key, want):
    import torch

    from blip2lib.assemble import build_model_and_task

    model, _, _ = build_model_and_task(_tiny(freeze_vit=freeze, vit_precision=key), torch.device("cpu"))
    assert model.config.vision.precision == want  # tiny: fp32 by default; a trained tower is always fp32
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # CPU: no cast whatever the mode


def test_pretraining_defaults_are_the_papers_not_the_lavis_yamls():
    """Paper §3.4: AdamW (0.9, 0.98), wd 0.05, peak 1e-4, 2k warm-up, cosine per step; min LR 1e-5 / 5e-5 (stage 1 / 2).

    LAVIS's shipped pre-training yamls use β2 0.999 and a 5k warm-up (stage 1); docs/fidelity.md lists both.
    """
    from blip2lib.workbook.schemas import Stage1Params, Stage2Params

    for schema, min_lr in ((Stage1Params, 1e-5), (Stage2Params, 5e-5)):
        p = schema()
        got = (p.beta2, p.weight_decay, p.lr, p.warmup_steps, p.min_lr, p.lr_schedule, p.apply_layer_decay)
        assert got == (0.98, 0.05, 1e-4, 2000, min_lr, "step", True), schema.__name__


def test_params_errors_name_types_in_words_and_suggest_the_nearest_key():
    """``from_dict`` (every params file, every CLI) says ``int``, not ``<class 'int'>``, and proposes a close key."""
    from blip2lib.config import Params, ParamsError

    with pytest.raises(ParamsError) as err:
        Params.from_dict({"sed": 3}, source="f.yaml")
    assert str(err.value) == "f.yaml: unknown key 'sed' for Params (did you mean 'seed'?)"
    with pytest.raises(ParamsError) as err:
        Params.from_dict({"seed": "three"}, source="f.yaml")
    assert str(err.value) == "f.yaml: key 'seed' must be int, got str 'three'"
    with pytest.raises(ParamsError, match=r"unknown key .zzzz. for Params \(known keys: data_root, model_scale, "):
        Params.from_dict({"zzzz": 1}, source="f.yaml")
