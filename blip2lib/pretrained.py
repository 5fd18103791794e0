"""Loading released / converted / our own BLIP-2 checkpoints, and exporting to transformers and LAVIS.

See docs/paper_map.md §8.

:func:`from_pretrained` takes any of three sources and returns our :class:`~blip2lib.model.Blip2` (stage 2) or
:class:`~blip2lib.model.Blip2QFormerModel` (stage 1 / retrieval):

* a transformers directory (``config.json`` + safetensors/bin) of ``Blip2ForConditionalGeneration`` (OPT/T5) or
  ``Blip2ForImageTextRetrieval``;
* a LAVIS ``.pth`` (``checkpoint["model"]``) assembled like LAVIS does (docs/paper_map.md §8.1): the ViT from
  ``vision_weights`` (``eva_vit_g.pth`` / ``clip_vit_L.pth``; a fine-tuned file's ``visual_encoder.*`` overrides it),
  the LLM from the local ``llm_path``, the Q-Former tokenizer from the local ``bert_dir``;
* our training checkpoint (``ckpt-<step>/`` with ``manifest.json``): trainable tensors from the file (sha256 checked),
  frozen towers from the manifest's ``vision_weights`` / ``llm_path`` (or the keyword overrides).

Only safetensors and ``torch.load(weights_only=True)`` are used: no code is ever unpickled. Every load produces a
:class:`LoadReport` (also logged): keys expected to be absent are named with the reason; any other gap raises
:class:`LoadError` listing the keys by module.

Image tokens (docs/paper_map.md §8.3): transformers writes ``[<image> x Q ; BOS ; text]`` and scatters the soft prompt
into the placeholders; our model PREPENDS the soft prompt to the text embeddings. Both give identical logits
(placeholders occupy the first Q positions; test_parity checks it), so loading ignores ``image_token_index`` and
exporting picks one (see :func:`save_pretrained_hf`).

This module imports torch/transformers lazily so that ``import blip2lib`` stays cheap.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

# LoadError / LoadReport, the file readers and the model-filling helpers live in blip2lib.weight_loading (moved there
# to keep this file short); they are re-exported here so that ``from blip2lib.pretrained import LoadError`` (checkpoint,
# vision, workbook.preflight_weights, the tests) keeps working.
from .weight_loading import (  # noqa: F401
    LoadError,
    LoadReport,
    _build,
    _fill,
    _llm_from_state,
    _read_hf_weights,
    _read_tensors,
    _tokenizer,
    hf_weight_files,
)

log = logging.getLogger(__name__)  # "blip2lib.pretrained": the load summary is logged here, as documented


# ----------------------------------------------------------------------------------------------------------------
# Loading each source


def _finish(model, report: LoadReport, strict: bool, attn: str, return_report: bool):
    from .convert import set_attn_implementation

    set_attn_implementation(model, attn)
    model.eval()
    model.load_report = report
    log.info(
        "loaded %s %s checkpoint: %d tensors; expected gaps %s; missing %s; unexpected %s",
        report.source,
        report.kind,
        report.loaded,
        report.summary()["expected"],
        report.missing,
        report.unexpected,
    )
    if strict:
        report.raise_on_error()
    return (model, report) if return_report else model


def _load_hf(d: Path, attn: str, strict: bool, return_report: bool, config=None):
    from .convert import HF_ABSENT, config_from_hf, hf_to_ours

    hf_cfg = json.loads((d / "config.json").read_text())
    cfg, kind = config_from_hf(hf_cfg)
    cfg = config or cfg
    note = f"image_token_index={hf_cfg.get('image_token_index')} unused: our model prepends the soft prompt"
    report = LoadReport("hf", kind, file=str(d), notes=[note])
    sd = hf_to_ours(_read_hf_weights(d), cfg.vision)
    lm = None
    if kind == "stage2":
        lm_sd = {k[len("language_model.") :]: v for k, v in sd.items() if k.startswith("language_model.")}
        lm = _llm_from_state(cfg.llm, lm_sd, attn, report)
        sd = {k: v for k, v in sd.items() if not k.startswith("language_model.")}
    model = _build(cfg, kind, lm, _tokenizer(d, bert=kind == "retrieval"))
    _fill(model, sd, report, HF_ABSENT)
    return _finish(model, report, strict, attn, return_report)


def _infer_lavis_config(sd: dict, vis: dict, llm_path: str | None, image_size: int | None,
                        model_scale: str = "full"):  # fmt: skip
    """Architecture of a LAVIS checkpoint from tensor shapes + the paper presets (docs/paper_map.md §1.2–1.5, §8.2).

    ``model_scale="rehearsal"`` takes the sizes shapes cannot give (head counts) from the rehearsal presets
    (``blip2lib.config.REHEARSAL_*``) instead of the paper's.
    """
    import dataclasses
    import math

    from .config import REHEARSAL_QFORMER, REHEARSAL_VISION, VIT_G, VIT_L, Blip2Config, LLMConfig, QFormerConfig

    src = {k[len("visual_encoder.") :]: v for k, v in sd.items() if k.startswith("visual_encoder.")} or vis
    clip = "conv1.weight" in src or "class_embedding" in src
    width = (src.get("class_embedding") if clip else src.get("cls_token")).shape[-1]
    rehearsal = model_scale == "rehearsal"  # size override of the dress rehearsal
    v = REHEARSAL_VISION["clip" if clip else "eva"] if rehearsal else VIT_L if clip else VIT_G
    if width != v.width:
        raise LoadError(f"vision width {width} matches no {model_scale} preset ({VIT_G.width} ViT-g / {VIT_L.width} "
                        f"ViT-L at full scale): pass config=")  # fmt: skip
    pos = src.get("positional_embedding" if clip else "pos_embed")
    grid = math.isqrt(pos.shape[-2] - 1)
    v = dataclasses.replace(v, image_size=image_size or grid * v.patch_size)
    layers = {int(k.split(".")[4]) for k in sd if k.startswith("Qformer.bert.encoder.layer.")}
    cross = sorted(i for i in layers if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in sd)
    qt = sd["query_tokens"]
    we = sd.get("Qformer.bert.embeddings.word_embeddings.weight")
    q = dataclasses.replace(REHEARSAL_QFORMER if rehearsal else QFormerConfig(), hidden_size=qt.shape[-1],
                            num_query_tokens=qt.shape[1], num_hidden_layers=len(layers),
                            cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else len(layers),
                            encoder_hidden_size=width, vocab_size=we.shape[0] if we is not None else 30523,
                            use_text_input="Qformer.bert.encoder.layer.0.intermediate.dense.weight" in sd)  # fmt: skip
    llm = None
    for fam in ("opt", "t5"):
        if f"{fam}_proj.weight" in sd:
            if not llm_path:
                raise LoadError(f"stage-2 LAVIS checkpoint ({fam}_proj): pass llm_path= (a local LLM directory)")
            llm = LLMConfig(fam, path=str(llm_path), hidden_size=sd[f"{fam}_proj.weight"].shape[0],
                            precision="bf16" if fam == "t5" else "fp16")  # fmt: skip
    embed = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    return Blip2Config(vision=v, qformer=q, llm=llm, embed_dim=embed)


def _load_lavis(path: Path, vision_weights, llm_path, bert_dir, image_size, config, attn, strict, return_report,
                language_model=None, model_scale="full"):  # fmt: skip
    import dataclasses

    from .convert import LAVIS_EXPECTED_UNUSED, lavis_to_ours
    from .llm import build_llm
    from .vision import load_vision_weights

    sd = _read_tensors(path)
    vis = _read_tensors(Path(vision_weights)) if vision_weights else {}
    cfg = config or _infer_lavis_config(sd, vis, llm_path, image_size, model_scale)
    if config is not None and image_size:
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=image_size))
    if cfg.llm is not None and llm_path:
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, path=str(llm_path)))
    kind = "stage1" if cfg.llm is None else "stage2"
    report = LoadReport("lavis", kind, file=str(path))
    lm = None
    if cfg.llm is not None:
        lm = language_model if language_model is not None else build_llm(cfg.llm, attn_implementation=attn)
        report.notes.append(f"language_model from {cfg.llm.path or 'the given module'} (LAVIS files hold no LLM)")
    model = _build(cfg, kind, lm, _tokenizer(bert_dir, bert=True) if lm is None else _tokenizer(llm_path))
    if lm is not None:
        model.qformer_tokenizer = _tokenizer(bert_dir, bert=True)
    mapped, dropped = lavis_to_ours(sd, cfg.vision)
    report.expected.update({k: LAVIS_EXPECTED_UNUSED[k] for k in dropped})
    from_vis = set()
    if vis:
        miss, unexp = load_vision_weights(model.vision_model, vis, cfg.vision)
        from_vis = {f"vision_model.{k}" for k, _ in model.vision_model.state_dict().items()} - {
            f"vision_model.{k}" for k in miss
        }
        name = Path(vision_weights).name
        for k in unexp:
            m = re.match(r"^(?:blocks|transformer\.resblocks)\.(\d+)\.", k)
            if m and int(m.group(1)) >= cfg.vision.depth:
                report.expected[f"{name}:{k}"] = (
                    f"vision block >= depth {cfg.vision.depth} (LAVIS uses the 2nd-to-last)"
                )
            else:
                report.unexpected.setdefault("vision_model", []).append(f"{name}:{k}")
        if miss:
            report.notes.append(f"{name} lacks {len(miss)} tower keys (must come from the checkpoint)")
        report.loaded += len(from_vis)
        override = any(k.startswith("vision_model.") for k in mapped)
        report.notes.append(f"vision tower from {vision_weights}" + (" (overridden by visual_encoder.*)" * override))
    expected = {"cls": "ITG head absent (re-created tied to word embeddings, BERT init)", "temp": "ITC temp (0.07)"}
    _fill(model, mapped, report, expected, already=from_vis)
    return _finish(model, report, strict, attn, return_report)


def _load_training(d: Path, vision_weights, llm_path, bert_dir, attn, strict, return_report):
    import dataclasses

    from .checkpoint import load_training_state
    from .config import config_from_dict
    from .vision import load_vision_weights

    manifest = json.loads((d / "manifest.json").read_text())
    run = manifest.get("config") or {}
    if "model" not in run:
        raise LoadError(f"{d}/manifest.json: config has no 'model' entry (config_to_dict(Blip2Config))")
    cfg = config_from_dict(run["model"])
    vision_weights = vision_weights or run.get("vision_weights") or ""
    llm_path = llm_path or run.get("llm_path") or (cfg.llm.path if cfg.llm else "")
    bert_dir = bert_dir or run.get("bert_dir") or ""
    if cfg.llm is not None and llm_path:
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, path=str(llm_path)))
    kind = "stage2" if cfg.llm is not None else "stage1"
    report = LoadReport("training", kind, file=str(d), notes=[f"stage={run.get('stage')} parent={run.get('parent')}"])
    lm = None
    if cfg.llm is not None:
        from .llm import build_llm

        if not llm_path:
            report.missing["language_model"] = ["language_model.* (frozen LLM: no llm_path in manifest or kwargs)"]
        lm = build_llm(cfg.llm, attn_implementation=attn)
    model = _build(cfg, kind, lm, _tokenizer(llm_path) if lm is not None else _tokenizer(bert_dir, bert=True))
    if lm is not None:
        model.qformer_tokenizer = _tokenizer(bert_dir, bert=True)
    frozen_vision = not any(p.requires_grad for p in model.vision_model.parameters())
    if frozen_vision:
        if vision_weights:
            miss, _ = load_vision_weights(model.vision_model, vision_weights, cfg.vision)
            if miss:
                report.missing["vision_model"] = [f"vision_model.{k}" for k in miss]
            report.notes.append(f"frozen vision tower from {vision_weights}")
        else:
            report.missing["vision_model"] = ["vision_model.* (frozen tower: no vision_weights in manifest or kwargs)"]
    load_training_state(d, model, verify=True, restore_rng=False)  # sha256 of every file + every trainable key
    report.loaded += sum(1 for _, p in model.named_parameters() if p.requires_grad)
    if lm is not None and llm_path:
        report.notes.append(f"frozen language_model from {llm_path}")
    return _finish(model, report, strict, attn, return_report)


def from_pretrained(
    path,
    *,
    vision_weights: str | None = None,
    llm_path: str | None = None,
    bert_dir: str | None = None,
    image_size: int | None = None,
    config=None,
    attn_implementation: str = "sdpa",
    strict: bool = True,
    return_report: bool = False,
    model_scale: str = "full",
    **private,
):
    """Load a BLIP-2 checkpoint of any supported source into our model (module docstring; docs/paper_map.md §8).

    Args:
        path: transformers directory, LAVIS ``.pth``/``.safetensors`` state dict, ``ckpt-<step>/`` directory, or a
            run directory (its newest complete checkpoint under ``checkpoints/`` is used).
        vision_weights: LAVIS ViT file (``eva_vit_g.pth`` / ``clip_vit_L.pth``); LAVIS/our checkpoints only.
        llm_path: local LLM directory (LAVIS/our checkpoints; overrides the manifest).
        bert_dir: local ``bert-base-uncased`` directory for the Q-Former tokenizer (adds ``[DEC]``).
        image_size: input resolution (LAVIS files: default from the pos-embed found, 224 or 364).
        config: our :class:`Blip2Config` to use instead of the inferred one (LAVIS / transformers sources; needed
            for non-paper sizes of LAVIS files, whose shapes do not give head counts).
        attn_implementation: "sdpa" (default) or "eager" for the Q-Former, ViT and LLM.
        strict: raise :class:`LoadError` on unexplained gaps (else they are only reported).
        return_report: return ``(model, LoadReport)`` instead of the model (always at ``model.load_report``).
        model_scale: ``full`` or ``rehearsal`` (LAVIS files only: which presets give the sizes shapes cannot tell;
            transformers dirs and our runs carry their whole configuration).
        **private: ``language_model=`` an already built LLM module for LAVIS files (used by :func:`save_lavis`).

    Returns:
        ``Blip2`` or ``Blip2QFormerModel`` in eval mode, fp32 (call ``model.place(device)`` for the GPU policy).
    """
    p = Path(path)
    if not p.exists():  # say so plainly (torch.load's error would read like a refused pickle)
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist (relative paths start at {Path.cwd()})")
    if p.is_dir() and (p / "manifest.json").exists():
        return _load_training(p, vision_weights, llm_path, bert_dir, attn_implementation, strict, return_report)
    if p.is_dir() and (p / "config.json").exists():
        return _load_hf(p, attn_implementation, strict, return_report, config)
    if p.is_dir():
        from .checkpoint import latest_checkpoint

        ck = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
        if ck is None:
            raise FileNotFoundError(f"{p}: neither a transformers dir, a ckpt-<step>/ dir nor a run dir")
        return _load_training(ck, vision_weights, llm_path, bert_dir, attn_implementation, strict, return_report)
    return _load_lavis(p, vision_weights, llm_path, bert_dir, image_size, config, attn_implementation, strict,
                       return_report, private.get("language_model"), model_scale)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Export


def save_pretrained_hf(model, path, *, check: bool = True, tol: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Write ``model`` as a directory stock transformers loads, verified before it appears at ``path``.

    See docs/paper_map.md §8.3.

    Stage-2 models → ``Blip2ForConditionalGeneration``; stage-1 models → ``Blip2ForImageTextRetrieval`` (``cls`` and
    ``temp`` are not representable and are dropped). Written: ``config.json``, ``model.safetensors`` (tied LLM
    aliases stored once), ``processor_config.json`` (``num_query_tokens``, CLIP-normalised bicubic image processor)
    and the tokenizer when the model has one. ``image_token_index``: a new ``<image>`` token when the LLM table has a
    free row (50265 OPT-2.7b, 32100 FlanT5, as on the Hub), else the last row; retrieval models use the Q-Former
    vocabulary size (ids are stripped before embedding, as on the Hub).

    The check loads the written directory with transformers (fp32, eager) and compares against ``model`` on a
    seeded input (:func:`blip2lib.convert.compare_to_hf`); above ``tol`` nothing is written.

    Returns:
        Max-abs differences per intermediate (empty without ``check``).

    Raises:
        FileExistsError: ``path`` exists. ValueError: check failed, or a stage-2 Q-Former with text input
        (transformers' generation model has no Q-Former text path). NotImplementedError: CLIP ViT-L tower.
    """
    from safetensors.torch import save_file
    from transformers import Blip2Config as HFBlip2Config

    from .convert import (
        _dedup_tied,
        _image_token,
        _write_processor,
        compare_to_hf,
        hf_config_dict,
        load_hf_reference,
        ours_to_hf,
    )

    out = Path(path)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite")
    cfg = model.config
    stage2 = cfg.llm is not None
    if stage2 and cfg.qformer.use_text_input:
        raise ValueError("transformers' Blip2ForConditionalGeneration has no Q-Former text input (VQA-FT variant)")
    if any(p.dtype.is_floating_point and p.dtype != __import__("torch").float32 for p in model.parameters()):
        raise ValueError("export from an fp32 model (the check is fp32); load it on CPU or call .float()")
    tok = getattr(model, "tokenizer", None)
    if stage2:
        lm = model.language_model
        token_id, tok = _image_token(model, tok, lm.get_input_embeddings().weight.shape[0])
        text_cfg = lm.config.to_dict()
    else:  # retrieval: transformers strips the Q placeholder ids before embedding, so any id works (Hub: 30523)
        token_id, tok = _image_token(model, tok, 1 << 62)
        token_id, text_cfg = cfg.qformer.vocab_size if tok is None else token_id, None
    sd, dropped = ours_to_hf(model.state_dict(), cfg.vision)
    if dropped:
        log.info("not representable in transformers, dropped: %s", sorted({k.split(".")[0] for k in dropped}))
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        HFBlip2Config(**hf_config_dict(cfg, text_cfg, token_id)).save_pretrained(tmp)
        save_file(_dedup_tied(sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_processor(tmp, model, tok, token_id if tok is not None else None)
        diffs = {}
        if check:
            diffs = compare_to_hf(model, load_hf_reference(tmp), seed=seed)
            worst = max(v for k, v in diffs.items() if k != "eps_effect")
            log.info("export check (max-abs): %s", diffs)
            if not worst <= tol:
                raise ValueError(f"export check failed: max-abs {worst:.3g} > {tol:g} ({diffs}); nothing written")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diffs


def save_lavis(model, path, *, llm_out: str | None = None, check: bool = True, tol: float = 1e-4,
               reference=None) -> dict[str, float]:  # fmt: skip
    """Write ``{"model": state_dict}`` in LAVIS names (docs/paper_map.md §8.1).

    The ViT is included as ``visual_encoder.*`` like a fine-tuned file; no LLM (LAVIS loads it from its own folder;
    ``llm_out`` saves it + tokenizer there).

    The check reloads the written file through our LAVIS loader and compares with ``reference`` (a transformers
    model, e.g. the source of ``hf-to-lavis``) or, without one, with ``model``; above ``tol`` nothing is written.
    """
    import torch

    from .convert import compare_to_hf, ours_outputs, ours_to_lavis

    out = Path(path)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite")
    cfg = model.config
    family = cfg.llm.family if cfg.llm is not None else None
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    lavis = {k: v.contiguous().clone() for k, v in ours_to_lavis(sd, family, cfg.vision.arch).items()}
    tmp = out.with_name(f".tmp-{out.name}")
    torch.save({"model": lavis}, tmp)
    diffs = {}
    try:
        if check:
            back = from_pretrained(tmp, config=cfg, language_model=getattr(model, "language_model", None))
            if reference is not None:
                diffs = compare_to_hf(back, reference)
            else:
                from .convert import check_inputs

                inp = check_inputs(cfg)
                a, b = ours_outputs(back, inp), ours_outputs(model.eval(), inp)
                diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
            worst = max(v for k, v in diffs.items() if k != "eps_effect")
            if not worst <= tol:
                raise ValueError(f"LAVIS export check failed: max-abs {worst:.3g} > {tol:g} ({diffs}); nothing written")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    if llm_out and cfg.llm is not None:
        model.language_model.save_pretrained(llm_out)
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(llm_out)
    return diffs
