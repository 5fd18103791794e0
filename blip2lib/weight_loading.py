"""Reading weight files and filling our model from them, with a :class:`LoadReport` of every gap.

The building blocks of :mod:`blip2lib.pretrained` (which re-exports :class:`LoadError`, :class:`LoadReport`,
:func:`hf_weight_files` and ``_read_tensors``): :class:`LoadError` / :class:`LoadReport`, the file readers (safetensors
or ``torch.load(weights_only=True)``: no code is ever unpickled), and the helpers that build our model and load a
state dict into it, classifying every absent key as expected (named with its reason) or an error. See
docs/paper_map.md §8.

This module imports torch/transformers lazily so that ``import blip2lib`` stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


class LoadError(UserError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model.

    The message names the file and lists every mis-shaped (both shapes), missing and unexpected key.
    """


@dataclass
class LoadReport:
    """What a load did: ``source`` ("hf" | "lavis" | "training"), counts, expected gaps (key → reason), errors."""

    source: str
    kind: str
    loaded: int = 0
    expected: dict[str, str] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mis_shaped: dict[str, str] = field(default_factory=dict)  # key -> "file (a, b) vs model (c, d)"; not loaded
    file: str = ""  # the file or directory read

    def summary(self) -> dict:
        """JSON-friendly dict; expected gaps are grouped by reason."""
        by_reason: dict[str, list[str]] = {}
        for k, why in self.expected.items():
            by_reason.setdefault(why, []).append(k)
        return {"source": self.source, "kind": self.kind, "file": self.file, "loaded": self.loaded,
                "expected": by_reason, "mis_shaped": self.mis_shaped, "missing": self.missing,
                "unexpected": self.unexpected, "notes": self.notes}  # fmt: skip

    def raise_on_error(self) -> None:
        """Raise one :class:`LoadError` naming the file and every mis-shaped, missing and unexpected key."""
        if self.missing or self.unexpected or self.mis_shaped:
            shaped = f" mis-shaped {self.mis_shaped}" if self.mis_shaped else ""
            raise LoadError(
                f"{self.file or '<state dict>'}: {self.source} checkpoint does not fit:{shaped} missing "
                f"{self.missing} unexpected {self.unexpected}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _read_tensors(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from .checkpoint import read_safetensors

        return read_safetensors(path)  # a truncated file: LoadError naming it
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code objects: refuse rather than unpickle it
        raise LoadError(f"{path}: not loadable with weights_only=True (refusing to unpickle code): {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            return sd[wrapper]
    return sd


def hf_weight_files(d: Path) -> list[Path]:
    """The weight files of a transformers directory: the shards its index names, else its one weight file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).exists():
            return [d / f for f in sorted(set(json.loads((d / index).read_text())["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).exists():
            return [d / name]
    raise FileNotFoundError(f"{d}: no model.safetensors / pytorch_model.bin (or their index)")


def _read_hf_weights(d: Path) -> dict:
    return {k: v for f in hf_weight_files(d) for k, v in _read_tensors(f).items()}


def _tokenizer(d: str | Path | None, bert: bool = False):
    if not d or not any((Path(d) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, **({"truncation_side": "right"} if bert else {}))
    if bert and tok.bos_token is None:
        tok.add_special_tokens({"bos_token": "[DEC]"})  # id 30522 (docs/paper_map.md §1.3), as blip2lib.assemble does
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Building and filling our model


def _tie_groups(module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _set_param(module, name: str, param) -> None:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    setattr(module, leaf, param)


def _llm_from_state(llm_cfg, lm_sd: dict, attn: str, report: LoadReport):
    """Build the LLM on the meta device and ASSIGN the file's tensors (one copy in memory).

    What the model ties (OPT lm_head ↔ embed_tokens, T5 encoder/decoder embed_tokens ↔ shared) is re-tied when the
    file stores one alias only; every other absent tensor is an error.
    """
    from .llm import build_llm

    lm = build_llm(llm_cfg, device="meta", attn_implementation=attn)
    ties = _tie_groups(lm)
    lm_sd = _drop_mis_shaped(lm, lm_sd, report, "language_model.")
    res = lm.load_state_dict(lm_sd, strict=False, assign=True)
    missing = set(res.missing_keys)
    for group in ties:
        src = next((n for n in group if n in lm_sd), None)
        for n in group:
            if n in missing and src is not None:
                _set_param(lm, n, dict(lm.named_parameters(remove_duplicate=False))[src])
                report.expected[f"language_model.{n}"] = f"tied to language_model.{src} (not stored)"
                missing.discard(n)
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is not None and head.weight.is_meta and (llm_cfg.hf_config or {}).get("tie_word_embeddings", True):
        # A config-tied head (transformers 5.x T5 configs always say tie_word_embeddings=True, docs/paper_map.md §8.3;
        # build_llm unties FlanT5 heads): the file stores only the embedding, as transformers itself would load it.
        head.weight = emb.weight
        name = next(n for n in missing if n.endswith("weight") and "head" in n)
        report.expected[f"language_model.{name}"] = "tied to the input embeddings (config tie_word_embeddings=True)"
        missing.discard(name)
    shaped = {k[len("language_model.") :] for k in report.mis_shaped if k.startswith("language_model.")}
    missing -= shaped  # listed as mis-shaped, not again as missing
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta and n not in shaped]
    report.missing.update({"language_model": sorted(f"language_model.{n}" for n in set(left) | missing)} if left
                          else {})  # fmt: skip
    if res.unexpected_keys:
        report.unexpected["language_model"] = [f"language_model.{k}" for k in res.unexpected_keys]
    report.loaded += len(lm_sd) - len(res.unexpected_keys)
    return lm


def _drop_mis_shaped(module, sd: dict, report: LoadReport, prefix: str = "") -> dict:
    """``sd`` without the keys whose shape differs from ``module``'s; those go to ``report.mis_shaped``.

    load_state_dict would raise a bare ``size mismatch`` at the first one, before the other gaps of the same file
    are known; this way one error lists them all.
    """
    from .checkpoint import shape_mismatches

    bad = shape_mismatches(module.state_dict(), sd)
    report.mis_shaped.update({prefix + k: v for k, v in bad.items()})
    return {k: v for k, v in sd.items() if k not in bad}


def _build(cfg, kind: str, language_model=None, tokenizer=None):
    from .model import Blip2, Blip2QFormerModel

    if kind == "retrieval" or cfg.llm is None:
        model = Blip2QFormerModel(cfg)
        model.tokenizer = tokenizer  # BERT tokenizer (with [DEC]) when known
        return model
    return Blip2(cfg, language_model=language_model, tokenizer=tokenizer)


def _fill(
    model,
    sd: dict,
    report: LoadReport,
    expected_missing: dict[str, str],
    skip_prefix: str = "language_model.",
    already: set | None = None,
) -> None:
    """``load_state_dict(strict=False)`` + classification of every gap (expected → named, other → error)."""
    from .convert import group_keys

    sd = _drop_mis_shaped(model, sd, report)
    res = model.load_state_dict(sd, strict=False)
    report.loaded += len(sd) - len(res.unexpected_keys)
    missing = []
    for k in res.missing_keys:
        if k.startswith(skip_prefix) or (already and k in already) or k in report.mis_shaped:
            continue  # a mis-shaped key is listed as such, not again as missing
        why = next((r for pre, r in expected_missing.items() if k == pre or k.startswith(pre + ".")), None)
        if why:
            report.expected[k] = why
        else:
            missing.append(k)
    for g, ks in group_keys(missing).items():
        report.missing.setdefault(g, []).extend(ks)
    for g, ks in group_keys(res.unexpected_keys).items():
        report.unexpected.setdefault(g, []).extend(ks)
