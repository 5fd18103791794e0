"""Model configurations, presets and the rehearsal size override.

Numbers follow ``docs/paper_map.md`` §1 (architecture) — each field says where it comes from. The flat run-parameter
schema (``Params``, ``ParamsError``, the YAML reader and its checks) lives in :mod:`blip2lib.params_schema` and is
re-exported here, so ``from blip2lib.config import Params`` keeps working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .params_schema import (  # noqa: F401 (re-exported)
    _INTERVAL,
    MODEL_SCALES,
    REHEARSAL_RUN,
    Params,
    ParamsError,
    _check_type,
    _UniqueKeyLoader,
    in_range,
    load_params_yaml,
    type_word,
)

# ----------------------------------------------------------------------------------------------------------------
# Model configurations


@dataclass(frozen=True)
class VisionConfig:
    """Frozen image encoder (docs/paper_map.md §1.2)."""

    arch: str = "eva"  # "eva" (EVA-CLIP ViT-g family, timm Eva) or "clip" (OpenAI CLIP ViT-L family, timm ViT)
    image_size: int = 224  # 224 pre-training / zero-shot, 364 caption+retrieval FT, 490 VQA FT (docs/paper_map.md §1.1)
    patch_size: int = 14  # both towers use 14-px patches
    width: int = 1408  # Dv: 1408 ViT-g, 1024 ViT-L
    depth: int = 39  # blocks BUILT: 39 of EVA's 40, 23 of CLIP's 24 (docs/paper_map.md §1.2)
    num_heads: int = 16  # 16 for both towers
    mlp_hidden: int = 6144  # int(1408 * 4.3637) = 6144 for ViT-g; 4096 for ViT-L
    ln_eps: float = 1e-6  # EVA LayerNorm eps 1e-6; CLIP 1e-5
    ln_vision_eps: float = 1e-5  # trainable ln_vision outside the tower (LAVIS 1e-5; HF post_layernorm 1e-6)
    drop_path_rate: float = 0.0  # 0 in every BLIP-2 config
    freeze: bool = True  # freeze_vit: True in pre-training; False in caption/retrieval/VQA fine-tuning
    # Frozen tower on a GPU (blip2lib.precision): "fp16_lavis" (LAVIS: Linear/Conv fp16, the rest fp32, own fp16
    # autocast) | "fp16" / "bf16" (whole cast, run outside autocast: faster) | "fp32". Trained or on a CPU: fp32.
    precision: str = "fp16_lavis"
    grad_checkpointing: bool = False  # use_grad_checkpoint (fine-tuning with an unfrozen ViT)


@dataclass(frozen=True)
class QFormerConfig:
    """BERT-base-shaped Q-Former (docs/paper_map.md §1.3). Field names follow transformers' ``Blip2QFormerConfig``."""

    vocab_size: int = 30523  # bert-base-uncased 30522 + [DEC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    cross_attention_frequency: int = 2  # cross-attention on layers i % 2 == 0 (0, 2, ..., 10)
    encoder_hidden_size: int = 1408  # = vision width (1408 ViT-g, 1024 ViT-L)
    num_query_tokens: int = 32
    use_text_input: bool = True  # keep word/pos embeddings + text FFN (stage 1, retrieval, VQA FT); False: stage 2
    pad_token_id: int = 0  # [PAD]
    cls_token_id: int = 101  # [CLS]
    sep_token_id: int = 102  # [SEP]
    dec_token_id: int = 30522  # [DEC], the bos token added by BLIP-2 (docs/paper_map.md §1.3 tokenizer)


@dataclass(frozen=True)
class LLMConfig:
    """Frozen language model. Either a local ``path`` or an inline transformers ``hf_config``.

    See docs/paper_map.md §1.5.
    """

    family: str = "opt"  # "opt" (decoder-only, AutoModelForCausalLM) or "t5" (encoder-decoder, Seq2SeqLM)
    path: str = ""  # local transformers directory (never a hub id: no network at run time)
    hf_config: dict = field(default_factory=dict)  # transformers config kwargs (tests, meta-device counts)
    hidden_size: int = 2560  # d_LLM: projection output width
    # Frozen LLM weights on a GPU: OPT fp16 (runs under the training autocast), FlanT5 bf16 (T5 overflows in fp16; runs
    # in its own bf16 autocast region as LAVIS's T5 does); fp32 on a CPU.
    precision: str = "fp16"
    exact_gelu: bool = True  # FlanT5: override dense_act_fn to exact "gelu" as LAVIS does (docs/paper_map.md §1.5)
    prompt: str = ""  # "" for pretrain_*, "a photo of" for caption FT (docs/paper_map.md §1.5)
    max_txt_len: int = 32  # LLM-side truncation (docs/paper_map.md §3.1)


@dataclass(frozen=True)
class Blip2Config:
    """A whole BLIP-2 model: vision tower + Q-Former (+ LLM for stage 2)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = None  # None → stage-1 model (no LLM)
    embed_dim: int = 256  # ITC projection width (vision_proj / text_proj)
    max_txt_len: int = 32  # Q-Former text length in stage-1 training (35 at retrieval evaluation)

    def replace(self, **kw: Any) -> Blip2Config:
        """Return a copy with top-level fields replaced."""
        return dataclasses.replace(self, **kw)


# Vision towers (docs/paper_map.md §1.2).
VIT_G = VisionConfig()
VIT_L = VisionConfig(arch="clip", width=1024, depth=23, num_heads=16, mlp_hidden=4096, ln_eps=1e-5)

# Frozen LLMs as transformers config kwargs (published architectures; no weights involved).
_OPT = dict(
    model_type="opt",
    vocab_size=50272,
    max_position_embeddings=2048,
    num_attention_heads=32,
    num_hidden_layers=32,
    bos_token_id=2,
    eos_token_id=2,
    pad_token_id=1,
    do_layer_norm_before=True,
)
_T5 = dict(
    model_type="t5",
    vocab_size=32128,
    d_kv=64,
    num_layers=24,
    num_decoder_layers=24,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
LLMS: dict[str, LLMConfig] = {
    "opt2.7b": LLMConfig(
        "opt", hf_config=dict(_OPT, hidden_size=2560, ffn_dim=10240, word_embed_proj_dim=2560), hidden_size=2560
    ),
    "opt6.7b": LLMConfig(
        "opt", hf_config=dict(_OPT, hidden_size=4096, ffn_dim=16384, word_embed_proj_dim=4096), hidden_size=4096
    ),
    "flant5xl": LLMConfig(
        "t5", hf_config=dict(_T5, d_model=2048, d_ff=5120, num_heads=32), hidden_size=2048, precision="bf16"
    ),
    "flant5xxl": LLMConfig(
        "t5", hf_config=dict(_T5, d_model=4096, d_ff=10240, num_heads=64), hidden_size=4096, precision="bf16"
    ),
}


def preset(vision: str = "vitg", llm: str | None = None) -> Blip2Config:
    """Full-size configuration from the paper: ``vision`` in {vitg, vitl}, ``llm`` in LLMS or None.

    See docs/paper_map.md §1.6.
    """
    v = {"vitg": VIT_G, "vitl": VIT_L}[vision]
    q = QFormerConfig(encoder_hidden_size=v.width, use_text_input=llm is None)
    return Blip2Config(vision=v, qformer=q, llm=LLMS[llm] if llm else None)


PRESETS: dict[str, Blip2Config] = {
    f"{v}" + (f"_{m}" if m else ""): preset(v, m)
    for v, m in [
        ("vitg", None),
        ("vitl", None),
        ("vitg", "opt2.7b"),
        ("vitg", "opt6.7b"),
        ("vitg", "flant5xl"),
        ("vitg", "flant5xxl"),
        ("vitl", "opt2.7b"),
        ("vitl", "flant5xl"),
    ]
}


# ----------------------------------------------------------------------------------------------------------------
# Size override of the dress rehearsal (``model_scale: rehearsal``; blip2lib/rehearsal/). Same classes, families,
# file formats and token-id layout as the paper's models; widths and depths shrunk so every real code path runs on a
# CPU in seconds. The released files have one more vision block than is built (40 / 24), so do the rehearsal files.

# ``MODEL_SCALES`` (the ``model_scale`` values) and ``REHEARSAL_RUN`` (the run length under the override) live in
# blip2lib/params_schema.py, where ``Params.from_dict`` applies them; re-exported above.
REHEARSAL_VISION = {
    "eva": VisionConfig(width=32, depth=2, num_heads=4, mlp_hidden=64),
    "clip": VisionConfig(arch="clip", width=24, depth=2, num_heads=4, mlp_hidden=48, ln_eps=1e-5),
}
REHEARSAL_QFORMER = QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=64, num_query_tokens=4)  # fmt: skip
REHEARSAL_EMBED_DIM = 16
# LLM widths (d_LLM) of the rehearsal models: the two sizes of a family differ, as in the paper (2560 / 4096 OPT).
REHEARSAL_LLM_WIDTH = {"opt2.7b": 32, "opt6.7b": 48, "flant5xl": 32, "flant5xxl": 48}


def rehearsal_llm_config(name: str) -> dict:
    """Tiny transformers config kwargs of LLM ``name`` (an ``LLMS`` key): the paper's vocabulary and ids, 2 layers."""
    base = dict(LLMS[name].hf_config)
    w = REHEARSAL_LLM_WIDTH[name]
    if base["model_type"] == "opt":
        return dict(base, hidden_size=w, ffn_dim=2 * w, word_embed_proj_dim=w, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    return dict(base, d_model=w, d_ff=2 * w, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)


def scaled_config(cfg: Blip2Config, scale: str = "full") -> Blip2Config:
    """``cfg`` at ``scale``: ``full`` returns it; ``rehearsal`` keeps the families and shrinks every size."""
    if scale not in MODEL_SCALES:
        raise ValueError(f"model_scale must be one of {list(MODEL_SCALES)}, got {scale!r}")
    if scale == "full":
        return cfg
    v = dataclasses.replace(REHEARSAL_VISION[cfg.vision.arch], image_size=cfg.vision.image_size,
                            precision=cfg.vision.precision)  # fmt: skip
    q = dataclasses.replace(REHEARSAL_QFORMER, encoder_hidden_size=v.width, use_text_input=cfg.qformer.use_text_input)
    llm = cfg.llm
    if llm is not None:
        name = next((k for k, c in LLMS.items() if c.hf_config == llm.hf_config), None)
        if name is None:
            raise ValueError(f"model_scale rehearsal: the LLM {llm.hf_config or llm.path} is none of {list(LLMS)}")
        llm = dataclasses.replace(llm, hf_config=rehearsal_llm_config(name), hidden_size=REHEARSAL_LLM_WIDTH[name])
    return Blip2Config(vision=v, qformer=q, llm=llm, embed_dim=REHEARSAL_EMBED_DIM, max_txt_len=cfg.max_txt_len)


def tiny_config(
    llm: str | None = None,
    cross_attention_frequency: int = 2,
    num_layers: int = 2,
    image_size: int = 28,
    arch: str = "eva",
) -> Blip2Config:
    """A seconds-fast configuration of the same classes for tests and smoke runs (size kwargs only)."""
    v = VisionConfig(
        arch=arch,
        image_size=image_size,
        patch_size=7,
        width=32,
        depth=2,
        num_heads=4,
        mlp_hidden=64,
        ln_eps=1e-6 if arch == "eva" else 1e-5,
        precision="fp32",
    )
    q = QFormerConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=32,
        num_query_tokens=4,
        use_text_input=llm is None,
        cls_token_id=1,
        sep_token_id=2,
        dec_token_id=99,
    )
    lm = None
    if llm == "opt":
        lm = LLMConfig(
            "opt",
            hf_config=dict(
                model_type="opt",
                vocab_size=99,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=37,
                max_position_embeddings=128,
                word_embed_proj_dim=32,
                bos_token_id=2,
                eos_token_id=2,
                pad_token_id=1,
            ),
            hidden_size=32,
            precision="fp32",
        )
    elif llm == "t5":
        lm = LLMConfig(
            "t5",
            hf_config=dict(
                model_type="t5",
                vocab_size=99,
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=1,
            ),
            hidden_size=32,
            precision="fp32",
        )
    return Blip2Config(vision=v, qformer=q, llm=lm, embed_dim=16, max_txt_len=12)


def config_to_dict(cfg: Any) -> dict:
    """Nested plain-dict view of a config dataclass (for YAML/JSON and checkpoint manifests)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Blip2Config:
    """Inverse of :func:`config_to_dict` (unknown keys are errors)."""
    d = dict(d)
    llm = d.pop("llm", None)
    return Blip2Config(
        vision=VisionConfig(**d.pop("vision", {})),
        qformer=QFormerConfig(**d.pop("qformer", {})),
        llm=LLMConfig(**llm) if llm else None,
        **d,
    )
