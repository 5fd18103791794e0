"""Assemble what a training run needs from flat params: model, task, tokenizers, data (docs/paper_map.md §2–4, §6).

The data side (datasets, transforms, shards, the resumable loader factory) is :mod:`blip2lib.assemble_data`; its
names are re-exported here, so ``from blip2lib.assemble import build_data`` keeps working.

Model sources: ``tiny`` (random, seconds; smoke tests), ``toy`` (the embedded toy world's frozen models) or a
``PRESETS`` key with local weights (``vision_weights``, ``llm_path``, ``bert_dir``). Nothing here downloads.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import safetensors.torch
import torch

from .assemble_data import _train_dataset, _transforms, build_data, is_shard_spec, toy_world  # noqa: F401 (re-exported)
from .config import PRESETS, Blip2Config, LLMConfig, QFormerConfig, VisionConfig, scaled_config, tiny_config
from .data.collate import bucket_task_text
from .featcache import VisionFeatureCache
from .featstore import StoreFeatures, open_for_run
from .model import Blip2, Blip2QFormerModel
from .tasks import Stage1Task, Stage2Task

log = logging.getLogger(__name__)

GENERATIVE = ("stage2", "caption_ft", "vqa_ft")


def _with(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def _tiny_components(params) -> dict:
    from .toy.synthetic import tiny_bert_tokenizer, tiny_llm_tokenizer

    cfg = tiny_config(params.llm if params.stage in GENERATIVE else None, image_size=params.image_size)
    return {"config": cfg, "qformer_tokenizer": tiny_bert_tokenizer(), "llm_tokenizer": tiny_llm_tokenizer(params.llm)}


def _toy_components(params) -> dict:
    """Toy-world frozen models: the ViT, the BERT that initialises the Q-Former, the OPT / T5 LLMs.

    Toy choices (not the paper's sizes): the Q-Former takes the toy BERT's width and depth, 8 queries and
    cross-attention in every layer (a 2-layer Q-Former with frequency 2 would cross-attend once). Like LAVIS's
    Q-Former, whose config is bert-base's (dropout 0.1), it takes its dropout from the BERT it starts from: the toy
    BERT has none (on a CPU, dropout masks and the slow attention-dropout SDPA path cost 22 % of a toy stage-1
    step: 326 → 254 ms on one thread).
    """
    import json as _json

    from transformers import AutoTokenizer

    world = toy_world(params)
    bert = _json.loads((world.bert_dir / "config.json").read_text())
    qtok = AutoTokenizer.from_pretrained(world.bert_dir, local_files_only=True)
    qtok.add_special_tokens({"bos_token": "[DEC]"})
    vision = VisionConfig(**{**world.vit_config, "precision": "fp32"})
    qformer = QFormerConfig(
        vocab_size=len(qtok), hidden_size=bert["hidden_size"], num_hidden_layers=bert["num_hidden_layers"],
        num_attention_heads=bert["num_attention_heads"], intermediate_size=bert["intermediate_size"],
        max_position_embeddings=bert["max_position_embeddings"], layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=bert.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=bert.get("attention_probs_dropout_prob", 0.1),
        cross_attention_frequency=1, encoder_hidden_size=vision.width, num_query_tokens=8,
        use_text_input=params.stage not in GENERATIVE,  # stage 2 keeps only the query path (docs/paper_map.md §1.5)
        pad_token_id=qtok.pad_token_id, cls_token_id=qtok.cls_token_id, sep_token_id=qtok.sep_token_id,
        dec_token_id=qtok.convert_tokens_to_ids("[DEC]"),
    )  # fmt: skip
    out = {
        "world": world,
        "qformer_tokenizer": qtok,
        "bert_dir": str(world.bert_dir),
        "vision_weights": str(world.vit_weights),
    }
    llm = None
    if params.stage in GENERATIVE:
        path = world.opt_dir if params.llm == "opt" else world.t5_dir
        hidden = _json.loads((path / "config.json").read_text())
        llm = LLMConfig(
            params.llm,
            path=str(path),
            hidden_size=hidden.get("hidden_size", hidden.get("d_model")),
            precision="fp32",
            exact_gelu=False,
        )
        out["llm_tokenizer"] = AutoTokenizer.from_pretrained(path, local_files_only=True)
        out["llm_path"] = str(path)
    out["config"] = Blip2Config(vision=vision, qformer=qformer, llm=llm, embed_dim=64)
    return out


def _preset_components(params) -> dict:
    from transformers import AutoTokenizer

    if params.model not in PRESETS:
        raise ValueError(f"model must be 'toy', 'tiny' or one of {sorted(PRESETS)}, got {params.model!r}")
    cfg = scaled_config(PRESETS[params.model], params.model_scale)  # model_scale rehearsal: the same family, tiny
    if not params.bert_dir:
        raise ValueError("bert_dir (a local bert-base-uncased folder) is required for real presets")
    qtok = AutoTokenizer.from_pretrained(params.bert_dir, local_files_only=True, truncation_side="right")
    qtok.add_special_tokens({"bos_token": "[DEC]"})  # id 30522 (docs/paper_map.md §1.3)
    out = {
        "config": cfg,
        "qformer_tokenizer": qtok,
        "bert_dir": params.bert_dir,
        "vision_weights": params.vision_weights,
        "llm_path": params.llm_path,
    }
    if cfg.llm is not None:
        if not params.llm_path:
            raise ValueError(f"llm_path (a local {params.model.split('_')[1]} folder) is required for stage 2")
        out["config"] = _with(cfg, llm=_with(cfg.llm, path=params.llm_path))
        out["llm_tokenizer"] = AutoTokenizer.from_pretrained(params.llm_path, local_files_only=True)
    return out


def _vision_config(params, cfg: Blip2Config) -> VisionConfig:
    """The run's vision tower config: image size, freezing, checkpointing and precision from ``params``."""
    return _with(
        cfg.vision,
        image_size=params.image_size,
        freeze=params.freeze_vit,
        grad_checkpointing=params.grad_checkpointing,
        precision=(params.vit_precision or cfg.vision.precision) if params.freeze_vit else "fp32",  # trained: fp32
    )


def build_frozen_tower(params, device: torch.device):
    """``(tower, vision config, components)``: the frozen vision tower alone, as :func:`build_model_and_task` makes it.

    No Q-Former and no LLM (a feature-store build needs neither). Under the same seed a random ``tiny`` tower comes out
    the same, because the model builds its tower first too; weights and precision are applied as the model does.
    """
    from .precision import set_vision_precision_
    from .vision import build_vision_tower, freeze_vision_, load_vision_weights

    comps = {"tiny": _tiny_components, "toy": _toy_components}.get(params.model, _preset_components)(params)
    vision = _vision_config(params, comps["config"])
    tower = build_vision_tower(vision)
    freeze_vision_(tower)
    if comps.get("vision_weights"):
        missing, _ = load_vision_weights(tower, comps["vision_weights"], vision)
        if missing:
            raise ValueError(f"vision weights {comps['vision_weights']} lack keys: {missing[:8]}")
    tower.to(device)
    set_vision_precision_(tower, vision.precision, device)  # a no-op on a CPU, as in Blip2Base.place
    return tower, vision, comps


def build_model_and_task(params, device: torch.device):
    """Model, task and the components dict (tokenizers, config, paths, best-metric key) for ``params.stage``."""
    comps = {"tiny": _tiny_components, "toy": _toy_components}.get(params.model, _preset_components)(params)
    cfg: Blip2Config = comps["config"]
    vision = _vision_config(params, cfg)
    qformer = cfg.qformer
    if params.stage == "vqa_ft":  # the question goes through the Q-Former too: keep the text path
        qformer = _with(qformer, use_text_input=True)
    llm = cfg.llm
    if params.stage in GENERATIVE and llm is not None:
        llm = _with(llm, prompt=params.prompt, max_txt_len=params.max_txt_len)
    cfg = _with(
        cfg,
        vision=vision,
        qformer=qformer,
        llm=llm if params.stage in GENERATIVE else None,
        max_txt_len=params.max_txt_len,
    )
    comps["config"] = cfg
    if params.stage in GENERATIVE:
        model = Blip2(cfg, tokenizer=comps["llm_tokenizer"], qformer_tokenizer=comps["qformer_tokenizer"],
                      llm_dropout=params.llm_dropout)  # fmt: skip
    else:
        model = Blip2QFormerModel(cfg)
    _load_frozen_and_init(model, comps, params)
    model.place(device)
    if params.stage in GENERATIVE:
        task = Stage2Task(
            model,
            prompt=params.prompt,
            max_txt_len=params.max_txt_len,
            question_template=params.question_template,
            qformer_question=params.stage == "vqa_ft",
            seed=params.seed,
        )
        if params.stage == "vqa_ft":
            comps.update(best_key="val_vqa_acc", higher_is_better=True)
        elif params.stage == "caption_ft":  # LAVIS caption_coco: agg_metrics = CIDEr + BLEU-4
            comps.update(best_key="val_cider_plus_bleu4", higher_is_better=True)
        else:
            comps.update(best_key="val_lm_loss", higher_is_better=False)
    else:
        task = Stage1Task(model, comps["qformer_tokenizer"], max_txt_len=params.max_txt_len, use_itg=params.use_itg,
                          text_padding=params.text_padding)  # fmt: skip
        comps.update(best_key="val_r_mean_itc", higher_is_better=True)
    if params.cache_vision_features:  # validated: frozen ViT, fixed images (featcache.py)
        model.vision_cache = VisionFeatureCache(max_bytes=params.cache_max_gib * 2**30)
    if params.feature_store:  # the loader serves stored features; the tower runs only on pixels (validation)
        comps["feature_store"] = open_for_run(params, model, device, _transforms(params)[0])
        model.vision_cache = StoreFeatures(comps["feature_store"].feature_shape)
    if params.text_len_buckets:  # static text shapes: captions right-padded to a bucket, pads masked as before
        bucket_task_text(task, params.text_len_buckets, params.max_txt_len)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s model: %.2fM trainable parameters", params.stage, n_train / 1e6)
    return model, task, comps


def _load_frozen_and_init(model, comps: dict, params) -> None:
    """Frozen tower weights, BERT initialisation of the Q-Former (paper §3.1), toy-world weights."""
    from .vision import load_vision_weights

    if comps.get("vision_weights"):
        missing, _ = load_vision_weights(model.vision_model, comps["vision_weights"], model.config.vision)
        if missing:
            raise ValueError(f"vision weights {comps['vision_weights']} lack keys: {missing[:8]}")
    # Without a parent checkpoint the Q-Former starts from BERT in every stage, as LAVIS' init_Qformer does; a
    # query-only (stage-2) Q-Former takes BERT's self-attention, embedding LayerNorm and (copied) FFN.
    if comps.get("bert_dir") and not params.init_from:
        from .qformer import load_bert_weights

        load_bert_weights(model.qformer, model.embeddings, getattr(model, "cls", None), comps["bert_dir"])
    if comps.get("qformer_init") and not params.init_from:
        comps["qformer_init"](model)


def materialize_frozen(model, comps: dict, run_dir: Path) -> None:
    """Write the frozen parts of a config-built (``tiny``) model into ``run_dir/frozen`` and record their paths.

    Real and toy runs reference their towers by path; a random tiny model has none, so its ViT, LLM and tokenizers
    are saved once (a few MB) to make the run loadable by ``blip2lib.from_pretrained`` like any other.
    """
    frozen = run_dir / "frozen"
    if not comps.get("vision_weights"):
        frozen.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in model.vision_model.state_dict().items()}
        safetensors.torch.save_file(sd, str(frozen / "vision.safetensors"))
        comps["vision_weights"] = str(frozen / "vision.safetensors")
    if not comps.get("bert_dir") and comps.get("qformer_tokenizer") is not None:
        comps["qformer_tokenizer"].save_pretrained(frozen / "bert")
        comps["bert_dir"] = str(frozen / "bert")
    lm = getattr(model, "language_model", None)
    if lm is not None and not comps.get("llm_path"):
        lm.save_pretrained(frozen / "llm")
        comps["llm_tokenizer"].save_pretrained(frozen / "llm")
        comps["llm_path"] = str(frozen / "llm")


def load_init(model: torch.nn.Module, path: str) -> dict:
    """Initialise trainable weights from parent checkpoints: keys that exist in both are taken (docs/paper_map.md §3.4).

    ``path`` may list several comma-separated checkpoints; a later one only fills keys the earlier ones lacked
    (VQA fine-tuning: the stage-2 run, then the stage-1 run for the Q-Former text path, docs/paper_map.md §4.2 / §10.4).

    Returns the report ``{"loaded", "dropped", "fresh"}`` (stage 1 → stage 2 drops the text FFN, word embeddings,
    ITG/ITC/ITM heads; the projection to the LLM is fresh).
    """
    parts = [p.strip() for p in path.split(",") if p.strip()]
    if len(parts) > 1:
        reports = [_load_one(model, parts[0])]
        for extra in parts[1:]:
            done = {k for r in reports for k in r["keys"]}
            reports.append(_load_one(model, extra, skip=done))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        loaded = {k for r in reports for k in r["keys"]}
        return {
            "files": [r["file"] for r in reports],
            "loaded": len(loaded),
            "keys": sorted(loaded),
            "dropped": sorted(set().union(*[r["dropped"] for r in reports]) - loaded),
            "fresh": sorted(trainable - loaded),
        }
    return _load_one(model, parts[0])


def _load_one(model: torch.nn.Module, path: str, skip: set | None = None) -> dict:
    from .checkpoint import read_safetensors

    p = Path(path)
    file = p / "model.safetensors" if p.is_dir() else p
    if p.is_dir() and not file.exists():
        from .checkpoint import latest_checkpoint

        ck = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
        if ck is None:
            raise FileNotFoundError(f"init_from={path}: no model.safetensors or checkpoint found")
        file = Path(ck) / "model.safetensors"
    sd = read_safetensors(file)  # a truncated file: LoadError naming it
    own = model.state_dict()
    take = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and k not in (skip or ())}
    bad_shape = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if bad_shape:
        raise ValueError(f"init_from={file}: shape mismatch for {bad_shape[:8]}")
    model.load_state_dict(take, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    report = {
        "file": str(file),
        "loaded": len(take),
        "keys": sorted(take),
        "dropped": sorted(set(sd) - set(take)),
        "fresh": sorted(trainable - set(take)),
    }
    log.info(
        "init from %s: %d tensors loaded, %d dropped, %d fresh",
        file,
        len(take),
        len(report["dropped"]),
        len(report["fresh"]),
    )
    return report


# ----------------------------------------------------------------------------------------------------------------
# Data


__all__ = ["build_model_and_task", "build_data", "build_frozen_tower", "load_init", "GENERATIVE"]
