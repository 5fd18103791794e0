"""Sharded evaluation drivers on 2 gloo processes == one process (VQA generation and retrieval re-ranking).

The VQA batches differ between the runs (one process: [0,1] [2,3] [4,5]; two ranks: [0,1] [2] and [3,4] [5]), so
this also checks that batched generation does not depend on the batch composition. The second VQA run resumes a
single-process run that was killed after its first batch: every rank reads the other world size's cache.
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from test_eval_drivers import TINY_VQA, _tiny_blip2, _tiny_qformer, retrieval_data, vqa_data  # same folder

from blip2lib.data import FORMATS, QuestionProcessor, RetrievalEvalDataset, VQAEvalDataset, image_eval_transform
from blip2lib.evaluate import run_retrieval, run_vqa
from blip2lib.toy.synthetic import tiny_bert_tokenizer

W = 2


def _datasets(root: Path):
    tf = image_eval_transform(28)
    vqa = VQAEvalDataset(root / "coco/images", root / FORMATS["vqa_val_eval"]["file"], tf, QuestionProcessor())
    ret = RetrievalEvalDataset(root / "flickr30k/images", root / FORMATS["flickr30k_test"]["file"], tf)
    return vqa, ret


def _evaluate(root: Path, out: Path) -> dict:
    torch.set_num_threads(1)
    vqa_ds, ret_ds = _datasets(root)
    model = _tiny_blip2("opt").double()
    res = {"vqa": run_vqa(model, vqa_ds, TINY_VQA, 2, out / "vqa", "vqa_val_eval", progress=False)}
    res["resumed"] = run_vqa(model, vqa_ds, TINY_VQA, 2, out / "resume", "vqa_val_eval", progress=False)
    res["retrieval"] = run_retrieval(
        _tiny_qformer(),
        ret_ds,
        tiny_bert_tokenizer(),
        k=3,
        batch_size=2,
        out_dir=out / "ret",
        itm_batch_size=4,
        progress=False,
        save_scores=True,
    )
    return res


def _worker(rank: int, init_file: str, root: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        res = _evaluate(Path(root), Path(out))
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow  # two spawned interpreters re-import torch + transformers: ~50 s on the shared 2-core box
def test_sharded_vqa_and_retrieval_equal_single_process(tmp_path):
    root = tmp_path / "data"
    vqa_data(root, n=6)
    retrieval_data(root, n_img=5)
    single = _evaluate(root, tmp_path / "single")
    # a single-process run killed after its first batch, to be resumed by the two ranks
    vqa_ds, _ = _datasets(root)
    model, calls = _tiny_blip2("opt").double(), []
    original = model.generate

    def dying(pixels, prompts, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return original(pixels, prompts, **kw)

    model.generate = dying
    sharded = tmp_path / "sharded"
    with pytest.raises(KeyboardInterrupt):
        run_vqa(model, vqa_ds, TINY_VQA, 2, sharded / "resume", "vqa_val_eval", progress=False)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), str(root), str(sharded)), nprocs=W, join=True)
    ranks = [json.loads((sharded / f"rank{r}.json").read_text()) for r in range(W)]
    assert ranks[0] == ranks[1]  # every rank returns rank 0's result
    res = ranks[0]
    preds = json.loads((tmp_path / "single/vqa/predictions.json").read_text())
    assert json.loads((sharded / "vqa/predictions.json").read_text()) == preds and len(preds) == 6
    assert json.loads((sharded / "resume/predictions.json").read_text()) == preds
    assert res["vqa"]["metrics"] == single["vqa"]["metrics"]
    assert res["vqa"]["config"]["world_size"] == 2 and [s["generated_this_run"] for s in
                                                         res["vqa"]["timing"]["per_rank"]] == [3, 3]  # fmt: skip
    assert res["resumed"]["timing"]["from_cache"] == 2 and res["resumed"]["timing"]["generated_this_run"] == 4
    assert sorted(p.name for p in (sharded / "vqa").glob("predictions.*.jsonl")) == [
        "predictions.0.jsonl", "predictions.1.jsonl"]  # fmt: skip
    a, b = torch.load(tmp_path / "single/ret/scores.pt"), torch.load(sharded / "ret/scores.pt")
    for key in ("itc", "score_i2t", "score_t2i"):
        assert torch.allclose(a[key], b[key], atol=1e-12), key
    assert res["retrieval"]["metrics"] == single["retrieval"]["metrics"]
