"""Bad images are skipped and counted; bad annotation/manifest lines fail at construction with file:line."""

import io
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2lib.data import (
    AnnotationError,
    BadSampleLog,
    CaptionDataset,
    Collate,
    ManifestDataset,
    VQAEvalDataset,
    collate_samples,
    image_eval_transform,
    load_image,
    read_manifest,
)


def _jpeg_bytes(color=(10, 200, 30), size=(16, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        (d / f"ok{i}.jpg").write_bytes(_jpeg_bytes((40 * i, 20, 20)))
    full = _jpeg_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "not_an_image.jpg").write_text("hello")
    Image.new("L", (5, 5), 128).save(d / "gray.png")
    return d


def test_load_image_variants(image_dir):
    log = BadSampleLog()
    assert load_image(image_dir / "ok0.jpg", log).mode == "RGB"
    assert load_image(image_dir / "gray.png", log).mode == "RGB"  # converted to RGB
    assert load_image(image_dir / "truncated.jpg", log) is None
    assert load_image(image_dir / "missing.jpg", log) is None
    assert load_image(image_dir / "not_an_image.jpg", log) is None
    pending = log.drain()
    assert [p.rsplit("/", 1)[-1] for p, _ in pending] == ["truncated.jpg", "missing.jpg", "not_an_image.jpg"]
    assert "truncated" in pending[0][1].lower() and "FileNotFoundError" in pending[1][1]
    assert log.drain() == [] and log.total == 0  # record only queues; absorb counts


def _write_manifest(tmp_path, names):
    path = tmp_path / "imgs" / "manifest.jsonl"
    path.write_text("".join(json.dumps({"image": n, "text": f"Caption {n}."}) + "\n" for n in names))
    return path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_skipped_and_counted_through_loader(tmp_path, image_dir, num_workers):
    names = ["ok0.jpg", "truncated.jpg", "ok1.jpg", "missing.jpg", "ok2.jpg", "ok3.jpg", "not_an_image.jpg"]
    log = BadSampleLog()
    ds = ManifestDataset(_write_manifest(tmp_path, names), transform=image_eval_transform(8), bad_log=log)
    loader = DataLoader(ds, batch_size=2, num_workers=num_workers, collate_fn=Collate(log))
    texts, sizes = [], []
    for batch in loader:
        log.absorb(batch)
        sizes.append(batch["batch_size"])
        if batch["batch_size"]:
            assert batch["image"].shape == (batch["batch_size"], 3, 8, 8)
            texts += batch["text_input"]
    assert texts == [f"Caption {n}." for n in names if n.startswith("ok")]
    assert sizes == [1, 1, 2, 0]  # the last batch (one bad sample) is empty, not an error
    assert log.total == 3
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in log.paths) == ["missing.jpg", "not_an_image.jpg", "truncated.jpg"]
    assert log.state_dict()["total"] == 3


def test_collate_stacks_keeps_lists_and_flattens_vqa():
    samples = [
        {"image": torch.zeros(3, 2, 2), "text_input": "a", "image_id": 4, "answers": ["x", "y"], "weights": [0.5, 0.5]},
        None,
        {"image": torch.ones(3, 2, 2), "text_input": "b", "image_id": 9, "answers": ["z"], "weights": [1.0]},
    ]
    b = collate_samples(samples)
    assert b["image"].shape == (2, 3, 2, 2) and b["text_input"] == ["a", "b"]
    assert b["image_id"].dtype == torch.long and b["image_id"].tolist() == [4, 9]
    assert b["answer"] == ["x", "y", "z"] and b["n_answers"].tolist() == [2, 1]
    torch.testing.assert_close(b["weight"], torch.tensor([0.5, 0.5, 1.0]))
    assert b["n_bad"] == 1 and b["batch_size"] == 2 and b["bad_samples"] == [("<unknown>", "sample was None")]
    # string ids (caption datasets) must stay a list so they never switch on retrieval-mode ITC
    # (docs/paper_map.md §10.15)
    assert collate_samples([{"image_id": "coco_1"}, {"image_id": "coco_2"}])["image_id"] == ["coco_1", "coco_2"]
    assert collate_samples([None, None]) == {
        "batch_size": 0,
        "n_bad": 2,
        "bad_samples": [("<unknown>", "sample was None")] * 2,
    }


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "ann.jsonl"
    good = json.dumps({"image": "a.jpg", "caption": "x", "image_id": "1"})
    path.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(AnnotationError, match=r"ann\.jsonl:3: invalid JSON"):
        CaptionDataset(tmp_path, path)
    path.write_text(f"{good}\n\n" + json.dumps({"image": "b.jpg", "image_id": "2"}) + "\n")
    with pytest.raises(AnnotationError, match=r"ann\.jsonl:3: missing field 'caption'"):
        CaptionDataset(tmp_path, path)


def test_bad_json_entry_and_type_are_named(tmp_path):
    path = tmp_path / "vqa.json"
    path.write_text(
        json.dumps(
            [
                {"image": "a.jpg", "question": "q?", "question_id": 1},
                {"image": "b.jpg", "question": "q?", "question_id": "7"},
            ]
        )
    )
    with pytest.raises(AnnotationError, match=r"vqa\.json: entry 1: field 'question_id' should be int, got '7'"):
        VQAEvalDataset(tmp_path, path)
    path.write_text('[{"image": "a.jpg",\n "question": }]')
    with pytest.raises(AnnotationError, match=r"vqa\.json:2:\d+: invalid JSON"):
        VQAEvalDataset(tmp_path, path)
    path.write_text('{"image": "a.jpg"}')
    with pytest.raises(AnnotationError, match="expected a JSON list"):
        VQAEvalDataset(tmp_path, path)


def test_csv_manifest_caption_and_vqa(tmp_path, image_dir):
    cap = tmp_path / "cap.csv"
    cap.write_text('image,text\nimgs/ok0.jpg,"A dog, running."\nimgs/ok1.jpg,Two cats\n')
    ds = ManifestDataset(cap)
    assert ds.kind == "caption" and len(ds) == 2
    assert ds[0]["text_input"] == "A dog, running." and ds[1]["image_id"] == "1"

    vqa = tmp_path / "vqa.csv"
    vqa.write_text(
        'image,question,answers,question_id\nimgs/ok0.jpg,What?,red|red|blue,17\nimgs/ok1.jpg,Why?,"[""x""]",\n'
    )
    ds = ManifestDataset(vqa, text_processor=str.lower)
    s = ds[0]
    assert s["answers"] == ["red", "blue"] and s["weights"] == pytest.approx([2 / 3, 1 / 3]) and s["question_id"] == 17
    assert ds[1]["answers"] == ["x"] and ds[1]["question_id"] == 1 and ds[1]["text_input"] == "why?"


def test_manifest_errors_name_file_and_line(tmp_path):
    bad_csv = tmp_path / "m.csv"
    bad_csv.write_text("image,text\na.jpg,ok\nb.jpg,\n")
    with pytest.raises(AnnotationError, match=r"m\.csv:3: missing or empty 'text'"):
        read_manifest(bad_csv)
    bad_vqa = tmp_path / "q.jsonl"
    bad_vqa.write_text(
        '{"image": "a.jpg", "question": "q", "answers": ["x"]}\n{"image": "a.jpg", "question": "q", "answers": []}\n'
    )
    with pytest.raises(AnnotationError, match=r"q\.jsonl:2: 'answers' must be a non-empty list"):
        read_manifest(bad_vqa)
    url = tmp_path / "u.jsonl"
    url.write_text('{"image": "https://example.com/a.jpg", "text": "t"}\n')
    with pytest.raises(AnnotationError, match=r"u\.jsonl:1: URLs are not fetched"):
        read_manifest(url)
    with pytest.raises(AnnotationError, match="must end in .jsonl or .csv"):
        read_manifest(tmp_path / "m.txt")


def test_answer_weights_exact_ratios():
    from blip2lib.data import answer_weights

    assert answer_weights(["no"] * 10) == (["no"], [1.0])
    assert answer_weights(["a", "b", "a", "c"]) == (["a", "b", "c"], [0.5, 0.25, 0.25])
