"""The toy world's scenes, captions, questions, tokenizers and baseline metrics, and its stage-0 LLM helpers."""

import math
import re

import numpy as np
import pytest
import torch

from blip2lib.toy import baselines as B
from blip2lib.toy import vocab as V
from blip2lib.toy import world, writers

_PAIR = re.compile(r"(red|green|blue|yellow) (circle|square|triangle)")


# ---------------------------------------------------------------------------------------------------------------
# scenes, captions, questions (checked against brute-force recomputation from the scene graph)


@pytest.fixture(scope="module")
def splits():
    return {n: writers.make_split(n, k, seed=0) for n, k in [("train", 300), ("test", 60), ("novel", 60)]}


def test_novel_pairs_never_in_training_captions(splits):
    held = set(world.NOVEL_PAIRS)
    train_pairs = {m for caps in splits["train"].captions for c in caps for m in _PAIR.findall(c)}
    assert train_pairs and not (train_pairs & held)
    for caps in splits["novel"].captions:
        assert set(_PAIR.findall(caps[0])) & held  # every novel scene shows >= 1 held-out pair
    assert not {m for caps in splits["test"].captions for m in _PAIR.findall(caps[0])} & held


def test_evaluation_splits_have_distinct_scenes_and_train_keeps_repeats(splits):
    for name in ("test", "novel"):
        canonical = [c[0] for c in splits[name].captions]
        assert len(set(canonical)) == len(canonical)
    train = [c[0] for c in splits["train"].captions]
    assert len(set(train)) < len(train)  # 300 train scenes: single-object ones repeat (only 24 kinds exist)


def test_captions_list_objects_left_to_right(splits):
    for scene, caps in zip(splits["test"].scenes, splits["test"].captions):
        assert [o.slot for o in scene.objects] == sorted({o.slot for o in scene.objects})
        assert len(caps) == 5
        words = caps[0].replace(",", "").split()
        shapes = [w for w in words if w in world.SHAPES]
        assert shapes == [o.shape for o in scene.objects]


def test_answers_match_the_scene(splits):
    n_checked = 0
    for scene, qas in zip(splits["test"].scenes, splits["test"].qas):
        objs = scene.objects
        for family, q, a in qas:
            m = re.fullmatch(r"how many (\w+)s are there\?", q)
            if m and m.group(1) in world.SHAPES:
                assert a == str(sum(o.shape == m.group(1) for o in objs))
            m = re.fullmatch(r"is there a (\w+) (\w+)\?", q)
            if m:
                assert a == ("yes" if any((o.colour, o.shape) == m.groups() for o in objs) else "no")
            m = re.fullmatch(r"what (shape|colour) is (left|right) of the (\w+) (\w+)\?", q)
            if m:
                attr, side, colour, shape = m.groups()
                (ref,) = [i for i, o in enumerate(objs) if (o.colour, o.shape) == (colour, shape)]
                others = objs[:ref] if side == "left" else objs[ref + 1 :]
                assert len(others) == 1 and getattr(others[0], attr) == a  # unambiguous "left of"
            assert family in world.FAMILIES
            n_checked += 1
    assert n_checked == 4 * 60


def test_question_families_are_balanced(splits):
    fam = [f for qas in splits["train"].qas for f, _, _ in qas]
    shares = {f: fam.count(f) / len(fam) for f in world.FAMILIES}
    assert min(shares.values()) > 0.15 and max(shares.values()) < 0.35
    yes = [a for qas in splits["train"].qas for f, _, a in qas if f == "exist"]
    assert 0.4 < yes.count("yes") / len(yes) < 0.6


def test_render_patch_labels():
    scene = world.Scene(1, "test", (world.Obj(0, "square", "red", "large", 8, 20),))
    image, labels = world.render(scene, np.random.default_rng(0))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image[20, 8, 0] > 150 and image[20, 8, 2] < 120  # red pixel at the object's centre
    assert labels[2, 1] == scene.objects[0].cls and labels[7, 7] == 0
    assert scene.slot_labels() == [scene.objects[0].cls, 0, 0, 0]


def test_objects_sit_on_the_patch_grid():
    """Small objects inside one 8-px patch, large ones on the corner of 2 × 2 patches (world._grid_position)."""
    rng = np.random.default_rng(5)
    seen = set()
    for i in range(200):
        scene = world.sample_scene(rng, i, "any")
        labels = world.patch_labels(scene)
        for o in scene.objects:
            rows, cols = np.nonzero(world._mask(o).reshape(8, 8, 8, 8).any(axis=(1, 3)))  # patches it touches
            touched = set(zip(rows.tolist(), cols.tolist()))
            if o.size == "small":
                assert (o.x % 8, o.y % 8) == (4, 4) and touched == {(o.y // 8, o.x // 8)}
            else:
                assert o.x == 16 * o.slot + 8 and o.y % 8 == 0
                assert touched == {(o.y // 8 - 1 + a, 2 * o.slot + b) for a in (0, 1) for b in (0, 1)}
            assert all(labels[r, c] == o.cls for r, c in touched)  # objects never overlap: slots are disjoint
            seen.add((o.size, o.y))
    assert len(seen) >= 14  # positions vary: most rows occur for both sizes


def test_probe_reads_slots_from_linearly_readable_patches():
    """Tokens that encode each patch's label and column (plus noise) give a perfect probe; shuffled labels give
    chance slots; tokens without the column give a column read-out near chance (1 in 8)."""
    from blip2lib.toy import vit_pretrain as VP

    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, i, "any") for i in range(160)]
    patches = np.stack([world.patch_labels(s) for s in scenes])  # (N, 8, 8)
    slots = np.asarray([s.slot_labels() for s in scenes])
    gen = torch.Generator().manual_seed(0)
    what = torch.nn.functional.one_hot(torch.from_numpy(patches).flatten(1), world.NUM_CLASSES).float()  # (N, 64, 25)
    where = torch.nn.functional.one_hot(torch.arange(64) % 8, 8).float().expand(len(scenes), -1, -1)  # (N, 64, 8)

    def tokens(parts):  # CLS first: (N, 65, C)
        f = torch.cat(parts, -1)
        f = torch.cat([torch.zeros(len(scenes), 1, f.shape[-1]), f], 1)
        return f + 0.05 * torch.randn(f.shape, generator=gen)

    feats = tokens([what, where])
    res = VP.linear_probe(feats[:100], patches[:100], feats[100:], patches[100:], slots[100:], seed=0)
    assert res == {"patch_accuracy": 100.0, "slot_accuracy": 100.0, "column_accuracy": 100.0,
                   "shape_accuracy": 100.0, "colour_accuracy": 100.0, "size_accuracy": 100.0}  # fmt: skip
    shuffled = patches[:100].reshape(100, -1)[:, rng.permutation(64)].reshape(100, 8, 8)
    bad = VP.linear_probe(feats[:100], shuffled, feats[100:], patches[100:], slots[100:], seed=0)
    assert bad["slot_accuracy"] < 50.0
    blind = tokens([what])  # what without where: the version-8 tower's failure
    res = VP.linear_probe(blind[:100], patches[:100], blind[100:], patches[100:], slots[100:], seed=0)
    assert res["slot_accuracy"] == 100.0 and res["column_accuracy"] < 30.0


def test_vit_pretraining_heads_see_where():
    """The pretraining heads give per-patch column and row logits, targets in raster order."""
    from blip2lib.toy import vit_pretrain as VP

    col, row = VP.patch_positions()
    assert col.tolist()[:10] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1] and row.tolist()[:10] == [0] * 8 + [1] * 2
    assert (row * 8 + col).tolist() == list(range(64))
    heads = VP._Heads(16)
    patch, slot, where = heads(torch.randn(2, 65, 16))
    assert patch.shape == (2, 64, world.NUM_CLASSES) and slot.shape == (2, 4, world.NUM_CLASSES)
    assert where.shape == (2, 64, 16)


def test_llm_curriculum_draws_short_scenes_first():
    from blip2lib.toy import llm_texts as LT

    pool = LT.text_pool(200, 0)
    draw = LT._curriculum(pool, np.random.default_rng(0), steps=10, easy_frac=0.4, easy_max_objects=2)
    early = [ex.num_objects for step in range(4) for ex in draw(step, 50)]
    late = [ex.num_objects for step in range(4, 10) for ex in draw(step, 50)]
    assert max(early) == 2 and min(early) == 1
    assert max(late) == 4 and sum(n > 2 for n in late) > 0.4 * len(late)
    assert all(ex.num_objects == ex.captions[2].count(",") + ex.captions[2].count(" and ") for ex in pool)


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


@pytest.mark.parametrize("build", [V.build_opt_tokenizer, V.build_t5_tokenizer, V.build_bert_tokenizer])
def test_tokenizer_roundtrip_and_fast_encode(tmp_path, build):
    from transformers import AutoTokenizer

    build().save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    vocab = tok.get_vocab()
    text = "Question: what colour is left of the red circle? Short answer: a large blue square, 2"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == V.encode(text, vocab)
    assert tok.unk_token_id not in ids


def test_tokenizer_special_ids(tmp_path):
    from transformers import AutoTokenizer

    V.build_opt_tokenizer().save_pretrained(str(tmp_path / "opt"))
    opt = AutoTokenizer.from_pretrained(str(tmp_path / "opt"))
    assert opt("red\n").input_ids == [2, opt.convert_tokens_to_ids("red"), 4]  # BOS </s> first, "\n" one token
    assert (opt.pad_token_id, opt.eos_token_id, opt("\n", add_special_tokens=False).input_ids) == (1, 2, [4])
    V.build_t5_tokenizer().save_pretrained(str(tmp_path / "t5"))
    t5 = AutoTokenizer.from_pretrained(str(tmp_path / "t5"))
    assert t5("yes").input_ids == [t5.convert_tokens_to_ids("yes"), 1] and t5.pad_token_id == 0
    V.build_bert_tokenizer().save_pretrained(str(tmp_path / "bert"))
    bert = AutoTokenizer.from_pretrained(str(tmp_path / "bert"))
    assert [bert.pad_token_id, bert.cls_token_id, bert.sep_token_id, bert.mask_token_id] == [0, 2, 3, 4]
    n = len(bert)
    bert.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP-2 does for the Q-Former (docs/paper_map.md §1.3)
    assert bert.bos_token_id == n


# ---------------------------------------------------------------------------------------------------------------
# metrics (hand-worked values)


def test_vqa_accuracy_hand_worked():
    assert B.vqa_accuracy("2", ["2"] * 7 + ["two"] * 3) == 1.0  # number words normalise to digits
    assert B.vqa_accuracy("two", ["2"] * 10) == 1.0
    # "3" given once: the 9 subsets that contain it score 1/3, the one without it scores 0 → 0.3
    assert B.vqa_accuracy("3", ["2"] * 9 + ["3"]) == pytest.approx(0.3)
    assert B.vqa_accuracy("the red\n", ["red"] * 10) == 1.0


def test_retrieval_chance_hand_worked():
    r = B.retrieval_chance(2)  # 2 images × 5 captions
    assert r["img_r1"] == 50.0 and r["txt_r1"] == 50.0
    assert r["txt_r5"] == pytest.approx(100 * (1 - math.comb(5, 5) / math.comb(10, 5)), abs=1e-3)
    assert B.caption_ceiling([["a"], ["a"], ["b"]]) == {
        "img_r1": round(100 * (0.5 + 0.5 + 1) / 3, 2),
        "distinct_scenes": 2,
    }


def test_toy_opt_word_vectors_start_as_large_as_its_position_vectors():
    """OPT's default 0.02 init buries token identity under the sinusoidal positions (see train_opt's docstring)."""
    from blip2lib.toy import llm_pretrain as L
    from blip2lib.toy import llm_texts as LT

    model = L.train_opt(LT.text_pool(4, 0), steps=0, seed=0)
    words = model.model.decoder.embed_tokens.weight
    positions = model.model.decoder.embed_positions.weight
    assert abs(words.std().item() - 0.5) < 0.03
    assert 0.3 < words.norm(dim=1).mean().item() / positions.norm(dim=1).mean().item() < 3.0


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_generate_with_the_description_as_prefix_equals_the_text_oracle(family):
    """BLIP-2's generate path (prefix embeddings + prompt) given the TRUE description's word embeddings answers
    exactly like the text-oracle baseline code: a zero-shot VQA gap to the oracle is the soft prompt's, not the path's.

    A random LLM with large weights (answers depend on every input token) stands in for the trained one.
    """
    from transformers import OPTForCausalLM, T5ForConditionalGeneration

    from blip2lib.generation import generate
    from blip2lib.toy import llm_pretrain as L

    torch.manual_seed(0)
    if family == "opt":
        llm, tok, prompt = OPTForCausalLM(L.opt_config()), V.build_opt_tokenizer(), V.OPT_PROMPT
    else:
        llm, tok, prompt = T5ForConditionalGeneration(L.t5_config()), V.build_t5_tokenizer(), V.T5_PROMPT
    with torch.no_grad():  # matrices random and large; biases 0 and norms 1, so no single direction dominates
        for name, p in llm.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if "embed" in name or "shared" in name else 1.0 / p.shape[1] ** 0.5)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    llm.eval()
    split = writers.make_split("test", 8, seed=3)
    records = writers.vqa_records(split, seed=3)[:24]
    descriptions = {s.image_id: world.captions(s)[0] for s in split.scenes}
    oracle = (B.opt_answers if family == "opt" else B.t5_answers)(llm, records, descriptions)

    def ours(drop_first: bool) -> list[str]:
        out = []
        for r in records:
            ids = tok(descriptions[r["image_id"]], return_tensors="pt").input_ids  # OPT: </s> desc; T5: desc </s>
            ids = ids[:, 1:] if drop_first else ids if family == "opt" else ids[:, :-1]
            prefix = llm.get_input_embeddings()(ids)
            out += generate(llm, family, tok, prefix, prompt.format(r["question"]), num_beams=1, max_new_tokens=3,
                            min_new_tokens=1)  # fmt: skip
        return [o.strip() for o in out]

    assert len(set(oracle)) >= 3, oracle  # the answers really depend on the inputs
    assert ours(drop_first=False) == oracle
    assert ours(drop_first=True) != oracle  # and the check sees a one-token change of the prefix


@pytest.mark.slow
def test_toy_bert_contrastive_cls_pulls_paraphrases_together():
    """The [CLS] term of the toy BERT (why: see train_bert) makes a caption's nearest caption a paraphrase of the
    same scene far more often than masked-LM alone (150 steps, 60 held-out scenes x 2 paraphrases)."""
    import torch.nn.functional as F

    from blip2lib.toy import llm_pretrain as L
    from blip2lib.toy import llm_texts as LT

    pool, held = LT.text_pool(400, 0), LT.text_pool(60, 1)
    enc = [[2] + V.encode(c, LT.BERT_V) + [3] for ex in held for c in ex.captions[:2]]
    x = LT._pad(enc, 0)
    scene = torch.arange(len(enc)) // 2

    def paraphrase_nn(model) -> float:
        with torch.no_grad():
            z = F.normalize(model.bert(input_ids=x, attention_mask=(x != 0).long()).last_hidden_state[:, 0], dim=-1)
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        return (scene[sim.argmax(1)] == scene).float().mean().item()

    mlm = paraphrase_nn(L.train_bert([ex.captions for ex in pool], 150, 0, batch=32, cl_weight=0.0))
    both = paraphrase_nn(L.train_bert([ex.captions for ex in pool], 150, 0, batch=32, cl_weight=1.0))
    assert mlm < 0.25 and both > 0.4, (mlm, both)  # measured 0.15 and 0.51; chance 1/119
