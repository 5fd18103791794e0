"""Stage1Task behaviours pinned for the mutants that survived `make mutate` (docs/mutation.md).

Tokenisation (truncation, default length, the target device, and the cross-rank padding of ``text_padding="longest"``
with a stand-in for the process group), the vision-cache context of a forward pass, the profiler labels and the
``text_padding`` error.
"""

import contextlib

import pytest
import torch

import blip2lib.tasks as tasks_mod
from blip2lib.config import tiny_config
from blip2lib.model import Blip2QFormerModel
from blip2lib.tasks import Stage1Task
from blip2lib.toy.synthetic import tiny_bert_tokenizer

TEXTS = ["a red circle on the mat", "a dog"]


@pytest.fixture(scope="module")
def tok():
    return tiny_bert_tokenizer()


def _task(tok, **kw) -> Stage1Task:
    torch.manual_seed(0)
    return Stage1Task(Blip2QFormerModel(tiny_config()).eval(), tok, **kw)


class FakeGroup:
    """Stands in for a process group whose other rank holds captions ``extra`` tokens longer than ours."""

    def __init__(self, monkeypatch, is_dist: bool, extra: int = 3):
        self.seen = []
        self.extra = extra
        monkeypatch.setattr(tasks_mod.dist, "is_dist", lambda: is_dist)
        monkeypatch.setattr(tasks_mod.dist, "all_reduce_max", self.all_reduce_max)

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        if x.device.type == "meta":  # no value to read: answer "no rank is longer"
            return torch.tensor([0])
        return torch.tensor([int(x[0]) + self.extra])


@pytest.mark.parametrize("pad_token", ["[PAD]", "[MASK]"])  # ids 0 and 4: the padding uses the tokenizer's pad id
def test_longest_padding_pads_to_the_longest_caption_of_all_ranks(monkeypatch, pad_token):
    tok = tiny_bert_tokenizer()
    tok.pad_token = pad_token
    pad_id = {"[PAD]": 0, "[MASK]": 4}[pad_token]
    group = FakeGroup(monkeypatch, is_dist=True)
    ids, mask = _task(tok, text_padding="longest").tokenize(TEXTS, torch.device("cpu"))
    ref = tok(TEXTS, padding="longest", return_tensors="pt")  # (B, L_local)
    n = ref.input_ids.shape[1]
    assert [x.tolist() for x in group.seen] == [[n]]  # the local length goes to the all-reduce
    assert ids.tolist() == [row + [pad_id] * 3 for row in ref.input_ids.tolist()]  # (B, L_local + 3)
    assert mask.tolist() == [row + [0] * 3 for row in ref.attention_mask.tolist()]


def test_longest_padding_keeps_the_local_length_when_it_is_the_longest(tok, monkeypatch):
    FakeGroup(monkeypatch, is_dist=True, extra=0)
    ids, mask = _task(tok, text_padding="longest").tokenize(TEXTS, torch.device("cpu"))
    ref = tok(TEXTS, padding="longest", return_tensors="pt")
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)


@pytest.mark.parametrize(("padding", "is_dist"), [("max_length", True), ("longest", False)])
def test_no_collective_unless_longest_padding_under_a_process_group(tok, monkeypatch, padding, is_dist):
    group = FakeGroup(monkeypatch, is_dist=is_dist)
    ids, _ = _task(tok, text_padding=padding, max_txt_len=16).tokenize(TEXTS, torch.device("cpu"))
    assert group.seen == []
    longest = max(len(row) for row in tok(TEXTS).input_ids)  # [CLS] words [SEP] of the longer caption
    assert ids.shape == (2, 16 if padding == "max_length" else longest)


def test_tokens_land_on_the_requested_device(tok, monkeypatch):
    group = FakeGroup(monkeypatch, is_dist=True, extra=0)
    meta = torch.device("meta")
    ids, mask = _task(tok).tokenize(TEXTS, meta)  # max_length: no collective
    assert ids.device == meta and mask.device == meta
    ids, mask = _task(tok, text_padding="longest").tokenize(TEXTS, meta)
    assert ids.device == meta and mask.device == meta and group.seen[0].device == meta


def test_default_length_is_32_and_long_captions_are_truncated(tok):
    task = _task(tok)
    assert task.max_txt_len == 32
    long = [" ".join(["dog"] * 40)]
    ids, mask = task.tokenize(long, torch.device("cpu"))
    assert ids.shape == (1, 32) and int(mask.sum()) == 32
    assert ids[0, 0].item() == tok.cls_token_id and ids[0, -1].item() == tok.sep_token_id


def test_text_padding_error_names_the_choices(tok):
    with pytest.raises(ValueError, match=r"^text_padding must be one of \('max_length', 'longest'\), got 'left'$"):
        _task(tok, text_padding="left")


class FakeCache:
    """A vision cache that is never active (the tower runs) but records which image ids each batch names."""

    active = False

    def __init__(self):
        self.named = []

    @contextlib.contextmanager
    def batch(self, image_ids):
        self.named.append(image_ids)
        yield


def test_forward_names_the_batch_images_for_the_vision_cache_and_labels_profiler_phases(tok):
    task = _task(tok)
    task.model.vision_cache = FakeCache()
    ids = torch.tensor([5, 9])
    batch = {"image": torch.randn(2, 3, 28, 28), "text_input": TEXTS, "image_id": ids}
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = task(batch)
    assert len(task.model.vision_cache.named) == 1 and task.model.vision_cache.named[0] is ids
    names = {e.name for e in prof.events()}
    assert {"stage1/encode", "stage1/itm_qformer", "stage1/itg_qformer"} <= names
    assert set(out) == {"itc_loss", "itm_loss", "itm_acc", "itm_no_negative", "itg_loss", "loss", "temp"}
    assert out["temp"].item() == task.model.temp.item() and not out["temp"].requires_grad


def test_without_itg_the_loss_is_itc_plus_itm(tok):
    task = _task(tok, use_itg=False)
    with torch.no_grad():
        out = task({"image": torch.randn(2, 3, 28, 28), "text_input": TEXTS})
    assert "itg_loss" not in out
    assert out["loss"].item() == (out["itc_loss"] + out["itm_loss"]).item()


def test_vision_keys_without_a_cache_attribute_or_ids():
    from blip2lib.tasks import vision_keys

    assert isinstance(vision_keys(object(), {}), contextlib.nullcontext)  # models without the attribute at all
    model = torch.nn.Linear(1, 1).train()
    model.vision_cache = FakeCache()
    with pytest.raises(
        ValueError, match=r"^cache_vision_features needs an image_id per sample: this dataset yields none$"
    ):
        vision_keys(model, {})
