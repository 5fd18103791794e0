"""Initialisation of the Q-Former: BERT's random init and loading a local bert-base-uncased checkpoint.

See docs/paper_map.md §1.3. Split out of ``blip2lib/qformer.py``, which re-exports both public functions; this module
imports nothing from it (the modules it fills are typed as plain ``nn.Module``), so the import graph stays one-way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

# The loader's log line keeps the logger it had inside blip2lib/qformer.py, so filters and captures on that name
# still see it.
log = logging.getLogger("blip2lib.qformer")


@torch.no_grad()
def init_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """HF/BERT initialisation: Linear/Embedding N(0, r), zero biases (LM-head bias too) and padding rows, LN (1, 0).

    A decoder tied to the word embeddings is left alone (the embedding owns and initialises that weight).
    ``query_tokens`` is initialised by the model, not here.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if not getattr(m, "_tied", False):
                m.weight.normal_(0.0, initializer_range)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, initializer_range)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def _bert_name(ours: str) -> str:
    """Our key (HF names, report prefixes) → bert-base-uncased key (without the ``bert.`` / ``cls.`` prefix)."""
    return (
        ours.replace("qformer.encoder.", "encoder.")
        .replace(".attention.attention.", ".attention.self.")
        .replace("_query.", ".")
        .replace("qformer.layernorm.", "embeddings.LayerNorm.")
    )


@torch.no_grad()
def load_bert_weights(
    qformer: nn.Module, embeddings: nn.Module | None, lm_head: nn.Module | None, bert_dir: str
) -> dict[str, list[str]]:
    """Initialise the Q-Former from a LOCAL bert-base-uncased directory, as LAVIS does (docs/paper_map.md §1.3).

    Mapping (our names ← BERT): ``qformer.layernorm`` ← ``bert.embeddings.LayerNorm``; ``embeddings.*`` ←
    ``bert.embeddings.{word,position}_embeddings``; ``…attention.attention.*`` ← ``…attention.self.*``; text FFN
    ``intermediate``/``output`` ← the same; query FFN ``intermediate_query``/``output_query`` ← a COPY of the same
    layer's text FFN; ``cls.predictions.{transform.*, bias}`` ← BERT's MLM head. Token-type embeddings, pooler,
    NSP head and the tied decoder weight are ignored. Word-embedding rows beyond BERT's vocabulary (``[DEC]``) are
    drawn from N(0, ``initializer_range``) as LAVIS got them: its ``resize_token_embeddings`` ran under transformers
    4.25–4.26, which built the new table with the model's ``_init_weights`` (normal, std 0.02) and copied the old
    rows over it (transformers ≥ 4.46 centres new rows on the mean of the old ones instead). The matching LM-head
    bias entries get 0 (the resized bias was zero-padded). Cross-attention keeps its current (random) initialisation.

    Args:
        qformer: the Q-Former to fill (a :class:`~blip2lib.qformer.Blip2QFormer`).
        embeddings: text embeddings, a :class:`~blip2lib.qformer.Blip2TextEmbeddings` (``None`` for a query-only
            Q-Former).
        lm_head: ITG head, a :class:`~blip2lib.qformer.Blip2QFormerLMHead` (``None`` to skip).
        bert_dir: folder with ``model.safetensors`` or ``pytorch_model.bin`` (e.g. ``BertForMaskedLM``).

    Returns:
        ``{"loaded": [our keys], "ignored": [BERT keys], "initialised": [our keys/slices not from BERT]}``.
    """
    if lm_head is not None and (
        embeddings is None or lm_head.predictions.decoder.weight is not embeddings.word_embeddings.weight
    ):
        raise ValueError("lm_head's decoder must be tied to embeddings.word_embeddings (the BERT LM head)")
    sd, orig = {}, {}  # normalised BERT name → tensor / → name in the file
    path = Path(bert_dir)
    if (path / "model.safetensors").exists():
        raw = safetensors.torch.load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    for key, v in raw.items():  # old checkpoints name LayerNorm parameters gamma/beta
        k = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        sd[k.removeprefix("bert.")], orig[k.removeprefix("bert.")] = v, key
    parts = {"qformer": qformer, "embeddings": embeddings, "cls": lm_head}
    targets = {
        f"{p}.{k}": v for p, mod in parts.items() if mod is not None for k, v in mod.state_dict(keep_vars=True).items()
    }
    loaded, initialised, used = [], [], set()
    for name, param in targets.items():
        if name.startswith("cls.predictions.decoder."):
            continue  # tied: the weight is the word embedding, the bias is cls.predictions.bias
        src = name if name.startswith("cls.") else _bert_name(name)
        if src == "cls.predictions.bias" and src not in sd:
            src = "cls.predictions.decoder.bias"
        if src not in sd:
            initialised.append(name)  # cross-attention (or layers BERT does not have): current init kept
            continue
        w = sd[src]
        used.add(src)
        if name in ("embeddings.word_embeddings.weight", "cls.predictions.bias") and w.shape[0] < param.shape[0]:
            n = w.shape[0]  # extra vocabulary rows ([DEC]): N(0, initializer_range) rows / zero bias entries
            param[:n] = w.to(param.dtype)
            if w.dim() == 2:
                param[n:].normal_(0.0, qformer.config.initializer_range)
            else:
                param[n:] = 0.0
            initialised.append(f"{name}[{n}:]")
        elif w.shape != param.shape:
            raise ValueError(f"{src} has shape {tuple(w.shape)}, {name} expects {tuple(param.shape)}")
        else:
            param.copy_(w)
        loaded.append(name)
    ignored = sorted(orig[k] for k in set(sd) - used)  # token types, pooler, NSP head, tied decoder weight
    log.info(
        "BERT init %s: %d loaded, %d ignored, %d initialised", bert_dir, len(loaded), len(ignored), len(initialised)
    )
    return {"loaded": loaded, "ignored": ignored, "initialised": initialised}
