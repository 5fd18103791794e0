"""Our decode loop over the frozen LLM's own transformers modules: the ids of transformers' ``generate``, less work.

What transformers' ``generate`` does that this loop avoids (``docs/fidelity.md``, "decode engine"):

* a decoder-only model gets its inputs expanded to ``batch × beams`` rows BEFORE the prefill, so the soft prompt and
  the text prompt run through the LLM once per beam; here the prefill runs once per sample and its key/value states
  are copied into every beam row of a preallocated cache;
* the cache grows by concatenation (a new tensor per layer and step) and every beam step re-indexes ALL of it; here
  the buffers have their final length from the start, the new token's key/value is written in place, and a beam
  reorder copies only the generated part (the prompt part is the same in every beam of a sample, and beams never
  move between samples);
* for T5 the cross-attention keys/values are re-indexed every beam step; here they are computed once (one row per
  sample, then copied to its beams) and never touched again.

The model forward is the model's own (``model(...)`` with a :class:`transformers.Cache`), called with the inputs
``generate`` passes, so every logit is computed by the same modules on the same inputs. Beam selection is
:func:`blip2lib.decoding.beam_search` (transformers' ``_beam_search`` rules); greedy is a plain argmax loop
(transformers' ``_sample``: processors on the raw float32 logits, finished rows padded).

Processors, as ``generate`` builds them from our :class:`~transformers.GenerationConfig`: the repetition penalty
(over the generated tokens; a T5 decoder also counts its start token) then ``min_new_tokens`` (EOS to ``-inf``).
Greedy applies them to logits, beam search to log-probabilities, like transformers.

Cache modes (``mode`` of :func:`static_generate`, :class:`SlabLayer`): ``exact`` hands attention the written prefix
of the buffer, exactly the keys transformers' growing cache holds (the CPU default); ``bucket`` hands it a window of
fixed length (cache length rounded up to ``bucket`` positions) with a prepared mask: the static shapes and addresses
a CUDA graph needs. ``graphs`` (the CUDA default) captures one step per window and replays it.

Finished samples leave the batch (``compact_at``): once at least that share of the current rows belongs to finished
samples (greedy: the row emitted EOS; beam search: the sample stopped by transformers' rule, see
:func:`blip2lib.decoding.beam_search`), their rows are dropped from the step inputs, the cache (and T5's
cross-attention keys/values and encoder mask), the repetition-penalty history and the beam bookkeeping, and their
answers are written back to their original rows, padded as before. A finished sample's tokens no longer change, and
every row's logits depend on that row alone, so the ids are the same. Dropping copies the whole cache once, so it
is done in steps (default: a quarter of the rows finished) rather than at every finished sample; on CPU, a VQA-like
decode (beam 5, 10 new tokens, most answers 1-2 tokens) ran about 1.3-1.5x faster with it, and dropping at every
step was no faster than the quarter rule. In ``graphs`` mode
rows are dropped only when the next step enters a new cache window: that window needs a capture anyway, so no
capture is added (graphs are keyed by window and row count).
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

from .decoding import beam_search

log = logging.getLogger(__name__)

STATIC_MODEL_TYPES = {"opt": ("opt",), "t5": ("t5",)}  # families -> transformers model_type our loop drives
MODES = ("exact", "bucket", "graphs")  # see static_generate


def supports(model: PreTrainedModel, family: str, do_sample: bool) -> bool:
    """Whether :func:`static_generate` can serve this request (``engine="auto"`` falls back to ``"hf"`` otherwise)."""
    return not do_sample and getattr(model.config, "model_type", None) in STATIC_MODEL_TYPES.get(family, ())


class SlabLayer(DynamicLayer):
    """One attention layer's keys/values in a preallocated ``(N, H, L_max, d)`` buffer, written in place.

    ``length`` counts the written positions. ``window=None`` (exact mode) hands attention the written prefix
    ``[:, :, :length]`` — the same keys, in the same order, as transformers' growing ``DynamicLayer``. With
    ``window=w`` (bucket mode) attention gets ``[:, :, :w]`` and the caller passes a mask that hides the unwritten
    tail; the write position is then the device tensor ``pos`` so a captured graph can be replayed at any step.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.keys, self.values, self.length = keys, values, length  # (N, H, L_max, d) each
        self.device, self.is_initialized = keys.device, True
        self.window: int | None = None
        self.pos: torch.Tensor | None = None  # (1,) long: write position in bucket mode

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # noqa: D102
        pass  # allocated up front

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new (N, H, q, d) states after the written prefix; return what attention reads."""
        q = key_states.shape[-2]
        if self.window is None:
            self.keys[:, :, self.length : self.length + q].copy_(key_states)
            self.values[:, :, self.length : self.length + q].copy_(value_states)
            self.length += q
            return self.keys[:, :, : self.length], self.values[:, :, : self.length]
        self.keys.index_copy_(2, self.pos, key_states)  # q == 1 in bucket mode (one decode step)
        self.values.index_copy_(2, self.pos, value_states)
        return self.keys[:, :, : self.window], self.values[:, :, : self.window]

    def get_seq_length(self) -> int | torch.Tensor:  # noqa: D102
        # bucket mode: the device tensor, so T5's relative position bias follows the step inside a replayed graph
        return self.length if self.window is None else self.pos

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # noqa: D102
        return (self.length + query_length if self.window is None else self.window), 0

    def get_max_length(self) -> int:  # noqa: D102
        return self.keys.shape[2]

    def reorder_generated_(self, rows: torch.Tensor, start: int) -> None:
        """Beam reorder of the generated positions ``[start, length)`` only; the prompt part is left alone."""
        if self.length > start:
            for buf in (self.keys, self.values):
                buf[:, :, start : self.length] = buf[:, :, start : self.length].index_select(0, rows)


def _slab_from(prefill: Cache, rows_per_sample: int, max_len: int) -> list[SlabLayer]:
    """Copy a prefilled (B rows) cache into fresh (B*K, H, max_len, d) buffers, each sample's rows K times."""
    layers = []
    for layer in prefill.layers:
        k, v = layer.keys, layer.values  # (B, H, P, d)
        n, (_, h, p, d) = k.shape[0] * rows_per_sample, k.shape
        keys = k.new_zeros(n, h, max_len, d)  # zeros: the unwritten tail is finite (masked, times 0 in attention)
        values = v.new_zeros(n, h, max_len, v.shape[-1])
        keys[:, :, :p] = k.repeat_interleave(rows_per_sample, 0)
        values[:, :, :p] = v.repeat_interleave(rows_per_sample, 0)
        layers.append(SlabLayer(keys, values, p))
    return layers


class _Decoder:
    """The state of one batched decode: prefill once per sample, then one-token steps on ``B * K`` rows."""

    def __init__(self, model, family, embeds, mask, k, max_new_tokens, decoder_start_id, mode="exact", bucket=32):
        self.model, self.family, self.mode, self.bucket = model, family, mode, bucket
        b = embeds.shape[0]
        if family == "opt":
            out = model(inputs_embeds=embeds, attention_mask=mask, cache=DynamicCache(config=model.config),
                        use_cache=True)  # fmt: skip
            self.start = embeds.shape[1]  # generated positions start after [soft prompt ; prompt]
            self.layers = _slab_from(out.cache, k, self.start + max_new_tokens)
            self.cache = Cache(layers=self.layers)
            tail = torch.ones(b * k, max_new_tokens, dtype=mask.dtype, device=mask.device)
            self.mask = torch.cat([mask.repeat_interleave(k, 0), tail], 1)  # (N, P + T), sliced per step
        else:
            enc = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, S, D)
            start = torch.full((b, 1), decoder_start_id, dtype=torch.long, device=embeds.device)
            pre = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
            out = model(decoder_input_ids=start, encoder_outputs=(enc,), attention_mask=mask, cache=pre,
                        use_cache=True)  # fmt: skip
            self.start = 1  # the decoder start token's position
            self.layers = _slab_from(out.cache.self_attention_cache, k, 1 + max_new_tokens)
            cross = DynamicCache(config=model.config)  # computed once per sample, copied to its beams, never reordered
            for i, layer in enumerate(out.cache.cross_attention_cache.layers):
                cross.update(layer.keys.repeat_interleave(k, 0), layer.values.repeat_interleave(k, 0), i)
            self.cache = EncoderDecoderCache(Cache(layers=self.layers), cross)
            self.cache.is_updated = dict.fromkeys(range(len(self.layers)), True)
            self.enc = enc.repeat_interleave(k, 0)  # (N, S, D): only its shape is read once the cross cache is set
            self.mask = mask.repeat_interleave(k, 0)  # (N, S) encoder mask for cross-attention
        # (B, V) -> (N, V): the K beams of a sample start from the same logits
        self.first = out.logits[:, -1].repeat_interleave(k, 0)
        self.rows = b * k  # rows every step runs on, until finished samples leave (keep)
        if mode != "exact":
            self._static_inputs()

    def _static_inputs(self) -> None:
        """Fixed-address inputs of a bucket-mode step (what a CUDA graph reads), updated in place before each step."""
        n, cap, dev = self.first.shape[0], self.layers[0].keys.shape[2], self.first.device
        self.tok = torch.zeros(n, 1, dtype=torch.long, device=dev)  # (N, 1) token fed at this step
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # (1,) cache index it is written to
        for layer in self.layers:
            layer.pos = self.pos
        valid = torch.zeros(n, cap, dtype=torch.bool, device=dev)  # (N, L) keys a query may attend to
        if self.family == "opt":
            valid[:, : self.start] = self.mask[:, : self.start].bool()
            self.real = self.mask[:, : self.start].sum(1, keepdim=True)  # (N, 1) real tokens of the prompt
            self.pos_ids = torch.zeros(n, 1, dtype=torch.long, device=dev)  # (N, 1) OPT's mask-cumsum position
        else:
            valid[:, 0] = True  # the decoder start token
            self.cross = self._mask4(self.mask.bool())  # (N, 1, 1, S) encoder padding, built once
        self.self_mask = self._mask4(valid)  # (N, 1, 1, L), one more key opened per step
        self.graphs: dict[tuple[int, int], tuple] = {}  # (window, rows) -> (graph, logits)
        self.pool = None

    def _mask4(self, valid: torch.Tensor) -> torch.Tensor:
        """(N, K) bool -> (N, 1, 1, K) mask in the format transformers builds for this attention implementation."""
        if self.model.config._attn_implementation == "eager":  # additive float: 0 or the dtype's minimum
            dtype = self.model.get_input_embeddings().weight.dtype  # transformers: the decoder inputs' dtype
            return torch.where(valid, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None]
        return valid[:, None, None].clone()  # sdpa / flex: True = attend

    def _forward(self, window: int) -> torch.Tensor:
        """One bucket-mode step on the fixed-address inputs: logits (N, V)."""
        if self.family == "opt":
            out = self.model(input_ids=self.tok, attention_mask=self.self_mask[..., :window], position_ids=self.pos_ids,
                             cache=self.cache, use_cache=True)  # fmt: skip
        else:
            out = self.model(decoder_input_ids=self.tok, encoder_outputs=(self.enc,), attention_mask=self.cross,
                             decoder_attention_mask=self.self_mask[..., :window], cache=self.cache,
                             use_cache=True)  # fmt: skip
        return out.logits[:, -1]

    def _window(self, t: int) -> int:
        """Keys a bucket-mode step ``t`` attends over: ``[0, pos]`` rounded up to the bucket, at most the cache."""
        pos = self.start + t - 1  # where the fed token's key/value goes
        return min(self.layers[0].keys.shape[2], -(-(pos + 1) // self.bucket) * self.bucket)

    def can_keep(self, t: int) -> bool:
        """Whether rows may be dropped before step ``t``: always, except inside a window of ``graphs`` mode."""
        return self.mode != "graphs" or t <= 1 or self._window(t) != self._window(t - 1)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in ``rows`` (N',) from the per-row state; the next steps run on N' rows."""
        for layer in self.layers:  # a copy of the whole buffer: later steps write after the prefix in place
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        if self.family == "t5":
            for layer in self.cache.cross_attention_cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            self.enc = self.enc.index_select(0, rows)
        self.mask = self.mask.index_select(0, rows)  # OPT: (N', P + T) prompt + generated mask; T5: (N', S)
        self.rows = rows.numel()
        if self.mode == "exact":
            return
        names = ("tok", "self_mask") + (("real", "pos_ids") if self.family == "opt" else ("cross",))
        for name in names:  # new addresses: graphs captured before cannot be replayed, so they are released
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.graphs = {}

    def _bucket_step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        pos = self.start + t - 1  # where the fed token's key/value goes
        window = self._window(t)
        self.tok.copy_(tokens)
        self.pos.fill_(pos)
        self.self_mask[:, 0, 0, pos] = True if self.self_mask.dtype == torch.bool else 0.0
        if self.family == "opt":
            torch.add(self.real, t - 1, out=self.pos_ids)  # cumsum(mask) - 1 at the new token
        for layer in self.layers:
            layer.window, layer.length = window, pos + 1
        if self.mode == "bucket":
            return self._forward(window)
        key = (window, self.rows)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(window)
            except RuntimeError as err:  # an op of this model that cannot be captured: same steps, no graphs
                log.warning("CUDA graph capture failed (%s); decoding on without graphs", err)
                self.mode = "bucket"
                return self._forward(window)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self, window: int) -> tuple:
        """Record one step at this window as a CUDA graph (memory pool shared by all windows of this decode)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (lazy inits, workspaces): writes the same K/V
            self._forward(window)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool if self.pool is not None else torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(window)
        return graph, logits

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Logits (N, V) after feeding ``tokens`` (N, 1), the token generated at step ``t - 1``; ``t == 0``: prefill."""
        if t == 0:
            return self.first
        if self.mode != "exact":
            return self._bucket_step(tokens, t)
        if self.family == "opt":
            out = self.model(input_ids=tokens, attention_mask=self.mask[:, : self.layers[0].length + 1],
                             cache=self.cache, use_cache=True)  # fmt: skip
        else:
            out = self.model(decoder_input_ids=tokens, encoder_outputs=(self.enc,), attention_mask=self.mask,
                             cache=self.cache, use_cache=True)  # fmt: skip
        return out.logits[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam reorder (flat source row of every new beam): generated positions of the self-attention cache only."""
        for layer in self.layers:
            layer.reorder_generated_(rows, self.start)


def repetition_penalty_(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty in place: every id in ``seen`` (N, t) gets ``s * p`` if ``s < 0`` else ``s / p`` (transformers)."""
    if penalty == 1.0 or seen.shape[1] == 0:
        return scores
    s = scores.gather(1, seen)
    return scores.scatter_(1, seen, torch.where(s < 0, s * penalty, s / penalty))


@torch.no_grad()
def static_generate(
    model: PreTrainedModel,
    family: str,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int,
    length_penalty: float,
    repetition_penalty: float,
    eos_id: int,
    pad_id: int | None,
    decoder_start_id: int | None = None,
    mode: str = "auto",
    bucket: int = 32,
    compact_at: float | None = 0.25,
) -> torch.Tensor:
    """New token ids for ``[soft prompt ; prompt]`` inputs, the ids transformers' ``generate`` returns.

    Args:
        model: OPT-like (``family="opt"``) or T5-like (``"t5"``) transformers model, eval mode.
        family: ``"opt"`` or ``"t5"``.
        embeds: (B, P, D) LLM input embeddings (OPT: ``[soft prompt ; left-padded prompt]``; T5: encoder input).
        mask: (B, P) attention mask of ``embeds``.
        num_beams: 1 = greedy, else beam search with transformers' rules.
        max_new_tokens: most generated tokens, EOS included.
        min_new_tokens: EOS is suppressed for the first ``min_new_tokens`` steps.
        length_penalty: beam score = sum log-prob / generated tokens ** length_penalty.
        repetition_penalty: transformers' CTRL penalty over generated tokens (and T5's decoder start token).
        eos_id: end token.
        pad_id: filler after EOS (greedy); beam search fills with ``pad_id`` unless it is 0 or None, then ``eos_id``
            (transformers' ``pad_token_id or eos_token_id``).
        decoder_start_id: T5 decoder start token.
        mode: ``"exact"`` (eager steps, attention over the written keys only, as transformers' growing cache),
            ``"bucket"`` (eager steps at fixed shapes: a window of ``bucket``-rounded cache length and a prepared
            mask), ``"graphs"`` (bucket shapes, each window's step captured once as a CUDA graph and replayed) or
            ``"auto"`` (``"graphs"`` on CUDA, ``"exact"`` elsewhere).
        bucket: window granularity in cache positions for ``"bucket"`` / ``"graphs"`` (one graph per window).
        compact_at: finished samples leave the batch once they hold at least this share of the current rows
            (``0``: at every step where a sample finished; ``None``: never, every row runs to the end). Greedy
            drops rows only when ``pad_id`` is set (without it transformers keeps generating after EOS).

    Returns:
        (B, T) new ids, T ≤ ``max_new_tokens``, as ``generate`` returns them (T5's start token dropped).
    """
    if family not in STATIC_MODEL_TYPES:
        raise ValueError(f"static decoding supports families {tuple(STATIC_MODEL_TYPES)}, got {family!r}")
    if family == "t5" and decoder_start_id is None:
        raise ValueError("static decoding of a T5 model needs decoder_start_id")
    if mode == "auto":
        mode = "graphs" if embeds.device.type == "cuda" else "exact"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES + ('auto',)}, got {mode!r}")
    if compact_at is not None and not 0.0 <= compact_at <= 1.0:
        raise ValueError(f"compact_at must be None or in [0, 1], got {compact_at!r}")
    if mode == "graphs" and embeds.device.type != "cuda":
        raise ValueError(f"mode='graphs' needs CUDA tensors, got {embeds.device}")
    b, k = embeds.shape[0], num_beams
    dec = _Decoder(model, family, embeds, mask, k, max_new_tokens, decoder_start_id, mode, bucket)
    start_col = None if family == "opt" else torch.full((b * k, 1), decoder_start_id, device=embeds.device)

    def seen(generated: torch.Tensor) -> torch.Tensor:  # what transformers' input_ids hold: (N, [1 +] t)
        return generated if start_col is None else torch.cat([start_col[: generated.shape[0]], generated], 1)

    if k == 1:
        compact = compact_at if pad_id is not None else None
        return _greedy(dec, b, max_new_tokens, min_new_tokens, repetition_penalty, eos_id, pad_id, seen, compact)

    def hook(logp: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return repetition_penalty_(logp, seen(generated), repetition_penalty)

    def step(tokens, _cache, t):
        return dec.step(tokens, t), None

    def reorder(_cache, rows):
        dec.reorder(rows)

    def compact(_cache, rows, t):  # rows: (N',) flat rows of the samples still running
        done = dec.rows - rows.numel()  # > 0: the search calls only after a sample stopped
        if done < compact_at * dec.rows or not dec.can_keep(t):
            return None, False
        dec.keep(rows)
        return None, True

    fill = pad_id if pad_id else eos_id  # transformers' beam output fill value (`pad_token_id or eos_token_id`)
    return beam_search(step, reorder, None, batch=b, bos_id=fill, eos_id=eos_id, pad_id=fill, num_beams=k,
                       max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                       device=embeds.device, logits_hook=hook if repetition_penalty != 1.0 else None,
                       compact=compact if compact_at is not None else None)  # fmt: skip


def _greedy(dec, b, max_new_tokens, min_new_tokens, penalty, eos_id, pad_id, seen, compact_at) -> torch.Tensor:
    """Greedy as transformers' ``_sample``: processors on float32 logits, argmax, finished rows padded.

    With ``compact_at`` (needs ``pad_id``), rows that emitted EOS leave the batch once they are at least that share
    of the current rows; ``rows`` maps the decoder's rows to their original ones, whose remaining columns stay padded.
    """
    fill = 0 if pad_id is None else pad_id  # every column is written unless a row left the batch (then: padding)
    out = torch.full((b, max_new_tokens), fill, dtype=torch.long, device=dec.first.device)  # (B, T) preallocated
    unfinished = torch.ones(b, dtype=torch.bool, device=out.device)  # (N,) over the decoder's current rows
    rows = None  # (N,) original row of each decoder row once some left; None: all rows, in order
    tokens = None
    for t in range(max_new_tokens):
        scores = dec.step(tokens, t).float()  # a copy for t > 0; the prefill logits are never written into
        scores = scores.clone() if t == 0 else scores
        scores = repetition_penalty_(scores, seen(out[:, :t] if rows is None else out[rows, :t]), penalty)
        if t < min_new_tokens:
            scores[:, eos_id] = float("-inf")
        nxt = scores.argmax(-1)
        if pad_id is not None:
            nxt = torch.where(unfinished, nxt, pad_id)
        if rows is None:
            out[:, t] = nxt
        else:
            out[rows, t] = nxt
        unfinished &= nxt != eos_id
        left = int(unfinished.sum())
        if left == 0:
            return out[:, : t + 1]
        tokens = nxt[:, None]
        done, n = len(unfinished) - left, len(unfinished)
        if compact_at is not None and 0 < done >= compact_at * n and t + 1 < max_new_tokens and dec.can_keep(t + 1):
            keep = unfinished.nonzero()[:, 0]  # (N',) decoder rows still running
            dec.keep(keep)
            rows = keep if rows is None else rows[keep]
            unfinished, tokens = unfinished[keep], tokens[keep]
    return out
