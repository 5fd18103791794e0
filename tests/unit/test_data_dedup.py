"""De-duplication report: by COCO id and by file hash; CLI round trip."""

import json

from PIL import Image

from blip2lib.data import dedup_report, image_paths
from blip2lib.data.__main__ import main
from blip2lib.data.dedup import coco_id


def test_coco_id_parsing():
    assert coco_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert coco_id("train2014/COCO_train2014_000000000009.jpg") == 9
    assert coco_id("val/COCO_val_000000100001.jpg") == 100001  # toy-world names (no year)
    assert coco_id("flickr30k-images/1000092795.jpg") is None


def test_report_by_coco_id_counts_cross_folder_matches():
    pre = ["train2014/COCO_train2014_000000000009.jpg", "val2014/COCO_val2014_000000000042.jpg", "VG_100K/1.jpg"]
    ev = {"test": ["val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000043.jpg"]}
    rep = dedup_report(pre, ev, by="coco_id")
    assert rep["n_pretrain"] == 3 and rep["n_pretrain_keyed"] == 2
    assert rep["splits"]["test"] == {
        "n_eval": 2,
        "n_overlap": 1,
        "examples": [["val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000042.jpg"]],
    }


def test_report_by_hash_finds_renamed_copies(tmp_path, capsys):
    (tmp_path / "pre").mkdir()
    (tmp_path / "ev").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "pre" / "web_123.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "pre" / "web_456.png")
    (tmp_path / "ev" / "x.png").write_bytes((tmp_path / "pre" / "web_123.png").read_bytes())
    Image.new("RGB", (4, 4), (7, 7, 7)).save(tmp_path / "ev" / "y.png")
    pre_ann = tmp_path / "pre.json"
    pre_ann.write_text(json.dumps([{"image": "web_123.png", "caption": "a"}, {"image": "web_456.png", "caption": "b"}]))
    ev_ann = tmp_path / "ev.json"
    ev_ann.write_text(json.dumps([{"image": "x.png", "caption": ["c"]}, {"image": "y.png", "caption": ["d"]}]))
    assert image_paths(pre_ann) == ["web_123.png", "web_456.png"]
    rc = main(
        ["dedup", "--pretrain", str(pre_ann), "--eval", f"karpathy_test={ev_ann}", "--by", "hash",
         "--pretrain-root", str(tmp_path / "pre"), "--eval-root", str(tmp_path / "ev")]
    )  # fmt: skip
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["splits"]["karpathy_test"]["n_overlap"] == 1
    assert rep["splits"]["karpathy_test"]["examples"] == [["web_123.png", "x.png"]]


def test_formats_cli_prints_json(capsys):
    assert main(["formats"]) == 0
    formats = json.loads(capsys.readouterr().out)
    assert formats["coco_karpathy_train"]["fields"]["caption"] == "str"
