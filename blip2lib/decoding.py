"""Batched greedy / beam-search decoder over a step function with a key/value cache.

Used by the Q-Former-only captioner of the stage-1 model (beam 3 from ``[DEC]``, EOS = ``[SEP]``) and by the LLM's
static decode engine (``blip2lib.static_decode``, with a ``logits_hook`` for the repetition penalty). The search
follows transformers' own beam search step for step (``GenerationMixin._beam_search`` of the installed 5.x, default
``early_stopping=False``), so the two agree token for token on the same log-probabilities
(``tests/unit/test_decoding.py`` and ``tests/unit/test_static_decode.py`` check this):

* every step ranks the ``2K`` best continuations of the ``K`` running beams by summed log-probability;
* a continuation that ends (EOS, or the last allowed token) is a finished hypothesis only when it ranks among the
  top ``K``; its score is ``sum log-prob / n ** length_penalty`` with ``n`` the generated tokens, EOS included;
* the ``K`` best continuations that did not end become the running beams (pruned ones are kept at ``-1e9``);
* a sample stops once ``K`` hypotheses finished and the best running beam, normalised by its current length, is
  not above the worst of them (transformers' heuristic; with ``length_penalty > 0`` it can miss a longer winner);
* the answer is the best finished hypothesis.

With a ``compact`` hook, samples that stopped leave the batch: their answer is stored, their rows are dropped from
the bookkeeping here and (by the hook) from the model's state, and the next steps run on the remaining rows. A stopped
sample's finished hypotheses can no longer change (every new candidate of it is masked to ``-1e9``), so the answers
are the same as without the hook.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# step(tokens (N, 1), cache, past_length) -> (logits (N, V), new_cache); reorder(cache, index (N,)) -> cache
StepFn = Callable[[torch.Tensor, object, int], tuple[torch.Tensor, object]]
ReorderFn = Callable[[object, torch.Tensor], object]
# hook(log_probs (N, V), generated tokens so far (N, t)) -> log_probs: a transformers logits processor's place
LogitsHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# compact(cache, keep (N',) flat rows to keep, next step t) -> (cache, whether the other rows were dropped)
CompactFn = Callable[[object, torch.Tensor, int], tuple[object, bool]]
_NEG = -1.0e9  # transformers' additive mask for pruned / not-finished entries (finite, unlike -inf)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick entries along dim 1: x (B, M, ...) with idx (B, N) → (B, N, ...)."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


@torch.no_grad()
def beam_search(
    step: StepFn,
    reorder: ReorderFn,
    cache: object,
    batch: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    num_beams: int = 3,
    max_new_tokens: int = 30,
    min_new_tokens: int = 10,
    length_penalty: float = 1.0,
    device: torch.device | str = "cpu",
    logits_hook: LogitsHook | None = None,
    compact: CompactFn | None = None,
) -> torch.Tensor:
    """Beam search (``num_beams == 1`` is greedy) as transformers runs it (see the module docstring).

    Args:
        step: runs the model on the last token of each hypothesis and returns next-token logits.
        reorder: re-indexes the cache along the hypothesis axis (flat ``b * K + beam`` rows).
        cache: the initial cache, already expanded to ``batch * num_beams`` rows (row-major per sample).
        batch: number of samples B.
        bos_id: start token (fed at step 0, not returned).
        eos_id: end token (returned, then padding).
        pad_id: padding after a hypothesis finished.
        num_beams: beam width K.
        max_new_tokens: most generated tokens, EOS included.
        min_new_tokens: EOS is suppressed until this many tokens were generated.
        length_penalty: final score = sum log-prob / (generated tokens) ** length_penalty.
        device: device of the token tensors.
        logits_hook: applied to the log-probabilities before the ``min_new_tokens`` mask, with the running beams'
            tokens (flat rows), where transformers runs its logits processors (e.g. the repetition penalty).
        compact: called after a step in which some samples stopped, with the flat rows of the samples still running
            (all ``K`` rows of each, in order); when it returns ``True`` it has dropped the other rows from the cache
            and the search goes on with the remaining samples only (their rows renumbered ``0..N'-1``). It may
            decline (``False``), e.g. when dropping rows does not pay yet.

    Returns:
        (B, T) generated ids of the best hypothesis (without ``bos_id``), padded with ``pad_id`` after EOS;
        T is the longest returned hypothesis.
    """
    k, keep, t_max = num_beams, 2 * num_beams, max_new_tokens
    run_seq = torch.full((batch, k, t_max), pad_id, dtype=torch.long, device=device)  # running beams' tokens
    run_score = torch.full((batch, k), _NEG, device=device)
    run_score[:, 0] = 0.0  # all beams start identical: only the first one is alive at step 0
    fin_seq = torch.full((batch, k, t_max), pad_id, dtype=torch.long, device=device)  # best K finished
    fin_score = torch.full((batch, k), _NEG, device=device)
    fin_len = torch.zeros((batch, k), dtype=torch.long, device=device)
    fin_done = torch.zeros((batch, k), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)  # early-stop heuristic not yet met
    top_k_rank = torch.arange(keep, device=device) < k  # only the top-K ranked continuations may finish
    offset = torch.arange(batch, device=device).view(-1, 1) * k
    last = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    b, ids = batch, torch.arange(batch, device=device)  # samples still in the batch, and their original index
    out_seq = torch.full((batch, t_max), pad_id, dtype=torch.long, device=device)  # answers of samples that left
    out_len = torch.zeros(batch, dtype=torch.long, device=device)
    for t in range(t_max):
        logits, cache = step(last, cache, t)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        if logits_hook is not None:
            logp = logits_hook(logp, run_seq[:, :, :t].reshape(b * k, t))
        if t < min_new_tokens:
            logp[:, eos_id] = float("-inf")
        vocab = logp.shape[-1]
        acc = (logp.view(b, k, vocab) + run_score[:, :, None]).view(b, k * vocab)  # (B, K*V)
        top, idx = acc.topk(keep, dim=1)  # (B, 2K), sorted best first
        src, tok = idx // vocab, idx % vocab  # source beam, new token
        cand = _gather(run_seq, src).clone()  # (B, 2K, T)
        cand[:, :, t] = tok
        ends = (tok == eos_id) | (t == t_max - 1)  # (B, 2K)
        # running beams: the K best continuations that did not end
        live = top + ends.float() * _NEG
        nxt = live.topk(k, dim=1).indices  # (B, K)
        run_seq, run_score = _gather(cand, nxt), live.gather(1, nxt)
        rows = (src.gather(1, nxt) + offset).view(-1)  # (B*K,) flat source row of each new running beam
        # finished hypotheses: length-normalised, merged with the previous best K
        norm = top / ((t + 1) ** length_penalty)
        just_done = ends & top_k_rank
        norm = norm + (~improvable).float() * _NEG + (~just_done).float() * _NEG
        best = torch.cat([fin_score, norm], dim=1).topk(k, dim=1).indices  # (B, K) of 3K
        fin_seq = _gather(torch.cat([fin_seq, cand], dim=1), best)
        fin_score = torch.cat([fin_score, norm], dim=1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(norm, t + 1, dtype=torch.long)], dim=1).gather(1, best)
        fin_done = torch.cat([fin_done, just_done], dim=1).gather(1, best)
        cache = reorder(cache, rows)
        last = run_seq[:, :, t].reshape(-1, 1)
        # stop a sample once its best running beam (at its current length) cannot beat the worst finished one
        worst = torch.where(fin_done, fin_score.min(dim=1, keepdim=True).values, _NEG)  # (B, K)
        improvable = improvable & (run_score[:, :1] / ((t + 1) ** length_penalty) > worst).any(1, keepdim=True)
        stopped = b - int(improvable.sum())
        if stopped == b or bool(ends.all()):
            break
        if compact is not None and stopped:
            running = improvable[:, 0]  # (B,) samples still running
            kept_rows = (running.nonzero() * k + torch.arange(k, device=device)).view(-1)  # (B'*K,) their flat rows
            cache, dropped = compact(cache, kept_rows, t + 1)
            if dropped:  # store the stopped samples' answers, then shrink every (B, ...) tensor to the B' running
                gone = ~running
                out_seq[ids[gone]], out_len[ids[gone]] = fin_seq[gone, 0], fin_len[gone, 0]
                state = (run_seq, run_score, fin_seq, fin_score, fin_len, fin_done, improvable, ids)
                run_seq, run_score, fin_seq, fin_score, fin_len, fin_done, improvable, ids = (x[running] for x in state)
                b, last = len(ids), last[kept_rows]
                offset = torch.arange(b, device=device).view(-1, 1) * k
    out_seq[ids], out_len[ids] = fin_seq[:, 0], fin_len[:, 0]
    width = int(out_len.max())
    return out_seq[:, :width]
