"""Length rules of generation (blip2lib.generation.new_token_bounds): exact generated-token bounds per family and rule.

LAVIS's numbers, read from its code: T5 ``generate(max_new_tokens=max_len, min_length=min_len)`` where transformers
counts the decoder start token in ``min_length``; paper-time OPT ``generate(input_ids=<prompt ids>, query_embeds=...,
max_new_tokens=max_len, min_length=min_len)`` with transformers < 4.27 counting the prompt ids; HEAD OPT
``generate(inputs_embeds=...)`` (transformers 4.33: empty ``input_ids``, so generated tokens only); the Q-Former
captioner ``generate(input_ids=[[DEC]], max_length=30, min_length=10)``. Expected values below are worked out from
those definitions, and the models are driven with an EOS logit bias so the bound itself decides the length.
"""

import types

import pytest
import torch

from blip2lib.config import tiny_config
from blip2lib.generation import generate, generate_ids, new_token_bounds, resolve_eos
from blip2lib.llm import build_llm, freeze_llm_
from blip2lib.model import Blip2QFormerModel
from blip2lib.toy.synthetic import tiny_llm_tokenizer

torch.set_num_threads(1)


def test_bounds_table():
    # "new": the numbers are generated tokens, for every family
    for fam in ("opt", "t5", "qformer"):
        assert new_token_bounds("new", fam, 30, 8, prompt_len=4) == (30, 8)
    for rule in ("lavis_head", "lavis_paper_time"):
        assert new_token_bounds(rule, "t5", 10, 1) == (10, 0)  # VQA: an empty answer is allowed
        assert new_token_bounds(rule, "t5", 30, 8) == (30, 7)  # caption: 7 tokens before EOS
        assert new_token_bounds(rule, "qformer", 30, 10) == (29, 9)  # [DEC] counts in both
    assert new_token_bounds("lavis_paper_time", "opt", 30, 8, prompt_len=4) == (30, 4)  # "</s> a photo of"
    assert new_token_bounds("lavis_paper_time", "opt", 10, 1, prompt_len=9) == (10, 0)  # never negative
    assert new_token_bounds("lavis_head", "opt", 30, 8, prompt_len=4) == (30, 8)
    with pytest.raises(ValueError, match="length_rule"):
        new_token_bounds("lavis", "t5", 10, 1)
    with pytest.raises(ValueError, match="family"):
        new_token_bounds("new", "flant5", 10, 1)


def _llm(family):
    torch.manual_seed(0)
    model = build_llm(tiny_config(family).llm, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return freeze_llm_(model), tiny_llm_tokenizer(family)


@pytest.fixture(scope="module")
def opt():
    return _llm("opt")


@pytest.fixture(scope="module")
def t5():
    return _llm("t5")


def _prefix(model, b):
    d = model.get_input_embeddings().embedding_dim
    return torch.randn(b, 4, d, generator=torch.Generator().manual_seed(1))  # (B, Q=4, D)


class _EOSBias:
    """Adds ``bias`` to the EOS logit at every step (forward hook on the LM head)."""

    def __init__(self, model, eos_id, bias):
        self.model, self.eos_id, self.bias = model, eos_id, bias

    def __enter__(self):
        def hook(_mod, _inp, out):
            out = out.clone()
            out[..., self.eos_id] += self.bias
            return out

        self.handle = self.model.get_output_embeddings().register_forward_hook(hook)

    def __exit__(self, *exc):
        self.handle.remove()


def _ids(model, family, tok, prompts, **kw):
    return generate_ids(model, family, tok, _prefix(model, len(prompts)), prompts, num_beams=1, **kw)


def _first_eos(ids, eos):
    """Generated tokens before the first EOS in each row (the row length when there is none)."""
    return [row.index(eos) if eos in row else len(row) for row in ids.tolist()]


def test_t5_vqa_empty_answer_allowed_under_lavis_only(t5):
    model, tok = t5
    eos = resolve_eos(tok, "t5")
    prompts = ["question : what is on the mat ? short answer :", "question : what colour ? short answer :"]
    with _EOSBias(model, eos, 1e4):  # EOS preferred whenever it is allowed
        for rule in ("lavis_head", "lavis_paper_time"):  # LAVIS min_len=1 counts the decoder start token
            ids = _ids(model, "t5", tok, prompts, max_new_tokens=10, min_new_tokens=1, length_rule=rule)
            assert ids.tolist() == [[eos], [eos]]
            assert generate(model, "t5", tok, _prefix(model, 2), prompts, num_beams=5, max_new_tokens=10,
                            min_new_tokens=1, length_penalty=-1.0, length_rule=rule) == ["", ""]  # fmt: skip
        ids = _ids(model, "t5", tok, prompts, max_new_tokens=10, min_new_tokens=1)  # paper: one real token first
        assert _first_eos(ids, eos) == [1, 1] and ids.shape == (2, 2)


def test_t5_caption_min_8_is_7_new_tokens_and_max_30_is_30(t5):
    model, tok = t5
    eos = resolve_eos(tok, "t5")
    prompts = ["a photo of", "a photo of"]
    with _EOSBias(model, eos, 1e4):
        ids = _ids(model, "t5", tok, prompts, max_new_tokens=30, min_new_tokens=8, length_rule="lavis_head")
        assert _first_eos(ids, eos) == [7, 7] and ids.shape == (2, 8)
        ids = _ids(model, "t5", tok, prompts, max_new_tokens=30, min_new_tokens=8)
        assert _first_eos(ids, eos) == [8, 8] and ids.shape == (2, 9)
    with _EOSBias(model, eos, -1e4):  # EOS never chosen: the maximum decides
        for rule in ("new", "lavis_head", "lavis_paper_time"):
            ids = _ids(model, "t5", tok, prompts, max_new_tokens=30, min_new_tokens=8, length_rule=rule)
            assert ids.shape == (2, 30) and not (ids == eos).any()


def test_opt_caption_min_length_counted_the_prompt_ids_at_paper_time(opt):
    model, tok = opt
    eos = resolve_eos(tok, "opt")
    assert tok("a photo of").input_ids == [2, 5, 6, 7]  # BOS </s> + 3 words = 4 ids
    prompts = ["a photo of"] * 2
    with _EOSBias(model, eos, 1e4):
        ids = _ids(model, "opt", tok, prompts, max_new_tokens=30, min_new_tokens=8, length_rule="lavis_paper_time")
        assert _first_eos(ids, eos) == [8 - 4, 8 - 4]
        for rule in ("new", "lavis_head"):  # HEAD generates from inputs_embeds only: generated tokens
            ids = _ids(model, "opt", tok, prompts, max_new_tokens=30, min_new_tokens=8, length_rule=rule)
            assert _first_eos(ids, eos) == [8, 8]
        # a padded batch: transformers < 4.27 counted the padded prompt width (9) for every row
        mixed = ["a photo of", "what is the colour of the sky ?"]
        assert [len(tok(p).input_ids) for p in mixed] == [4, 9]
        ids = _ids(model, "opt", tok, mixed, max_new_tokens=30, min_new_tokens=12, length_rule="lavis_paper_time")
        assert _first_eos(ids, eos) == [12 - 9, 12 - 9]
    with _EOSBias(model, eos, -1e4):
        ids = _ids(model, "opt", tok, prompts, max_new_tokens=30, min_new_tokens=8, length_rule="lavis_paper_time")
        assert ids.shape == (2, 30) and not (ids == eos).any()


def test_qformer_captioner_lavis_30_10_is_29_9_new_tokens():
    torch.manual_seed(0)
    model = Blip2QFormerModel(tiny_config()).eval()
    q = model.config.qformer
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    for bias, want_lavis, want_new in ((1e4, (10, 9), (11, 10)), (-1e4, (29, None), (30, None))):
        handle = model.cls.register_forward_hook(lambda _m, _i, out, b=bias: out + b * _onehot(out, q.sep_token_id))
        try:
            for rule, (width, sep_at) in (("lavis_head", want_lavis), ("new", want_new)):
                ids = model.generate_captions(images, num_beams=3, max_new_tokens=30, min_new_tokens=10,
                                              length_rule=rule)  # fmt: skip
                assert ids.shape == (2, width), (rule, bias)
                if sep_at is None:
                    assert not (ids == q.sep_token_id).any()
                else:
                    assert (ids[:, sep_at] == q.sep_token_id).all() and not (ids[:, :sep_at] == q.sep_token_id).any()
        finally:
            handle.remove()


def _onehot(out, idx):
    hot = torch.zeros(out.shape[-1], dtype=out.dtype)
    hot[idx] = 1.0
    return hot


# ----------------------------------------------------------------------------------------------------------------
# The recipes carry the rule to Blip2.generate; the CLI maps recipe -> rule and accepts a length_rule override


def test_vqa_recipes_end_to_end_on_a_tiny_t5_blip2():
    from blip2lib.evaluate import VQADecoding
    from blip2lib.model import Blip2

    torch.manual_seed(0)
    model = Blip2(tiny_config("t5"), tokenizer=tiny_llm_tokenizer("t5")).eval()
    eos = resolve_eos(model.tokenizer, "t5")
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    paper, lavis = VQADecoding.paper("t5"), VQADecoding.lavis_head("t5")
    assert (paper.length_rule, lavis.length_rule) == ("new", "lavis_head")
    prompts = [paper.format_prompt("what is on the mat"), paper.format_prompt("what colour")]
    with _EOSBias(model.language_model, eos, 1e4):
        assert model.generate(images, prompts, **lavis.generate_kwargs()) == ["", ""]  # min_len=1: empty allowed
        assert all(len(a.split()) == 1 for a in model.generate(images, prompts, **paper.generate_kwargs()))


@pytest.mark.parametrize(
    ("task", "family", "recipe", "override", "want"),
    [
        ("vqa", "t5", "paper", None, "new"),
        ("vqa", "t5", "lavis", None, "lavis_head"),
        ("vqa", "opt", "lavis", None, "lavis_head"),
        ("caption", "opt", "paper", "lavis_paper_time", "lavis_paper_time"),
        ("caption", "t5", "lavis", None, "lavis_head"),
    ],
)
def test_cli_recipe_sets_the_length_rule(tmp_path, monkeypatch, task, family, recipe, override, want):
    import blip2lib.evaluate.__main__ as cli

    seen = {}
    monkeypatch.setattr(cli, "build_dataset", lambda *a: types.SimpleNamespace(transform=None))  # read first
    monkeypatch.setattr(cli, f"run_{task}", lambda model, ds, decoding, *a, **kw: seen.setdefault("d", decoding))
    ann = tmp_path / "coco" / "annotations" / "vqa_val_eval.json"  # its identity keys the prediction cache
    ann.parent.mkdir(parents=True)
    ann.write_text("[]")
    values = {"checkpoint": "tiny", "family": family, "data_root": str(tmp_path), "split": "vqa_val_eval",
              "out_dir": str(tmp_path / "o"), "recipe": recipe}  # fmt: skip
    if override:
        values["length_rule"] = override
    cli.run_params(task, cli.SCHEMAS[task].from_dict(values))
    assert seen["d"].length_rule == want
    assert ("overridden by" in seen["d"].source) == (override is not None)


def test_cli_rejects_an_unknown_length_rule(tmp_path):
    import blip2lib.evaluate.__main__ as cli
    from blip2lib.config import ParamsError

    values = {"data_root": str(tmp_path), "split": "vqa_val_eval", "out_dir": str(tmp_path), "length_rule": "lavis"}
    with pytest.raises(ParamsError, match="key 'length_rule' must be one of"):
        cli.run_params("vqa", cli.VQAParams.from_dict(values))
