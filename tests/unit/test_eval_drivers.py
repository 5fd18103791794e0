"""Evaluation drivers (blip2lib/evaluate/drivers.py, __main__.py) on tiny synthetic datasets in the FORMATS layout.

Scores are checked against hand-worked numbers (stub models with known answers) or brute-force loops (retrieval);
the real tiny models check the plumbing (batching, resume, result files).
"""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from blip2lib.config import ParamsError, tiny_config
from blip2lib.data import (
    FORMATS,
    NoCapsDataset,
    QuestionProcessor,
    RetrievalEvalDataset,
    VQAEvalDataset,
    image_eval_transform,
)
from blip2lib.data.readers import GQAEvalDataset
from blip2lib.evaluate import CacheMismatchError, CaptionDecoding, VQADecoding, run_caption, run_retrieval, run_vqa
from blip2lib.evaluate.__main__ import main
from blip2lib.evaluate.drivers_common import load_cache
from blip2lib.model import Blip2, Blip2QFormerModel
from blip2lib.toy.synthetic import tiny_bert_tokenizer, tiny_llm_tokenizer

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# synthetic data in the readers' layout


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)


def _write(root, key, entries):
    path = root / FORMATS[key]["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


QUESTIONS = ["What colour is the dog?", "How many cats?", "What is on the mat?", "Is the sky blue?", "What shape?"]


def vqa_data(root, n=5, with_answers=True, bad=()):
    entries = []
    for i in range(n):
        img = f"val2014/COCO_val2014_{i:012d}.jpg"
        _image(root / "coco/images" / img, i)
        if i in bad:
            (root / "coco/images" / img).write_bytes(b"not an image")
        e = {"question_id": 100 + i, "question": QUESTIONS[i % len(QUESTIONS)], "image": img}
        if with_answers:
            e["answer"] = ["red"] * 10
        entries.append(e)
    ann = _write(root, "vqa_val_eval" if with_answers else "vqa_test", entries)
    return VQAEvalDataset(root / "coco/images", ann, image_eval_transform(28), QuestionProcessor())


class StubVQA(nn.Module):
    """Answers looked up by the exact prompt; records every call."""

    family = "opt"

    def __init__(self, answers):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.answers, self.calls = answers, []

    def generate(self, pixel_values, prompts, **kw):
        self.calls.append((list(prompts), kw, tuple(pixel_values.shape)))
        self.modes = getattr(self, "modes", []) + [(torch.is_grad_enabled(), self.training)]
        return [self.answers[p] for p in prompts]


def _tiny_blip2(family="opt", seed=0):
    torch.manual_seed(seed)
    model = Blip2(tiny_config(family), tokenizer=tiny_llm_tokenizer(family))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights with spread, so different images give different words
        for n, p in model.named_parameters():
            if not n.startswith("vision_model") and "layernorm" not in n.lower():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


TINY_VQA = VQADecoding(prompt="question : {} answer :", num_beams=2, max_new_tokens=3, min_new_tokens=1)


# ----------------------------------------------------------------------------------------------------------------
# VQA


def test_vqa_breakdown_uses_types_carried_by_the_dataset_list(tmp_path):
    ds = vqa_data(tmp_path / "data", n=3)
    for a, (at, qt) in zip(ds.annotation, [("other", "attribute"), ("number", "count"), ("other", "relation")]):
        a["answer_type"], a["question_type"] = at, qt
    prompts = [f"Question: {q} Answer:" for q in ("what colour is the dog?", "how many cats?", "what is on the mat?")]
    res = run_vqa(StubVQA(dict(zip(prompts, ["red", "3", "blue"]))), ds, VQADecoding.paper("opt"), batch_size=3,
                  out_dir=tmp_path / "out", split_name="vqa_val_eval", progress=False)  # fmt: skip
    assert res["metrics"]["per_answer_type"] == {"other": 50.0, "number": 0.0}
    assert res["metrics"]["per_question_type"] == {"attribute": 100.0, "count": 0.0, "relation": 0.0}


def test_vqa_scores_hand_worked_and_records_configuration(tmp_path):
    ds = vqa_data(tmp_path / "data", n=3)
    prompts = [f"Question: {q} Answer:" for q in ("what colour is the dog?", "how many cats?", "what is on the mat?")]
    model = StubVQA(dict(zip(prompts, ["Red", "two", "blue"])))
    annotations = {"annotations": [
        {"question_id": 100, "answers": ["red"] * 10, "answer_type": "other"},
        {"question_id": 101, "answers": ["2", "2"] + ["3"] * 8, "answer_type": "number"},
        {"question_id": 102, "answers": ["green"] * 10, "answer_type": "other"},
    ]}  # fmt: skip
    out = tmp_path / "out"
    model.train()
    res = run_vqa(model, ds, VQADecoding.paper("opt"), batch_size=2, out_dir=out, split_name="vqa_val_eval",
                  annotations=annotations, progress=False)  # fmt: skip
    # official (headline): q100 "Red" vs ten identical "red" -> raw strings compared -> 0; q101: annotators differ,
    # "two" -> "2", 2 of 10 match -> (2*(1/3) + 8*(2/3)) / 10 = 0.6; q102: 0. LAVIS: q100 "Red" -> "red" -> 100.
    assert res["metrics"]["overall"] == round((0 + 60 + 0) / 3, 2) == 20.0 and res["metrics"]["scorer"] == "official"
    assert res["metrics"]["per_answer_type"] == {"other": 0.0, "number": 60.0}
    assert res["metrics"]["lavis"] == {"overall": round((100 + 60 + 0) / 3, 2), "scorer": "lavis",
                                       "per_answer_type": {"other": 50.0, "number": 60.0}}  # fmt: skip
    assert res["metrics"]["unit"] == "percent"
    assert model.modes == [(False, False)] * 2 and model.training  # no autograd, eval mode, train mode restored
    assert [c[0] for c in model.calls] == [prompts[:2], prompts[2:]]  # blip_question + paper OPT prompt, batches 2+1
    kw = model.calls[0][1]
    assert kw == {"num_beams": 5, "length_penalty": -1.0, "max_new_tokens": 10, "min_new_tokens": 1,
                  "do_sample": False, "max_prompt_len": 32}  # fmt: skip
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    cfg = on_disk["config"]
    assert cfg["decoding"]["prompt"] == "Question: {} Answer:" and cfg["decoding"]["num_beams"] == 5
    assert cfg["family"] == "opt" and cfg["versions"]["torch"] == torch.__version__
    assert "autocast" in cfg["precision"] and cfg["world_size"] == 1
    assert on_disk["counts"] == {"n_questions": 3, "n_predicted": 3, "n_scored": 3, "complete": True,
                                 "bad_samples": {"count": 0, "examples": [], "policy": "skipped and excluded from "
                                                 "scoring"}}  # fmt: skip
    assert json.loads((out / "predictions.json").read_text()) == [
        {"question_id": 100, "answer": "Red"}, {"question_id": 101, "answer": "two"},
        {"question_id": 102, "answer": "blue"}]  # fmt: skip
    assert json.loads((out / "per_question.json").read_text()) == {"100": 0.0, "101": 60.0, "102": 0.0}


def test_okvqa_lemmatises_once_and_records_both_scorers(tmp_path, monkeypatch):
    from blip2lib.evaluate import drivers

    calls = []

    def fake_lemmas(answers):  # stands in for spaCy: "reds" -> "red"
        calls.append(list(answers))
        return [a[:-1] if a.endswith("s") else a for a in answers]

    monkeypatch.setattr(drivers, "lemmatize_answers", fake_lemmas)
    ds = vqa_data(tmp_path / "data", n=2)  # GT: ten identical "red" per question
    prompts = [f"Question: {q} Answer:" for q in ("what colour is the dog?", "how many cats?")]
    model = StubVQA(dict(zip(prompts, ["reds", "Reds"])))
    res = run_vqa(model, ds, VQADecoding.paper("opt"), 2, tmp_path / "o", "okvqa_test", lemmatize=True, progress=False)
    assert calls == [["reds", "Reds"]]  # one lemmatiser pass, shared by both evaluators
    m = res["metrics"]
    # lemmas "red" / "Red" vs unanimous "red": official compares raw -> 100, 0; LAVIS lower-cases the pred -> 100, 100
    assert (m["overall"], m["scorer"], m["lemmatized"]) == (50.0, "official", True)
    assert m["lavis"] == {"overall": 100.0, "per_answer_type": {"unknown": 100.0}, "scorer": "lavis"}


def test_vqa_test_dev_writes_submission_without_scores(tmp_path):
    ds = vqa_data(tmp_path / "data", n=2, with_answers=False)
    model = StubVQA({"Question: what colour is the dog? Short answer:": "red",
                     "Question: how many cats? Short answer:": "2"})  # fmt: skip
    res = run_vqa(model, ds, VQADecoding.lavis_head("opt"), 4, tmp_path / "o", "vqa_test", progress=False)
    assert res["metrics"] is None
    sub = json.loads((tmp_path / "o" / "vqav2_submission.json").read_text())
    assert sub == [{"question_id": 100, "answer": "red"}, {"question_id": 101, "answer": "2"}]


def test_vqa_scores_from_dataset_answers_and_skips_bad_images(tmp_path):
    ds = vqa_data(tmp_path / "data", n=4, bad=(1,))
    answers = {f"Question: {q.lower()} Short answer:": a for q, a in zip(QUESTIONS, ["red", "x", "red", "no"])}
    model = StubVQA(answers)
    res = run_vqa(model, ds, VQADecoding.paper("t5"), 2, tmp_path / "o", "vqa_val_eval", progress=False)
    # GT = the split file's answers (10 x "red"); question 101's image is unreadable -> excluded
    assert res["metrics"]["overall"] == round(100 * 2 / 3, 2) and res["metrics"]["n_questions"] == 3
    bad = res["counts"]["bad_samples"]
    assert bad["count"] == 1 and "COCO_val2014_000000000001" in bad["examples"][0] and not res["counts"]["complete"]
    assert sum(len(c[0]) for c in model.calls) == 3
    model.calls.clear()  # a rerun neither retries the bad image nor regenerates anything
    again = run_vqa(model, ds, VQADecoding.paper("t5"), 2, tmp_path / "o", "vqa_val_eval", progress=False)
    assert model.calls == [] and again["metrics"] == res["metrics"] and again["counts"] == res["counts"]


def test_gqa_exact_match(tmp_path):
    root = tmp_path / "data"
    entries = []
    for i, (q, a) in enumerate([("Is it red?", "yes"), ("What is it?", "a dog"), ("Where?", "left")]):
        _image(root / "gqa/images" / f"n{i}.jpg", i)
        entries.append({"image": f"n{i}.jpg", "question": q, "question_id": f"g{i}", "answer": a})
    ann = _write(root, "gqa_testdev", entries)
    ds = GQAEvalDataset(root / "gqa/images", ann, image_eval_transform(28))
    model = StubVQA({"Question: is it red? Short answer:": "Yes", "Question: what is it? Short answer:": "the dog",
                     "Question: where? Short answer:": "right"})  # fmt: skip
    res = run_vqa(model, ds, VQADecoding.paper("t5"), 8, tmp_path / "o", "gqa_testdev", gqa=True, progress=False)
    # "the dog" == "a dog" after processing both sides; LAVIS's unrounded sum(acc) / len(acc) * 100
    assert res["metrics"] == {"overall": 2 / 3 * 100, "n_questions": 3, "unit": "percent", "scorer": "lavis"}


def test_vqa_kill_and_resume_generates_only_missing_questions(tmp_path):
    ds = vqa_data(tmp_path / "data", n=5)
    model = _tiny_blip2("opt")
    full = run_vqa(model, ds, TINY_VQA, 2, tmp_path / "full", "vqa_val_eval", progress=False)
    original, rows = model.generate, []

    def dying(pixels, prompts, **kw):
        if rows:  # second batch
            raise KeyboardInterrupt("killed")
        rows.append(len(prompts))
        return original(pixels, prompts, **kw)

    model.generate = dying
    with pytest.raises(KeyboardInterrupt):
        run_vqa(model, ds, TINY_VQA, 2, tmp_path / "resume", "vqa_val_eval", progress=False)
    assert rows == [2] and len((tmp_path / "resume/predictions.0.jsonl").read_text().splitlines()) == 1 + 2

    def counting(pixels, prompts, **kw):
        rows.append(len(prompts))
        return original(pixels, prompts, **kw)

    model.generate = counting
    resumed = run_vqa(model, ds, TINY_VQA, 2, tmp_path / "resume", "vqa_val_eval", progress=False)
    assert rows == [2, 2, 1]  # only questions 3-5 generated after the restart
    assert resumed["timing"]["from_cache"] == 2 and resumed["timing"]["generated_this_run"] == 3
    preds = json.loads((tmp_path / "full/predictions.json").read_text())
    assert json.loads((tmp_path / "resume/predictions.json").read_text()) == preds
    assert resumed["metrics"] == full["metrics"] and len(preds) == 5


def test_truncated_cache_line_is_regenerated_and_recipe_change_supersedes_the_cache(tmp_path):
    ds = vqa_data(tmp_path / "data", n=3)
    model = StubVQA({f"Question: {q.lower()} Answer:": "red" for q in QUESTIONS})
    run_vqa(model, ds, VQADecoding.paper("opt"), 2, tmp_path / "o", "v", progress=False)
    cache = tmp_path / "o/predictions.0.jsonl"
    cache.write_text(cache.read_text()[:-10])  # killed while writing the last line
    model.calls.clear()
    res = run_vqa(model, ds, VQADecoding.paper("opt"), 2, tmp_path / "o", "v", progress=False)
    assert [len(c[0]) for c in model.calls] == [1] and res["metrics"]["overall"] == 100.0
    model.calls.clear()  # another recipe: nothing reused, the old cache moved aside (never mixed, never deleted)
    model.answers.update({f"Question: {q.lower()} Short answer:": "red" for q in QUESTIONS})  # LAVIS's OPT prompt
    res = run_vqa(model, ds, VQADecoding.lavis_head("opt"), 2, tmp_path / "o", "v", progress=False)
    assert [len(c[0]) for c in model.calls] == [2, 1] and res["timing"]["from_cache"] == 0
    moved = res["cache"]["superseded"]
    assert any(k.startswith("decoding.") for k in moved["changed"])
    with pytest.raises(
        CacheMismatchError,
        match=r"^\S+/predictions\.0\.jsonl holds predictions made under another "
        r"cache key \(changed: decoding\.",
    ) as err:  # the moved cache is the paper recipe's
        load_cache(tmp_path / moved["moved_to"], res["cache"]["key"])
    assert err.value.changed == moved["changed"]


# ----------------------------------------------------------------------------------------------------------------
# Captioning


class StubCaptioner(StubVQA):
    """Captions handed out in call order (the driver walks the dataset in index order)."""

    family = "t5"

    def __init__(self, captions):
        super().__init__({})
        self.captions = list(captions)

    def generate(self, pixel_values, prompts, **kw):
        self.calls.append((list(prompts), kw, tuple(pixel_values.shape)))
        out, self.captions = self.captions[: len(prompts)], self.captions[len(prompts) :]
        return out


def test_caption_nocaps_domains_and_submission(tmp_path):
    root = tmp_path / "data"
    refs = ["a red dog on the mat", "two blue cats on the left", "a green square on the right"]
    domains = ["in-domain", "in-domain", "out-domain"]
    entries = [{"image": f"val/{i}.jpg", "img_id": 7 + i, "domain": d} for i, d in enumerate(domains)]
    for i in range(3):
        _image(root / "nocaps/images" / f"val/{i}.jpg", i)
    ann = _write(root, "nocaps_val", entries)
    gt = {"images": [{"id": 7 + i} for i in range(3)],
          "annotations": [{"image_id": 7 + i, "caption": c, "id": i} for i, c in enumerate(refs)]}  # fmt: skip
    ds = NoCapsDataset(root / "nocaps/images", ann, image_eval_transform(28))
    model = StubCaptioner(refs[:2] + ["xx yy zz ww"])
    res = run_caption(model, ds, CaptionDecoding.paper(), gt, 2, tmp_path / "o", "nocaps_val", metrics=("BLEU",),
                      progress=False)  # fmt: skip
    m = res["metrics"]
    assert m["in-domain"]["Bleu_4"] == pytest.approx(100.0, abs=1e-4) and m["in-domain"]["n_images"] == 2
    assert m["out-domain"]["Bleu_1"] < 1e-3 and m["overall"]["n_images"] == 3 and m["unit"] == "percent"
    assert model.calls[0][0] == ["a photo of"] * 2
    assert model.calls[0][1] == {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8,
                                 "repetition_penalty": 1.0, "length_penalty": 1.0, "do_sample": False}  # fmt: skip
    sub = json.loads((tmp_path / "o/captions.json").read_text())
    assert sub == [{"image_id": 7 + i, "caption": c} for i, c in enumerate(refs[:2] + ["xx yy zz ww"])]
    assert res["files"]["nocaps_submission"] == res["files"]["predictions"]
    assert res["config"]["decoding"]["source"].startswith("paper")


def test_caption_real_tiny_t5_without_gt(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _image(root / "coco/images" / f"val2014/COCO_val2014_{i + 1:012d}.jpg", i)
    ann = _write(root, "coco_karpathy_test", [{"image": f"val2014/COCO_val2014_{i + 1:012d}.jpg", "caption": ["x"]}
                                              for i in range(3)])  # fmt: skip
    from blip2lib.data import CaptionEvalDataset

    ds = CaptionEvalDataset(root / "coco/images", ann, image_eval_transform(28))
    dec = CaptionDecoding(prompt="a photo of", num_beams=2, max_new_tokens=4, min_new_tokens=2)
    res = run_caption(_tiny_blip2("t5"), ds, dec, None, 2, tmp_path / "o", "coco_karpathy_test", progress=False)
    caps = json.loads((tmp_path / "o/captions.json").read_text())
    assert res["metrics"] is None and [c["image_id"] for c in caps] == [1, 2, 3]
    assert all(2 <= len(c["caption"].split()) <= 4 for c in caps)  # new tokens only (one word per token)


# ----------------------------------------------------------------------------------------------------------------
# Retrieval: driver == brute force ITC + ITM over every pair


def retrieval_data(root, n_img=4, caps_per=2, bad=()):
    words = ["a red dog", "a blue cat", "two green mat", "the small circle", "a large square", "left sky", "right",
             "what colour"]  # fmt: skip
    entries = []
    for i in range(n_img):
        img = f"flickr30k-images/{i}.jpg"
        _image(root / "flickr30k/images" / img, 10 + i)
        if i in bad:
            (root / "flickr30k/images" / img).write_bytes(b"broken")
        entries.append({"image": img, "caption": [words[(i * caps_per + c) % len(words)] for c in range(caps_per)]})
    ann = _write(root, "flickr30k_test", entries)
    return RetrievalEvalDataset(root / "flickr30k/images", ann, image_eval_transform(28))


def _tiny_qformer(seed=0):
    torch.manual_seed(seed)
    model = Blip2QFormerModel(tiny_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("vision_model") and "layernorm" not in n.lower() and n != "temp":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.double().eval()


def _brute_force(model, ds, tok, k):
    """Every pair by loops: ITC = max_q cosine; ITM positive logit; top-k per row by sorting; -100 elsewhere."""
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).double()
    with torch.no_grad():
        return _brute_force_scores(model, images, ds, tok, k)


def _brute_force_scores(model, images, ds, tok, k):
    enc = model.encode_image(images)
    t = tok(ds.text, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    tf = model.encode_text(t.input_ids, t.attention_mask)["text_feat"]
    ni, nt = len(ds), len(ds.text)
    itc, itm = torch.zeros(ni, nt, dtype=torch.float64), torch.zeros(ni, nt, dtype=torch.float64)
    for i in range(ni):
        for j in range(nt):
            itc[i, j] = max(float(enc["image_feats"][i, q] @ tf[j]) for q in range(enc["image_feats"].shape[1]))
            itm[i, j] = model.itm_logits(enc["image_embeds"][i : i + 1], t.input_ids[j : j + 1],
                                         t.attention_mask[j : j + 1])[0, 1]  # fmt: skip
    i2t, t2i = torch.full((ni, nt), -100.0, dtype=torch.float64), torch.full((nt, ni), -100.0, dtype=torch.float64)
    for i in range(ni):
        for j in sorted(range(nt), key=lambda j: -itc[i, j])[:k]:
            i2t[i, j] = itm[i, j] + itc[i, j]
    for j in range(nt):
        for i in sorted(range(ni), key=lambda i: -itc[i, j])[:k]:
            t2i[j, i] = itm[i, j] + itc[i, j]
    return itc, i2t, t2i


def _recalls(i2t, t2i, ds):
    """R@k by counting, with the pessimistic tie rule of recall_at_k (ties with the -100 fill occur for k < N):
    rank = #{higher} + #{equal and not ground truth}; image->text uses the image's best caption."""

    def rank(row, positives):
        best = max(float(row[p]) for p in positives)
        return sum(float(v) > best or (float(v) == best and c not in positives) for c, v in enumerate(row))

    rt = [rank(i2t[i], ds.img2txt[i]) for i in range(len(ds))]
    ri = [rank(t2i[j], [ds.txt2img[j]]) for j in range(len(ds.text))]
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100 * sum(r < k for r in rt) / len(rt)
        out[f"img_r{k}"] = 100 * sum(r < k for r in ri) / len(ri)
    return out


@pytest.mark.parametrize("k", [3, 128])
def test_retrieval_equals_brute_force(tmp_path, k):
    ds = retrieval_data(tmp_path / "data")
    model, tok = _tiny_qformer(), tiny_bert_tokenizer()
    res = run_retrieval(model, ds, tok, k=k, batch_size=3, out_dir=tmp_path / "o", itm_batch_size=5, progress=False,
                        save_scores=True)  # fmt: skip
    itc, i2t, t2i = _brute_force(model, ds, tok, k)
    scores = torch.load(tmp_path / "o/scores.pt")
    assert torch.allclose(scores["itc"], itc, atol=1e-10)
    assert torch.allclose(scores["score_i2t"], i2t, atol=1e-10) and torch.allclose(scores["score_t2i"], t2i, atol=1e-10)
    want = _recalls(i2t, t2i, ds)
    assert {key: res["metrics"][key] for key in want} == pytest.approx(want)
    assert res["metrics"]["unit"] == "percent" and res["metrics_itc_only"]["unit"] == "percent"
    assert res["config"]["k"] == k and res["config"]["text_max_len"] == 35 and res["config"]["fusion"] == "itm+itc"


def test_retrieval_drops_unreadable_image_with_its_captions(tmp_path):
    ds = retrieval_data(tmp_path / "data", n_img=3, bad=(1,))
    res = run_retrieval(_tiny_qformer(), ds, tiny_bert_tokenizer(), k=4, fusion="itc", out_dir=tmp_path / "o",
                        progress=False)  # fmt: skip
    c = res["counts"]
    assert (c["n_images"], c["n_texts"], c["n_images_scored"], c["n_texts_scored"]) == (3, 6, 2, 4)
    assert c["bad_samples"]["count"] == 1 and not c["complete"]
    assert res["metrics"]["txt_r5"] == 100.0  # 2 images x 4 texts: every rank < 5


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _params(tmp_path, **kw):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"checkpoint": "tiny", "data_root": str(tmp_path / "data"),
                                    "out_dir": str(tmp_path / "cli"), "progress": False, **kw}))  # fmt: skip
    return path


def test_cli_vqa_tiny_and_bad_keys(tmp_path, capsys):
    vqa_data(tmp_path / "data", n=3)
    path = _params(tmp_path, split="vqa_val_eval", batch_size=2, num_beams=1, max_new_tokens=2, family="t5")
    assert main(["vqa", "--params", str(path)]) == 0
    res = json.loads((tmp_path / "cli/result.json").read_text())
    assert res["config"]["decoding"]["num_beams"] == 1 and res["config"]["decoding"]["prompt"].endswith("answer:")
    assert "overridden by" in res["config"]["decoding"]["source"] and res["counts"]["n_predicted"] == 3
    assert json.loads(capsys.readouterr().out)["metrics"]["unit"] == "percent"
    bad = _params(tmp_path, split="vqa_val_eval", num_beam=3)
    with pytest.raises(ParamsError, match=r"params\.yaml: unknown key 'num_beam'"):
        from blip2lib.evaluate.__main__ import run

        run("vqa", bad)
    assert main(["retrieval", "--params", str(_params(tmp_path, split="vqa_val_eval", fusion="sum"))]) == 2
    assert "key 'fusion' must be one of" in capsys.readouterr().err


def test_cli_retrieval_tiny(tmp_path):
    retrieval_data(tmp_path / "data", n_img=3)
    assert main(["retrieval", "--params", str(_params(tmp_path, split="flickr30k_test", k=2))]) == 0
    res = json.loads((tmp_path / "cli/result.json").read_text())
    assert res["counts"]["n_texts_scored"] == 6 and res["config"]["k"] == 2


def test_cli_loads_a_checkpoint_path_with_from_pretrained(tmp_path):
    from blip2lib.pretrained import save_pretrained_hf

    ds = vqa_data(tmp_path / "data", n=3)
    model = _tiny_blip2("opt")
    save_pretrained_hf(model, tmp_path / "ck", check=False)
    path = _params(tmp_path, checkpoint=str(tmp_path / "ck"), split="vqa_val_eval", num_beams=2, max_new_tokens=3)
    assert main(["vqa", "--params", str(path)]) == 0
    dec = VQADecoding.paper("opt")
    dec = VQADecoding(prompt=dec.prompt, num_beams=2, max_new_tokens=3, source=dec.source)
    run_vqa(model, ds, dec, 16, tmp_path / "mem", "vqa_val_eval", progress=False)
    preds = json.loads((tmp_path / "mem/predictions.json").read_text())
    assert json.loads((tmp_path / "cli/predictions.json").read_text()) == preds
    with pytest.raises(ParamsError, match="needs a Blip2QFormerModel"):
        from blip2lib.evaluate.__main__ import run

        run("retrieval", _params(tmp_path, checkpoint=str(tmp_path / "ck"), split="flickr30k_test"))


def test_trim_padding_keeps_every_real_token():
    from blip2lib.evaluate.retrieval import trim_padding

    ids = torch.tensor([[101, 5, 6, 102, 0, 0], [101, 7, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    t_ids, t_mask = trim_padding(ids, mask)
    assert t_ids.tolist() == [[101, 5, 6, 102], [101, 7, 102, 0]] and t_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # left padding: the last column is real, nothing to trim
    assert trim_padding(left, left)[1].shape == (2, 4)
    empty = torch.zeros(2, 5, dtype=torch.long)
    assert trim_padding(empty, empty)[0].shape == (2, 1)
