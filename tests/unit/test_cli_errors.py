"""Every command answers a user mistake with one line on stderr and exit status 2; ``-v`` shows the traceback.

Each test makes the mistake a user makes (a file that does not exist, an unusable output folder, a wrong key) and
asserts the exact status and that stderr is a single ``error: ...`` line naming the offending path or key. In-process
calls of each ``main`` keep this cheap; ``python -m blip2lib`` itself is timed in ``test_cli_index.py``.
"""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from blip2lib.config import ParamsError
from blip2lib.data import FORMATS
from blip2lib.errors import UserError, one_line, run_guarded


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_run_guarded_maps_user_errors_to_2_and_keeps_bugs(capsys):
    def bad_params():
        raise ParamsError("f.yaml: key 'lr' must be float\n  (got 'fast')")

    assert run_guarded(bad_params) == 2
    assert _one_error_line(capsys.readouterr().err) == "error: f.yaml: key 'lr' must be float | (got 'fast')"
    with pytest.raises(ParamsError):
        run_guarded(bad_params, verbose=True)  # -v: the traceback
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        run_guarded(lambda: {}["x"])
    assert issubclass(ParamsError, UserError)
    err = FileNotFoundError(2, "No such file or directory", "/nope/x.pth")
    assert one_line(err) == "[Errno 2] No such file or directory: '/nope/x.pth'"


def test_convert_missing_checkpoint(capsys, tmp_path):
    from blip2lib.convert.__main__ import main

    assert main(["lavis-to-hf", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"checkpoint '{tmp_path / 'nope.pth'}' does not exist" in line
    assert not (tmp_path / "o").exists()


def test_toy_build_into_an_unusable_folder(capsys, tmp_path):
    from blip2lib.toy.__main__ import main

    (tmp_path / "file").write_text("x")  # a file where the world's parent folder should be
    assert main(["build", "--size", "tiny", "--out", str(tmp_path / "file" / "world")]) == 2
    assert str(tmp_path / "file") in _one_error_line(capsys.readouterr().err)


def test_train_missing_params_file_and_unknown_key(capsys, tmp_path):
    from blip2lib.train import main

    assert main(["--params", str(tmp_path / "nope.yaml")]) == 2
    assert str(tmp_path / "nope.yaml") in _one_error_line(capsys.readouterr().err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: stage1\nmodel: tiny\nlearning_rate: 0.1\n")
    assert main(["--params", str(bad)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "'learning_rate'" in line


def _vqa_tree(root, n=3, corrupt=()):
    entries = []
    for i in range(n):
        img = f"val2014/COCO_val2014_{i:012d}.jpg"
        (root / "coco/images/val2014").mkdir(parents=True, exist_ok=True)
        if i in corrupt:
            (root / "coco/images" / img).write_bytes(b"not a jpeg")
        else:
            pixels = np.random.default_rng(i).integers(0, 255, (28, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "coco/images" / img)
        entries.append({"question_id": i, "question": "What colour?", "image": img, "answer": ["red"] * 10})
    path = root / FORMATS["vqa_val_eval"]["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def _eval_params(tmp_path, **kw):
    values = {"checkpoint": "tiny", "data_root": str(tmp_path / "data"), "split": "vqa_val_eval", "batch_size": 2,
              "progress": False, "num_beams": 1, "max_new_tokens": 2, "out_dir": str(tmp_path / "out")}  # fmt: skip
    values.update(kw)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_evaluate_reads_the_annotations_before_loading_the_model(capsys, tmp_path, monkeypatch):
    import blip2lib.evaluate.__main__ as cli

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the annotation file was checked")

    monkeypatch.setattr(cli, "load_model", must_not_load)
    assert cli.main(["vqa", "--params", str(_eval_params(tmp_path))]) == 2  # no annotation file at all
    line = _one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "data") in line


def test_evaluate_exits_3_when_images_were_skipped_unless_allowed(capsys, tmp_path):
    from blip2lib.evaluate.__main__ import main

    _vqa_tree(tmp_path / "data", corrupt=(1,))
    params = str(_eval_params(tmp_path))
    assert main(["vqa", "--params", params]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["counts"]["complete"] is False
    assert _one_error_line(captured.err) == (
        "error: incomplete evaluation: 1 unreadable sample(s) were skipped and excluded from the scores "
        "(listed in result.json); --allow-incomplete accepts that"
    )
    assert main(["vqa", "--params", params, "--allow-incomplete"]) == 0


def test_data_prepare_from_a_missing_folder(capsys, tmp_path):
    from blip2lib.data.__main__ import main

    assert main(["prepare", "coco_karpathy", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: --src {tmp_path / 'nope'} is not a folder"
