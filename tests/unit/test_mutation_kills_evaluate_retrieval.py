"""Retrieval driver (blip2lib/evaluate/drivers.py ``run_retrieval``): text handling, chunking, fusion, fields, errors.

The mutation pass (docs/mutation.md) showed these unpinned: the caption processing and tokeniser arguments, the
encoder chunks and the trimmed text widths, the fused scores, the result fields and defaults, the image pass (loader
settings, the dataset's bad-sample log, the progress bar, bad rows of every batch) and the two error messages. The
stub model makes every score known in advance: image i and its captions share the one-hot feature e_i, and the ITM
logit of a pair is the image's pixel value plus 0.01 x the caption's length.
"""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from blip2lib.evaluate import drivers, run_retrieval
from blip2lib.evaluate import drivers_common as dc


class Items(Dataset):
    """In-memory eval set: ``items[i]`` dict (``image`` added), or None for an unreadable image."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return None if self.items[i] is None else {"image": torch.full((3, 2, 2), float(i)), **self.items[i]}


class Gallery(Items):
    """Retrieval eval set: images 0..n-1 (None in ``bad``); captions ``texts`` with their image in ``txt2img``."""

    def __init__(self, n, texts, txt2img, bad=()):
        super().__init__([None if i in bad else {"index": i} for i in range(n)])
        self.text, self.txt2img = list(texts), dict(enumerate(txt2img))


class Tokenizer:
    """Text -> ids ``[len(text), 1, ..., 1, 0, ...]``: one real token per word, so the trimmed width is known."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts, **kw):
        self.calls.append((list(texts), kw))
        rows = [[len(t)] + [1] * (len(t.split()) - 1) for t in texts]
        ids = torch.tensor([r + [0] * (kw["max_length"] - len(r)) for r in rows])  # (Nt, L)
        return type("Tok", (), {"input_ids": ids, "attention_mask": (ids != 0).long()})


class Matcher(nn.Module):
    """ITC: image i and every caption of image i share feature e_i. ITM positive logit: pixel value + 0.01 * text len.

    Records the batch sizes and widths of every call.
    """

    def __init__(self, n_img, txt2img):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.n, self.txt2img, self.log = n_img, txt2img, []
        self.by_len = {}

    def encode_image(self, images):
        self.log.append(("image", images.shape[0]))
        value = images[:, 0, 0, 0].long()  # (B,) the image index
        return {
            "image_embeds": images.flatten(1)[:, None, :],
            "image_feats": nn.functional.one_hot(value, self.n)[:, None, :].double(),
        }  # (B, 1, 12), (B, 1, n) fmt: skip

    def encode_text(self, ids, mask):
        self.log.append(("text", tuple(ids.shape)))
        # the caption's image is looked up by its length token (captions of the tests have distinct lengths)
        return {"text_feat": nn.functional.one_hot(torch.tensor([self.by_len[int(i)] for i in ids[:, 0]]),
                                                   self.n).double()}  # fmt: skip

    def itc_similarity(self, image_feats, text_feat):
        self.log.append(("itc", image_feats.shape[0]))
        return (image_feats @ text_feat.t()).amax(1)  # (Bi, Nt)

    def itm_logits(self, image_embeds, ids, mask):
        self.log.append(("itm", tuple(ids.shape)))
        pos = image_embeds[:, 0, 0].double() + 0.01 * ids[:, 0].double()
        return torch.stack([torch.full_like(pos, -999.0), pos], 1)  # (P, 2)


def gallery(texts=("A Dog!", "two cats", "a red ball here"), txt2img=(0, 1, 2), n=3, bad=()):
    ds = Gallery(n, texts, txt2img, bad)
    model = Matcher(n, txt2img)
    model.by_len = {len(t): img for t, img in zip(texts, txt2img)}
    model.by_len.update({len(t.lower().replace("!", "")): img for t, img in zip(texts, txt2img)})
    return ds, model


def test_retrieval_text_handling_scores_and_fields(tmp_path):
    ds, model = gallery()
    tok = Tokenizer()
    model.train()
    res = run_retrieval(model, ds, tok, k=5, fusion="itm", text_max_len=6, batch_size=2, out_dir=tmp_path,
                        split_name="test", itm_batch_size=4, progress=False, save_scores=True)  # fmt: skip
    assert model.training  # train mode restored
    assert tok.calls == [
        (
            ["a dog", "two cats", "a red ball here"],
            {"padding": "max_length", "truncation": True, "max_length": 6, "return_tensors": "pt"},
        )
    ]
    # images and texts in chunks of batch_size; texts trimmed to their longest caption (2 words, then 4 words)
    assert [e for e in model.log if e[0] != "itm"] == [("image", 2), ("image", 1), ("text", (2, 2)), ("text", (1, 4)),
                                                       ("itc", 2), ("itc", 1)]  # fmt: skip
    scores = torch.load(tmp_path / "scores.pt")
    lengths = torch.tensor([5.0, 8.0, 15.0], dtype=torch.float64)
    itm = torch.arange(3.0, dtype=torch.float64)[:, None] + 0.01 * lengths[None, :]  # (Ni, Nt): all pairs candidates
    assert torch.equal(scores["itc"], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(scores["score_i2t"], itm, atol=1e-6)
    assert torch.allclose(scores["score_t2i"], itm.t(), atol=1e-6)
    assert scores["txt2img"] == [0, 1, 2] and scores["img2txt"] == [[0], [1], [2]]
    assert res["metrics_itc_only"]["txt_r1"] == 100.0 and res["metrics"]["img_r1"] == 100 / 3  # itm: image 2 wins
    assert res["config"] == {**res["config"], "k": 5, "fusion": "itm", "text_max_len": 6, "text_padding": "max_length",
                             "text_processor": "CaptionProcessor(prompt='', max_words=50)", "itm_batch_size": 4,
                             "batch_size": 2}  # fmt: skip
    assert (res["task"], res["split"]) == ("retrieval", "test")
    counts = {k: v for k, v in res["counts"].items() if k != "duplicate_captions"}  # checked by its own tests
    assert json.loads((tmp_path / "result.json").read_text())["counts"] == res["counts"] and counts == {
        "n_images": 3, "n_texts": 3, "n_images_scored": 3, "n_texts_scored": 3, "complete": True,
        "bad_samples": {"count": 0, "examples": [], "policy": "skipped and excluded from scoring"}}  # fmt: skip


def test_retrieval_itm_batches_and_no_scores_file(tmp_path):
    ds, model = gallery()
    run_retrieval(model, ds, Tokenizer(), k=1, fusion="itm+itc", out_dir=tmp_path, itm_batch_size=2, progress=False,
                  text_processor=str)  # fmt: skip
    assert [e[1][0] for e in model.log if e[0] == "itm"] == [2, 1, 2, 1]  # k=1: 3 pairs per direction, 2 per call
    assert not (tmp_path / "scores.pt").exists()
    ds, model = gallery()
    res = run_retrieval(model, ds, Tokenizer(), fusion="itc", out_dir=tmp_path, progress=False, text_processor=str)
    assert [e for e in model.log if e[0] == "itm"] == [] and res["config"]["text_processor"] == repr(str)


def test_retrieval_drops_captions_of_unreadable_images(tmp_path):
    ds, model = gallery(texts=("a b", "c d e", "f", "g h i j"), txt2img=(0, 1, 1, 2), bad={1})
    model.by_len = {3: 0, 7: 1}  # the captions left, of the images left (renumbered 0, 1)
    tok = Tokenizer()
    res = run_retrieval(model, ds, tok, k=4, fusion="itc", out_dir=tmp_path, progress=False, save_scores=True)
    assert tok.calls[0][0] == ["a b", "g h i j"]
    scores = torch.load(tmp_path / "scores.pt")
    assert scores["txt2img"] == [0, 1] and scores["img2txt"] == [[0], [1]]
    assert res["counts"]["bad_samples"]["count"] == 1 and not res["counts"]["complete"]


def test_retrieval_errors(tmp_path):
    ds, model = gallery()
    with pytest.raises(ValueError) as err:
        run_retrieval(model, ds, Tokenizer(), fusion="sum", out_dir=tmp_path, progress=False)
    assert str(err.value) == "fusion must be one of ('itm+itc', 'itm', 'itc'), got 'sum'"
    ds, model = gallery(bad={0, 1, 2})
    with pytest.raises(RuntimeError) as err:
        run_retrieval(model.train(), ds, Tokenizer(), out_dir=tmp_path, progress=False)
    assert str(err.value) == ("retrieval: none of the 3 images could be read (first: [{'index': 0, 'bad': "
                              "'<unknown>: sample was None'}])")  # fmt: skip
    assert model.training


class LoggedGallery(Gallery):
    """A gallery whose unreadable images are recorded in its ``bad_log``, as the real readers do."""

    def __init__(self, *args, **kw):
        from blip2lib.data.images import BadSampleLog

        super().__init__(*args, **kw)
        self.bad_log = BadSampleLog()

    def __getitem__(self, i):
        if self.items[i] is None:
            self.bad_log.record(f"im{i}.jpg", "broken")
        return super().__getitem__(i)


def test_image_pass_loader_bar_and_bad_rows_of_every_batch(tmp_path, monkeypatch):
    import tqdm.auto

    loaders, bars = [], []
    real_loader = dc.DataLoader

    def loader(*args, **kw):
        loaders.append(kw)
        return real_loader(*args, **kw)

    def bar(iterable, **kw):
        bars.append(kw)
        return iterable

    ds = LoggedGallery(4, ["a", "b c"], [0, 3], bad=(1, 2))
    model = Matcher(4, [0, 3])
    model.by_len = {1: 0, 3: 3}
    monkeypatch.setattr(dc, "DataLoader", loader)
    monkeypatch.setattr(tqdm.auto, "tqdm", bar)
    res = run_retrieval(model, ds, Tokenizer(), fusion="itc", batch_size=2, out_dir=tmp_path, num_workers=0)
    assert (loaders[0]["batch_size"], loaders[0]["num_workers"]) == (2, 0)
    assert loaders[0]["collate_fn"].bad_log is ds.bad_log
    assert bars == [{"desc": "images", "disable": False}]  # rank 0 with progress (the default)
    # one unreadable image in each batch of 2: both are listed, with the reasons the dataset recorded
    assert res["counts"]["bad_samples"]["examples"] == ["im1.jpg: broken", "im2.jpg: broken"]
    assert (res["counts"]["n_images_scored"], res["counts"]["n_texts_scored"]) == (2, 2)
    bars.clear()
    res = run_retrieval(model, ds, Tokenizer(), fusion="itc", out_dir=tmp_path, progress=False, num_workers=1)
    assert bars == [{"desc": "images", "disable": True}] and loaders[1]["num_workers"] == 1
    assert res["counts"]["bad_samples"]["examples"] == ["im1.jpg: broken", "im2.jpg: broken"]  # drained in the worker
    bars.clear()
    monkeypatch.setattr(drivers.dist, "is_main", lambda: False)
    monkeypatch.setattr(drivers.dist, "broadcast_object", lambda obj: obj)
    run_retrieval(model, ds, Tokenizer(), fusion="itc", out_dir=tmp_path / "r1")
    assert bars == [{"desc": "images", "disable": True}]  # other ranks: no bar


def test_retrieval_defaults_and_nested_scores_folder(tmp_path, monkeypatch):
    import tqdm.auto

    loaders, bars = [], []
    real_loader = dc.DataLoader
    monkeypatch.setattr(dc, "DataLoader", lambda *a, **kw: loaders.append(kw) or real_loader(*a, **kw))
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda iterable, **kw: bars.append(kw) or iterable)
    monkeypatch.chdir(tmp_path)
    ds, model = gallery()
    res = run_retrieval(model, ds, Tokenizer())
    assert json.loads((tmp_path / "eval_retrieval" / "result.json").read_text())["split"] == res["split"] == ""
    cfg = res["config"]
    assert (cfg["k"], cfg["fusion"], cfg["text_max_len"], cfg["batch_size"], cfg["itm_batch_size"]) == (
        128, "itm+itc", 35, 64, 128)  # fmt: skip
    assert loaders[0]["num_workers"] == 0 and bars == [{"desc": "images", "disable": False}]
    run_retrieval(model, ds, Tokenizer(), out_dir=tmp_path / "new" / "dir", save_scores=True, progress=False)
    assert (tmp_path / "new" / "dir" / "scores.pt").exists()
