"""engine="static" on CUDA: the same ids as transformers' ``generate`` in fp16 and bf16, with CUDA graphs replayed.

Skipped without CUDA (``make gpu-check`` runs them). Tiny random OPT (fp16 and bf16) and T5 (bf16; fp16 is refused
for T5), weights redrawn at std 0.5 so greedy and beam answers differ, batch 7 with prompts of different lengths.
Each case runs the default CUDA mode (``graphs``: one captured step per cache window, replayed) and the ``exact``
mode (eager steps over the written keys), and compares both with ``engine="hf"``; a third run captures windows of 4
positions with finished samples leaving the batch at every window start they can (``compact_at=0``), so graphs are
captured again for fewer rows.
"""

import functools

import pytest
import torch

from blip2lib import static_decode
from blip2lib.config import tiny_config
from blip2lib.generation import generate_ids
from blip2lib.llm import build_llm, freeze_llm_
from blip2lib.toy.synthetic import tiny_llm_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")]

PROMPTS = ["a photo of", "question : what is on the mat ? answer :", "", "a dog", "what colour is the cat ?",
           "x5 x6 x7 x8 x9 x10 x11", "the"]  # fmt: skip
EOS = {"opt": 97, "t5": 77}  # ids these random models emit early in some rows (tests/unit/test_static_decode.py)
CASES = [  # (num_beams, length_penalty, repetition_penalty, min_new_tokens)
    (1, 1.0, 1.0, 0),
    (1, 1.0, 1.5, 3),
    (5, -1.0, 1.0, 0),
    (5, 0.0, 1.5, 2),
    (5, 1.0, 1.0, 3),
]


def _llm(family, dtype):
    torch.manual_seed(0)
    model = build_llm(tiny_config(family).llm, device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return freeze_llm_(model), tiny_llm_tokenizer(family)


@pytest.mark.parametrize(("family", "dtype"), [("opt", torch.float16), ("opt", torch.bfloat16), ("t5", torch.bfloat16)])
def test_static_equals_transformers_on_cuda(family, dtype, monkeypatch):
    model, tok = _llm(family, dtype)
    d = model.get_input_embeddings().embedding_dim
    prefix = torch.randn(7, 4, d, generator=torch.Generator().manual_seed(1)).cuda()  # (B, Q, D)
    captured = []
    real_capture = static_decode._Decoder._capture
    monkeypatch.setattr(static_decode._Decoder, "_capture",
                        lambda self, w: captured.append((w, self.rows)) or real_capture(self, w))  # fmt: skip
    real = static_decode.static_generate
    differ = 0
    for beams, lp, rp, lo in CASES:
        kw = dict(num_beams=beams, length_penalty=lp, repetition_penalty=rp, min_new_tokens=lo, max_new_tokens=12,
                  eos=EOS[family])  # fmt: skip
        hf = generate_ids(model, family, tok, prefix, PROMPTS, engine="hf", **kw)
        for mode, extra in (("auto", {}), ("exact", {}), ("graphs", {"bucket": 4, "compact_at": 0.0})):
            run = functools.partial(real, mode=mode, **{"bucket": 8, **extra})
            monkeypatch.setattr(static_decode, "static_generate", run)
            ids = generate_ids(model, family, tok, prefix, PROMPTS, engine="static", **kw)
            assert ids.shape == hf.shape and ids.tolist() == hf.tolist(), (mode, extra, kw)
        monkeypatch.setattr(static_decode, "static_generate", real)
        differ += (
            hf.tolist()
            != generate_ids(model, family, tok, prefix, PROMPTS, engine="hf", **{**kw, "num_beams": 1}).tolist()
        )
    assert len({w for w, _ in captured}) >= 2  # graphs were captured (no silent fallback), for more than one window
    assert {rows for _, rows in captured} - {7, 35}  # and again after finished samples left the batch
    assert differ >= 1  # beam search changed some answers
