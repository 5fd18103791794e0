"""Length-bucketed captions (params text_len_buckets, blip2lib/data/collate.py): static text shapes, same step."""

import random

import pytest
import torch

from blip2lib.assemble import build_model_and_task
from blip2lib.config import ParamsError
from blip2lib.data.collate import bucket_length, bucket_task_text, check_buckets, pad_to_bucket
from blip2lib.toy.synthetic import synthetic_batch
from blip2lib.train import TrainParams

torch.set_num_threads(2)


def test_pad_to_bucket_values_and_bucket_choice():
    ids = torch.tensor([[101, 7, 102], [101, 102, 0]])
    # written out: 3 tokens go to the 4-bucket, right-padded with the value
    assert torch.equal(pad_to_bucket(ids, [2, 4, 8], value=0), torch.tensor([[101, 7, 102, 0], [101, 102, 0, 0]]))
    assert [bucket_length(n, [2, 4, 8]) for n in (1, 2, 3, 4, 5, 8)] == [2, 2, 4, 4, 8, 8]
    with pytest.raises(ValueError, match=r"a text of 9 tokens fits no bucket of \[2, 4, 8\]"):
        bucket_length(9, [2, 4, 8])
    assert check_buckets([32, 16], 32) == [16, 32]
    with pytest.raises(ParamsError, match=r"largest bucket 16 is below max_txt_len=32"):
        check_buckets([8, 16], 32)
    with pytest.raises(ParamsError, match="distinct positive lengths"):
        check_buckets([0, 32], 32)
    with pytest.raises(ParamsError, match="distinct positive lengths"):
        check_buckets([32, 32], 32)


def _text_tensors(task, batch) -> dict:
    """The task's tokenized text: Q-Former ids/mask (stage 1) or the LLM inputs (stage 2), RNG fixed."""
    if hasattr(task, "tokenize"):
        ids, mask = task.tokenize(batch["text_input"], torch.device("cpu"))
        return {"ids": ids, "mask": mask}
    task.rng.seed(1)
    return dict(task.llm_inputs(batch))


def _step(task, batch, seed):
    """Losses and gradients of one fp32 step (eval mode: no dropout, whose masks depend on the text length)."""
    torch.manual_seed(seed)  # ITM hard-negative sampling draws from the global RNG
    if hasattr(task, "rng"):
        task.rng.seed(seed)  # T5 prefix-LM split points
    task.zero_grad(set_to_none=True)
    out = task(batch)
    out["loss"].backward()
    losses = {k: float(v.detach()) for k, v in out.items() if k.endswith("loss")}
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize(
    "stage,llm,padding",
    [("stage1", "opt", "longest"), ("stage1", "opt", "max_length"), ("stage2", "opt", ""), ("stage2", "t5", "")],
)
def test_bucketed_step_equals_unbucketed(stage, llm, padding):
    params = TrainParams(stage=stage, model="tiny", llm=llm, image_size=28, max_txt_len=12, train_data="synthetic",
                         text_padding=padding or "max_length")  # fmt: skip
    random.seed(0)
    torch.manual_seed(0)
    model, task, _ = build_model_and_task(params, torch.device("cpu"))
    task.eval()
    batch = synthetic_batch(6, 28, seed=3)
    ref_losses, ref_grads = _step(task, batch, seed=1)
    plain = _text_tensors(task, batch)  # before: the longest text (or max_txt_len)
    bucket_task_text(task, [8, 20], params.max_txt_len)
    padded = _text_tensors(task, batch)  # after: at a bucket of [8, 20] (20 ≥ max_txt_len = 12)
    assert padded.keys() == plain.keys() and any(padded[k].shape[1] > t.shape[1] for k, t in plain.items())
    pad_id = (task.tokenizer if stage == "stage1" else task.model.tokenizer).pad_token_id
    pads = {"ids": pad_id, "input_ids": pad_id, "labels": -100}  # masks: 0
    for k, t in plain.items():
        n = t.shape[1]
        assert padded[k].shape == (6, 8 if n <= 8 else 20), k
        assert torch.equal(padded[k][:, :n], t), k  # the text itself is untouched
        assert (padded[k][:, n:] == pads.get(k, 0)).all(), k  # masks 0, labels -100, ids the pad id
    losses, grads = _step(task, batch, seed=1)
    assert losses.keys() == ref_losses.keys() and len(losses) >= 2
    for k in losses:
        assert losses[k] == pytest.approx(ref_losses[k], abs=1e-6), k
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n in grads:
        # fp32 rounding of other reduction lengths: measured ≤ 1.05e-6 on |g| ≈ 1.2 (query_tokens)
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-6, msg=n)
