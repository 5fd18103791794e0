"""Periodic validation probes: VQA and caption scoring with their baselines, the retrieval probe's ITM re-ranking."""

import json

import pytest
import torch

from blip2lib.validate import vqa_probe


class _FakeVQAModel:
    """Answers from a fixed list; records what ``generate`` was given."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, images, prompts, questions=None, **decoding):
        self.calls.append({"n": len(images), "prompts": prompts, "questions": questions, **decoding})
        start = sum(c["n"] for c in self.calls[:-1])
        return self.answers[start : start + len(images)]


def test_vqa_probe_scores_with_official_accuracy_and_a_constant_baseline():
    val = {
        "images": torch.zeros(3, 3, 4, 4),
        "questions": ["what colour is it?", "what colour is the square?", "what shape is it?"],
        "answers": [["red"] * 10, ["blue"] * 2 + ["red"] * 8, ["circle"] * 10],
    }
    model = _FakeVQAModel(["Red", "blue", "square"])
    out = vqa_probe(model, val, torch.device("cpu"), "Question: {} Answer:", batch=2)
    # q1: "Red" vs ten identical "red": the official evaluator then compares raw strings -> 0 (LAVIS's gives 1);
    # q2: "blue" given by 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; q3: 0  -> 0.6 / 3
    assert out["val_vqa_acc"] == pytest.approx(100 * 0.6 / 3)
    # most frequent answer over the set: "red" (18 of 30) -> q1 1, q2 1 (8 of 10 say red), q3 0
    assert out["val_vqa_acc_constant"] == pytest.approx(100 * 2 / 3)
    assert out["val_answer_diversity"] == 1.0 and out["val_answers"] == ["Red", "blue", "square"]
    assert [c["n"] for c in model.calls] == [2, 1]  # batched
    first = model.calls[0]
    assert first["prompts"] == ["Question: what colour is it? Answer:", "Question: what colour is the square? Answer:"]
    assert first["questions"] == val["questions"][:2]  # the question also goes through the Q-Former
    assert first["num_beams"] == 1 and first["max_new_tokens"] == 10


def test_vqa_finetune_validates_and_keeps_the_best_by_vqa_accuracy(tmp_path):
    from blip2lib.train import TrainParams, train

    params = TrainParams(stage="vqa_ft", model="tiny", llm="opt", train_data="synthetic", val_data="synthetic",
                         val_images=6, steps=2, batch_size=4, warmup_steps=1, image_size=28, max_txt_len=12,
                         progress=False, ckpt_every=2, eval_every=1)  # fmt: skip
    r = train(params, tmp_path)
    val = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [0, 1, 2]  # step 0: the untrained model (eval_at_start)
    for v in val:
        assert 0.0 <= v["val_vqa_acc"] <= 100.0 and len(v["val_answers"]) == 6
    assert r.summary["best"]["key"] == "val_vqa_acc"
    assert r.summary["best"]["metric"] == max(v["val_vqa_acc"] for v in val if v["step"] > 0)
    assert r.summary["best"]["step"] in (1, 2)  # the start is a reference, never the "best" checkpoint


class _FakeCaptioner:
    def __init__(self, captions):
        self.captions, self.prompts = captions, []

    def generate(self, images, prompt, **decoding):
        self.prompts.append(prompt)
        return self.captions[: len(images)]  # one batch: every validation image


def test_caption_probe_scores_greedy_captions_against_all_references():
    from blip2lib.evaluate.caption import coco_caption_scores
    from blip2lib.validate import caption_probe

    texts = ["a red circle", "a small red circle", "a blue square", "a large blue square", "two green triangles"]
    val = {"images": torch.zeros(3, 3, 4, 4), "texts": texts, "img2txt": [[0, 1], [2, 3], [4]]}
    preds = ["a small red circle", "a blue circle", "two green triangles"]
    out = caption_probe(_FakeCaptioner(preds), val, torch.device("cpu"), prompt="a photo of")
    refs = {0: texts[:2], 1: texts[2:4], 2: texts[4:]}
    ref = coco_caption_scores(dict(enumerate(preds)), refs, metrics=("BLEU", "CIDEr"))
    assert out["val_cider"] == pytest.approx(ref["CIDEr"]) and out["val_bleu4"] == pytest.approx(ref["Bleu_4"])
    assert out["val_cider_plus_bleu4"] == pytest.approx(ref["CIDEr"] + ref["Bleu_4"])
    perfect = caption_probe(_FakeCaptioner(["a red circle", "a blue square", "two green triangles"]), val,
                            torch.device("cpu"))  # fmt: skip
    assert perfect["val_cider"] > out["val_cider"]


def test_caption_finetune_keeps_the_best_by_cider_plus_bleu4(tmp_path):
    from blip2lib.train import TrainParams, train

    params = TrainParams(stage="caption_ft", model="tiny", llm="opt", train_data="synthetic", val_data="synthetic",
                         val_images=6, steps=2, batch_size=4, warmup_steps=1, image_size=28, max_txt_len=12,
                         progress=False, ckpt_every=2, eval_every=1, prompt="a photo of")  # fmt: skip
    r = train(params, tmp_path)
    val = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [0, 1, 2]
    assert all(v["val_cider_plus_bleu4"] == pytest.approx(v["val_cider"] + v["val_bleu4"]) for v in val)
    assert r.summary["best"]["key"] == "val_cider_plus_bleu4"
    assert r.summary["best"]["metric"] == max(v["val_cider_plus_bleu4"] for v in val if v["step"] > 0)


class _FakeRetrievalModel:
    """Image i and caption i match. ITC ranks every true pair LAST; ITM gives the true pair +10, any other 0.

    Images carry their index in pixel (0, 0, 0); captions are one word each, decoded back to their index.
    """

    def __init__(self, tokenizer, words):
        self.n = len(words)
        self.index = {tokenizer.convert_tokens_to_ids(w): i for i, w in enumerate(words)}

    def eval(self):
        return self

    def encode_image(self, images):
        idx = images[:, 0, 0, 0].round().long()  # (B,)
        return {"image_feats": idx, "image_embeds": idx}

    def _text_index(self, ids):
        return torch.tensor([self.index[int(t)] for t in ids[:, 1]])  # ids: [CLS] word [SEP] [PAD]...

    def encode_text(self, ids, mask):
        return {"text_feat": self._text_index(ids)}

    def itc_similarity(self, image_idx, text_idx):
        return ((text_idx[None, :] - image_idx[:, None]) % self.n).double() / self.n  # (N_img, N_txt), true = 0

    def itm_logits(self, image_idx, ids, mask):
        match = (image_idx == self._text_index(ids)).double()
        return torch.stack([torch.zeros_like(match), 10 * match], dim=1)  # (P, 2)


def test_retrieval_probe_itm_itc_recalls_come_from_the_itm_rescored_candidates():
    from blip2lib.toy.synthetic import tiny_bert_tokenizer
    from blip2lib.validate import retrieval_probe

    words = ["dog", "cat", "red", "blue", "green", "sky"]
    n = len(words)
    tok = tiny_bert_tokenizer()
    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float)
    val = {"images": images, "texts": words, "txt2img": list(range(n)), "img2txt": [[i] for i in range(n)]}
    out = retrieval_probe(_FakeRetrievalModel(tok, words), tok, val, torch.device("cpu"), batch=4)
    # ITC alone: every true pair is ranked last of 6 (rank 5), so R@1 = R@5 = 0 and only R@10 = 100
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
        assert out[f"val_{key}_itc"] == 0.0, key
    assert out["val_r_mean_itc"] == pytest.approx(100 / 3)
    # ITM + ITC over the top-k (k = 6: every candidate): 10 + 0 beats any other pair's <= 5/6 in both directions
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert out[f"val_{key}_itm_itc"] == 100.0, key
    assert out["val_itm_acc"] == 100.0 and out["val_itm_acc_constant"] == 50.0  # positives > 0, rolled pairs <= 0
