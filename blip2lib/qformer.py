"""The Q-Former: a BERT-base-shaped transformer shared by learned queries and text.

See docs/paper_map.md §1.3, paper Fig. 2.

BLIP-2 (Li et al., 2023, arXiv:2301.12597). Parameter names follow transformers' ``Blip2QFormerModel`` (the
``qformer.*`` keys, docs/paper_map.md §8.3); the LAVIS names differ only by the prefix ``Qformer.bert`` and the segment
``.self.`` → ``.attention.`` (docs/paper_map.md §8.3). Text word/position embeddings live outside the Q-Former (HF
top-level ``embeddings.*``) and the embedding LayerNorm is ``Blip2QFormer.layernorm``, applied to ``[queries ; text]``
together (docs/paper_map.md §1.3 "Embeddings").

Masks: callers pass 0/1 masks (1 = may attend); inside they become LAVIS's additive ``(1 - m) * -10000`` (the
convention every released checkpoint was trained with). It is finite in fp16/bf16/fp32, so a fully masked row never
gives NaN (it degrades to a softmax over the raw scores), and exp(-10000) is exactly 0 in fp32, so other rows equal
transformers 5.x's dtype-min masks.

Weight initialisation and the bert-base-uncased loader (``init_weights``, ``load_bert_weights``) live in
:mod:`blip2lib.qformer_init` and are re-exported here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import QFormerConfig
from .crossinput import CrossInput, cross_input
from .qformer_init import _bert_name, init_weights, load_bert_weights  # noqa: F401 (re-exported)

MASK_VALUE = -10000.0  # LAVIS additive mask value (docs/paper_map.md §1.3 "Attention masks")
KV = tuple[torch.Tensor, torch.Tensor]  # one layer's self-attention (key, value), each (B, nh, T_kv, hd)


class QFormerOutput(NamedTuple):
    """Q-Former result: ``last_hidden_state`` (B, T, H) and, with ``use_cache``, one (k, v) per layer."""

    last_hidden_state: torch.Tensor
    past_key_values: list[KV] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Masks (paper Fig. 2): all return 0/1 tensors in the dtype of ``text_mask``.


def bidirectional_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Bi-directional mask for one ``[queries ; text]`` pass (ITM, VQA-FT conditioning; docs/paper_map.md §1.3).

    Every token sees every query and every non-pad text token. (ITC's uni-modal mask needs no builder: queries
    and text run in two separate passes, the text one with its plain padding mask.)

    Args:
        text_mask: 0/1 text padding mask, (B, L).
        num_queries: number of query tokens Q in front of the text.

    Returns:
        (B, Q+L) key-padding mask, broadcast over all rows by :class:`Blip2QFormer`.
    """
    ones = text_mask.new_ones(text_mask.shape[0], num_queries)  # (B, Q)
    return torch.cat([ones, text_mask], dim=1)  # (B, Q+L)


def causal_prefix_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """UniLM-style multimodal-causal mask for a full ``[queries ; text]`` pass (generation variant (b)).

    See docs/paper_map.md §1.3.

    Query rows see all queries and no text; text row t sees all queries and the non-pad text tokens s <= t.

    Args:
        text_mask: 0/1 text padding mask, (B, L).
        num_queries: number of query tokens Q.

    Returns:
        (B, Q+L, Q+L) 0/1 mask (row = attending position, column = attended position).
    """
    b, q = text_mask.shape[0], num_queries
    text_rows = causal_text_mask_with_prefix(text_mask, q)  # (B, L, Q+L)
    query_rows = text_mask.new_zeros(b, q, q + text_mask.shape[1])  # (B, Q, Q+L)
    query_rows[:, :, :q] = 1  # queries see queries only
    return torch.cat([query_rows, text_rows], dim=1)  # (B, Q+L, Q+L)


def causal_text_mask_with_prefix(text_mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Mask for a text-only causal pass on top of P cached query keys/values (ITG training variant (a)).

    See docs/paper_map.md §2.

    Args:
        text_mask: 0/1 text padding mask, (B, L).
        num_prefix: number of cached prefix positions P (the queries); all visible to every text row.

    Returns:
        (B, L, P+L) 0/1 mask: ones over the P prefix columns, causal AND non-pad over the L text columns.
    """
    b, n = text_mask.shape
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=text_mask.device))  # (L, L): s <= t
    text = (causal[None] & text_mask[:, None, :].bool()).to(text_mask.dtype)  # (B, L, L)
    prefix = text_mask.new_ones(b, n, num_prefix)  # (B, L, P)
    return torch.cat([prefix, text], dim=2)  # (B, L, P+L)


def _additive_mask(mask: torch.Tensor | None, t: int, t_kv: int, dtype: torch.dtype) -> torch.Tensor | None:
    """0/1 mask (B, T_kv) or (B, T, T_kv) → additive (B, 1, 1|T, T_kv) with ``MASK_VALUE`` on masked entries."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape[1] != t_kv:
            raise ValueError(f"2-D attention_mask must cover all {t_kv} keys (cache + input), got {tuple(mask.shape)}")
        mask = mask[:, None, None, :]  # (B, 1, 1, T_kv)
    elif mask.dim() == 3:
        if tuple(mask.shape[1:]) != (t, t_kv):
            raise ValueError(f"3-D attention_mask must be (B, {t}, {t_kv}), got {tuple(mask.shape)}")
        mask = mask[:, None]  # (B, 1, T, T_kv)
    else:
        raise ValueError(f"attention_mask must be 2-D or 3-D, got {mask.dim()}-D")
    return (1.0 - mask.to(dtype)) * MASK_VALUE


# ----------------------------------------------------------------------------------------------------------------
# Layers (post-LN BERT: sublayer → dropout → + residual → LayerNorm)


class _MultiHeadAttention(nn.Module):
    """Q/K/V projections and scaled dot-product attention (HF ``Blip2QFormerMultiHeadAttention`` names)."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int, impl: str):
        super().__init__()
        h = cfg.hidden_size
        if h % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {h} is not a multiple of num_attention_heads {cfg.num_attention_heads}")
        self.nh, self.hd, self.impl = cfg.num_attention_heads, h // cfg.num_attention_heads, impl
        self.p_drop = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_dim, h)  # kv_dim = H (self) or encoder_hidden_size (cross)
        self.value = nn.Linear(kv_dim, h)

    def image_kv(self, cross: CrossInput) -> KV:
        """Keys and values of ``cross``'s S images (no row gather), each (S, nh, N, hd)."""
        return cross.project(self.key, self.value, self._heads)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.nh, self.hd).transpose(1, 2)  # (B, S, H) → (B, nh, S, hd)

    def forward(
        self,
        x: torch.Tensor,
        kv_states: torch.Tensor | CrossInput,
        mask: torch.Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        q = self._heads(self.query(x))  # (B, nh, T, hd)
        if isinstance(kv_states, CrossInput):  # image K/V: projected once per image, gathered per row
            k, v = kv_states.keys_values(self.key, self.value, self._heads, self.layer_index)  # (B, nh, N, hd)
        else:
            k, v = self._heads(self.key(kv_states)), self._heads(self.value(kv_states))  # (B, nh, S, hd)
        if past is not None:  # cached keys/values come first (queries, then earlier text; docs/paper_map.md §2 ITG)
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh, T_kv, hd)
        p = self.p_drop if self.training else 0.0
        if self.impl == "eager":
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd)  # (B, nh, T, T_kv)
            if mask is not None:
                scores = scores + mask
            probs = F.dropout(scores.softmax(dim=-1), p=p, training=self.training)
            ctx = probs @ v  # (B, nh, T, hd)
        else:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), dropout_p=p
            )  # (B, nh, T, hd)
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, T, H)
        return ctx, (k, v)


class _SelfOutput(nn.Module):
    """dense → dropout → + residual → LayerNorm (BERT ``SelfOutput`` / ``Output``)."""

    def __init__(self, cfg: QFormerConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)  # (B, T, H)


class _Attention(nn.Module):
    """Attention sublayer: ``attention.{query,key,value}`` + ``output.{dense,LayerNorm}``."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int, impl: str):
        super().__init__()
        self.attention = _MultiHeadAttention(cfg, kv_dim, impl)
        self.output = _SelfOutput(cfg, cfg.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        kv_states: torch.Tensor | CrossInput,
        mask: torch.Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        ctx, kv = self.attention(x, kv_states, mask, past)  # (B, T, H)
        return self.output(ctx, x), kv


class _Intermediate(nn.Module):
    """dense H → intermediate_size, exact (erf) GELU."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # (B, T, I)


class Blip2QFormerLayer(nn.Module):
    """Self-attention (all positions) → cross-attention (queries, every ``freq``-th layer) → two FFNs.

    See docs/paper_map.md §1.3.
    """

    def __init__(self, cfg: QFormerConfig, index: int, impl: str = "sdpa"):
        super().__init__()
        self.attention = _Attention(cfg, cfg.hidden_size, impl)
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0  # layers 0, 2, ... for freq 2
        if self.has_cross_attention:
            self.crossattention = _Attention(cfg, cfg.encoder_hidden_size, impl)
            self.crossattention.attention.layer_index = index  # its entry in CrossInput.kv (not a parameter)
        self.has_text_ffn = cfg.use_text_input
        if self.has_text_ffn:  # text FFN (absent in stage-2 checkpoints, docs/paper_map.md §8.1); HF key order
            self.intermediate = _Intermediate(cfg)
            self.output = _SelfOutput(cfg, cfg.intermediate_size)
        self.intermediate_query = _Intermediate(cfg)  # query FFN
        self.output_query = _SelfOutput(cfg, cfg.intermediate_size)

    def _text_ffn(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_text_ffn:
            raise ValueError("text positions need the text FFN: build the Q-Former with use_text_input=True")
        return self.output(self.intermediate(x), x)  # (B, L, H)

    def forward(
        self,
        x: torch.Tensor,
        query_length: int,
        mask: torch.Tensor | None,
        encoder_hidden_states: CrossInput | None,
        past: KV | None,
    ) -> tuple[torch.Tensor, KV]:
        """(B, T, H) → (B, T, H) plus this layer's self-attention (k, v); see :meth:`Blip2QFormer.forward`."""
        h, kv = self.attention(x, x, mask, past)  # (B, T, H); kv: (B, nh, T_kv, hd) each
        if query_length == 0:  # pure text pass: text FFN everywhere, no image
            return self._text_ffn(h), kv
        hq = h[:, :query_length]  # (B, Q, H)
        if self.has_cross_attention:  # only queries see the image; image mask is all ones
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states must be given for a pass with queries (cross-attention)")
            hq, _ = self.crossattention(hq, encoder_hidden_states)  # (B, Q, H)
        out = self.output_query(self.intermediate_query(hq), hq)  # (B, Q, H)
        if h.shape[1] > query_length:
            out = torch.cat([out, self._text_ffn(h[:, query_length:])], dim=1)  # (B, Q+L, H)
        return out, kv


class Blip2QFormer(nn.Module):
    """The Q-Former stack (HF ``Blip2QFormerModel`` keys): embedding LayerNorm + dropout, then N post-LN layers.

    Args:
        cfg: Q-Former configuration.
        attn_implementation: ``"sdpa"`` (``F.scaled_dot_product_attention`` with an explicit additive mask) or
            ``"eager"`` (explicit softmax; same maths, for tight parity checks).
    """

    def __init__(self, cfg: QFormerConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # LAVIS bert.embeddings.LayerNorm
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = nn.Module()  # only a container, for the ``encoder.layer.{i}`` key names
        self.encoder.layer = nn.ModuleList(
            [Blip2QFormerLayer(cfg, i, attn_implementation) for i in range(cfg.num_hidden_layers)]
        )

    def image_keys_values(self, cross: CrossInput) -> CrossInput:
        """``cross`` with every cross-attention layer's keys/values of its S images computed now, once.

        Every later pass given the result (or a ``_replace(index=...)`` of it) reads them instead of projecting the
        images again; their gradients from all passes meet in the same tensors.
        """
        layers = self.encoder.layer
        kv = tuple(lay.crossattention.attention.image_kv(cross) if lay.has_cross_attention else None for lay in layers)
        return cross._replace(kv=kv)

    def forward(
        self,
        embeds: torch.Tensor,
        query_length: int,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | CrossInput | None = None,
        past_key_values: list[KV] | None = None,
        use_cache: bool = False,
    ) -> QFormerOutput:
        """Run the Q-Former.

        Args:
            embeds: raw ``[queries ; text]`` embeddings BEFORE the embedding LayerNorm, (B, T, H). The first
                ``query_length`` positions are queries (cross-attention + query FFN), the rest text (text FFN).
            query_length: number of query positions at the front of ``embeds`` (0: a text-only pass).
            attention_mask: 0/1, either (B, T_kv) key padding or (B, T, T_kv) per row; T_kv = cached + T.
                ``None`` = attend everywhere.
            encoder_hidden_states: image features (B, N, Dv), needed when ``query_length > 0``; or a
                :class:`CrossInput` (S images, cast once, optionally gathered to the B rows by its ``index``).
            past_key_values: per-layer cached self-attention (k, v), each (B, nh, P, hd), prefixed to the keys.
            use_cache: return this pass's per-layer self-attention (k, v) including the cached prefix.

        Returns:
            :class:`QFormerOutput` with ``last_hidden_state`` (B, T, H) and ``past_key_values`` (or ``None``).
        """
        b, t, _ = embeds.shape
        if not 0 <= query_length <= t:
            raise ValueError(f"query_length {query_length} must lie in [0, {t}]")
        dtype = self.layernorm.weight.dtype  # the Q-Former stays in its own (fp32) dtype, as in HF
        x = self.dropout(self.layernorm(embeds.to(dtype)))  # (B, T, H): LN over [queries ; text]
        if isinstance(encoder_hidden_states, torch.Tensor):  # (B, N, Dv): one cast for all cross-attention layers
            encoder_hidden_states = cross_input(encoder_hidden_states, dtype)
        if encoder_hidden_states is not None and encoder_hidden_states.batch != b:
            raise ValueError(f"encoder_hidden_states serve {encoder_hidden_states.batch} rows, embeds have {b}")
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        mask = _additive_mask(attention_mask, t, past_len + t, dtype)  # (B, 1, 1|T, T_kv) or None
        cache: list[KV] | None = [] if use_cache else None
        for i, layer in enumerate(self.encoder.layer):
            past = None if past_key_values is None else past_key_values[i]
            x, kv = layer(x, query_length, mask, encoder_hidden_states, past)  # (B, T, H)
            if cache is not None:
                cache.append(kv)
        return QFormerOutput(x, cache)


# ----------------------------------------------------------------------------------------------------------------
# Text embeddings and the ITG LM head


class Blip2TextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the Q-Former text (HF top-level ``embeddings.*``; docs/paper_map.md §1.3).

    No token-type embeddings and no LayerNorm here: the LayerNorm is :attr:`Blip2QFormer.layernorm`, applied to
    ``[queries ; text]`` together.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """Embed text ids (B, L) → (B, L, H).

        Args:
            input_ids: token ids, (B, L).
            past_length: number of TEXT tokens already in the cache (queries consume no positions), so the first
                text token has position 0 (docs/paper_map.md §1.3, §10.2).
        """
        pos = self.position_ids[:, past_length : past_length + input_ids.shape[1]]  # (1, L)
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)  # (B, L, H)


class Blip2QFormerLMHead(nn.Module):
    """BERT MLM head used for ITG (LAVIS ``Qformer.cls``): dense → GELU → LayerNorm → tied decoder + bias.

    Args:
        cfg: Q-Former configuration.
        embedding_weight: the word-embedding weight (V, H) to tie the decoder to; ``None`` keeps an own weight.
    """

    def __init__(self, cfg: QFormerConfig, embedding_weight: nn.Parameter | None = None):
        super().__init__()
        h, v = cfg.hidden_size, cfg.vocab_size
        self.predictions = p = nn.Module()  # plain containers give BERT's ``predictions.transform.*`` key names
        p.transform = nn.Module()
        p.transform.dense = nn.Linear(h, h)
        p.transform.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        p.decoder = nn.Linear(h, v, bias=False)
        if embedding_weight is not None:
            p.decoder.weight = embedding_weight  # tied to embeddings.word_embeddings (docs/paper_map.md §1.3 LM head)
            p.decoder._tied = True  # init_weights leaves it to the embedding
        p.bias = nn.Parameter(torch.zeros(v))
        p.decoder.bias = p.bias  # BERT exposes it under both names (docs/paper_map.md §8.1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, H) → vocabulary logits (B, L, V)."""
        t = self.predictions.transform
        x = t.LayerNorm(F.gelu(t.dense(hidden_states)))  # (B, L, H)
        return self.predictions.decoder(x)  # (B, L, V)
