"""Model-level distributed check: Stage1Task on 2 gloo processes == one process on the whole batch.

See docs/paper_map.md §2.

ITM uses a fixed negative sampler (global indices), texts have equal token counts per rank (so the ITG mean of
per-rank means equals the global mean). DDP averages gradients, so the rank-average of the parameter gradients
must equal the single-process gradient (see tests/unit/test_losses_dist.py for the derivation).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from blip2lib.config import tiny_config
from blip2lib.model import Blip2QFormerModel
from blip2lib.tasks import Stage1Task
from blip2lib.toy.synthetic import tiny_bert_tokenizer

W, B = 2, 2
TEXTS = ["a red circle", "a blue square", "two green dog", "the small cat"]  # 3 words each → equal token counts


def _sampler(sim_i2t, sim_t2i, rank, image_ids=None, image_ids_all=None):
    b, n = sim_i2t.shape
    g = torch.arange(b) + rank * b  # global row ids
    return (g + 1) % n, (g + 2) % n  # negative image per text, negative text per image (never the positive)


# Rank 0's captions are shorter than rank 1's: "longest" padding must agree on one global length for ITM's gather.
UNEVEN = ["a red circle", "a dog", "two green dog and the small cat", "the small blue cat"]


def _run(rank: int, batch: int, texts=TEXTS, text_padding: str = "max_length", use_itg: bool = True) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Blip2QFormerModel(tiny_config()).double()
    task = Stage1Task(model, tiny_bert_tokenizer(), max_txt_len=8, negative_sampler=_sampler,
                      text_padding=text_padding, use_itg=use_itg).eval()  # fmt: skip
    images = torch.randn(W * B, 3, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sl = slice(rank * batch, rank * batch + batch)
    out = task({"image": images[sl], "text_input": texts[sl]})
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": {k: float(v.detach()) for k, v in out.items() if k.endswith("loss")}, "grads": grads}


def _worker(rank: int, init_file: str, out_dir: str, kwargs: dict) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        torch.save(_run(rank, B, **kwargs), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_stage1_task_two_ranks_equal_single_process():
    single = _run(0, W * B)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d, {}), nprocs=W, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(W)]
    for term in ("itc_loss", "itm_loss", "itg_loss", "loss"):
        mean = sum(r["loss"][term] for r in ranks) / W
        assert mean == pytest.approx(single["loss"][term], abs=1e-10), term
    assert set(single["grads"]) == set(ranks[0]["grads"]) == set(ranks[1]["grads"])
    for name, g in single["grads"].items():
        ddp = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / W
        assert torch.allclose(ddp, g, atol=1e-10, rtol=1e-8), name


@pytest.mark.dist
def test_longest_padding_two_ranks_with_uneven_captions_equal_single_process():
    """Each rank pads to the global longest caption (a MAX all-reduce), so ITM's gathered negatives line up.

    ITG is off: with uneven token counts its rank-mean of per-rank means is not the global token mean (see above).
    The single-process reference pads to ``max_txt_len`` as LAVIS does: padding must not change ITC or ITM.
    """
    kw = dict(texts=UNEVEN, text_padding="longest", use_itg=False)
    single = _run(0, W * B, texts=UNEVEN, text_padding="max_length", use_itg=False)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d, kw), nprocs=W, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(W)]
    assert "itg_loss" not in single["loss"]
    for term in ("itc_loss", "itm_loss", "loss"):
        mean = sum(r["loss"][term] for r in ranks) / W
        assert mean == pytest.approx(single["loss"][term], abs=1e-10), term
    for name, g in single["grads"].items():
        ddp = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / W
        assert torch.allclose(ddp, g, atol=1e-10, rtol=1e-8), name
