"""Small batched greedy / beam-search decoder over a step function with a key/value cache.

Used by the Q-Former-only captioner of the stage-1 model (spec §2, last paragraph: beam 3 from ``[DEC]``, EOS =
``[SEP]``). The LLM side uses transformers' ``generate`` (see ``blip2lib.llm``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# step(tokens (N, 1), cache, past_length) -> (logits (N, V), new_cache); reorder(cache, index (N,)) -> cache
StepFn = Callable[[torch.Tensor, object, int], tuple[torch.Tensor, object]]
ReorderFn = Callable[[object, torch.Tensor], object]


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
) -> torch.Tensor:
    """Beam search (``num_beams == 1`` is greedy) with transformers' length-normalised final scores.

    Args:
        step: runs the model on the last token of each hypothesis and returns next-token logits.
        reorder: re-indexes the cache along the hypothesis axis.
        cache: the initial cache, already expanded to ``batch * num_beams`` rows (row-major per sample).
        batch: number of samples B.
        bos_id: start token.
        eos_id: end token.
        pad_id: padding after a hypothesis finished.
        num_beams: beam width K.
        max_new_tokens: most generated tokens.
        min_new_tokens: EOS is suppressed before this many generated tokens.
        length_penalty: final score = sum log-prob / length ** length_penalty.
        device: device of the token tensors.

    Returns:
        (B, T) generated ids (without ``bos_id``), padded with ``pad_id`` after EOS.
    """
    k = num_beams
    tokens = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)  # (B*K, 1)
    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive at step 0
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    for t in range(max_new_tokens):
        logits, cache = step(tokens[:, -1:], cache, t)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        if t < min_new_tokens:
            logp[:, eos_id] = float("-inf")
        logp[done] = float("-inf")
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(batch, k * vocab)  # (B, K*V)
        top, idx = cand.topk(2 * k, dim=-1)  # (B, 2K): room for EOS hypotheses that leave the beam
        beam_idx, tok = idx // vocab, idx % vocab
        new_rows, new_tok, new_scores = [], [], []
        for b in range(batch):
            kept = 0
            for j in range(2 * k):
                if top[b, j].item() == float("-inf"):
                    break
                row = b * k + beam_idx[b, j].item()
                if tok[b, j].item() == eos_id or t == max_new_tokens - 1:
                    seq = torch.cat([tokens[row, 1:], tok[b, j].view(1)])
                    finished[b].append((top[b, j].item() / (seq.numel() ** length_penalty), seq))
                    if tok[b, j].item() == eos_id:
                        continue
                if kept < k:
                    new_rows.append(row)
                    new_tok.append(tok[b, j])
                    new_scores.append(top[b, j])
                    kept += 1
            while kept < k:  # every candidate finished: park dead rows
                new_rows.append(b * k)
                new_tok.append(torch.tensor(pad_id, device=device))
                new_scores.append(torch.tensor(float("-inf"), device=device))
                kept += 1
        rows = torch.tensor(new_rows, device=device)
        tokens = torch.cat([tokens[rows], torch.stack(new_tok).view(-1, 1)], dim=1)
        scores = torch.stack(new_scores).view(batch, k)
        done = torch.isinf(scores.view(-1))
        cache = reorder(cache, rows)
        if all(
            len(f) >= k and max(s for s, _ in f) >= scores[b].max().item() / ((t + 1) ** length_penalty)
            for b, f in enumerate(finished)
        ) or bool(done.all()):
            break
    best = [max(f, key=lambda x: x[0])[1] if f else tokens[b * k, 1:] for b, f in enumerate(finished)]
    width = max(s.numel() for s in best)
    out = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    for b, s in enumerate(best):
        out[b, : s.numel()] = s
    return out
