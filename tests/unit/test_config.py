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
