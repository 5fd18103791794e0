"""Beam-search behaviour that the mutation pass of blip2lib/decoding.py showed unpinned (docs/mutation.md).

The other decoding tests run one sample at a time over a cache that is only the prefix, so nothing checked that
the per-sample early stop stays per sample in a batch, that a stopped sample stops adding hypotheses, that the
cache rows are re-indexed per sample, or that the loop ends as soon as every sample is done. Here the step
function scores a prefix with a fixed table that also depends on the sample, and the expected answers are worked
out by hand from the rule "a sample stops once its K hypotheses finished and its best running beam, normalised by
its current length, is not above the worst of them".
"""

import math

import torch

from blip2lib.decoding import beam_search

torch.set_num_threads(1)
EOS, A, B = 0, 1, 2  # the scored vocabulary
BOS, PAD = 3, 9  # fed / padding only
NEG_INF = -math.inf


def _logits(sample: int, prefix: tuple[int, ...]) -> torch.Tensor:
    """(3,) logits over (EOS, A, B) for one sample after a prefix of generated tokens."""
    if sample == 0:
        # (): EOS leads (log p = -0.313), A second (-1.313); after A: A leads by far, EOS is far behind
        return torch.tensor([0.0, -1.0, NEG_INF]) if not prefix else torch.tensor([-30.0, 0.0, NEG_INF])
    return torch.tensor([-5.0, 0.0, NEG_INF])  # sample 1: A always leads, EOS is never the top continuation


def _search(batch: int, num_beams: int = 1, max_new_tokens: int = 5, calls: list | None = None):
    """beam_search over a cache of (sample id, BOS, generated tokens...) rows, re-indexed with index_select."""

    def step(tokens, cache, t):  # tokens (N, 1); cache (N, 1 + t) -> logits (N, 3)
        if calls is not None:
            calls.append(tokens.shape[0])
        cache = torch.cat([cache, tokens], dim=1)
        logits = torch.stack([_logits(row[0], tuple(row[2:])) for row in cache.tolist()])
        return logits, cache

    def reorder(cache, rows):  # index_select refuses a negative row (no silent wrap-around)
        return cache.index_select(0, rows)

    ids = torch.arange(batch).repeat_interleave(num_beams).view(-1, 1)  # (B*K, 1): sample id per row
    return beam_search(step, reorder, ids, batch, BOS, EOS, PAD, num_beams=num_beams, max_new_tokens=max_new_tokens,
                       min_new_tokens=0, length_penalty=1.0)  # fmt: skip


def test_a_sample_that_stopped_early_keeps_its_answer_while_another_goes_on():
    # sample 0, step 0: "EOS" finishes with -log(1 + e^-1) = -0.313 (n=1); the running beam "A" has -1.313, and
    # -1.313 / 1 is not above -0.313, so sample 0 stops. Had it gone on, "A A A A A" (n=5, the length limit) would
    # score -1.313 / 5 = -0.263 > -0.313 and win: the answer must stay "EOS".
    e = math.log1p(math.exp(-1.0))
    assert -(1.0 + e) / 5 > -e  # the longer hypothesis would have won
    # sample 1 never ranks EOS first, so it runs to the 5-token limit with "A A A A A"
    out = _search(batch=2)
    assert out.tolist() == [[EOS, PAD, PAD, PAD, PAD], [A, A, A, A, A]]


def test_the_loop_ends_once_every_sample_stopped():
    calls: list[int] = []
    out = _search(batch=1, calls=calls)
    assert out.tolist() == [[EOS]]
    assert calls == [1]  # one step: sample 0 is done after step 0, no further model calls


def test_default_lengths_and_width():
    """The defaults are the stage-1 captioner's: 3 beams, at most 30 new tokens, EOS not before 10, length 1.0."""
    rows: list[int] = []

    def step(tokens, cache, t):  # the logits depend on the step only
        rows.append(tokens.shape[0])
        # steps 0-9: A (log p exactly 0 in float32); step 10: EOS 0.1, A 0; step 11 on: EOS (log p 0)
        table = {10: [0.1, 0.0, -50.0]}.get(t, [-50.0, 0.0, -50.0] if t < 10 else [0.0, -50.0, -50.0])
        return torch.tensor([table]).expand(tokens.shape[0], 3), cache

    out = beam_search(step, lambda cache, idx: cache, None, 1, BOS, EOS, PAD)
    assert set(rows) == {3}  # B * num_beams rows per step
    # EOS is masked for the first 10 tokens. Then "A^10 EOS" (n = 11) scores lE = 0.1 - lse and "A^11 EOS"
    # (n = 12) scores lA = -lse, lse = log(e^0.1 + 1). Length penalty 1.0: lE / 11 > lA / 12, the shorter wins
    # (with 2.0, lA / 144 > lE / 121 and the longer would win).
    lse = math.log(math.exp(0.1) + 1.0)
    l_e, l_a = 0.1 - lse, -lse
    assert l_e / 11 > l_a / 12 and l_a / 12**2 > l_e / 11**2
    assert out.tolist() == [[A] * 10 + [EOS]]

    def never_eos(tokens, cache, t):
        return torch.tensor([[-50.0, 0.0, -1.0]]).expand(tokens.shape[0], 3), cache

    out = beam_search(never_eos, lambda cache, idx: cache, None, 1, BOS, EOS, PAD)
    assert out.tolist() == [[A] * 30]  # ended by the 30-token limit


def test_two_token_vocabulary():
    """K beams over V = 2 tokens have exactly 2K = K * V continuations per step: all of them are ranked."""

    def step(tokens, cache, t):  # log p: EOS -1.313, A -0.313 at every step
        return torch.tensor([[-1.0, 0.0]]).expand(tokens.shape[0], 2), cache

    out = beam_search(step, lambda cache, idx: cache, None, 1, BOS, EOS, PAD, num_beams=2, max_new_tokens=2,
                      min_new_tokens=0)  # fmt: skip
    # "EOS" = -1.313 (n=1), "A EOS" = -1.627 / 2, "A A" (the length limit) = -0.627 / 2: "A A" wins
    assert out.tolist() == [[A, A]]
