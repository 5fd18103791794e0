"""Stage2Task routing pinned for the mutants that survived `make mutate` over blip2lib/tasks.py (docs/mutation.md).

Which tokenising helper each kind of batch goes to, with which texts and which length limit; the defaults; the
question path through the Q-Former tokenizer; the vision-cache context; the prompt stripping of a T5 caption.
Spies on the two ``blip2lib.llm`` helpers record the calls; the expected arguments are written out from the
class docstring (the helpers' own numbers are pinned in test_tasks_llm_inputs.py).
"""

import contextlib
import random

import pytest
import torch
from torch import nn

import blip2lib.llm as llm
from blip2lib.tasks import Stage2Task
from blip2lib.toy.synthetic import tiny_llm_tokenizer


class Stub(nn.Module):
    """The parts of the stage-2 model that Stage2Task touches; ``lm_loss`` records its arguments."""

    def __init__(self, family, cache=None):
        super().__init__()
        self.family, self.tokenizer = family, tiny_llm_tokenizer(family)
        self.qformer_tokenizer, self.vision_cache, self.calls = tiny_llm_tokenizer("t5"), cache, []

    def lm_loss(self, images, inputs, qids, qmask):
        self.calls.append((inputs, qids, qmask))
        return torch.tensor(1.5)


class Calls(list):
    """The recorded calls, plus the tokenizer each call received."""


@pytest.fixture
def spy(monkeypatch):
    """Replaces opt_/t5_training_inputs by recorders of (helper, texts, second argument, max_len)."""
    calls = Calls()

    def record(tok, *call):
        calls.append(call)
        tokenizers.append(tok)
        return {"labels": torch.zeros(len(call[1]), 40, dtype=torch.long)}  # the OPT VQA path masks the prompt

    tokenizers = []
    monkeypatch.setattr(llm, "opt_training_inputs", lambda tok, texts, prompt, n: record(tok, "opt", texts, prompt, n))
    monkeypatch.setattr(llm, "t5_training_inputs", lambda tok, a, b, n: record(tok, "t5", a, b, n))
    calls.tokenizers = tokenizers
    return calls


def test_defaults(spy):
    opt = Stage2Task(Stub("opt"))
    opt.llm_inputs({"text_input": ["what is red ?"], "answer": ["blue"]})
    assert spy[-1] == ("opt", ["Question: what is red ? Answer: blue"], "", 32)  # template and length 32
    # ten 10-word captions: each split point is one of 5, so another seed matches all ten with chance 5^-10
    words = "a red dog on the mat two blue circle is".split()
    caps = [" ".join(words[i:] + words[:i]) for i in range(10)]
    Stage2Task(Stub("t5")).llm_inputs({"text_input": caps})  # prefix LM by default, seeded with 0
    rng = random.Random(0)
    pairs = [llm.split_prefix_lm(c, rng) for c in caps]
    assert spy[-1] == ("t5", [a for a, _ in pairs], [b for _, b in pairs], 32)


def test_every_branch_passes_the_length_limit(spy):
    opt, t5 = Stage2Task(Stub("opt"), max_txt_len=5), Stage2Task(Stub("t5"), max_txt_len=5, prefix_lm=False)
    cap, pre = Stage2Task(Stub("t5"), prompt="a photo of", max_txt_len=5), Stage2Task(Stub("t5"), max_txt_len=5, seed=3)
    opt.llm_inputs({"text_input": ["q"], "answer": ["a"]})
    opt.llm_inputs({"text_input": ["dog"]})
    t5.llm_inputs({"text_input": ["q"], "answer": ["a"]})
    t5.llm_inputs({"text_input": ["in"], "text_output": ["out"]})
    t5.llm_inputs({"text_input": ["dog"]})
    cap.llm_inputs({"text_input": ["a photo of dog"]})
    pre.llm_inputs({"text_input": ["red dog"]})
    assert [c[3] for c in spy] == [5] * 7
    want = [opt, opt, t5, t5, t5, cap, pre]  # each call gets its own model's tokenizer
    assert all(got is task.model.tokenizer for got, task in zip(spy.tokenizers, want, strict=True))
    assert spy[3] == ("t5", ["in"], ["out"], 5)  # an explicit split is used as given
    assert spy[4] == ("t5", [""], ["dog"], 5)  # no prefix LM: empty encoder text, the caption as the target
    assert spy[5] == ("t5", ["a photo of"], ["dog"], 5)


def test_strip_prompt_removes_spaces_only_on_the_left():
    task = Stage2Task(Stub("t5"), prompt="a photo of")
    assert task.strip_prompt("a photo of  Xray ") == "Xray "
    assert task.strip_prompt("a photo of \tdog") == "\tdog"


class Cache:
    def __init__(self):
        self.ids = []

    def batch(self, ids):
        self.ids.append(ids)
        return contextlib.nullcontext()


def test_forward_question_path_and_vision_cache():
    cache = Cache()
    model = Stub("opt", cache=cache)
    task = Stage2Task(model, max_txt_len=3, qformer_question=True)
    batch = {"image": torch.zeros(2, 3, 4, 4), "text_input": ["what is the red dog", "sky"], "answer": ["a", "b"],
             "image_id": torch.tensor([4, 9])}  # fmt: skip
    out = task(batch)
    assert set(out) == {"lm_loss", "loss"} and out["lm_loss"].item() == out["loss"].item() == 1.5
    assert cache.ids == [batch["image_id"]]
    _, qids, qmask = model.calls[-1]
    t5 = tiny_llm_tokenizer("t5")  # the stub's Q-Former tokenizer: word ids, then </s> 1, truncated to 3
    what, is_, sky = (t5.get_vocab()[w] for w in ("what", "is", "sky"))
    assert qids.tolist() == [[what, is_, 1], [sky, 1, 0]]
    assert qmask.tolist() == [[1, 1, 1], [1, 1, 0]]
