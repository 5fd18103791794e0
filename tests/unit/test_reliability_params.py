"""Reliability of the params path: out-of-range values, reuse of a run folder with other params, unsafe names.

Each test reproduces a failure found by an attack run (values that crashed late or ran silently wrong, a finished
run reused with another ``lr``, a model name that wrote outside its folder) and pins the refusal: a
``ParamsError`` naming the file, the key and what is allowed, raised before any work.
"""

import json
import shutil

import pytest
import torch
import yaml

from blip2lib.config import ParamsError
from blip2lib.evaluate.__main__ import VQAParams
from blip2lib.train import RESUME_MAY_CHANGE, TrainParams, main, train

torch.set_num_threads(1)


def _yaml(tmp_path, **values):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ---- item 9: range checks in the schema, before any work ----


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("batch_size", 0, "[1, inf)"),  # was ZeroDivisionError
        ("batch_size", -4, "[1, inf)"),  # was a torch error after the model was built
        ("steps", -5, "[1, inf)"),  # exited 0 having trained nothing
        ("grad_accum", 0, "[1, inf)"),  # was KeyError: 'loss'
        ("ckpt_every", -1, "[0, inf) (0 saves only at the end)"),  # saved every step
        ("image_size", 0, "[1, inf)"),  # was a conv error
        ("beta2", 1.0, "[0, 1)"),
        ("lr_layer_decay", 0.0, "(0, 1]"),
        ("seed", -1, "[0, 4294967295] (numpy seeds are 32-bit)"),
    ],
)
def test_out_of_range_train_value_names_file_key_and_range(tmp_path, key, value, allowed):
    path = _yaml(tmp_path, **{key: value})
    with pytest.raises(ParamsError) as err:
        TrainParams.from_yaml(path)
    assert str(err.value) == f"{path}: key '{key}' must be in {allowed}, got {value!r}"


def test_cli_refuses_bad_value_before_creating_the_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = _yaml(tmp_path, model="tiny", train_data="synthetic", batch_size=0, run_dir=str(run_dir))
    assert main(["--params", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: key 'batch_size' must be in [1, inf), got 0"
    assert not run_dir.exists()  # nothing was built or written


def test_in_code_params_are_checked_by_train_and_sentinels_stay_valid(tmp_path):
    with pytest.raises(ParamsError, match=r"TrainParams: key 'grad_accum' must be in \[1, inf\), got 0"):
        train(TrainParams(model="tiny", grad_accum=0), tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # documented zeros keep their meaning: checkpoint/validate only at the end, epoch length from the data
    TrainParams(ckpt_every=0, eval_every=0, steps_per_epoch=0, clip_norm=0.0, keep_last=0).validate_values()
    # evaluation: image_size 0 = the checkpoint's own resolution; batch_size 0 is refused
    assert VQAParams.from_dict({"image_size": 0}, "e.yaml").image_size == 0
    with pytest.raises(ParamsError, match=r"e\.yaml: key 'batch_size' must be in \[1, inf\), got 0"):
        VQAParams.from_dict({"batch_size": 0}, "e.yaml")
    with pytest.raises(ParamsError, match=r"e\.yaml: key 'num_beams' must be in \[1, inf\), got 0"):
        VQAParams.from_dict({"num_beams": 0}, "e.yaml")
    assert VQAParams.from_dict({"num_beams": None}, "e.yaml").num_beams is None  # None: the recipe's value


# ---- item 3: a run folder is never continued with params that change what a step computes ----


def _tiny(**kw):
    base = dict(stage="stage1", model="tiny", train_data="synthetic", val_data="", steps=4, batch_size=4,
                warmup_steps=1, image_size=28, max_txt_len=12, progress=False, ckpt_every=2, keep_last=0,
                eval_at_start=False, lr=1e-3)  # fmt: skip
    return TrainParams(**{**base, **kw})


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(run_dir / f"checkpoints/ckpt-{step}/model.safetensors"))


def test_finished_run_with_other_lr_is_refused_and_more_steps_is_recorded(tmp_path):
    run = tmp_path / "run"
    train(_tiny(), run)
    before = _weights(run, 4)
    with pytest.raises(ParamsError) as err:  # used to exit 0 returning the old weights
        train(_tiny(lr=1e-2, seed=7), run)
    msg = str(err.value)
    assert f"run folder {run} " in msg and "checkpoint ckpt-4" in msg
    assert "lr: 0.001 -> 0.01" in msg and "seed: 42 -> 7" in msg
    assert all(torch.equal(v, _weights(run, 4)[k]) for k, v in before.items())  # nothing was trained
    res = train(_tiny(steps=6, progress=True), run)  # allowed: go on for longer (progress is cosmetic)
    assert res.summary["step"] == 6
    change = {"at_step": 4, "from_checkpoint": "ckpt-4", "changed": {"steps": [4, 6], "progress": [False, True]}}
    manifest = json.loads((run / "checkpoints/ckpt-6/manifest.json").read_text())
    assert manifest["config"]["params_history"] == [change] and manifest["config"]["params"]["steps"] == 6
    assert res.summary["params_history"] == [change]
    with pytest.raises(ParamsError, match="steps: 5 is below the checkpoint's step 6"):
        train(_tiny(steps=5), run)


def test_interrupted_run_resumes_only_with_its_own_params(tmp_path):
    run = tmp_path / "run"
    train(_tiny(), run)
    shutil.rmtree(run / "checkpoints/ckpt-4")  # as if killed between the step-2 and the step-4 checkpoint
    with pytest.raises(ParamsError, match=r"checkpoint ckpt-2.*batch_size: 4 -> 2"):
        train(_tiny(batch_size=2), run)
    res = train(_tiny(), run)  # unchanged params resume, and nothing is recorded as changed
    assert res.summary["step"] == 4 and res.summary["resumed_from"].endswith("ckpt-2")
    assert json.loads((run / "checkpoints/ckpt-4/manifest.json").read_text())["config"]["params_history"] == []


def test_resume_allow_list_is_the_documented_one():
    # a key that changes what a step computes must never be allowed by accident
    assert RESUME_MAY_CHANGE == {"steps", "ckpt_every", "eval_every", "eval_at_start", "keep_last", "progress",
                                 "tensorboard", "num_workers", "max_bad_steps", "smoke_test", "dist_timeout_s",
                                 "cache_max_gib"}  # fmt: skip
    assert not {"lr", "batch_size", "grad_accum", "seed", "train_data", "init_from", "num_gpus"} & RESUME_MAY_CHANGE


# ---- item 14: names from params files never leave their folder ----


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../../../escaped_by_name", "contains a path separator"),
        ("..", "is a relative path, not a name"),
        ("a\\b", "contains a path separator"),
        ("/abs", "contains a path separator"),
        ("", "must be a non-empty string"),
        ("tab\there", "contains a control character"),
        (" padded", "has leading or trailing whitespace"),
        ("x" * 256, "is longer than 255 bytes"),
    ],
)
def test_unsafe_names_are_refused_naming_source_and_key(name, why):
    from blip2lib.paths import safe_name

    with pytest.raises(ParamsError) as err:
        safe_name(name, "checkpoints", "t.yaml")
    assert str(err.value).startswith(f"t.yaml: key 'checkpoints': name {name!r} {why};")
    for ok in ("blip2_opt2.7b", "model-1", ".hidden_but_plain", "x" * 255):
        assert safe_name(ok, "checkpoints") == ok


def test_checkpoint_name_with_dotdot_writes_nothing(tmp_path):
    from blip2lib.workbook.tables import evaluate_checkpoints

    out = tmp_path / "a/b/c/d/run"
    with pytest.raises(ParamsError, match=r"vqa evaluation: key 'checkpoints': name '\.\./\.\./\.\./\.\./escaped"):
        # the good name comes first: it must not be evaluated (and written) before the bad one is refused
        evaluate_checkpoints("vqa", {"good": "tiny", "../../../../escaped_by_name": "tiny"}, out,
                             split="vqa_val_eval", data_root=str(tmp_path / "missing"))  # fmt: skip
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # neither out_dir nor the escaped folder exists


def test_ablation_variant_and_stage_family_names_are_checked(tmp_path):
    from blip2lib.workbook.ablation import run_ablation
    from blip2lib.workbook.schemas import ITGAblationParams, Stage2Params
    from blip2lib.workbook.stages import run_stage

    bad = ITGAblationParams(variants={"ok": {}, "../out": {}})
    with pytest.raises(ParamsError, match=r"key 'variants': name '\.\./out' contains a path separator"):
        run_ablation(bad, tmp_path / "abl")
    with pytest.raises(ParamsError, match=r"key 'llms': name '\.\./t5' contains a path separator"):
        run_stage(Stage2Params(llms=["opt", "../t5"], model="tiny"), tmp_path / "st")
    assert list(tmp_path.iterdir()) == []
