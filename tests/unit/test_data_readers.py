"""Official-format fixtures → ``prepare`` → readers: counts, fields, sample keys (docs/paper_map.md §6.1)."""

import json

import pytest
import torch
from PIL import Image

from blip2lib.data import (
    FORMATS,
    CaptionDataset,
    CaptionEvalDataset,
    GQAEvalDataset,
    NoCapsDataset,
    RetrievalDataset,
    RetrievalEvalDataset,
    VGCaptionDataset,
    VQADataset,
    VQAEvalDataset,
    load_annotations,
    load_caption_gt,
    pre_question,
    prepare,
    validate_entry,
)
from blip2lib.data.__main__ import main


def _img(path, color=(200, 10, 10), size=(12, 9)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _dump(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _karpathy_coco():
    def image(cocoid, split, folder, n_sent=5):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        sents = [{"raw": f"A Photo {cocoid}-{j}. ", "tokens": [], "imgid": cocoid, "sentid": j} for j in range(n_sent)]
        return {
            "filepath": folder,
            "filename": name,
            "imgid": cocoid,
            "split": split,
            "sentences": sents,
            "cocoid": cocoid,
        }

    images = [
        image(1, "train", "train2014"),
        image(2, "restval", "val2014"),
        image(3, "val", "val2014"),
        image(4, "test", "val2014", n_sent=6),
        image(5, "test", "val2014"),
    ]
    return {"images": images, "dataset": "coco"}


@pytest.fixture
def coco_root(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    _dump(_karpathy_coco(), src / "caption_datasets" / "dataset_coco.json")  # one folder deep, as unzipped
    result = prepare("coco_karpathy", src, out)
    for folder, cocoid in [("train2014", 1), ("val2014", 2), ("val2014", 3), ("val2014", 4), ("val2014", 5)]:
        _img(out / "coco/images" / folder / f"COCO_{folder}_{cocoid:012d}.jpg")
    return out, result


def test_prepare_coco_karpathy_counts_and_size_warnings(coco_root):
    out, result = coco_root
    assert result["counts"] == {
        "train images": 2,  # train + restval
        "train captions": 10,
        "val images": 1,
        "val captions": 5,
        "test images": 2,
        "test captions": 11,
    }
    assert "coco_karpathy: test images: expected 5,000, found 2 (difference -4,998)" in result["warnings"]
    assert "coco_karpathy: test captions: expected 25,010, found 11 (difference -24,999)" in result["warnings"]
    for name in ("coco_karpathy_train", "coco_karpathy_val", "coco_karpathy_test", "coco_karpathy_test_gt"):
        assert (out / FORMATS[name]["file"]).is_file()


def test_every_written_file_matches_formats(coco_root):
    out, _ = coco_root
    for name in ("coco_karpathy_train", "coco_karpathy_val", "coco_karpathy_test"):
        for i, entry in enumerate(json.loads((out / FORMATS[name]["file"]).read_text())):
            validate_entry(entry, FORMATS[name]["fields"], f"{name}[{i}]")


def test_caption_train_dataset_keeps_string_ids(coco_root):
    out, _ = coco_root
    ds = CaptionDataset(out / "coco/images", out / FORMATS["coco_karpathy_train"]["file"], text_processor=str.lower)
    assert len(ds) == 10
    s = ds[0]
    assert set(s) == {"image", "text_input", "image_id"}
    assert s["text_input"] == "a photo 1-0."  # raw stripped by prepare, processed by the given processor
    assert s["image_id"] == "coco_1" and isinstance(s["image"], Image.Image) and s["image"].mode == "RGB"
    assert ds.annotation[7]["instance_id"] == "7"


def test_caption_eval_dataset_and_gt_agree_on_ids(coco_root):
    out, _ = coco_root
    ds = CaptionEvalDataset(out / "coco/images", out / FORMATS["coco_karpathy_test"]["file"])
    gt = load_caption_gt(out / FORMATS["coco_karpathy_test_gt"]["file"])
    assert [ds[i]["image_id"] for i in range(len(ds))] == [4, 5] == sorted(gt)
    assert set(ds[0]) == {"image", "image_id", "instance_id"}
    assert len(gt[4]) == 6 and gt[5][0] == "A Photo 5-0."


def test_retrieval_datasets(coco_root):
    out, _ = coco_root
    train = RetrievalDataset(out / "coco/images", out / FORMATS["coco_karpathy_train"]["file"])
    ids = [train[i]["image_id"] for i in range(len(train))]
    assert ids == [0] * 5 + [1] * 5 and all(type(i) is int for i in ids)  # dense integer index (docs/paper_map.md §4.3)
    assert set(train[0]) == {"image", "text_input", "image_id", "instance_id"}

    ev = RetrievalEvalDataset(
        out / "coco/images", out / FORMATS["coco_karpathy_test"]["file"], text_processor=str.upper
    )
    assert len(ev.text) == 11 and len(ev.image) == 2 and ev.text[0] == "A PHOTO 4-0."
    # brute-force the maps from the raw file
    raw = json.loads((out / FORMATS["coco_karpathy_test"]["file"]).read_text())
    t = 0
    for i, entry in enumerate(raw):
        for _ in entry["caption"]:
            assert ev.txt2img[t] == i and t in ev.img2txt[i]
            t += 1
    assert ev.img2txt == {0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 8, 9, 10]}
    assert set(ev[1]) == {"image", "index"} and ev[1]["index"] == 1


def test_flickr_prepare_and_retrieval_eval(tmp_path):
    imgs = [
        {"filename": f"{n}.jpg", "imgid": n, "split": s, "sentences": [{"raw": f"c{n}{j}"} for j in range(5)]}
        for n, s in [(100, "train"), (101, "val"), (102, "test"), (103, "test")]
    ]
    _dump({"images": imgs, "dataset": "flickr30k"}, tmp_path / "src/dataset_flickr30k.json")
    result = prepare("flickr30k", tmp_path / "src", tmp_path / "data")
    assert result["counts"]["test images"] == 2 and result["counts"]["test captions"] == 10
    assert result["warnings"] == [
        "flickr30k: test images: expected 1,000, found 2 (difference -998)",
        "flickr30k: test captions: expected 5,000, found 10 (difference -4,990)",
    ]
    train = json.loads((tmp_path / "data" / FORMATS["flickr30k_train"]["file"]).read_text())
    assert train[0] == {"image": "flickr30k-images/100.jpg", "caption": "c1000", "image_id": "100"}
    ev = RetrievalEvalDataset(tmp_path / "data/flickr30k/images", tmp_path / "data" / FORMATS["flickr30k_test"]["file"])
    assert ev.image == ["flickr30k-images/102.jpg", "flickr30k-images/103.jpg"] and len(ev.txt2img) == 10


def _vqa_official(src, subtype, qids, with_answers=True, prefix="v2_", qprefix="v2_OpenEnded_mscoco_"):
    questions = {
        "data_subtype": subtype,
        "questions": [{"image_id": 7 + q, "question": f"What (color) is #{q}?", "question_id": q} for q in qids],
    }
    _dump(questions, src / f"{qprefix}{subtype}_questions.json")
    if with_answers:
        answers = ["yes"] * 6 + ["no"] * 3 + ["maybe"]
        anns = [
            {
                "question_id": q,
                "image_id": 7 + q,
                "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers)],
            }
            for q in qids
        ]
        _dump({"annotations": anns}, src / f"{prefix}mscoco_{subtype}_annotations.json")


def test_vqav2_prepare_and_readers(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    _vqa_official(src, "train2014", [1, 2])
    _vqa_official(src, "val2014", [10, 11, 12])
    _vqa_official(src, "test-dev2015", [20], with_answers=False)
    result = prepare("vqav2", src, out)
    assert result["counts"] == {"train questions": 2, "val questions": 3, "test-dev questions": 1}
    assert "vqav2: val questions: expected 214,354, found 3 (difference -214,351)" in result["warnings"]
    assert (out / "coco/annotations/v2_mscoco_val2014_annotations.json").is_file()  # official copy for the scorer
    _img(out / "coco/images/train2014/COCO_train2014_000000000008.jpg")
    _img(out / "coco/images/val2014/COCO_val2014_000000000017.jpg")
    _img(out / "coco/images/test2015/COCO_test2015_000000000027.jpg")

    train = VQADataset(out / "coco/images", out / FORMATS["vqa_train"]["file"], text_processor=pre_question)
    s = train[0]
    assert set(s) == {"image", "text_input", "answers", "weights"}
    assert s["text_input"] == "what color is 1?"
    assert s["answers"] == ["yes", "no", "maybe"] and s["weights"] == pytest.approx([0.6, 0.3, 0.1])

    val = VQAEvalDataset(out / "coco/images", out / FORMATS["vqa_val_eval"]["file"])
    assert (
        len(val) == 3
        and val[0]["question_id"] == 10
        and set(val[0])
        == {
            "image",
            "text_input",
            "question_id",
            "instance_id",
        }
    )
    test = VQAEvalDataset(out / "coco/images", out / FORMATS["vqa_test"]["file"])
    assert test.annotation[0]["image"] == "test2015/COCO_test2015_000000000027.jpg"
    assert test[0]["image"] is not None and "answer" not in test.annotation[0]

    # the official pair can be read directly too (answers merged by question_id)
    direct = VQADataset(
        out / "coco/images",
        [src / "v2_OpenEnded_mscoco_val2014_questions.json", src / "v2_mscoco_val2014_annotations.json"],
    )
    assert [a["question_id"] for a in direct.annotation] == [10, 11, 12] and len(direct.annotation[0]["answer"]) == 10


def test_okvqa_prepare(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    _vqa_official(src, "train2014", [1], prefix="", qprefix="OpenEnded_mscoco_")
    _vqa_official(src, "val2014", [5, 6], prefix="", qprefix="OpenEnded_mscoco_")
    result = prepare("okvqa", src, out)
    assert result["counts"] == {"train questions": 1, "val questions": 2}
    entries = load_annotations(out / FORMATS["okvqa_val_eval"]["file"], FORMATS["okvqa_val_eval"]["fields"])
    assert entries[0]["dataset"] == "okvqa" and entries[1]["image"] == "val2014/COCO_val2014_000000000013.jpg"


def test_gqa_official_and_prepared(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    official = {
        f"20{i}": {"imageId": f"n{i}", "question": f"Is it red{i}?", "answer": "no", "fullAnswer": "No."}
        for i in range(3)
    }
    _dump(official, src / "testdev_balanced_questions.json")
    result = prepare("gqa", src, out)
    assert result["warnings"] == ["gqa: test-dev questions: expected 12,578, found 3 (difference -12,575)"]
    for i in range(3):
        _img(out / f"gqa/images/n{i}.jpg")
    for ann in (out / FORMATS["gqa_testdev"]["file"], src / "testdev_balanced_questions.json"):  # LAVIS and official
        ds = GQAEvalDataset(out / "gqa/images", ann, text_processor=pre_question)
        s = ds[2]
        assert s["question_id"] == "202" and s["answer"] == "no" and s["text_input"] == "is it red2?"
        assert set(s) == {"image", "text_input", "answer", "question_id", "instance_id"}


def test_nocaps_domains_and_gt(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    domains = ["in-domain", "near-domain", "out-domain"]
    images = [{"id": i, "file_name": f"{i:04x}.jpg", "domain": d, "open_images_id": "x"} for i, d in enumerate(domains)]
    anns = [{"image_id": i, "caption": f"cap {i} {j}", "id": 10 * i + j} for i in range(3) for j in range(2)]
    _dump({"images": images, "annotations": anns, "info": {}}, src / "nocaps_val_4500_captions.json")
    result = prepare("nocaps", src, out)
    assert result["counts"] == {"val images": 3, "val captions": 6}
    assert result["warnings"] == ["nocaps: val images: expected 4,500, found 3 (difference -4,497)"]
    for img in images:
        _img(out / "nocaps/images/val" / img["file_name"])
    ds = NoCapsDataset(out / "nocaps/images", out / FORMATS["nocaps_val"]["file"])
    assert [ds[i]["domain"] for i in range(3)] == domains and ds[1]["image_id"] == 1
    assert set(ds[0]) == {"image", "image_id", "instance_id", "domain"}
    assert load_caption_gt(out / FORMATS["nocaps_val_gt"]["file"])[2] == ["cap 2 0", "cap 2 1"]
    direct = NoCapsDataset(out / "nocaps/images", src / "nocaps_val_4500_captions.json")  # official file directly
    assert direct.annotation[2]["image"] == "val/0002.jpg" and direct.annotation[2]["domain"] == "out-domain"


def test_vg_prepare_dedups_phrases_and_picks_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    regions = [
        {"id": 1, "regions": [{"phrase": "A red car "}, {"phrase": "a red car"}, {"phrase": "tree"}]},
        {"id": 2, "regions": [{"phrase": "sky"}]},
    ]
    _dump(regions, src / "region_descriptions.json")
    _dump([{"image_id": 2, "url": "https://x/VG_100K_2/2.jpg"}], src / "image_data.json")
    assert prepare("vg", src, out)["counts"] == {"images": 2, "captions": 3}
    _img(out / "vg/images/VG_100K/1.jpg")
    _img(out / "vg/images/VG_100K_2/2.jpg")
    ds = VGCaptionDataset(out / "vg/images", out / FORMATS["vg_caption"]["file"])
    assert [a["caption"] for a in ds.annotation] == ["A red car", "tree", "sky"]
    assert ds.annotation[2]["image"] == "VG_100K_2/2.jpg" and set(ds[2]) == {"image", "text_input"}


def test_transform_applied(coco_root):
    from blip2lib.data import image_eval_transform

    out, _ = coco_root
    ds = CaptionEvalDataset(out / "coco/images", out / FORMATS["coco_karpathy_val"]["file"], image_eval_transform(16))
    assert ds[0]["image"].shape == (3, 16, 16) and ds[0]["image"].dtype == torch.float32


def test_cli_prepare_warns_with_difference(tmp_path, capsys):
    _dump(_karpathy_coco(), tmp_path / "src/dataset_coco.json")
    assert main(["prepare", "coco_karpathy", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "data")]) == 0
    captured = capsys.readouterr()
    assert "WARNING coco_karpathy: test images: expected 5,000, found 2 (difference -4,998)" in captured.err
    assert "coco_karpathy: test captions: 11" in captured.out


def test_cli_prepare_missing_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main(["prepare", "coco_karpathy", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err  # one line, no traceback
    assert err.startswith("error: ") and "dataset_coco.json not found" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="dataset_coco.json not found"):  # -v: the traceback
        main(["prepare", "coco_karpathy", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "data"), "-v"])


def test_prepare_link_images(tmp_path):
    _dump(_karpathy_coco(), tmp_path / "src/dataset_coco.json")
    _img(tmp_path / "src/val2014/COCO_val2014_000000000003.jpg")
    result = prepare("coco_karpathy", tmp_path / "src", tmp_path / "data", link_images=True)
    assert result["linked"] == [str(tmp_path / "data/coco/images/val2014")]
    assert (tmp_path / "data/coco/images/val2014/COCO_val2014_000000000003.jpg").is_file()


def test_image_cache_decodes_each_path_once(coco_root, monkeypatch):
    import blip2lib.data.readers as readers_mod

    out, _ = coco_root
    loads: list[str] = []
    real = readers_mod.load_image
    monkeypatch.setattr(readers_mod, "load_image", lambda p, log=None: loads.append(str(p)) or real(p, log))
    ds = CaptionDataset(out / "coco/images", out / FORMATS["coco_karpathy_train"]["file"], transform=lambda im: im.size)
    plain = [ds[i]["image"] for i in range(len(ds))]
    n_plain = len(loads)
    ds.image_cache = {}
    first = [ds[i]["image"] for i in range(len(ds))]
    again = [ds[i]["image"] for i in range(len(ds))]
    paths = {a["image"] for a in ds.annotation}
    assert first == plain == again and n_plain == len(ds)
    assert len(loads) - n_plain == len(paths) < len(ds)  # one decode per distinct image, captions share it
    assert set(ds.image_cache) == paths


def test_cache_images_needs_fixed_images_and_annotation_files():
    from blip2lib.assemble import _train_dataset
    from blip2lib.train import TrainParams

    with pytest.raises(ValueError, match="cache_images needs fixed images"):
        TrainParams(stage="stage1", cache_images=True, augment="paper").validate_values()
    params = TrainParams(stage="stage1", cache_images=True, augment="none", train_data="synthetic")
    with pytest.raises(ValueError, match="cache_images works with annotation-file datasets"):
        _train_dataset(params, {}, None)
