"""What blip2lib/generation.py hands to transformers, pinned after its mutation pass (docs/mutation.md).

The other generation tests check lengths and batching on tiny LLMs, where a different beam width, a dropped
repetition penalty or a lost ``bos_token_id`` often leaves the argmax text unchanged. Here a spy wraps the model's
``generate`` and records the ``GenerationConfig`` and the ``inputs_embeds`` it receives (then runs the real
``generate``), so every setting is compared with the value the docstrings promise: the defaults are the
paper-time captioning ones (beam 5, 30 / 8 new tokens, length penalty 1, top-p 0.9 when sampling), the
beam-only and sampling-only settings are left unset otherwise, and the stop / pad / start ids come from the
tokenizer and the model config.
"""

import pytest
import torch

from blip2lib.config import tiny_config
from blip2lib.generation import format_prompt, generate, generate_ids, new_token_bounds, resolve_eos
from blip2lib.llm import build_llm, freeze_llm_
from blip2lib.toy.synthetic import tiny_llm_tokenizer

torch.set_num_threads(1)
Q = 4  # soft-prompt length


def _llm(family):
    torch.manual_seed(0)
    return freeze_llm_(build_llm(tiny_config(family).llm, attn_implementation="eager")), tiny_llm_tokenizer(family)


@pytest.fixture(scope="module")
def opt():
    return _llm("opt")


@pytest.fixture(scope="module")
def t5():
    return _llm("t5")


def _prefix(model, b=2):
    d = model.get_input_embeddings().embedding_dim
    return torch.randn(b, Q, d, generator=torch.Generator().manual_seed(1))  # (B, Q, D)


class _Spy:
    """Replaces ``model.generate``: records its keyword arguments, then runs the real one (or returns ``fake``)."""

    def __init__(self, model, monkeypatch, fake=None):
        self.calls, self.real, self.fake = [], model.generate, fake
        monkeypatch.setattr(model, "generate", self)
        # engine="auto" would take our static loop (which never calls model.generate): pin transformers' engine
        monkeypatch.setattr("blip2lib.static_decode.supports", lambda *args: False)

    def __call__(self, **kw):
        self.calls.append(kw)
        return self.fake if self.fake is not None else self.real(**kw)

    @property
    def config(self):
        return self.calls[-1]["generation_config"]


def test_defaults_are_the_captioning_settings(opt, monkeypatch):
    model, tok = opt
    spy = _Spy(model, monkeypatch)
    newline = tok.get_vocab()["\n"]
    for call in (generate_ids, generate):
        call(model, "opt", tok, _prefix(model), "a photo of")
        cfg = spy.config
        assert (cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens, cfg.length_penalty) == (5, 30, 8, 1.0)
        assert (cfg.repetition_penalty, cfg.do_sample, cfg.top_p, cfg.use_cache) == (1.0, False, None, True)
        assert cfg.eos_token_id == newline  # OPT stops at "\n"
        assert cfg.pad_token_id == tok.pad_token_id == 1
        assert cfg.bos_token_id == model.config.bos_token_id == 2
        assert cfg.decoder_start_token_id is None  # decoder-only
        # sampling: nucleus 0.9 by default
        call(model, "opt", tok, _prefix(model), "a photo of", do_sample=True, num_beams=1, max_new_tokens=2,
             min_new_tokens=0)  # fmt: skip
        assert (spy.config.do_sample, spy.config.top_p, spy.config.length_penalty) == (True, 0.9, None)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")  # transformers notes the penalty sees new tokens
@pytest.mark.parametrize("call", [generate_ids, generate])
def test_every_argument_reaches_transformers(opt, monkeypatch, call):
    model, tok = opt
    spy = _Spy(model, monkeypatch)
    prompt = "a photo of a red dog"  # BOS + 6 words = 7 ids, truncated to 3 below
    kw = dict(num_beams=2, max_new_tokens=4, min_new_tokens=2, length_penalty=-1.0, repetition_penalty=1.5, eos="dog")
    call(model, "opt", tok, _prefix(model), prompt, max_prompt_len=3, **kw)
    cfg = spy.config
    got = (cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens, cfg.length_penalty, cfg.repetition_penalty)
    assert got == (2, 4, 2, -1.0, 1.5)
    assert cfg.eos_token_id == tok.get_vocab()["dog"]
    assert spy.calls[-1]["inputs_embeds"].shape[1] == Q + 3  # prompt cut to max_prompt_len ids
    # greedy: no length penalty (beam only) and no top-p (sampling only); sampling: top-p as given
    call(model, "opt", tok, _prefix(model), prompt, num_beams=1, max_new_tokens=2, min_new_tokens=0,
         length_penalty=2.0, top_p=0.5)  # fmt: skip
    assert (spy.config.length_penalty, spy.config.top_p, spy.config.do_sample) == (None, None, False)
    assert spy.calls[-1]["inputs_embeds"].shape[1] == Q + 7  # no max_prompt_len: the whole prompt
    call(model, "opt", tok, _prefix(model), prompt, num_beams=1, max_new_tokens=2, min_new_tokens=0,
         do_sample=True, top_p=0.5)  # fmt: skip
    assert (spy.config.top_p, spy.config.do_sample) == (0.5, True)


def test_t5_starts_from_the_config_decoder_start(t5, monkeypatch):
    model, tok = t5
    spy = _Spy(model, monkeypatch)
    generate_ids(model, "t5", tok, _prefix(model), "a photo of", num_beams=1, max_new_tokens=2, min_new_tokens=0)
    assert spy.config.decoder_start_token_id == model.config.decoder_start_token_id == 0
    assert spy.config.eos_token_id == tok.eos_token_id == 1


def test_generate_cuts_each_text_at_the_chosen_eos(opt):
    model, tok = opt
    prefix = _prefix(model, b=4)
    ids = generate_ids(model, "opt", tok, prefix, "a photo of", num_beams=1, max_new_tokens=6, min_new_tokens=0)
    # the most frequent generated token as the stop token: the reference cuts each row at its first occurrence
    stop = int(torch.mode(ids.flatten()).values)
    assert stop != tok.get_vocab()["\n"]
    want = []
    for row in generate_ids(model, "opt", tok, prefix, "a photo of", num_beams=1, max_new_tokens=6, min_new_tokens=0,
                            eos=stop).tolist():  # fmt: skip
        row = row[: row.index(stop)] if stop in row else row
        want.append(" ".join(tok.convert_ids_to_tokens([i for i in row if i != tok.pad_token_id])))
    got = generate(model, "opt", tok, prefix, "a photo of", num_beams=1, max_new_tokens=6, min_new_tokens=0, eos=stop)
    assert got == want
    assert any(stop in row for row in ids.tolist())  # the cut happens in this case


def test_a_transformers_that_returns_the_prompt_is_refused(opt, monkeypatch):
    model, tok = opt
    _Spy(model, monkeypatch, fake=torch.zeros(2, 5, dtype=torch.long))  # 5 columns for max_new_tokens=4
    with pytest.raises(RuntimeError, match=r"^generate returned 5 > max_new_tokens=4 tokens$"):
        generate_ids(model, "opt", tok, _prefix(model), "a photo of", max_new_tokens=4)


def test_string_eos_and_messages(opt):
    _, tok = opt
    assert resolve_eos(tok, "opt", "dog") == tok.get_vocab()["dog"]  # one word, no BOS added
    assert resolve_eos(tok, "opt", "cat") == tok.get_vocab()["cat"]
    with pytest.raises(ValueError, match=r"^eos 'red dog' must be a single token, got \[\d+, \d+\]$"):
        resolve_eos(tok, "opt", "red dog")
    with pytest.raises(ValueError, match=r"exactly one '\{\}', got 'Question: \{\} \{\}'"):
        format_prompt("Question: {} {}", "why")
    with pytest.raises(ValueError, match=r"^3 prompts for 2 soft prompts$"):
        generate_ids(None, "opt", tok, torch.zeros(2, Q, 8), ["a", "b", "c"])


def test_bounds_defaults_and_qformer_floor():
    # prompt_len defaults to 0: paper-time OPT then counts no prompt ids
    assert new_token_bounds("lavis_paper_time", "opt", 30, 8) == (30, 8)
    # the Q-Former captioner with min_length 0: [DEC] counted, floored at 0 new tokens
    assert new_token_bounds("lavis_head", "qformer", 30, 0) == (29, 0)
