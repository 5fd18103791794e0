"""BLIP-2 models: the stage-1 Q-Former model and the stage-2 model with a frozen LLM (docs/paper_map.md §1, Fig. 1–3).

Models return features and logits; the losses live in ``losses.py`` and the tasks in ``tasks.py`` sum them.
Attribute names follow transformers' BLIP-2 state-dict keys (docs/paper_map.md §8.3) except
``vision_model`` (timm key names) and the ITG head ``cls`` / ``temp`` that transformers does not have.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .config import Blip2Config
from .crossinput import CrossInput, cross_input
from .decoding import beam_search
from .featcache import VisionFeatureCache
from .qformer import (
    Blip2QFormer,
    Blip2QFormerLMHead,
    Blip2TextEmbeddings,
    bidirectional_mask,
    causal_text_mask_with_prefix,
    init_weights,
)
from .vision import build_vision_tower, freeze_vision_, set_grad_checkpointing, vision_features

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Temporarily switch ``module`` to eval (dropout off), restoring its mode afterwards."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, counting tied tensors once."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


class Blip2Base(nn.Module):
    """Vision tower + ``ln_vision`` + learned queries + Q-Former, shared by both stages (docs/paper_map.md §1.1)."""

    def __init__(self, cfg: Blip2Config, device: torch.device | str | None = None):
        super().__init__()
        self.config = cfg
        q = cfg.qformer
        meta = str(device) == "meta"  # meta device: shapes only (full-size parameter counts without memory)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.vision_model = build_vision_tower(cfg.vision)
            # ln_vision sits OUTSIDE the tower and is trained in every stage (docs/paper_map.md §1.1 step 2).
            self.ln_vision = nn.LayerNorm(cfg.vision.width, eps=cfg.vision.ln_vision_eps)
            self.query_tokens = nn.Parameter(torch.zeros(1, q.num_query_tokens, q.hidden_size))
            self.qformer = Blip2QFormer(q)
            # Word/position embeddings only where text enters the Q-Former (stage 1, retrieval, VQA FT;
            # docs/paper_map.md §1.5).
            self.embeddings = Blip2TextEmbeddings(q) if q.use_text_input else None
        self.vision_cache: VisionFeatureCache | None = None  # opt-in frozen-ViT feature cache (featcache.py)
        if cfg.vision.freeze:
            freeze_vision_(self.vision_model)  # no grads, pinned to eval (docs/paper_map.md §1.2)
        elif cfg.vision.grad_checkpointing:
            set_grad_checkpointing(self.vision_model, True)
        if not meta:
            init_weights(self.qformer, q.initializer_range)
            if self.embeddings is not None:
                init_weights(self.embeddings, q.initializer_range)
            nn.init.normal_(self.query_tokens, std=q.initializer_range)  # LAVIS N(0, 0.02); HF zeros

    def train(self, mode: bool = True) -> Blip2Base:
        """Switch trainable parts; frozen towers stay in eval whatever ``mode`` is.

        See docs/paper_map.md §1.2 ``disabled_train``.
        """
        super().train(mode)
        for m in self.modules():
            if getattr(m, "is_frozen", False):
                nn.Module.train(m, False)
        return self

    def place(self, device: torch.device | str) -> Blip2Base:
        """Move to ``device`` and apply the per-module precision policy (:mod:`blip2lib.precision`).

        On a GPU a frozen ViT takes ``vision.precision`` (``fp16_lavis``: LAVIS's Linear/Conv-only fp16 under its
        own fp16 autocast; ``fp16``/``bf16``: cast whole, run outside autocast) and the frozen LLM ``llm.precision``
        (OPT fp16, T5 bf16 — never fp16); a bf16 LLM also runs every call in its own bf16 autocast, as LAVIS's T5
        does inside the fp16 training autocast. The Q-Former, queries, ``ln_vision`` and projections keep fp32
        master weights (the training autocast covers them). On a CPU everything stays fp32.
        """
        from .precision import autocast_region_, set_vision_precision_

        self.to(device)
        if torch.device(device).type == "cuda":
            if getattr(self.vision_model, "is_frozen", False):
                set_vision_precision_(self.vision_model, self.config.vision.precision, device)
            lm = getattr(self, "language_model", None)
            if lm is not None:
                from .llm import resolve_dtype

                dtype = resolve_dtype(self.family, self.config.llm.precision, device)
                lm.to(dtype)
                if dtype == torch.bfloat16:
                    autocast_region_(lm, dtype, torch.device(device).type)
        return self

    def save_pretrained(self, path: str | Path, *, format: str = "transformers", check: bool = True, **kwargs) -> dict:
        """Write this model to ``path`` as a transformers directory (default) or a LAVIS ``.pth`` file.

        The method form of :func:`blip2lib.pretrained.save_pretrained_hf` (``format="transformers"``) and
        :func:`blip2lib.pretrained.save_lavis` (``format="lavis"``): the export is verified numerically against the
        target library's own model before anything appears at ``path`` (``check=False`` skips that).

        Args:
            path: output directory (transformers) or file (LAVIS); must not exist.
            format: ``"transformers"`` or ``"lavis"``.
            check: run the numerical check before writing.
            **kwargs: passed on (``tol``, ``seed`` for transformers; ``tol``, ``llm_out`` for LAVIS).

        Returns:
            The check's max-abs differences per compared output (empty when unchecked).
        """
        from .pretrained import save_lavis, save_pretrained_hf  # the loaders import this module: import lazily

        if format == "transformers":
            return save_pretrained_hf(self, path, check=check, **kwargs)
        if format == "lavis":
            return save_lavis(self, path, check=check, **kwargs)
        raise ValueError(f"format must be 'transformers' or 'lavis', got {format!r}")

    def vision_dtype(self) -> torch.dtype:
        """Dtype of the vision tower's weights."""
        return next(self.vision_model.parameters()).dtype

    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``ln_vision(ViT(image))`` in fp32: (B, 3, S, S) → (B, N, Dv). Frozen towers run without autograd."""
        frozen = not any(p.requires_grad for p in self.vision_model.parameters())

        def tower(px: torch.Tensor) -> torch.Tensor:
            with torch.no_grad() if frozen else contextlib.nullcontext(), record_function("blip2/vision_tower"):
                return vision_features(self.vision_model, px.to(self.vision_dtype()))  # (B, N, Dv)

        if self.vision_cache is not None and self.vision_cache.active:
            if not frozen:
                raise RuntimeError("the vision feature cache needs a frozen vision tower (freeze_vit: true)")
            x = self.vision_cache.features(pixel_values, tower)  # only unseen images run the tower
        else:
            x = tower(pixel_values)
        # LAVIS computes ln_vision in fp32 (docs/paper_map.md §1.1); the Q-Former keeps fp32 master weights.
        return self.ln_vision(x.to(self.ln_vision.weight.dtype))

    def query_pass(
        self,
        image_embeds: torch.Tensor | CrossInput,
        use_cache: bool = False,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ):
        """Learned queries through the Q-Former with cross-attention to ``image_embeds`` (B, N, Dv).

        ``image_embeds`` may be a :class:`~blip2lib.qformer.CrossInput`. With ``text_ids`` the text is concatenated
        after the queries in one bi-directional pass (ITM, and the VQA fine-tuning variant of docs/paper_map.md §4.2).
        Returns the Q-Former output (``last_hidden_state`` (B, Q[+L], H)).
        """
        b = image_embeds.batch if isinstance(image_embeds, CrossInput) else image_embeds.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)  # (B, Q, H)
        nq = queries.shape[1]
        if text_ids is None:
            return self.qformer(
                queries, query_length=nq, attention_mask=None, encoder_hidden_states=image_embeds, use_cache=use_cache
            )
        embeds = torch.cat([queries, self.embeddings(text_ids)], dim=1)  # (B, Q+L, H)
        mask = bidirectional_mask(text_mask, nq)  # (B, Q+L): every token sees every non-pad token
        return self.qformer(
            embeds, query_length=nq, attention_mask=mask, encoder_hidden_states=image_embeds, use_cache=use_cache
        )


class Blip2QFormerModel(Blip2Base):
    """Stage-1 model: ITC/ITM/ITG heads on the Q-Former; also the retrieval fine-tuning model.

    See docs/paper_map.md §1.4.
    """

    def __init__(self, cfg: Blip2Config, device: torch.device | str | None = None):
        if not cfg.qformer.use_text_input:
            raise ValueError("the stage-1 model needs the Q-Former text path (qformer.use_text_input=True)")
        super().__init__(cfg, device)
        h, e = cfg.qformer.hidden_size, cfg.embed_dim
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.cls = Blip2QFormerLMHead(cfg.qformer, self.embeddings.word_embeddings.weight)  # tied decoder
            # The projections and the ITM head are plain nn.Linear built outside BERT's init in LAVIS, so they keep
            # PyTorch's default: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) — not BERT's N(0, 0.02) and zero
            # bias. The BERT MLM head (`cls`) is part of the BERT model and gets BERT's init (or BERT's weights).
            self.vision_projection = nn.Linear(h, e)
            self.text_projection = nn.Linear(h, e)
            self.itm_head = nn.Linear(h, 2)
            self.temp = nn.Parameter(torch.full((), 0.07))  # learnable, never clamped (docs/paper_map.md §1.4)
        if str(device) != "meta":
            init_weights(self.cls, cfg.qformer.initializer_range)

    # ---- features (docs/paper_map.md §2 shared passes) ----
    def encode_image(self, pixel_values: torch.Tensor, use_cache: bool = False) -> dict:
        """Image side of the stage-1 passes (docs/paper_map.md §2 steps 1–2).

        Returns ``image_embeds`` (B, N, Dv) and ``cross_input`` (cast once, reused by ITM), ``query_output`` (B, Q,
        H), ``image_feats`` (B, Q, E) L2-normalised, and the query pass's self-attention cache when ``use_cache``.
        """
        image_embeds = self.encode_vision(pixel_values)
        cross = cross_input(image_embeds, self.qformer.layernorm.weight.dtype)  # one cast per step, not per pass
        cross = self.qformer.image_keys_values(cross)  # image K/V once per step: the ITM pass reuses them
        out = self.query_pass(cross, use_cache=use_cache)
        feats = F.normalize(self.vision_projection(out.last_hidden_state), dim=-1)  # (B, Q, E)
        return {
            "image_embeds": image_embeds,
            "cross_input": cross,
            "query_output": out.last_hidden_state,
            "image_feats": feats,
            "past_key_values": out.past_key_values,
        }

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Text-only pass (uni-modal mask: no queries, no image): ``text_feat`` (B, E) from ``[CLS]``."""
        out = self.qformer(self.embeddings(input_ids), query_length=0, attention_mask=attention_mask)
        feat = F.normalize(self.text_projection(out.last_hidden_state[:, 0]), dim=-1)  # (B, E)
        return {"text_output": out.last_hidden_state, "text_feat": feat}

    @staticmethod
    def itc_similarity(image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """Raw ITC cosine, max over queries: (Bi, Q, E) × (Bt, E) → (Bi, Bt).

        See docs/paper_map.md §10.20, no temperature.
        """
        return torch.einsum("iqe,te->itq", image_feats, text_feat).amax(dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """ITM 2-way logits of pairs (image_embeds[i], text[i]), averaged over the queries: (B, 2).

        See docs/paper_map.md §2 ITM.
        """
        out = self.query_pass(image_embeds, text_ids=input_ids, text_mask=attention_mask)
        nq = self.query_tokens.shape[1]
        return self.itm_head(out.last_hidden_state[:, :nq]).mean(dim=1)  # (B, Q, 2) → (B, 2)

    def itg_logits(self, past_key_values, decoder_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITG logits (B, L, V): text-only causal pass reusing the query pass's K/V cache.

        The mask is the multimodal-causal one of docs/paper_map.md §1.3 (a).
        """
        nq = self.query_tokens.shape[1]
        mask = causal_text_mask_with_prefix(attention_mask, nq)  # (B, L, Q+L)
        out = self.qformer(
            self.embeddings(decoder_ids), query_length=0, attention_mask=mask, past_key_values=past_key_values
        )
        return self.cls(out.last_hidden_state)

    # ---- user-facing scoring API ----
    @torch.no_grad()
    def itm_probability(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """P(match) per (image, text) pair: softmax of the averaged ITM logits, class 1 (docs/paper_map.md §10.20)."""
        image_embeds = self.encode_vision(pixel_values)
        return self.itm_logits(image_embeds, input_ids, attention_mask).softmax(-1)[:, 1]

    @torch.no_grad()
    def generate_captions(
        self,
        pixel_values: torch.Tensor,
        num_beams: int = 3,
        max_new_tokens: int = 30,
        min_new_tokens: int = 10,
        length_penalty: float = 1.0,
        length_rule: str = "new",
    ) -> torch.Tensor:
        """Q-Former-only captioning from ``[DEC]`` until ``[SEP]``: returns (B, T) BERT ids (no ``[DEC]``).

        Args:
            pixel_values: (B, 3, S, S) images.
            num_beams: beam width (LAVIS: 3).
            max_new_tokens: most generated tokens, ``[SEP]`` included.
            min_new_tokens: ``[SEP]`` is suppressed for this many generated tokens.
            length_penalty: beam score = sum log-prob / generated tokens ** length_penalty (LAVIS: 1.0).
            length_rule: ``"new"``: the two lengths count generated tokens; ``"lavis_head"`` /
                ``"lavis_paper_time"``: they are LAVIS's ``max_length`` / ``min_length`` (30 / 10), which count
                the ``[DEC]`` start token, so 30 / 10 become 29 / 9 generated tokens
                (``blip2lib.generation.new_token_bounds``).
        """
        from .generation import new_token_bounds

        max_new_tokens, min_new_tokens = new_token_bounds(length_rule, "qformer", max_new_tokens, min_new_tokens)
        q = self.config.qformer
        b = pixel_values.shape[0]
        with _eval_mode(self):
            enc = self.encode_image(pixel_values, use_cache=True)
        # One cached query pass per image, repeated per beam; text then decodes causally on top of it.
        idx = torch.arange(b, device=pixel_values.device).repeat_interleave(num_beams)
        cache = [(k[idx], v[idx]) for k, v in enc["past_key_values"]]
        nq = q.num_query_tokens

        def step(tokens, cache, t):
            past = cache
            mask = torch.ones(tokens.shape[0], nq + t + 1, device=tokens.device, dtype=torch.long)
            out = self.qformer(
                self.embeddings(tokens, past_length=t),
                query_length=0,
                attention_mask=mask,
                past_key_values=past,
                use_cache=True,
            )
            return self.cls(out.last_hidden_state[:, -1]), out.past_key_values

        def reorder(cache, rows):
            return [(k[rows], v[rows]) for k, v in cache]

        with _eval_mode(self):
            return beam_search(
                step,
                reorder,
                cache,
                b,
                q.dec_token_id,
                q.sep_token_id,
                q.pad_token_id,
                num_beams,
                max_new_tokens,
                min_new_tokens,
                length_penalty,
                device=pixel_values.device,
            )


class Blip2(Blip2Base):
    """Stage-2 model (docs/paper_map.md §1.5, Fig. 3): Q-Former query path → ``language_projection`` → frozen LLM.

    The Q-Former keeps only its query path (``qformer.use_text_input=False``) unless the VQA fine-tuning variant
    feeds the question through it (docs/paper_map.md §4.2), which keeps the text embeddings and text FFN.

    ``llm_dropout=True`` (default, as LAVIS trains) lets the frozen LLM follow ``train()`` / ``eval()``: its dropout
    is active in training steps while its weights stay frozen. ``False`` pins it in eval mode (no dropout ever).
    """

    def __init__(
        self,
        cfg: Blip2Config,
        device: torch.device | str | None = None,
        language_model: nn.Module | None = None,
        tokenizer=None,
        qformer_tokenizer=None,
        llm_dropout: bool = True,
    ):
        if cfg.llm is None:
            raise ValueError("the stage-2 model needs cfg.llm (use Blip2QFormerModel for stage 1)")
        super().__init__(cfg, device)
        from .llm import build_llm, freeze_llm_

        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.language_projection = nn.Linear(cfg.qformer.hidden_size, cfg.llm.hidden_size)  # PyTorch default init
        self.language_model = language_model if language_model is not None else build_llm(cfg.llm, device=device)
        # Frozen weights, never in the optimizer. llm_dropout (LAVIS): the LLM follows this model's train()/eval(),
        # so its dropout is on in training; False pins it in eval. The frozen ViT stays pinned either way.
        self.llm_dropout = llm_dropout
        freeze_llm_(self.language_model, train_dropout=llm_dropout)
        if llm_dropout:
            self.language_model.train(self.training)  # start in this model's mode, as a later train()/eval() would
        self.tokenizer = tokenizer  # LLM tokenizer (None: ids only)
        self.qformer_tokenizer = qformer_tokenizer  # BERT tokenizer for question input (VQA FT)

    @property
    def family(self) -> str:
        """LLM family: ``opt`` (decoder-only) or ``t5`` (encoder-decoder)."""
        return self.config.llm.family

    def soft_prompt(
        self,
        pixel_values: torch.Tensor,
        qformer_ids: torch.Tensor | None = None,
        qformer_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """32 soft visual tokens in LLM space: (B, 3, S, S) → (B, Q, D_llm) (docs/paper_map.md §1.1 step 4, §3.3).

        With ``qformer_ids`` the question is fed through the Q-Former together with the queries (VQA FT, §4.2);
        only the query outputs are projected.
        """
        image_embeds = self.encode_vision(pixel_values)
        out = self.query_pass(image_embeds, text_ids=qformer_ids, text_mask=qformer_mask)
        nq = self.query_tokens.shape[1]
        return self.language_projection(out.last_hidden_state[:, :nq])  # (B, Q, D_llm)

    def lm_loss(
        self,
        pixel_values: torch.Tensor,
        llm_inputs: dict,
        qformer_ids: torch.Tensor | None = None,
        qformer_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frozen-LLM loss conditioned on the soft prompt; ``llm_inputs`` from ``blip2lib.llm``.

        See docs/paper_map.md §3.1 / §3.2.
        """
        from .llm import llm_loss

        prefix = self.soft_prompt(pixel_values, qformer_ids, qformer_mask)
        return llm_loss(self.language_model, self.family, prefix, llm_inputs)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        prompts: str | list[str] = "",
        qformer_ids: torch.Tensor | None = None,
        qformer_mask: torch.Tensor | None = None,
        questions: list[str] | None = None,
        prefix_embeds: torch.Tensor | None = None,
        **decoding,
    ) -> list[str]:
        """Batched captioning / VQA (docs/paper_map.md §5): soft prompt + text prompt → new text only.

        ``decoding``: ``num_beams``, ``max_new_tokens``, ``min_new_tokens`` (new tokens, never counting the query
        positions), ``length_penalty``, ``repetition_penalty``, ``engine`` … (see ``blip2lib.generation.generate``).
        ``prefix_embeds`` (B, Q, D_llm): a soft prompt already computed by :meth:`soft_prompt` (e.g. once per image
        and repeated for its questions); ``pixel_values`` and the question inputs are then not used.
        """
        from .generation import generate

        if self.tokenizer is None:
            raise ValueError("Blip2.generate needs the LLM tokenizer (model.tokenizer)")
        if prefix_embeds is None and questions is not None and qformer_ids is None and self.embeddings is not None:
            # VQA fine-tuned variant (docs/paper_map.md §4.2): the question also goes through the Q-Former.
            tok = self.qformer_tokenizer(list(questions), padding="longest", truncation=True,
                                         max_length=self.config.max_txt_len, return_tensors="pt")  # fmt: skip
            qformer_ids = tok.input_ids.to(pixel_values.device)
            qformer_mask = tok.attention_mask.to(pixel_values.device)
        with _eval_mode(self):  # no Q-Former dropout while decoding, whatever mode the caller left
            prefix = prefix_embeds if prefix_embeds is not None else self.soft_prompt(pixel_values, qformer_ids,
                                                                                      qformer_mask)  # fmt: skip
            return generate(self.language_model, self.family, self.tokenizer, prefix, prompts, **decoding)
