"""The grouped VQA pipeline (blip2lib/evaluate/pipeline.py): the same answers and files as the per-question path.

Tiny random OPT and T5 models in fp32 on the CPU; a split whose images carry 1 to 6 questions each, interleaved,
with an odd total and one unreadable image. The reference answers come from the per-question path and from calling
``Blip2.generate`` on each question alone (the definition); the projection of the ``vqav2_pipeline`` benchmark row
is checked against the hand arithmetic.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2lib.config import ParamsError, tiny_config
from blip2lib.data import FORMATS, QuestionProcessor, VQAEvalDataset, image_eval_transform
from blip2lib.data.processors import pre_question
from blip2lib.evaluate import VQADecoding, run_vqa
from blip2lib.evaluate.__main__ import RetrievalParams, VQAParams, _check
from blip2lib.evaluate.pipeline import auto_batch_size, group_by_image, plan_vqa_pipeline, supports_grouping
from blip2lib.model import Blip2
from blip2lib.toy.synthetic import tiny_llm_tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]

# image -> its questions (words of several lengths so that sorting by prompt length reorders them)
QUESTIONS = {
    0: ["what colour is the dog"],
    1: ["how many cats", "is the sky blue today or is it grey", "what", "where is the red ball on the mat"],
    2: ["what shape", "is it a dog"],
    3: ["how many"],
    4: [
        "what is on the mat",
        "red",
        "is the cat left of the dog or right of it",
        "what colour",
        "how many balls",
        "is it",
    ],  # fmt: skip
    5: ["what is it", "is it red", "how many dogs"],  # unreadable image
    6: ["where", "what is the cat doing on the blue mat"],
}
BAD_IMAGE = 5
N_QUESTIONS = sum(len(q) for q in QUESTIONS.values())  # 19: odd
DECODING = VQADecoding(prompt="question : {} answer :", num_beams=2, max_new_tokens=3, min_new_tokens=1)


def vqa_split(root):
    """The questions interleaved across images (round robin), as a VQAEvalDataset; question ids 500 + position."""
    order = []
    for k in range(max(len(q) for q in QUESTIONS.values())):
        order += [(img, qs[k]) for img, qs in QUESTIONS.items() if k < len(qs)]
    for img in QUESTIONS:
        path = root / "coco/images" / f"val2014/COCO_val2014_{img:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if img == BAD_IMAGE:
            path.write_bytes(b"not an image")
        else:
            rng = np.random.default_rng(img)
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)
    entries = [{"question_id": 500 + n, "question": q + "?", "image": f"val2014/COCO_val2014_{img:012d}.jpg",
                "answer": ["red"] * 10} for n, (img, q) in enumerate(order)]  # fmt: skip
    ann = root / FORMATS["vqa_val_eval"]["file"]
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(entries))
    return VQAEvalDataset(root / "coco/images", ann, image_eval_transform(28), QuestionProcessor()), order


def tiny_blip2(family, seed=0):
    torch.manual_seed(seed)
    model = Blip2(tiny_config(family), tokenizer=tiny_llm_tokenizer(family))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights with spread (the ViT's too): different images give different answers
        for n, p in model.named_parameters():
            if "norm" not in n.lower():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


class Counting:
    """Wraps ``model.soft_prompt`` and ``model.generate`` (instance attributes) to count images and calls."""

    def __init__(self, model, die_at_call=None):
        self.model, self.images, self.calls, self.die_at = model, 0, [], die_at_call
        self.soft, self.gen = model.soft_prompt, model.generate
        model.soft_prompt, model.generate = self._soft, self._gen

    def _soft(self, pixels, *a, **kw):
        self.images += pixels.shape[0]
        return self.soft(pixels, *a, **kw)

    def _gen(self, pixels, prompts, **kw):
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(prompts))
        return self.gen(pixels, prompts, **kw)

    def undo(self):
        del self.model.soft_prompt, self.model.generate


def _files(out):
    return {name: json.loads((out / name).read_text()) for name in ("predictions.json", "per_question.json")}


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_grouped_answers_equal_per_question_and_one_by_one(tmp_path, family):
    ds, order = vqa_split(tmp_path / "data")
    model = tiny_blip2(family)
    spy = Counting(model)
    per_q = run_vqa(model, ds, DECODING, 4, tmp_path / "per_q", "v", progress=False, pipeline="per_question")
    assert spy.images == N_QUESTIONS - len(QUESTIONS[BAD_IMAGE])  # one soft prompt per readable question
    spy.images, spy.calls = 0, []
    grouped = run_vqa(model, ds, DECODING, 4, tmp_path / "grouped", "v", progress=False)  # auto -> grouped
    assert grouped["config"]["pipeline"] == "grouped" and per_q["config"]["pipeline"] == "per_question"
    assert spy.images == len(QUESTIONS) - 1  # ONE soft prompt per readable image
    # 16 answerable questions in batches of 4 (the pool carries questions over chunks); each batch length-sorted
    assert sorted(len(c) for c in spy.calls) == [4, 4, 4, 4]
    tok = model.tokenizer
    for call in spy.calls:
        lens = [len(ids) for ids in tok(call).input_ids]
        assert lens == sorted(lens)
    assert _files(tmp_path / "grouped") == _files(tmp_path / "per_q")
    assert grouped["metrics"] == per_q["metrics"] and grouped["counts"] == per_q["counts"]
    assert grouped["counts"]["bad_samples"]["count"] == 3 and grouped["counts"]["n_predicted"] == 16
    preds = {p["question_id"]: p["answer"] for p in json.loads((tmp_path / "grouped/predictions.json").read_text())}
    assert list(preds) == [500 + n for n, (img, _) in enumerate(order) if img != BAD_IMAGE]  # dataset order kept
    assert len(set(preds.values())) > 3  # not a degenerate model: the answers differ
    readable = [n for n, (img, _) in enumerate(order[: len(QUESTIONS)]) if img != BAD_IMAGE]  # one per image
    same_q = model.generate(torch.stack([ds[n]["image"] for n in readable]), ["question : what is it? answer :"] * 6,
                            **DECODING.generate_kwargs())  # fmt: skip
    assert len(set(same_q)) >= 3  # ... and they depend on the image, so a question given another image's prefix shows
    # the definition: each question alone, its own image through the whole model
    spy.undo()
    for n, (img, q) in enumerate(order):
        if img == BAD_IMAGE:
            continue
        pixels = ds[n]["image"][None]  # (1, 3, 28, 28)
        alone = model.generate(pixels, [DECODING.format_prompt(pre_question(q + "?"))], **DECODING.generate_kwargs(),
                               max_prompt_len=32 if family == "opt" else None)  # fmt: skip
        assert preds[500 + n] == alone[0], (n, q)


def test_interrupted_grouped_run_resumes_to_the_same_files(tmp_path):
    ds, _ = vqa_split(tmp_path / "data")
    model = tiny_blip2("opt")
    run_vqa(model, ds, DECODING, 4, tmp_path / "full", "v", progress=False, pipeline="grouped")
    spy = Counting(model, die_at_call=2)  # killed in the third generate call
    with pytest.raises(KeyboardInterrupt):
        run_vqa(model, ds, DECODING, 4, tmp_path / "resume", "v", progress=False, pipeline="grouped")
    lines = (tmp_path / "resume/predictions.0.jsonl").read_text().splitlines()
    done = [json.loads(x) for x in lines[1:]]
    assert "meta" in json.loads(lines[0]) and len([r for r in done if "text" in r]) == 8  # two batches of 4
    spy.die_at, spy.calls = None, []
    resumed = run_vqa(model, ds, DECODING, 4, tmp_path / "resume", "v", progress=False, pipeline="grouped")
    assert sum(len(c) for c in spy.calls) == 16 - 8  # only the missing questions
    assert resumed["timing"]["from_cache"] == len(done) and resumed["timing"]["generated_this_run"] == 8
    assert _files(tmp_path / "resume") == _files(tmp_path / "full")
    rows = [json.loads(x) for x in (tmp_path / "resume/predictions.0.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["index"] for r in rows) == list(range(N_QUESTIONS))  # every question exactly once, by index


def test_a_per_question_cache_is_reused_by_the_grouped_path(tmp_path):
    """The cache is keyed by question: a run started per question finishes grouped (and the other way round)."""
    ds, _ = vqa_split(tmp_path / "data")
    model = tiny_blip2("opt")
    full = run_vqa(model, ds, DECODING, 4, tmp_path / "full", "v", progress=False, pipeline="per_question")
    spy = Counting(model, die_at_call=1)
    with pytest.raises(KeyboardInterrupt):
        run_vqa(model, ds, DECODING, 4, tmp_path / "mixed", "v", progress=False, pipeline="per_question")
    spy.die_at, spy.calls = None, []
    mixed = run_vqa(model, ds, DECODING, 4, tmp_path / "mixed", "v", progress=False, pipeline="grouped")
    assert mixed["cache"]["superseded"] is None and mixed["timing"]["from_cache"] == 4  # the first batch of 4
    assert _files(tmp_path / "mixed") == _files(tmp_path / "full") and mixed["metrics"] == full["metrics"]
    spy.calls, spy.images = [], 0
    again = run_vqa(model, ds, DECODING, 4, tmp_path / "full", "v", progress=False, pipeline="grouped")
    assert spy.calls == [] and spy.images == 0 and again["timing"]["from_cache"] == N_QUESTIONS


def test_grouping_and_pipeline_choice(tmp_path):
    ds, order = vqa_split(tmp_path / "data")
    groups = group_by_image(ds, range(len(ds)))
    # hand-made: indices of each image in first-appearance order
    want = [[n for n, (img, _) in enumerate(order) if img == k] for k in dict.fromkeys(img for img, _ in order)]
    assert groups == want and [len(g) for g in groups] == [1, 4, 2, 1, 6, 3, 2]
    # order[9], order[4] show image 4; order[1], order[7] image 1: groups by first appearance, members as given
    assert group_by_image(ds, [9, 4, 1, 7]) == [[9, 4], [1, 7]]

    class NoSoftPrompt(torch.nn.Module):
        pass

    model = tiny_blip2("opt")
    assert supports_grouping(model, ds) is None and plan_vqa_pipeline(model, ds, "auto") == "grouped"
    assert plan_vqa_pipeline(NoSoftPrompt(), ds, "auto") == "per_question"
    model.embeddings = torch.nn.Identity()  # stands in for the VQA fine-tuned variant's Q-Former text input
    with pytest.raises(ValueError, match="pipeline='grouped' does not apply: the question enters this model's"):
        plan_vqa_pipeline(model, ds, "grouped")
    with pytest.raises(ValueError, match="pipeline must be one of"):
        plan_vqa_pipeline(model, ds, "fast")


def test_auto_batch_size_hand_computed():
    model = tiny_blip2("opt")  # OPT: 2 layers, hidden 32, vocab 99, 4 queries, fp32 weights (4 bytes)
    positions = 4 + 32 + 10
    kv = 5 * 2 * 2 * 32 * positions * 4  # beams x layers x (K, V) x width x positions x bytes = 117,760
    logits = 5 * 99 * 4 * 4  # 7,920
    acts = 5 * positions * 32 * 4 * 16  # 471,040
    per_q = kv + logits + acts  # 596,720
    n, info = auto_batch_size(model, num_beams=5, max_new_tokens=10, prompt_len=32, free_bytes=50_000_000)
    assert info["bytes_per_question"] == per_q == 596_720
    assert n == 40  # floor(0.5 * 5e7 / 596,720) = 41 -> a multiple of 8
    assert auto_batch_size(model, 5, 10, 32, free_bytes=5_000_000)[0] == 4  # floor(4.19): below 8, kept
    assert auto_batch_size(model, 5, 10, 32, free_bytes=10**12)[0] == 256  # capped
    assert auto_batch_size(model, 5, 10, 32, free_bytes=1)[0] == 1
    t5 = tiny_blip2("t5")  # T5: 2 decoder layers x (self, cross), width 4 heads x 8, d_model 32
    kv5 = 1 * 4 * 2 * 32 * (4 + 8 + 30) * 4
    _, info5 = auto_batch_size(t5, 1, 30, 8, free_bytes=10**9)
    assert info5["kv_cache"] == kv5 and info5["logits"] == 99 * 16
    cpu_n, cpu_info = auto_batch_size(model, 5, 10)  # no CUDA: the CPU default
    assert cpu_n == 16 and "CPU" in cpu_info["rule"]


def test_batch_size_auto_in_the_driver_and_the_params(tmp_path):
    ds, _ = vqa_split(tmp_path / "data")
    res = run_vqa(tiny_blip2("opt"), ds, DECODING, "auto", tmp_path / "o", "v", progress=False)
    assert res["config"]["batch_size"] == 16 and "CPU" in res["config"]["batch_size_auto"]["rule"]
    assert res["config"]["decode_engine"] == "default"
    with pytest.raises(ValueError, match="batch_size must be a positive integer or 'auto', got 'big'"):
        run_vqa(tiny_blip2("opt"), ds, DECODING, "big", tmp_path / "o2", "v", progress=False)
    common = {"data_root": "/d", "out_dir": "/o", "split": "vqa_val_eval"}
    assert VQAParams.from_dict({**common, "batch_size": "auto"}).batch_size == "auto"
    _check(VQAParams.from_dict({**common, "batch_size": "auto"}), "e.yaml")
    with pytest.raises(ParamsError, match=r"e\.yaml: key 'batch_size' must be a positive integer or 'auto', got 'a'"):
        _check(VQAParams.from_dict({**common, "batch_size": "a"}), "e.yaml")
    with pytest.raises(ParamsError, match=r"key 'batch_size' must be a positive integer, got 'auto'"):
        _check(RetrievalParams.from_dict({**common, "split": "flickr30k_test", "batch_size": "auto"}), "e.yaml")
    with pytest.raises(ParamsError, match=r"key 'decode_engine' must be one of \['auto', 'hf', 'static'\]"):
        _check(VQAParams.from_dict({**common, "decode_engine": "fast"}), "e.yaml")


def test_decode_engine_reaches_generate(tmp_path):
    ds, _ = vqa_split(tmp_path / "data")
    model = tiny_blip2("opt")
    seen = []
    real = model.generate
    model.generate = lambda px, prompts, **kw: seen.append(kw.get("engine")) or real(px, prompts, **kw)
    res = run_vqa(model, ds, DECODING, 8, tmp_path / "o", "v", progress=False, decode_engine="hf")
    assert seen and set(seen) == {"hf"} and res["config"]["decode_engine"] == "hf"
    assert "engine" not in res["cache"]["key"]["generate_kwargs"]  # the engine does not change an answer


@pytest.fixture(scope="module")
def decode_rows():
    spec = importlib.util.spec_from_file_location("bench_decode_rows", ROOT / "benchmarks" / "decode_rows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vqav2_pipeline_projection_is_the_hand_arithmetic(decode_rows):
    # 40,504 images at 100 img/s = 405.04 s; 214,354 questions at 200 q/s = 1,071.77 s; total 1,476.81 s
    assert decode_rows.project_vqav2(images_per_s=100.0, questions_per_s=200.0) == pytest.approx(
        1476.81 / 60, rel=1e-12
    )
    assert decode_rows.project_vqav2(40_504.0, 214_354.0) == pytest.approx(2 / 60, rel=1e-12)


def test_logit_difference_column(decode_rows):
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # (B=2, V): a loop that prefills each sample once
    b = a.repeat_interleave(3, 0)  # (B x 3 beams, V): one that prefills every beam
    b[4, 1] += 0.25
    # step 1: rows repeated to line up, worst entry 0.25; step 2: 5 rows cannot line up with 2 -> not compared
    assert decode_rows.max_logit_diff([a, a], [b, torch.zeros(5, 2)]) == (0.25, 1)
    assert decode_rows.max_logit_diff([], []) == (None, 0)
    llm = tiny_blip2("opt").language_model
    ids = torch.tensor([[2, 5, 7], [2, 9, 4]])
    with torch.no_grad():
        outs = [llm(input_ids=ids[:, : k + 1]).logits[:, -1] for k in range(3)]  # (2, V) per call
        seen = decode_rows.step_logits(llm, lambda: [llm(input_ids=ids[:, : k + 1]) for k in range(3)], steps=2)
    assert len(seen) == 2 and all(torch.equal(s, o) for s, o in zip(seen, outs))  # the first 2 calls, last position

    def masks_in_place():  # a decode loop that suppresses a token in the logits it got (min_new_tokens does)
        llm(input_ids=ids).logits[:, -1, 3] = -float("inf")

    with torch.no_grad():
        (kept,) = decode_rows.step_logits(llm, masks_in_place, steps=1)
    assert torch.equal(kept, outs[2]) and torch.isfinite(kept).all()  # recorded before the mask: a copy


@pytest.mark.gpu
def test_grouped_on_cuda_with_workers_and_auto_batch_size(tmp_path, monkeypatch):
    """CUDA: pinned batches from 2 workers, the device synchronised around the soft prompt, free memory read."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 arithmetic on both paths
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ds, _ = vqa_split(tmp_path / "data")
    model = tiny_blip2("opt").cuda()
    run_vqa(model, ds, DECODING, 4, tmp_path / "p", "v", progress=False, pipeline="per_question")
    res = run_vqa(model, ds, DECODING, 4, tmp_path / "g", "v", progress=False, pipeline="grouped", num_workers=2)
    assert _files(tmp_path / "g") == _files(tmp_path / "p") and res["counts"]["n_predicted"] == 16
    n, info = auto_batch_size(model, num_beams=5, max_new_tokens=10)
    raw = int(0.5 * info["free_bytes"] // info["bytes_per_question"])
    assert info["free_bytes"] > 0 and n == max(1, min(256, raw // 8 * 8 if raw >= 8 else raw))
