"""Q-Former beam search (blip2lib/decoding.py) against brute force over a tiny vocabulary and transformers' search.

The step function scores a prefix with a fixed table (no model), so the optimum can be enumerated by hand:
with enough beams nothing is ever pruned and beam search must return the brute-force argmax of
``sum log-prob / n ** length_penalty`` (n = generated tokens, EOS included) among all hypotheses that end in EOS
(after ``min_new_tokens``) or reach ``max_new_tokens``.
"""

import itertools
import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, OPTConfig, OPTForCausalLM

from blip2lib.decoding import beam_search

torch.set_num_threads(1)
EOS, A, B = 0, 1, 2  # the scored vocabulary
BOS, PAD = 3, 9  # fed / padding only (never scored)


def _table_step(table):
    """step/reorder over a cache that is simply each hypothesis's prefix (generated tokens, BOS dropped)."""

    def step(tokens, cache, t):
        cache = tokens if t == 0 else torch.cat([cache, tokens], dim=1)  # (N, t + 1) incl. BOS
        logits = torch.stack([table(tuple(row[1:])) for row in cache.tolist()])  # (N, V)
        return logits, cache

    def reorder(cache, rows):
        return cache[rows]

    return step, reorder


def _run(table, batch=1, **kw):
    step, reorder = _table_step(table)
    return beam_search(step, reorder, None, batch, BOS, EOS, PAD, **kw)


def _brute_force(table, max_new, min_new, lp):
    """Best hypothesis by enumerating every token sequence over {EOS, A, B}."""
    best, best_score = None, -math.inf
    for n in range(1, max_new + 1):
        for body in itertools.product([A, B], repeat=n - 1):
            ends = [EOS] if n - 1 >= min_new else []
            ends += [A, B] if n == max_new else []  # hitting max_new_tokens also ends a hypothesis
            for last in ends:
                seq = (*body, last)
                logp = sum(torch.log_softmax(table(seq[:i]), -1)[seq[i]].item() for i in range(n))
                score = logp / n**lp
                if score > best_score:
                    best, best_score = seq, score
    return list(best)


# A hand-worked table: P(next | prefix) over (EOS, A, B).
_HAND = {(): [0.4, 0.35, 0.25], (A,): [0.9, 0.05, 0.05]}


def hand_table(prefix):
    return torch.tensor(_HAND.get(prefix, [0.1, 0.45, 0.45])).log()


def test_hand_worked_length_normalisation_and_min_length():
    # "EOS" alone: log .4 = -0.916 (n=1); "A EOS": log .35 + log .9 = -1.155 (n=2) -> -0.578 normalised
    # lp=0 (sums): the empty answer wins; lp=1: "A EOS" wins; min_new=1 forbids the empty answer
    assert math.log(0.4) > math.log(0.35) + math.log(0.9)
    assert (math.log(0.35) + math.log(0.9)) / 2 > math.log(0.4)
    kw = dict(num_beams=12, max_new_tokens=3)  # 12 beams: nothing is pruned over 3 steps of a 3-token vocabulary
    assert _run(hand_table, min_new_tokens=0, length_penalty=0.0, **kw).tolist() == [[EOS]]
    assert _run(hand_table, min_new_tokens=0, length_penalty=1.0, **kw).tolist() == [[A, EOS]]
    assert _run(hand_table, min_new_tokens=1, length_penalty=0.0, **kw).tolist() == [[A, EOS]]
    # a batch pads the shorter answer with PAD after its EOS
    assert _run(hand_table, batch=2, min_new_tokens=0, length_penalty=0.0, **kw).tolist() == [[EOS], [EOS]]
    for lp, mn in itertools.product((0.0, 1.0), (0, 1)):
        assert _run(hand_table, min_new_tokens=mn, length_penalty=lp, **kw)[0].tolist() == _brute_force(
            hand_table, 3, mn, lp
        )


def random_table(seed):
    def table(prefix):
        code = seed * 1000 + sum((t + 1) * 4**i for i, t in enumerate(prefix)) + 7 * len(prefix)
        return torch.randn(3, generator=torch.Generator().manual_seed(code)) * 1.5

    return table


def test_exhaustive_beam_search_equals_brute_force():
    """12 beams never prune 3 steps over 3 tokens: the search must return the brute-force optimum."""
    winners = {}
    for seed, lp, mn in itertools.product(range(12), (-1.0, 0.0, 1.0, 2.0), (0, 2)):
        table = random_table(seed)
        want = _brute_force(table, 3, mn, lp)
        got = _run(table, num_beams=12, max_new_tokens=3, min_new_tokens=mn, length_penalty=lp)[0].tolist()
        assert got == want, (seed, lp, mn)
        winners[seed, lp, mn] = tuple(want)
    # the cases exercise what they claim: length normalisation, EOS and the minimum length change the winner
    assert any(winners[s, 1.0, m] != winners[s, 0.0, m] for s in range(12) for m in (0, 2))
    assert any(winners[s, lp, 0] != winners[s, lp, 2] for s in range(12) for lp in (0.0, 1.0))
    assert any(w[-1] == EOS and len(w) < 3 for w in winners.values())  # ended by EOS before the limit
    assert any(w[-1] != EOS for w in winners.values())  # ended by the length limit


def wide(table, width=10):
    """The table padded to the model's 10 ids with -inf (BOS / PAD are inputs only), for both searches."""
    return lambda prefix: torch.cat([table(prefix), torch.full((width - 3,), -math.inf)])


class _TableProcessor(LogitsProcessor):
    """Replaces transformers' scores by the table's log-probs, keeping its EOS suppression (-inf) intact."""

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, scores):
        logits = torch.stack([self.table(tuple(row[1:])) for row in input_ids.tolist()])  # (N, 10)
        return torch.where(torch.isinf(scores), scores, torch.log_softmax(logits.float(), dim=-1))


@pytest.fixture(scope="module")
def hf_model():
    """Any tiny causal LM: its logits are replaced by the table (its forward only drives generate's loop)."""
    cfg = OPTConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=8, pad_token_id=PAD, bos_token_id=BOS,
                    eos_token_id=EOS)  # fmt: skip
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")  # min_new > max_new is one of the cases
@pytest.mark.parametrize("num_beams", [1, 2, 3, 4])
def test_equals_transformers_beam_search(hf_model, num_beams):
    """Same table, same lengths: transformers' generate and ours pick the same tokens (pruning, early stop)."""
    for seed, lp, mn, mx in itertools.product(range(4), (-1.0, 0.0, 1.0, 2.0), (0, 2), (1, 4, 6)):
        table = wide(random_table(100 + seed))
        ours = _run(table, num_beams=num_beams, max_new_tokens=mx, min_new_tokens=mn, length_penalty=lp)
        hf = hf_model.generate(
            input_ids=torch.tensor([[BOS]]), attention_mask=torch.ones(1, 1, dtype=torch.long), num_beams=num_beams,
            do_sample=False, max_new_tokens=mx, min_new_tokens=mn, length_penalty=lp, eos_token_id=EOS,
            pad_token_id=PAD, logits_processor=LogitsProcessorList([_TableProcessor(table)]),
        )  # fmt: skip
        assert ours[0].tolist() == hf[0, 1:].tolist(), (seed, lp, mn, mx)
