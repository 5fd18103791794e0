r"""The toy LLMs' stage-0 training texts: scene descriptions, questions, captions, and their fused-vector form.

Token layouts (why they look like this: see :mod:`.llm_pretrain`):

* OPT: ``</s> {description} </s> question : {q} answer : {a} \n`` (a soft prompt later stands where
  ``</s> {description}`` is);
* T5: encoder ``{description} question : {q} short answer : </s>``, decoder ``{a} </s>``; captions as prefix LM.

Each example carries per-token loss weights (the loss is concentrated on answers) and the word positions the reading
objectives of :mod:`.reading` bind to. In a fraction of examples the description becomes one fused vector per object
(:func:`fuse_embeddings`), the closest text-only stand-in for the soft visual prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import reading as R
from . import vocab as V
from . import world

OPT_V = V._vocab(V.OPT_SPECIALS)
T5_V = V._vocab(V.T5_SPECIALS)
BERT_V = V._vocab(V.BERT_SPECIALS)


@dataclass
class TextExample:
    """A scene's language: its caption paraphrases, (family, question, answer) triples and its objects."""

    captions: list[str]
    qas: list[tuple[str, str, str]]
    num_objects: int = 0
    objects: tuple[world.Obj, ...] = ()  # left→right; the targets of the reading objectives (reading.py)


def text_pool(num_scenes: int, seed: int) -> list[TextExample]:
    """Scenes over ALL (colour, shape) pairs (the LLM knows every word, as a web-trained LLM would)."""
    rng = np.random.default_rng([seed, 11])
    out = []
    for i in range(num_scenes):
        scene = world.sample_scene(rng, i, "any")
        qas = world.questions(scene, rng, 4)
        out.append(TextExample(world.captions(scene), qas, len(scene.objects), scene.objects))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Example construction: (ids, per-target loss weights)

_W_DESC, _W_RECAP, _W_ANSWER = 0.1, 0.3, 1.0  # the loss is concentrated on answers (probe run B: answers ×5)


@dataclass
class OptSequence:
    """One OPT training sequence and the targets of its reading objectives (:mod:`.reading`)."""

    ids: list[int]
    weights: list[float]  # weights[t]: loss weight of predicting ids[t] from ids[:t]
    bind: np.ndarray  # (len(ids), 4) bind targets, reading.IGNORE off the description's shape words
    point: list[tuple[int, int]]  # (answer-predicting position, key position of the referent's shape word)
    parse: list[tuple[int, list[int]]]  # (answer-predicting position, reading.parse_labels of its question)
    words: np.ndarray | None = None  # (len(ids), 3) word ids of fused object vectors, −1 elsewhere; or None


def opt_example(
    ex: TextExample, rng: np.random.Generator, num_qa: int = 3, fuse_frac: float = 0.0, fuse_len: int = 8
) -> OptSequence:
    """One OPT training sequence (:class:`OptSequence`).

    A description is followed by ``num_qa`` questions, each opened by ``</s>`` exactly as the zero-shot prompt is
    after the soft prompt; packing several questions per description makes each FLOP teach more answers. With
    probability ``fuse_frac`` ``</s> {description}`` is replaced by ``fuse_len`` fused object vectors
    (:func:`_fused_description`), as a soft prompt replaces it.
    """
    r = rng.random()
    text = ex.captions[0 if rng.random() < 0.5 else rng.integers(5)]
    desc = V.encode(text, OPT_V)
    ids, w = [V.OPT_BOS] + desc, [0.0] + [_W_DESC] * len(desc)
    bind = [np.full((1, 4), R.IGNORE), _bind(text, ex)]
    shapes = [1 + p for p in R.shape_positions(V.split_words(text))]
    point, parse, words = [], [], None
    if r < 0.05:  # blind: a question with no description (gives the LLM's language prior a meaning)
        ids, w, bind, shapes = [], [], [], []
    elif fuse_frac and ex.objects and rng.random() < fuse_frac:  # no loss on the fused vectors: nothing to predict
        ids, fused_bind, words, shapes = _fused_description(ex, rng, bind[1], fuse_len, OPT_V)
        w, bind = [0.0] * fuse_len, [fused_bind]
    if r < 0.85:
        for j in rng.permutation(len(ex.qas))[:num_qa]:
            _, q, a = ex.qas[j]
            prompt = V.encode(V.OPT_PROMPT.format(q), OPT_V)
            at = len(ids) + len(prompt)  # the prompt's last token predicts the answer
            k = R.referent(ex.objects, q, causal=True) if shapes and ex.objects else None
            if k is not None:
                point.append((at, shapes[k]))
            if ex.objects:
                parse.append((at, R.parse_labels(q)))
            ids += [V.OPT_BOS] + prompt + [OPT_V[a], V.OPT_NEWLINE]
            w += [0.0] * (1 + len(prompt)) + [_W_ANSWER, _W_ANSWER]
            bind.append(np.full((len(prompt) + 3, 4), R.IGNORE))
    else:  # re-describe: what stage 2 asks of the soft prompt ("[soft] </s> caption \n")
        text = ex.captions[rng.integers(5)]
        cap = V.encode(text, OPT_V)
        ids += [V.OPT_BOS] + cap + [V.OPT_NEWLINE]
        w += [0.0] + [_W_RECAP] * (len(cap) + 1)
        bind += [np.full((1, 4), R.IGNORE), _bind(text, ex), np.full((1, 4), R.IGNORE)]
    return OptSequence(ids, w, np.concatenate(bind), point, parse, _words(words, len(ids) - fuse_len))


def _bind(text: str, ex: TextExample, both_sides: bool = False) -> np.ndarray:
    words = V.split_words(text)
    if not ex.objects:  # a pool without objects (hand-made examples): no bind targets
        return np.full((len(words), 6 if both_sides else 4), R.IGNORE)
    return R.bind_labels(words, ex.objects, both_sides)


@dataclass
class T5Example:
    """One T5 example (the decoder start token is prepended by T5) and its reading targets (:mod:`.reading`)."""

    enc: list[int]
    labels: list[int]
    weight: float
    bind: np.ndarray  # (len(enc), 6) bind targets, reading.IGNORE off the description's shape words
    point: int  # encoder position of the referent's shape word, −1 if none
    words: np.ndarray | None = None  # (len(enc), 3) word ids summed into a fused object vector, −1 unused; or None


def _fused_description(
    ex: TextExample, rng: np.random.Generator, bind: np.ndarray, length: int, vocab: dict[str, int] = T5_V
) -> tuple[list[int], np.ndarray, np.ndarray, list[int]]:
    """A description as ``length`` fused vectors (see :func:`train_t5`; ``vocab``: the LLM's word ids).

    One vector per object (its size, colour and shape words), left→right at random sorted positions; the rest are
    ``","`` fillers. Returns placeholder ids, bind targets (each object's vector gets its shape word's), the
    (length, 3) word ids and the objects' positions.
    """
    pos = np.sort(rng.choice(length, size=len(ex.objects), replace=False))
    words = np.full((length, 3), -1, dtype=np.int64)
    words[:, 0] = vocab[","]
    fused_bind = np.full((length, bind.shape[1]), R.IGNORE, dtype=np.int64)
    for p, o, s in zip(pos, ex.objects, np.flatnonzero(bind[:, 0] != R.IGNORE)):
        words[p] = [vocab[o.size], vocab[o.colour], vocab[o.shape]]
        fused_bind[p] = bind[s]
    return [vocab["<unk>"]] * length, fused_bind, words, pos.tolist()


def t5_example(ex: TextExample, rng: np.random.Generator, fuse_frac: float = 0.0, fuse_len: int = 8) -> T5Example:
    """One T5 example (:class:`T5Example`): a question with its one-word answer, or a caption as prefix LM.

    With probability ``fuse_frac`` a description is given as fused object vectors (:func:`_fused_description`).
    """
    r = rng.random()
    text = ex.captions[rng.integers(5)]
    desc = [] if r < 0.05 else V.encode(text, T5_V)
    bind = _bind(text, ex, both_sides=True)[: len(desc)]
    shapes = R.shape_positions(V.split_words(text))
    words = None
    if fuse_frac and desc and ex.objects and rng.random() < fuse_frac:
        desc, bind, words, shapes = _fused_description(ex, rng, bind, fuse_len)
    if r < 0.8:
        _, q, a = ex.qas[rng.integers(len(ex.qas))]
        prompt = V.encode(V.T5_PROMPT.format(q), T5_V) + [V.T5_EOS]
        k = R.referent(ex.objects, q, causal=False) if desc and ex.objects else None
        point = shapes[k] if k is not None else -1
        bind = np.concatenate([bind, np.full((len(prompt), 6), R.IGNORE)])
        return T5Example(desc + prompt, [T5_V[a], V.T5_EOS], _W_ANSWER, bind, point, _words(words, len(prompt)))
    text2 = ex.captions[rng.integers(5)]
    cap = V.encode(text2, T5_V)
    k = int(rng.integers(len(cap)))  # prefix-LM split point (BLIP-2 T5 stage 2, docs/paper_map.md §3.2)
    bind = np.concatenate([bind, _bind(text2, ex, both_sides=True)[:k], np.full((1, 6), R.IGNORE)])
    return T5Example(desc + cap[:k] + [V.T5_EOS], cap[k:] + [V.T5_EOS], _W_RECAP, bind, -1, _words(words, k + 1))


def fuse_embeddings(table: torch.nn.Embedding, emb: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``emb`` (B, S, C) with each position that has ``words`` (B, S, 3) ≥ 0 replaced by their fused vector.

    Fused vector: the sum of the words' embeddings / sqrt(number of words), about one word vector's norm.
    """
    valid = words >= 0  # (B, S, 3)
    vec = (table(words.clamp(min=0)) * valid[..., None]).sum(2) / valid.sum(2, keepdim=True).clamp(min=1).sqrt()
    return torch.where(valid.any(2)[..., None], vec, emb)


def _fuse_batch(
    table: torch.nn.Embedding, emb: torch.Tensor, rows: list[tuple[np.ndarray | None, int]], noise: float = 0.0
) -> torch.Tensor:
    """:func:`fuse_embeddings` over a padded batch: ``rows`` holds each sequence's ``words`` (or None) and length.

    ``noise``: std of Gaussian noise added to every fused vector (so that an imperfect one is still read).
    """
    if all(words is None for words, _ in rows):
        return emb
    words = torch.from_numpy(_pad_rows([w if w is not None else np.full((n, 3), -1) for w, n in rows], emb.shape[1]))
    out = fuse_embeddings(table, emb, words)  # (B, T, C)
    if noise:
        out = out + noise * torch.randn_like(out) * (words >= 0).any(2)[..., None]
    return out


def _words(words: np.ndarray | None, tail: int) -> np.ndarray | None:
    return None if words is None else np.concatenate([words, np.full((tail, 3), -1, dtype=np.int64)])


def _curriculum(
    pool: list[TextExample], rng: np.random.Generator, steps: int, easy_frac: float, easy_max_objects: int
) -> Callable[[int, int], list[TextExample]]:
    """``draw(step, n)``: ``n`` scenes, only those with ≤ ``easy_max_objects`` objects for the first ``easy_frac``.

    Why: in a short description the question's referent is one of few candidates, so the attention look-ups
    ("what colour is the square?") get a strong gradient early and carry over to 3–4 objects. Measured on the
    toy OPT (batch 16, 300 held-out scenes × 4 questions): 82.0% text-oracle accuracy after 2400 steps with the
    first 40% on ≤ 2-object scenes vs 79.1% at step 2400 of a 3200-step run without — within seed noise (~5
    points between two text pools), so weak evidence; ≤ 1-object scenes first gave 75.5%.
    """
    easy = [ex for ex in pool if ex.num_objects <= easy_max_objects] or pool

    def draw(step: int, n: int) -> list[TextExample]:
        src = easy if step < easy_frac * steps else pool
        return [src[i] for i in rng.integers(len(src), size=n)]

    return draw


def _split_by(flags: torch.Tensor) -> list[torch.Tensor]:
    """Row indices where ``flags`` (B,) is true, then where it is false; empty groups left out."""
    return [rows for rows in (flags.nonzero()[:, 0], (~flags).nonzero()[:, 0]) if len(rows)]


def _pad(seqs: list[list], value) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def _pad_rows(arrays: list[np.ndarray], n: int) -> np.ndarray:
    """Stack (T_i, K) target arrays into (B, n, K), padding with reading.IGNORE."""
    out = np.full((len(arrays), n, arrays[0].shape[1]), R.IGNORE, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out
