"""Retrieval scoring: recalls on hand-built matrices, re-ranking vs brute force, 2-rank sharding.

See docs/paper_map.md §4.3, §5.3.
"""

import datetime
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from blip2lib import dist
from blip2lib.evaluate.retrieval import NEG_FILL, ranks, recall_at_k, rerank_scores, shard_rows

DT = torch.float64


def _row_with_rank(n, gt, rank):
    """A score row over n columns whose ground-truth column `gt` has exactly `rank` strictly higher entries."""
    others = [c for c in range(n) if c != gt]
    row = torch.empty(n, dtype=DT)
    for pos, c in enumerate(others):  # distinct descending scores 100, 99, ...
        row[c] = 100.0 - pos
    row[gt] = 100.0 - rank + 0.5  # between the (rank-1)-th and rank-th other column
    return row


def test_recalls_on_designed_ranks():
    designed = [0, 0, 1, 4, 5, 9, 10, 11, 3, 0, 7, 2]  # 12 images, caption i belongs to image i
    n = len(designed)
    s = torch.stack([_row_with_rank(n, i, r) for i, r in enumerate(designed)])
    assert ranks(s, [[i] for i in range(n)]).tolist() == designed
    res = recall_at_k(s, list(range(n)), [[i] for i in range(n)], score_t2i=torch.eye(n, dtype=DT))
    # rank < 1: {0,0,0} = 3/12; rank < 5: {0,0,1,4,3,0,2} = 7/12; rank < 10: all but {10, 11} = 10/12
    assert (
        res["txt_r1"] == 25.0
        and res["txt_r5"] == pytest.approx(700 / 12)
        and res["txt_r10"] == pytest.approx(1000 / 12)
    )
    assert res["txt_r_mean"] == pytest.approx((25 + 700 / 12 + 1000 / 12) / 3)
    # t2i given explicitly as the identity: every text finds its image first
    assert res["img_r1"] == res["img_r5"] == res["img_r10"] == res["img_r_mean"] == 100.0
    assert res["r_mean"] == pytest.approx((res["txt_r_mean"] + 100.0) / 2)
    assert res["agg_metrics"] == res["txt_r_mean"] and res["unit"] == "percent"


def test_multiple_ground_truths_take_the_best_rank():
    # 2 images x 4 captions; image 0 owns captions {0, 1}, image 1 owns {2, 3}
    s = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.3, 0.7]], dtype=DT)
    # image 0: caption 1 (0.9) is top -> 0; image 1: best own caption 3 (0.7) is behind caption 0 (0.8) -> 1
    assert ranks(s, [[0, 1], [2, 3]]).tolist() == [0, 1]
    res = recall_at_k(s, [0, 0, 1, 1], [[0, 1], [2, 3]])  # t2i defaults to s.T
    # texts: t0 [0.1, 0.8] -> 1, t1 [0.9, 0.1] -> 0, t2 [0.5, 0.3] -> 1, t3 [0.2, 0.7] -> 0
    assert res["txt_r1"] == 50.0 and res["txt_r5"] == 100.0
    assert res["img_r1"] == 50.0 and res["img_r10"] == 100.0
    assert res["r_mean"] == pytest.approx(((50 + 100 + 100) / 3 + (50 + 100 + 100) / 3) / 2)
    # numpy input works the same
    assert recall_at_k(s.numpy(), [0, 0, 1, 1], [[0, 1], [2, 3]]) == res


def test_tie_rules():
    row = torch.tensor([[0.5, 0.5, 0.5, 0.1]], dtype=DT)
    # GT {1}: nothing higher, 2 tied non-GT (cols 0, 2) -> pessimistic 2, optimistic 0
    assert ranks(row, [[1]]).item() == 2 and ranks(row, [[1]], ties="optimistic").item() == 0
    # GT {1, 2}: only col 0 is a tied non-GT -> pessimistic 1 (other positives never count against you)
    assert ranks(row, [[1, 2]]).item() == 1
    # GT {3}: 3 strictly higher, no ties -> 3 under both rules
    assert ranks(row, [[3]]).item() == 3 == ranks(row, [[3]], ties="optimistic").item()
    # a collapsed model (constant scores, 12 x 12) gets 0 recall under the pessimistic rule, 100 under optimistic
    const = torch.zeros(12, 12, dtype=DT)
    gt = [[i] for i in range(12)]
    assert recall_at_k(const, list(range(12)), gt)["r_mean"] == 0.0
    assert recall_at_k(const, list(range(12)), gt, ties="optimistic")["r_mean"] == 100.0
    # without ties both rules agree with LAVIS's argsort ranking
    g = torch.Generator().manual_seed(3)
    s = torch.rand(6, 9, generator=g, dtype=DT)
    pos = [[1, 4], [0], [2, 3, 8], [5], [6], [7]]
    lavis = [min(int(np.where(np.argsort(r)[::-1] == p)[0][0]) for p in ps) for r, ps in zip(s.numpy(), pos)]
    assert ranks(s, pos).tolist() == lavis == ranks(s, pos, ties="optimistic").tolist()
    with pytest.raises(ValueError, match="ties"):
        ranks(s, pos, ties="random")


def _itm_table(n_img, n_txt, seed=7):
    return torch.randn(n_img, n_txt, generator=torch.Generator().manual_seed(seed), dtype=DT)


class FakeITM:
    """ITM logits read from a fixed table; records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, img_idx, txt_idx):
        assert img_idx.shape == txt_idx.shape and img_idx.dtype == torch.long
        self.calls.append((img_idx.clone(), txt_idx.clone()))
        return self.table[img_idx, txt_idx]


def _brute(sim, table, k, fusion):
    """Python loops: for every row, sort candidates by ITC, keep the first k, fuse; -100 elsewhere."""
    n_img, n_txt = sim.shape
    i2t = torch.full((n_img, n_txt), NEG_FILL, dtype=DT)
    t2i = torch.full((n_txt, n_img), NEG_FILL, dtype=DT)

    def fuse(i, j):
        itc, itm = float(sim[i, j]), float(table[i, j])
        return {"itm+itc": itm + itc, "itm": itm, "itc": itc}[fusion]

    for i in range(n_img):
        for j in sorted(range(n_txt), key=lambda c: -float(sim[i, c]))[:k]:
            i2t[i, j] = fuse(i, j)
    for j in range(n_txt):
        for i in sorted(range(n_img), key=lambda r: -float(sim[r, j]))[:k]:
            t2i[j, i] = fuse(i, j)
    return i2t, t2i


@pytest.mark.parametrize("fusion", ["itm+itc", "itm", "itc"])
@pytest.mark.parametrize("k", [1, 3, 50])  # 50 > N: every pair is a candidate
def test_rerank_equals_brute_force(fusion, k):
    sim = torch.rand(7, 11, generator=torch.Generator().manual_seed(1), dtype=DT) * 2 - 1
    table = _itm_table(7, 11)
    itm = FakeITM(table)
    i2t, t2i = rerank_scores(sim, itm if fusion != "itc" else None, k=k, fusion=fusion, batch_size=4)
    ref_i2t, ref_t2i = _brute(sim, table, k, fusion)
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)
    if k == 50:
        assert (i2t != NEG_FILL).all() and (t2i != NEG_FILL).all()
    if fusion != "itc":  # batched: pairs = 7*min(k,11) + 11*min(k,7), at most 4 per call
        n_pairs = 7 * min(k, 11) + 11 * min(k, 7)
        assert sum(c[0].numel() for c in itm.calls) == n_pairs
        assert max(c[0].numel() for c in itm.calls) <= 4
        assert len(itm.calls) == math.ceil(7 * min(k, 11) / 4) + math.ceil(11 * min(k, 7) / 4)


def test_itm_rerank_fixes_an_itc_mistake_only_inside_top_k():
    sim = torch.tensor([[0.9, 0.8, 0.1]], dtype=DT)  # 1 image; its caption is text 1
    table = torch.tensor([[0.0, 0.5, 5.0]], dtype=DT)  # ITM loves text 2, but text 2 is outside the top-2
    i2t, _ = rerank_scores(sim, FakeITM(table), k=2)
    assert i2t.tolist() == [[0.9, 1.3, NEG_FILL]]  # 0+0.9, 0.5+0.8, not a candidate
    assert ranks(i2t, [[1]]).item() == 0
    itc, _ = rerank_scores(sim, None, k=2, fusion="itc")
    assert ranks(itc, [[1]]).item() == 1


def test_argument_errors():
    sim = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs an itm_fn"):
        rerank_scores(sim, None)
    with pytest.raises(ValueError, match="fusion must be"):
        rerank_scores(sim, FakeITM(torch.zeros(2, 3)), fusion="sum")


def test_shard_rows_partition_like_lavis():
    for n in range(0, 23):
        for w in range(1, 5):
            parts = [shard_rows(n, r, w) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert all(len(p) <= n // w + 1 for p in parts)
    assert shard_rows(10, 0, 2) == range(0, 6) and shard_rows(10, 1, 2) == range(6, 10)


# --- 2-process gloo: each rank scores its rows, all_reduce_sum merges; must equal one process exactly ----------
W, N_IMG, N_TXT, K = 2, 5, 9, 3


def _sim():
    return torch.rand(N_IMG, N_TXT, generator=torch.Generator().manual_seed(11), dtype=DT)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=30)
    )
    try:
        itm = FakeITM(_itm_table(N_IMG, N_TXT))
        i2t, t2i = rerank_scores(_sim(), itm, k=K, batch_size=5)
        n_pairs = sum(c[0].numel() for c in itm.calls)
        torch.save({"i2t": i2t, "t2i": t2i, "n_pairs": n_pairs}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_sharded_rerank_equals_single_process(tmp_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=W, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    assert not dist.is_dist()
    ref_i2t, ref_t2i = rerank_scores(_sim(), FakeITM(_itm_table(N_IMG, N_TXT)), k=K)
    for o in outs:
        assert torch.equal(o["i2t"], ref_i2t) and torch.equal(o["t2i"], ref_t2i)
    # the work really was split: image rows 0-2 on rank 0, 3-4 on rank 1 (step = 5 // 2 + 1 = 3);
    # text rows 0-4 / 5-8 (step 5); pairs per rank = rows * K
    assert outs[0]["n_pairs"] == 3 * K + 5 * K and outs[1]["n_pairs"] == 2 * K + 4 * K


# ----------------------------------------------------------------------------------------------------------------
# Captions go through LAVIS's blip_caption at evaluation (ret_*_eval.yaml), in the driver and the CLI / table path

RAW_CAPTIONS = [
    ["A Dog, running!  On the BEACH.", "Two (small) cats: sleeping; on a mat~"],
    ["   The sky is #blue*   \n", " ".join(f"w{i}" for i in range(60))],
]
# worked out by hand from the definition: lower-case; each of . ! " ( ) * # : ; ~ becomes a space; runs of 2+
# whitespace become one space; strip; keep the first 50 space-separated words (the comma is not in the list)
PROCESSED = [
    "a dog, running on the beach",
    "two small cats sleeping on a mat",
    "the sky is blue",
    " ".join(f"w{i}" for i in range(50)),
]


def _retrieval_files(root):
    import json

    from PIL import Image

    from blip2lib.data import FORMATS

    entries = []
    for i, caps in enumerate(RAW_CAPTIONS):
        img = f"flickr30k-images/{i}.jpg"
        path = root / FORMATS["flickr30k_test"]["images_root"] / img
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)
        entries.append({"image": img, "caption": caps})
    ann = root / FORMATS["flickr30k_test"]["file"]
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(entries))
    return root / FORMATS["flickr30k_test"]["images_root"], ann


class _RecordingTokenizer:
    """The tiny BERT tokenizer, recording the texts of every call."""

    def __init__(self):
        from blip2lib.toy.synthetic import tiny_bert_tokenizer

        self.tok, self.texts = tiny_bert_tokenizer(), []

    def __call__(self, texts, **kw):
        self.texts.append(list(texts))
        return self.tok(texts, **kw)


def _tiny_qformer():
    from blip2lib.config import tiny_config
    from blip2lib.model import Blip2QFormerModel

    torch.manual_seed(0)
    return Blip2QFormerModel(tiny_config()).eval()


def test_driver_tokenises_blip_caption_texts(tmp_path):
    from blip2lib.data import CaptionProcessor, RetrievalEvalDataset, image_eval_transform
    from blip2lib.evaluate import run_retrieval

    images, ann = _retrieval_files(tmp_path / "data")
    raw = RetrievalEvalDataset(images, ann, image_eval_transform(28))  # no text processor: raw captions
    assert raw.text == [c for caps in RAW_CAPTIONS for c in caps]
    tok = _RecordingTokenizer()
    res = run_retrieval(_tiny_qformer(), raw, tok, k=2, fusion="itc", out_dir=tmp_path / "o", progress=False)
    assert tok.texts == [PROCESSED]
    assert res["config"]["text_processor"] == "CaptionProcessor(prompt='', max_words=50)"
    # a dataset that already processed its captions gives the same texts (blip_caption is idempotent)
    done = RetrievalEvalDataset(images, ann, image_eval_transform(28), CaptionProcessor())
    assert done.text == PROCESSED
    tok = _RecordingTokenizer()
    run_retrieval(_tiny_qformer(), done, tok, k=2, fusion="itc", out_dir=tmp_path / "o2", progress=False)
    assert tok.texts == [PROCESSED]


def test_cli_and_table_path_tokenise_blip_caption_texts(tmp_path, monkeypatch):
    import yaml

    import blip2lib.toy.synthetic
    from blip2lib.evaluate.__main__ import RetrievalParams, build_dataset, main

    _retrieval_files(tmp_path / "data")
    tok = _RecordingTokenizer()
    monkeypatch.setattr(blip2lib.toy.synthetic, "tiny_bert_tokenizer", lambda: tok)  # what load_model("tiny") calls
    params = {"checkpoint": "tiny", "data_root": str(tmp_path / "data"), "split": "flickr30k_test", "k": 2,
              "fusion": "itc", "out_dir": str(tmp_path / "cli"), "progress": False}  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["retrieval", "--params", str(path)]) == 0
    assert tok.texts == [PROCESSED]
    # the dataset the CLI (and blip2lib.workbook.tables, through run_params) builds holds the processed texts
    assert build_dataset(RetrievalParams.from_dict(params), "retrieval", 28).text == PROCESSED
