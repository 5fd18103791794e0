"""The toy LLMs' auxiliary reading objectives (blip2lib/toy/reading.py), checked against the scene graphs and
against the attention the transformers models really compute."""

import numpy as np
import pytest
import torch

from blip2lib.toy import llm_pretrain as L
from blip2lib.toy import llm_texts as LT
from blip2lib.toy import reading as R
from blip2lib.toy import vocab as V
from blip2lib.toy import world

_ATTR = {"colour": 1, "shape": 2, "size": None}


def _scenes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = world.sample_scene(rng, i, "any")
        out.append((scene, world.questions(scene, rng, 4)))
    return out


def test_referent_names_the_object_the_answer_is_read_from():
    """For every generated question: the answer is an attribute of the referent (or of its left neighbour, for a
    causal LM's "left of"); "is there …?" has a referent exactly when the answer is yes; counting has none."""
    checked = {"attribute": 0, "relation": 0, "exist": 0, "count": 0}
    for scene, qas in _scenes(400):
        objs = scene.objects
        for family, q, answer in qas:
            checked[family] += 1
            for causal in (True, False):
                k = R.referent(objs, q, causal)
                if family == "count":
                    assert k is None
                    continue
                if family == "exist":
                    assert (k is not None) == (answer == "yes"), q
                    if k is not None:
                        assert f"{objs[k].colour} {objs[k].shape}" in q
                    continue
                attr = q.split()[1]  # colour / shape / size
                read = objs[k - 1] if family == "relation" and "left of" in q and causal else objs[k]
                assert getattr(read, attr) == answer, (q, objs, causal)
                if family == "relation":  # the neighbour, on the asked side of the named object
                    ref = next(i for i, o in enumerate(objs) if f"{o.colour} {o.shape}?" in q)
                    assert k == (ref if causal else ref - 1) if "left of" in q else k == ref + 1
    assert min(checked.values()) > 100, checked


def test_bind_labels_on_a_hand_built_scene():
    objs = (
        world.Obj(0, "circle", "red", "small", 4, 4),
        world.Obj(2, "square", "blue", "large", 40, 8),
        world.Obj(3, "circle", "yellow", "small", 52, 4),
    )
    words = V.split_words(world.captions(world.Scene(0, "any", objs))[1])  # "… left of … left of …"
    causal = R.bind_labels(words, objs, both_sides=False)
    both = R.bind_labels(words, objs, both_sides=True)
    pos = R.shape_positions(words)
    assert [words[p] for p in pos] == ["circle", "square", "circle"]
    # colour red=0 blue=2 yellow=3, size small=0 large=1, shapes circle=0 square=1, none = len(group)
    assert causal[pos].tolist() == [[0, 0, 3, 4], [2, 1, 0, 0], [3, 0, 1, 2]]
    assert both[pos, 4:].tolist() == [[1, 2], [0, 3], [3, 4]]
    off = np.setdiff1d(np.arange(len(words)), pos)
    assert (causal[off] == R.IGNORE).all() and (both[off] == R.IGNORE).all()
    with pytest.raises(ValueError, match="does not list the objects"):
        R.bind_labels(words, objs[1:] + objs[:1], both_sides=False)


def test_parse_labels_cover_every_template():
    seen = set()
    for _, qas in _scenes(200):
        for _, q, _ in qas:
            kind, colour, shape = R.parse_labels(q)
            seen.add(R.TEMPLATES[kind])
            words = q.rstrip("?").split()
            assert (colour < len(world.COLOURS)) == any(w in world.COLOURS for w in words)
            assert (shape < len(world.SHAPES)) == any(w.rstrip("s") in world.SHAPES for w in words)
    assert seen == set(R.TEMPLATES)
    assert R.parse_labels("how many squares are there?") == [R.TEMPLATES.index("how many shape"), 4, 1]
    with pytest.raises(ValueError, match="not a toy-world question"):
        R.parse_labels("where is the square?")


def test_opt_example_points_from_the_answer_position_to_the_referents_shape_word():
    inv = {i: w for w, i in LT.OPT_V.items()}
    pool = LT.text_pool(200, 0)
    rng = np.random.default_rng(0)
    n_point = 0
    for ex in pool:
        seq = LT.opt_example(ex, rng, num_qa=4)
        assert len(seq.bind) == len(seq.ids) == len(seq.weights)
        for at, _ in seq.parse:
            assert inv[seq.ids[at]] == ":" and inv[seq.ids[at - 1]] == "answer"
            assert seq.weights[at + 1] == 1.0  # the next token is the answer
        for at, key in seq.point:
            n_point += 1
            assert inv[seq.ids[key]] in world.SHAPES and key < at
            assert (seq.bind[key] != R.IGNORE).all()
    assert n_point > 300


def _eager_random(model_cls, cfg):
    """An eager-attention model (so it returns its attention probabilities) with large random matrices."""
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


def test_opt_point_scores_are_the_layers_own_attention():
    """softmax(opt_point_scores) equals the attention probabilities transformers' eager OPT returns (heads 0, 1)."""
    from transformers import OPTForCausalLM

    model = _eager_random(OPTForCausalLM, L.opt_config())
    x = torch.randint(5, len(LT.OPT_V), (3, 12))
    x[1, 9:] = V.OPT_PAD  # a right-padded row
    out = model(input_ids=x, attention_mask=(x != V.OPT_PAD).long(), output_hidden_states=True,
                output_attentions=True)  # fmt: skip
    rows = torch.tensor([[0, 11], [1, 8], [2, 5], [0, 0]])
    with torch.no_grad():
        scores = R.opt_point_scores(model.model.decoder.layers[-1], out.hidden_states[-2], x, V.OPT_PAD, rows)
    want = out.attentions[-1][rows[:, 0], : R.POINT_HEADS, rows[:, 1]]  # (R, H, T)
    torch.testing.assert_close(scores.softmax(-1), want, atol=1e-6, rtol=1e-5)
    assert want[3, :, 1:].abs().max() == 0  # the first position sees only itself


def test_t5_point_scores_are_the_decoders_own_cross_attention():
    from transformers import T5ForConditionalGeneration

    model = _eager_random(T5ForConditionalGeneration, L.t5_config())
    x = torch.randint(3, len(LT.T5_V), (2, 10))
    x[0, 7:] = V.T5_PAD
    mask = (x != V.T5_PAD).long()
    cross = model.decoder.block[-1].layer[1]
    seen = {}
    hook = cross.layer_norm.register_forward_hook(lambda _m, _i, o: seen.setdefault("q", o))
    out = model(input_ids=x, attention_mask=mask, decoder_input_ids=torch.zeros(2, 2, dtype=torch.long),
                output_attentions=True)  # fmt: skip
    hook.remove()
    with torch.no_grad():
        scores = R.t5_point_scores(cross.EncDecAttention, seen["q"][:, 0], out.encoder_last_hidden_state, mask)
    want = out.cross_attentions[-1][:, : R.POINT_HEADS, 0]  # (B, H, S)
    torch.testing.assert_close(scores.softmax(-1), want, atol=1e-6, rtol=1e-5)
    assert want[0, :, 7:].abs().max() == 0


def test_point_loss_is_minus_log_attention_on_the_target():
    scores = torch.tensor([[[0.0, 1.0, float("-inf")], [2.0, 0.0, 1.0]]])  # (R=1, H=2, T=3)
    p0 = torch.tensor([0.0, 1.0]).softmax(-1)[1]
    p1 = torch.tensor([2.0, 0.0, 1.0]).softmax(-1)[1]
    want = -(p0.log() + p1.log()) / 2
    torch.testing.assert_close(R.point_loss(scores, torch.tensor([1])), want)


def test_reading_objectives_can_be_switched_off_and_do_not_change_the_saved_model_class():
    pool = LT.text_pool(16, 0)
    on = L.train_opt(pool, steps=3, seed=0)
    off = L.train_opt(pool, steps=3, seed=0, reading=(0.0, 0.0, 0.0))
    assert set(on.state_dict()) == set(off.state_dict())  # the heads are not part of the model
    assert any(not torch.equal(on.state_dict()[k], off.state_dict()[k]) for k in on.state_dict())
    t5 = L.train_t5(pool, steps=2, seed=0, batch=4)
    assert not t5.decoder.block[-1].layer[1].layer_norm._forward_hooks  # the capture hook is removed


def test_t5_loss_in_two_decoder_passes_equals_one_padded_pass():
    """t5_loss runs the decoder once for 2-token answers and once for captions; loss and gradients must equal the
    one padded pass it replaced (weighted NLL over every label token + bind + point over the pointed rows), with
    fused descriptions' vectors built position by position here."""
    import torch.nn.functional as F
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(L.t5_config())
    heads = R.ReadingHeads(model.config.d_model, both_sides=True)
    pool, rng = LT.text_pool(40, 0), np.random.default_rng(3)
    exs = [LT.t5_example(ex, rng, fuse_frac=0.5) for ex in pool[:24]]
    assert {len(e.labels) <= 2 for e in exs} == {True, False} and any(e.point >= 0 for e in exs)
    assert {e.words is None for e in exs} == {True, False}  # word and fused descriptions in one batch
    cross = model.decoder.block[-1].layer[1]
    seen = {}
    hook = cross.layer_norm.register_forward_hook(lambda _m, _i, o: seen.__setitem__("query", o))
    params = [*model.parameters(), *heads.parameters()]

    got = L.t5_loss(model, heads, exs, (0.7, 1.3), cross, seen)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)  # the parse head is OPT's only

    x, y = LT._pad([e.enc for e in exs], V.T5_PAD), LT._pad([e.labels for e in exs], -100)
    mask = (x != V.T5_PAD).long()
    emb = model.shared(x)
    rows = [emb[b] for b in range(len(exs))]
    for b, e in enumerate(exs):  # a fused object vector: its words' vectors summed, / sqrt(how many)
        for p in range(len(e.enc) if e.words is not None else 0):
            ids = [int(i) for i in e.words[p] if i >= 0]
            if ids:
                rows[b] = torch.cat([rows[b][:p], model.shared.weight[ids].sum(0, keepdim=True) / len(ids) ** 0.5,
                                     rows[b][p + 1 :]])  # fmt: skip
    out = model(inputs_embeds=torch.stack(rows), attention_mask=mask, labels=y, output_hidden_states=True)
    nll = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100).view_as(y)
    w = torch.tensor([e.weight for e in exs])[:, None] * (y != -100)
    want = (nll * w).sum() / w.sum()
    bind = torch.from_numpy(LT._pad_rows([e.bind for e in exs], x.shape[1]))
    want = want + 0.7 * heads.bind_loss(out.encoder_hidden_states[1], bind)
    keys = torch.tensor([e.point for e in exs])
    has = keys >= 0
    scores = R.t5_point_scores(cross.EncDecAttention, seen["query"][has, 0], out.encoder_last_hidden_state[has],
                               mask[has])  # fmt: skip
    want = want + 1.3 * R.point_loss(scores, keys[has])
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    hook.remove()

    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert sum(g is None for g in got_grads) == 2  # heads.parse weight and bias
    for g, h in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)


def test_junk_descriptions_replace_only_the_descriptions_of_picked_question_sequences():
    """train_opt's junk prefixes: picked question rows get noise on exactly their description tokens and lose the
    description loss and the point / bind targets there; re-describe and blind rows, and every other token, stay."""
    pool, rng = LT.text_pool(200, 0), np.random.default_rng(5)
    seqs = [LT.opt_example(ex, rng, 4) for ex in pool[:60]]
    kinds = ["blind" if s.ids[1] != V.OPT_BOS and LT._W_DESC not in s.weights else
             "recap" if LT._W_RECAP in s.weights else "qa" for s in seqs]  # fmt: skip
    assert {"qa", "recap", "blind"} <= set(kinds)
    before = [(list(s.point), s.bind.copy()) for s in seqs]
    x, w = LT._pad([s.ids for s in seqs], V.OPT_PAD), LT._pad([s.weights for s in seqs], 0.0)
    emb = torch.randn(*x.shape, 8)
    pick = torch.arange(len(seqs)) % 2 == 0
    torch.manual_seed(0)
    new_emb, new_w = L._junk_descriptions(seqs, emb, w, pick, 0.5)
    for b, s in enumerate(seqs):
        n = len(s.ids)
        desc = torch.tensor([wt == LT._W_DESC for wt in s.weights] + [False] * (x.shape[1] - n))
        hit = bool(pick[b]) and kinds[b] == "qa"
        assert desc.any() == (kinds[b] != "blind")
        changed = (new_emb[b] != emb[b]).any(-1)
        assert torch.equal(changed, desc if hit else torch.zeros_like(desc)), (b, kinds[b])
        assert torch.equal(new_w[b], w[b].masked_fill(desc, 0.0) if hit else w[b])
        if hit:
            assert s.point == [] and (s.bind[desc[:n].numpy()] == R.IGNORE).all()
            assert np.array_equal(s.bind[~desc[:n].numpy()], before[b][1][~desc[:n].numpy()])
        else:
            assert s.point == before[b][0] and np.array_equal(s.bind, before[b][1])
    torch.manual_seed(0)
    noise = torch.randn_like(emb) * 0.5  # the same draw: the junk vectors are N(0, std²)
    b = next(i for i in range(len(seqs)) if pick[i] and kinds[i] == "qa")
    torch.testing.assert_close(new_emb[b, 1], noise[b, 1])


def test_fused_descriptions_give_one_vector_per_object_in_order_and_point_at_the_referent():
    """t5_example(fuse_frac=1): the description becomes fuse_len placeholders whose word triples name the objects
    left→right (size, colour, shape; "," fillers between), each object's row carries its shape word's bind targets,
    and a question's point key is its referent's row."""
    pool, rng = LT.text_pool(300, 0), np.random.default_rng(7)
    comma, unk = LT.T5_V[","], LT.T5_V["<unk>"]
    inv = {i: w for w, i in LT.T5_V.items()}
    seen = {"qa": 0, "caption": 0, "pointed": 0}
    for ex in pool[:120]:
        e = LT.t5_example(ex, rng, fuse_frac=1.0, fuse_len=8)
        if e.words is None:  # blind: no description to fuse
            assert unk not in e.enc
            continue
        assert e.words.shape == (len(e.enc), 3) and e.enc[:8] == [unk] * 8 and (e.words[8:] == -1).all()
        obj_rows = [p for p in range(8) if e.words[p, 0] != comma]
        assert obj_rows == sorted(obj_rows) and len(obj_rows) == len(ex.objects)
        for p, o in zip(obj_rows, ex.objects):
            assert e.words[p].tolist() == [LT.T5_V[o.size], LT.T5_V[o.colour], LT.T5_V[o.shape]]
        for p in set(range(8)) - set(obj_rows):
            assert e.words[p].tolist() == [comma, -1, -1]
        words = V.split_words(ex.captions[0])
        want = R.bind_labels(words, ex.objects, both_sides=True)[R.shape_positions(words)]
        np.testing.assert_array_equal(e.bind[obj_rows], want)
        assert (np.delete(e.bind[:8], obj_rows, axis=0) == R.IGNORE).all()
        if len(e.labels) == 2:  # a question: the answer is read from the referent's fused vector
            seen["qa"] += 1
            text = " ".join(inv[i] for i in e.enc[8:-1])  # "question : what colour is the square ? short answer :"
            question = text.removeprefix("question : ").removesuffix(" short answer :").replace(" ?", "?")
            assert question in [qq for _, qq, _ in ex.qas]
            k = R.referent(ex.objects, question, causal=False)
            assert e.point == (obj_rows[k] if k is not None else -1), question
            seen["pointed"] += e.point >= 0
        else:  # prefix LM: fused description, then a caption prefix and </s>
            seen["caption"] += 1
            assert e.enc[-1] == V.T5_EOS and e.weight == LT._W_RECAP
    assert min(seen.values()) >= 10, seen


def test_fuse_embeddings_replaces_only_fused_rows_by_their_scaled_word_sum():
    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 6)
    emb = torch.randn(2, 4, 6)
    words = torch.full((2, 4, 3), -1)
    words[0, 1] = torch.tensor([3, 4, 5])
    words[1, 2] = torch.tensor([7, -1, -1])
    words[1, 3] = torch.tensor([8, 9, -1])
    got = LT.fuse_embeddings(table, emb, words)
    want = emb.clone()
    want[0, 1] = (table.weight[3] + table.weight[4] + table.weight[5]) / 3**0.5
    want[1, 2] = table.weight[7]
    want[1, 3] = (table.weight[8] + table.weight[9]) / 2**0.5
    torch.testing.assert_close(got, want)


def test_opt_fused_sequences_replace_bos_and_description_and_keep_the_questions():
    """opt_example(fuse_frac=1): ``</s> {description}`` becomes 8 fused object vectors (no loss on them, the objects'
    causal bind targets on their rows), the questions follow as before, and each point key is the referent's row;
    junk descriptions leave these sequences alone (they have no description tokens)."""
    inv = {i: w for w, i in LT.OPT_V.items()}
    comma, unk = LT.OPT_V[","], LT.OPT_V["<unk>"]
    pool, rng = LT.text_pool(200, 0), np.random.default_rng(11)
    seqs, n_point = [], 0
    for ex in pool[:100]:
        seq = LT.opt_example(ex, rng, num_qa=4, fuse_frac=1.0)
        if seq.words is None:  # blind
            assert unk not in seq.ids
            continue
        seqs.append(seq)
        assert seq.ids[:8] == [unk] * 8 and seq.ids[8] == V.OPT_BOS and seq.weights[:9] == [0.0] * 9
        assert len(seq.words) == len(seq.ids) == len(seq.bind) == len(seq.weights) and (seq.words[8:] == -1).all()
        rows = [p for p in range(8) if seq.words[p, 0] != comma]
        assert [seq.words[p].tolist() for p in rows] == [[LT.OPT_V[o.size], LT.OPT_V[o.colour], LT.OPT_V[o.shape]]
                                                          for o in ex.objects]  # fmt: skip
        words = V.split_words(ex.captions[0])
        np.testing.assert_array_equal(seq.bind[rows], R.bind_labels(words, ex.objects, False)[R.shape_positions(words)])
        for at, key in seq.point:  # the question ends at `at`: find it and its causal referent
            n_point += 1
            start = max(i for i in range(at) if seq.ids[i] == V.OPT_BOS) + 1
            text = " ".join(inv[i] for i in seq.ids[start : at + 1])  # "question : … ? answer :"
            question = text.removeprefix("question : ").removesuffix(" answer :").replace(" ?", "?")
            assert key == rows[R.referent(ex.objects, question, causal=True)], question
    assert len(seqs) > 80 and n_point > 100
    x, w = LT._pad([s.ids for s in seqs], V.OPT_PAD), LT._pad([s.weights for s in seqs], 0.0)
    emb = torch.randn(*x.shape, 8)
    new_emb, new_w = L._junk_descriptions(seqs, emb, w, torch.ones(len(seqs), dtype=torch.bool), 0.5)
    assert torch.equal(new_emb, emb) and torch.equal(new_w, w)
