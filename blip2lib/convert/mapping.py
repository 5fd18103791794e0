"""Checkpoint conversion: key maps and configs between our BLIP-2, transformers and LAVIS, and a numerical check.

Three namings of the same tensors (docs/paper_map.md §8.1, §8.3):

* ours — transformers' names except ``vision_model`` (timm keys), ``ln_vision`` (outside the tower) and the stage-1
  extras ``cls`` (ITG head) and ``temp`` that transformers does not have;
* transformers — ``vision_model.*`` in ``Blip2VisionModel`` names, ``ln_vision`` = ``vision_model.post_layernorm``;
* LAVIS — ``visual_encoder``, ``Qformer.bert.*`` with ``.self.`` for ``.attention.``, ``vision_proj``/``text_proj``,
  ``opt_proj``/``t5_proj``, ``opt_model``/``t5_model``.

Every rename is an exact prefix/segment rule (no blunt substring replace). The numerical check (:func:`compare_to_hf`)
runs ours and a transformers model on a fixed seeded input in fp32 with eager attention and reports the max-abs
difference of each intermediate. CLI: ``python -m blip2lib.convert {lavis-to-hf,hf-to-lavis} ...`` (see ``--help``).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from ..vision import vision_state_dict_from_hf, vision_state_dict_from_lavis, vision_state_dict_to_hf

log = logging.getLogger(__name__)

GROUPS = ("vision_model", "ln_vision", "query_tokens", "qformer", "embeddings", "cls", "heads", "language_projection",
          "language_model")  # fmt: skip
_HEADS = ("vision_projection", "text_projection", "itm_head", "temp")


def module_group(key: str) -> str:
    """Report group of one of OUR keys: its first component, with the ITC/ITM heads and ``temp`` as "heads"."""
    top = key.split(".", 1)[0]
    return "heads" if top in _HEADS else top


def group_keys(keys) -> dict[str, list[str]]:
    """``{group: sorted keys}`` for a key list (see :func:`module_group`); empty groups are left out."""
    out: dict[str, list[str]] = {}
    for k in sorted(keys):
        out.setdefault(module_group(k), []).append(k)
    return out


# ----------------------------------------------------------------------------------------------------------------
# LAVIS <-> ours (docs/paper_map.md §8.1, docs/paper_map.md §8.3)

_LAVIS_PROJ = {"opt": "opt_proj", "t5": "t5_proj"}
_LAVIS_LM = {"opt": "opt_model", "t5": "t5_model"}
_LAVIS_FIXED = [  # (LAVIS prefix, our prefix), first match wins
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("Qformer.bert.encoder.", "qformer.encoder."),
    ("Qformer.cls.", "cls."),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("opt_proj.", "language_projection."),
    ("t5_proj.", "language_projection."),
    ("opt_model.", "language_model."),
    ("t5_model.", "language_model."),
]
LAVIS_EXPECTED_UNUSED = {"Qformer.bert.embeddings.position_ids": "BERT position_ids buffer (non-persistent for us)"}
_SELF = re.compile(r"^(qformer\.encoder\.layer\.\d+\.(?:attention|crossattention))\.self\.")
_ATT = re.compile(r"^(Qformer\.bert\.encoder\.layer\.\d+\.(?:attention|crossattention))\.attention\.")


def lavis_to_ours(sd: Mapping[str, torch.Tensor], vision: VisionConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LAVIS ``checkpoint["model"]`` keys → ours; returns ``(mapped, dropped)``.

    ``visual_encoder.*`` go through :func:`blip2lib.vision.vision_state_dict_from_lavis` (CLIP renames, pos-embed
    resize to ``vision.image_size``). ``dropped`` holds :data:`LAVIS_EXPECTED_UNUSED` keys found. Keys matching no
    rule keep their LAVIS name, so a load reports them as unexpected.
    """
    out, dropped, vis = {}, [], {}
    for k, v in sd.items():
        if k in LAVIS_EXPECTED_UNUSED:
            dropped.append(k)
        elif k.startswith("visual_encoder."):
            vis[k] = v
        else:
            new = next((ours + k[len(lav) :] for lav, ours in _LAVIS_FIXED if k.startswith(lav)), k)
            out[_SELF.sub(r"\1.attention.", new)] = v
    if vis:
        out.update({f"vision_model.{k}": v for k, v in vision_state_dict_from_lavis(vis, vision).items()})
    return out, dropped


_CLIP_TO_LAVIS = {"attn.qkv.": "attn.in_proj_", "attn.proj.": "attn.out_proj.", "norm1.": "ln_1.", "norm2.": "ln_2.",
                  "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}  # fmt: skip


def _vision_to_lavis(k: str, v: torch.Tensor, arch: str) -> tuple[str, torch.Tensor]:
    if arch == "eva":
        return k, v  # LAVIS' EVA names equal timm's (vision.py)
    m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
    if m:
        sub = m.group(2)
        for ours, lav in _CLIP_TO_LAVIS.items():
            if sub.startswith(ours):
                sub = lav + sub[len(ours) :] if ours != "attn.qkv." else f"attn.in_proj_{sub.split('.')[-1]}"
                break
        return f"transformer.resblocks.{m.group(1)}.{sub}", v
    top = {"cls_token": ("class_embedding", v.reshape(-1)), "pos_embed": ("positional_embedding", v[0]),
           "patch_embed.proj.weight": ("conv1.weight", v), "norm_pre.weight": ("ln_pre.weight", v),
           "norm_pre.bias": ("ln_pre.bias", v)}  # fmt: skip
    return top.get(k, (k, v))


def ours_to_lavis(sd: Mapping[str, torch.Tensor], family: str | None, arch: str = "eva") -> dict[str, torch.Tensor]:
    """Our keys → LAVIS keys (inverse of :func:`lavis_to_ours`); ``family`` "opt"/"t5" names the projection/LLM."""
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_model."):
            lk, lv = _vision_to_lavis(k[len("vision_model.") :], v, arch)
            out[f"visual_encoder.{lk}"] = lv
            continue
        if k.startswith(("language_projection.", "language_model.")):
            if family is None:
                raise ValueError(f"{k}: a stage-2 key needs the LLM family")
            pre = _LAVIS_PROJ[family] if k.startswith("language_projection.") else _LAVIS_LM[family]
            out[f"{pre}.{k.split('.', 1)[1]}"] = v
            continue
        new = next((lav + k[len(o) :] for lav, o in _LAVIS_FIXED if k.startswith(o)), k)
        out[_ATT.sub(r"\1.self.", new)] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# transformers <-> ours (docs/paper_map.md §8.3)

HF_ABSENT = {"cls": "ITG head (transformers has none; re-created tied to embeddings.word_embeddings, BERT init)",
             "temp": "ITC temperature (transformers drops it; re-created at 0.07, docs/paper_map.md §1.4)"}  # fmt: skip


def ours_to_hf(sd: Mapping[str, torch.Tensor], vision: VisionConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our keys → transformers keys; returns ``(mapped, dropped)`` with ``dropped`` = ``cls.*`` / ``temp``."""
    out, dropped, vis = {}, [], {}
    for k, v in sd.items():
        if k.startswith("vision_model."):
            vis[k[len("vision_model.") :]] = v
        elif k.startswith("ln_vision."):
            out["vision_model.post_layernorm." + k[len("ln_vision.") :]] = v
        elif module_group(k) in ("cls",) or k == "temp":
            dropped.append(k)
        else:
            out[k] = v
    out.update({f"vision_model.{k}": v for k, v in vision_state_dict_to_hf(vis, vision).items()})
    return out, dropped


def hf_to_ours(sd: Mapping[str, torch.Tensor], vision: VisionConfig) -> dict[str, torch.Tensor]:
    """Transformers keys → ours (``post_layernorm`` → ``ln_vision``; qkv bias split into q/v, k slice must be 0)."""
    out = {k: v for k, v in sd.items() if not k.startswith("vision_model.")}
    for k, v in sd.items():
        if k.startswith("vision_model.post_layernorm."):
            out["ln_vision." + k.rsplit(".", 1)[1]] = v
    vis = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    out.update({f"vision_model.{k}": v for k, v in vision_state_dict_from_hf(vis, vision).items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Configurations (docs/paper_map.md §8.3)


def config_from_hf(hf: Mapping) -> tuple[Blip2Config, str]:
    """Our :class:`Blip2Config` and the model kind ("stage2" | "retrieval") from a transformers ``config.json`` dict.

    ``ln_vision_eps`` takes the file's vision ``layer_norm_eps`` (HF ``post_layernorm``: 1e-6 on the updated Hub
    configs; LAVIS used 1e-5 — docs/paper_map.md §8.3, LAVIS#418), so a loaded model reproduces transformers exactly.
    """
    v, q = dict(hf.get("vision_config", {})), dict(hf.get("qformer_config", {}))
    arch = (hf.get("architectures") or ["Blip2ForConditionalGeneration"])[0]
    kind = "retrieval" if "Retrieval" in arch else "stage2"
    if v.get("hidden_act", "gelu") != "gelu" or not v.get("qkv_bias", True):
        raise ValueError("only the EVA layout (exact GELU, qkv bias) maps onto our vision tower")
    d = VisionConfig()
    eps = v.get("layer_norm_eps", 1e-6)
    vision = VisionConfig(arch="eva", image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
                          width=v.get("hidden_size", d.width), depth=v.get("num_hidden_layers", d.depth),
                          num_heads=v.get("num_attention_heads", d.num_heads),
                          mlp_hidden=v.get("intermediate_size", d.mlp_hidden), ln_eps=eps,
                          ln_vision_eps=eps)  # fmt: skip
    dq = QFormerConfig()
    vocab = q.get("vocab_size", 30522)
    qf = QFormerConfig(**{f: q[f] for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob",
                                           "max_position_embeddings", "layer_norm_eps", "initializer_range",
                                           "cross_attention_frequency", "pad_token_id") if f in q},
                       encoder_hidden_size=vision.width, num_query_tokens=hf.get("num_query_tokens", 32),
                       use_text_input=kind == "retrieval" or bool(q.get("use_qformer_text_input", False)),
                       dec_token_id=dq.dec_token_id if vocab == dq.vocab_size else vocab - 1)  # fmt: skip
    llm = None
    if kind == "stage2":
        t = dict(hf.get("text_config") or {"model_type": "opt"})
        t5 = bool(t.get("is_encoder_decoder", t.get("model_type") == "t5"))
        hidden = t.get("d_model") if t5 else t.get("hidden_size")
        llm = LLMConfig("t5" if t5 else "opt", hf_config=t, hidden_size=hidden, precision="bf16" if t5 else "fp16",
                        exact_gelu=t5 and t.get("dense_act_fn") == "gelu")  # fmt: skip
    return Blip2Config(vision=vision, qformer=qf, llm=llm, embed_dim=hf.get("image_text_hidden_size", 256)), kind


def hf_config_dict(cfg: Blip2Config, text_config: dict | None, image_token_index: int) -> dict:
    """Transformers ``Blip2Config`` kwargs for our config (``text_config``: the built LLM's ``config.to_dict()``)."""
    v, q = cfg.vision, cfg.qformer
    if v.arch != "eva":
        raise NotImplementedError("transformers' BLIP-2 has only the EVA vision layout (no CLIP ViT-L)")
    if abs(v.ln_vision_eps - v.ln_eps) > 0:
        log.warning(
            "transformers has ONE vision eps: post_layernorm gets %.0e instead of our ln_vision %.0e "
            "(the known LAVIS/HF 1e-5 vs 1e-6 difference, docs/paper_map.md §8.3)",
            v.ln_eps,
            v.ln_vision_eps,
        )
    retrieval = cfg.llm is None
    return {
        "architectures": ["Blip2ForImageTextRetrieval" if retrieval else "Blip2ForConditionalGeneration"],
        "vision_config": dict(hidden_size=v.width, intermediate_size=v.mlp_hidden, num_hidden_layers=v.depth,
                              num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                              layer_norm_eps=v.ln_eps, hidden_act="gelu", qkv_bias=True),
        "qformer_config": dict(vocab_size=q.vocab_size, hidden_size=q.hidden_size,
                               num_hidden_layers=q.num_hidden_layers,
                               num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                               hidden_dropout_prob=q.hidden_dropout_prob,
                               attention_probs_dropout_prob=q.attention_probs_dropout_prob,
                               max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
                               initializer_range=q.initializer_range, pad_token_id=q.pad_token_id,
                               cross_attention_frequency=q.cross_attention_frequency,
                               encoder_hidden_size=v.width, use_qformer_text_input=q.use_text_input),
        "text_config": text_config if text_config is not None else {"model_type": "opt"},
        "num_query_tokens": q.num_query_tokens,
        "image_text_hidden_size": cfg.embed_dim,
        "image_token_index": image_token_index,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Numerical check: ours vs a transformers model on a fixed random input (fp32, eager attention; docs/paper_map.md §8.3)


def set_attn_implementation(model: nn.Module, impl: str) -> None:
    """Switch every attention of OUR model to "eager" or "sdpa": Q-Former, timm tower and the transformers LLM.

    A stop-gap: ``Blip2Base`` has no ``attn_implementation`` argument yet (the Q-Former and ``build_llm`` do).
    """
    from ..qformer import _MultiHeadAttention

    for m in model.modules():
        if isinstance(m, _MultiHeadAttention):
            m.impl = impl
        elif hasattr(m, "fused_attn"):  # timm Attention / EvaAttention
            m.fused_attn = impl == "sdpa"
    lm = getattr(model, "language_model", None)
    if lm is not None:
        lm.set_attn_implementation(impl)


def check_inputs(cfg: Blip2Config, seed: int = 0, batch: int = 2, text_len: int = 6, vocab: int | None = None) -> dict:
    """Seeded pixels (B, 3, S, S), text ids (B, L) in [3, vocab - 1) with the last row right-padded, T5 decoder ids."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    vocab = vocab or (cfg.qformer.vocab_size if cfg.llm is None else _llm_vocab(cfg))
    ids = torch.randint(3, vocab - 1, (batch, text_len), generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[-1, text_len - 2 :] = 0
    return {"pixel_values": torch.randn(batch, 3, s, s, generator=g), "input_ids": ids, "attention_mask": mask,
            "decoder_input_ids": torch.randint(3, vocab - 1, (batch, 4), generator=g)}  # fmt: skip


def _llm_vocab(cfg: Blip2Config) -> int:
    return int(cfg.llm.hf_config.get("vocab_size", 50272)) if cfg.llm.hf_config else 32000


@torch.no_grad()
def ours_outputs(model: nn.Module, inp: dict) -> dict[str, torch.Tensor]:
    """Intermediates of our model on :func:`check_inputs`.

    ``vision`` (after ln_vision), ``qformer``, then ``soft_prompt`` + ``logits`` (stage 2, soft prompt PREPENDED) or
    ``itm`` (B, 2) + ``itc`` (B, B) (retrieval).
    """
    from ..llm import prepend_prefix

    img = model.encode_vision(inp["pixel_values"])  # (B, N, Dv)
    q = model.query_pass(img).last_hidden_state  # (B, Q, H)
    out = {"vision": img, "qformer": q}
    ids, mask = inp["input_ids"], inp["attention_mask"]
    if hasattr(model, "language_model"):
        prefix = model.language_projection(q)  # (B, Q, D)
        lm = model.language_model
        embeds, full_mask = prepend_prefix(lm, prefix, ids, mask)
        kw = {"decoder_input_ids": inp["decoder_input_ids"]} if lm.config.is_encoder_decoder else {}
        out.update(soft_prompt=prefix, logits=lm(inputs_embeds=embeds, attention_mask=full_mask, **kw).logits)
    else:
        feats = F.normalize(model.vision_projection(q), dim=-1)
        out.update(itm=model.itm_logits(img, ids, mask),
                   itc=model.itc_similarity(feats, model.encode_text(ids, mask)["text_feat"]))  # fmt: skip
    return out


@torch.no_grad()
def hf_outputs(hf: nn.Module, inp: dict) -> dict[str, torch.Tensor]:
    """The same intermediates from a transformers BLIP-2, fed the processor layout ``[<image> x Q ; text]``."""
    c = hf.config
    img = hf.vision_model(inp["pixel_values"]).last_hidden_state
    nq = c.num_query_tokens
    q = hf.qformer(query_embeds=hf.query_tokens.expand(img.shape[0], -1, -1), encoder_hidden_states=img)
    out = {"vision": img, "qformer": q.last_hidden_state}
    b = img.shape[0]
    ids = torch.cat([torch.full((b, nq), c.image_token_index), inp["input_ids"]], 1)  # processor layout
    mask = torch.cat([torch.ones(b, nq, dtype=torch.long), inp["attention_mask"]], 1)
    if hasattr(hf, "language_model"):
        kw = {"decoder_input_ids": inp["decoder_input_ids"]} if c.text_config.is_encoder_decoder else {}
        out["soft_prompt"] = hf.language_projection(q.last_hidden_state)
        out["logits"] = hf(pixel_values=inp["pixel_values"], input_ids=ids, attention_mask=mask, **kw).logits
    else:
        px = inp["pixel_values"]
        out["itm"] = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        out["itm"] = out["itm"].logits_per_image
        out["itc"] = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
    return out


def compare_to_hf(model: nn.Module, hf: nn.Module, seed: int = 0, align_ln_eps: bool = True) -> dict[str, float]:
    """Max-abs difference of each intermediate between ``model`` (ours) and ``hf`` (both eval, fp32, eager).

    With ``align_ln_eps`` our ``ln_vision`` runs with transformers' single vision eps for the comparison (the one
    representable difference, docs/paper_map.md §8.3); its effect on the final output is reported as ``eps_effect``.
    """
    c = hf.config
    vocab = c.qformer_config.vocab_size if model.config.llm is None else c.text_config.vocab_size
    if model.config.llm is not None and 3 < c.image_token_index < vocab:
        vocab = c.image_token_index + 1  # text ids stay below the placeholder id (it would be scattered into)
    inp = check_inputs(model.config, seed, vocab=vocab)
    was_training = model.training
    impl = next((m.impl for m in model.modules() if hasattr(m, "impl")), "sdpa")
    model.eval()
    eps, hf_eps = model.ln_vision.eps, hf.config.vision_config.layer_norm_eps
    try:
        set_attn_implementation(model, "eager")
        theirs = hf_outputs(hf, inp)
        ours_raw = ours_outputs(model, inp)
        if align_ln_eps:
            model.ln_vision.eps = hf_eps
        ours = ours_outputs(model, inp)
    finally:
        model.ln_vision.eps = eps
        set_attn_implementation(model, impl)
        model.train(was_training)
    diffs = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours}
    final = "logits" if "logits" in ours else "itm"
    diffs["eps_effect"] = (ours_raw[final] - ours[final]).abs().max().item()
    return diffs


# ----------------------------------------------------------------------------------------------------------------
# Export helpers (used by blip2lib.pretrained.save_pretrained_hf)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # docs/paper_map.md §6


def _dedup_tied(sd: dict) -> dict:
    """Keep one name per shared storage (safetensors refuses aliases): ``shared`` > ``embed_tokens`` > ``lm_head``."""

    def rank(k: str) -> int:
        return 2 if k.endswith("lm_head.weight") else 1 if k.endswith("embed_tokens.weight") else 0

    seen: dict[tuple, str] = {}
    for k in sorted(sd, key=lambda k: (rank(k), k)):
        t = sd[k]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        seen.setdefault(key, k)
    keep = set(seen.values())
    return {k: v.contiguous() for k, v in sd.items() if k in keep}


def _image_token(model, tokenizer, rows: int) -> tuple[int, object]:
    """Placeholder id inside the LLM embedding table (its row is looked up, then overwritten; docs/paper_map.md §8.3).

    A new ``<image>`` token when the table has a free row (the Hub choice: 50265 OPT, 32100 T5), else the last row
    (tiny models, whose tokenizers fill the table); ``rows - 1`` without a tokenizer.
    """
    if tokenizer is None:
        return rows - 1, None
    tok = copy.deepcopy(tokenizer)
    if len(tok) < rows:
        from transformers import AddedToken

        tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
        return tok.convert_tokens_to_ids("<image>"), tok
    log.warning("no free embedding row: token id %d doubles as the image placeholder", rows - 1)
    return rows - 1, tok


def _write_processor(out: Path, model, tokenizer, image_token_id: int | None) -> None:
    from transformers import BlipImageProcessor

    s = model.config.vision.image_size
    ip = BlipImageProcessor(size={"height": s, "width": s}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                            resample=3)  # bicubic squash = LAVIS blip_image_eval (docs/paper_map.md §6)  # fmt: skip
    nq = model.config.qformer.num_query_tokens
    if tokenizer is None:
        cfg = {"image_processor": ip.to_dict(), "num_query_tokens": nq, "processor_class": "Blip2Processor"}
        (out / "processor_config.json").write_text(json.dumps(cfg, indent=2))
        return
    tokenizer.save_pretrained(out)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["image_token"] = tokenizer.convert_ids_to_tokens(image_token_id)  # Blip2Processor reuses tokenizer.image_token
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    cfg = {"image_processor": ip.to_dict(), "num_query_tokens": nq, "processor_class": "Blip2Processor"}
    (out / "processor_config.json").write_text(json.dumps(cfg, indent=2))


def load_hf_reference(path, attn_implementation: str = "eager"):
    """Load a BLIP-2 directory with stock transformers (fp32) — the class named by ``architectures``."""
    import transformers

    arch = (
        json.loads((Path(path) / "config.json").read_text()).get("architectures") or ["Blip2ForConditionalGeneration"]
    )[0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn_implementation).eval()
