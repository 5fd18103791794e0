"""Preflight of weight files: read key names and shapes only, compare them with a model built on the meta device.

A file's tensors are never read: safetensors files give their header, ``.pth`` / ``.bin`` files are opened with
``torch.load(weights_only=True, mmap=True)`` (only the pickled metadata is parsed, the storages stay on disk). The
shapes become meta tensors and go through the same key mappings the loaders use (``blip2lib.convert`` /
``blip2lib.vision``), so "fits" means what ``blip2lib.from_pretrained`` and ``blip2lib.assemble`` would accept.
Findings go to the caller's context (``ctx.err`` / ``ctx.note`` with the params key), never raised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "vocab.txt")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
_META_MODELS: dict[str, torch.nn.Module] = {}  # repr(config) → model built on the meta device (one build per config)
SHOWN = 3  # example keys named per kind of mismatch


class Unreadable(RuntimeError):
    """A weight file that cannot be read in its format (message names the file)."""


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a ``.safetensors`` / ``.pth`` / ``.bin`` state dict (``{"model": ...}`` unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:  # the JSON header only
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise Unreadable(f"{path}: not a readable safetensors file ({e})") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # legacy (non-zip) format, a pickle with code objects, a truncated file
        raise Unreadable(f"{path}: not loadable with torch.load(weights_only=True, mmap=True): {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict):
        raise Unreadable(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def dir_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of a transformers directory's weights (sharded through its index, or one file)."""
    from ..pretrained import hf_weight_files  # the loader's own file resolution

    try:
        files = hf_weight_files(d)
    except FileNotFoundError as e:
        raise Unreadable(str(e)) from e
    return {k: s for f in files for k, s in file_shapes(f).items()}


def as_meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Meta tensors of those shapes; transformers' fused qkv biases are real zeros (a loader checks their k slice)."""
    return {k: torch.zeros(s) if k.endswith("qkv.bias") else torch.empty(s, device="meta") for k, s in shapes.items()}


def _examples(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN]) + (f" … (+{len(keys) - SHOWN})" if len(keys) > SHOWN else "")


def compare(found: dict, expected: dict, absent_ok=lambda k: False, ties: list[list[str]] = ()) -> str:
    """What keeps ``found`` ({key: shape}) from fitting ``expected``; "" when it fits.

    ``absent_ok(key)`` names model keys a file is not expected to hold; a key tied to another one (``ties``) may be
    stored under either name.
    """
    alias = {n: g for g in ties for n in g}
    missing = [k for k in expected if k not in found and not absent_ok(k)
               and not any(a in found for a in alias.get(k, ()))]  # fmt: skip
    unexpected = [k for k in found if k not in expected]
    shape = [k for k in found if k in expected and tuple(found[k]) != tuple(expected[k])]
    parts = []
    if shape:
        k = sorted(shape)[0]
        parts.append(f"{len(shape)} shape mismatches (e.g. {k}: file {tuple(found[k])} vs model {tuple(expected[k])})")
    if missing:
        parts.append(f"{len(missing)} keys missing ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
    return "; ".join(parts)


def _shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _ties(module: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def vision_width(shapes: dict) -> int:
    """Width of a ViT state dict (LAVIS EVA / CLIP names, bare or under ``visual_encoder.``); 0 when unknown."""
    pre = "visual_encoder." if any(k.startswith("visual_encoder.") for k in shapes) else ""
    return (shapes.get(f"{pre}class_embedding") or shapes.get(f"{pre}cls_token") or (0,))[-1]


def describe_vision(shapes: dict) -> str:
    """A ViT state dict's family, width and block count, e.g. ``EVA ViT (width 1408, 40 blocks)``."""
    pre = "visual_encoder." if any(k.startswith("visual_encoder.") for k in shapes) else ""
    clip = f"{pre}class_embedding" in shapes or f"{pre}conv1.weight" in shapes
    width = vision_width(shapes)
    stem = f"{pre}transformer.resblocks." if clip else f"{pre}blocks."
    blocks = {k[len(stem) :].split(".")[0] for k in shapes if k.startswith(stem)}
    return f"{'CLIP' if clip else 'EVA'} ViT (width {width}, {len(blocks)} blocks)"


def scaled(cfg, scale: str):
    """``cfg`` at a params file's ``model_scale`` (the dress rehearsal's size override); ``full`` leaves it as is."""
    if scale == "full":
        return cfg
    from .. import config

    return config.scaled_config(cfg, scale)


def meta_model(ctx, key: str, cfg, kind: str):
    """Our model for ``cfg`` on the meta device (shapes only), or None after reporting why it cannot be built."""
    from ..model import Blip2, Blip2QFormerModel

    tag = repr(cfg)
    if tag not in _META_MODELS:
        try:
            cls = Blip2QFormerModel if kind in ("stage1", "retrieval") or cfg.llm is None else Blip2
            _META_MODELS[tag] = cls(cfg, device="meta")
        except Exception as e:  # an LLM config transformers cannot build, an inconsistent size...
            ctx.err(key, f"cannot build the configured architecture on the meta device: {type(e).__name__}: {e}")
            return None
    model = _META_MODELS[tag]
    ctx.models.append(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Frozen towers and their folders


def check_vision_file(ctx, key: str, path: Path, vcfg, what: str) -> None:
    """A LAVIS ViT file (``eva_vit_g.pth`` / ``clip_vit_L.pth`` layout) against the tower ``vcfg`` describes."""
    from ..vision import _lavis_to_timm, build_vision_tower

    try:
        shapes = file_shapes(path)
        mapped, _dropped = _lavis_to_timm(as_meta(shapes), vcfg)  # blocks ≥ depth are dropped, as the loader does
    except (Unreadable, ValueError) as e:
        ctx.err(key, str(e))
        return
    tag = f"tower {vcfg!r}"
    if tag not in _META_MODELS:  # one build per tower configuration
        _META_MODELS[tag] = build_vision_tower(vcfg, device="meta")
    tower = _META_MODELS[tag]
    gap = compare({k: tuple(v.shape) for k, v in mapped.items()}, _shapes_of(tower))
    if gap:
        want = f"{'EVA' if vcfg.arch == 'eva' else 'CLIP'} ViT (width {vcfg.width}, {vcfg.depth} blocks used)"
        ctx.err(key, f"{path} holds a {describe_vision(shapes)}; {what} needs the {want}: {gap}")


def _config_json(ctx, key: str, d: Path) -> dict | None:
    try:
        return json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        ctx.err(key, f"{d} has no config.json (a transformers model folder is expected)")
    except (OSError, ValueError) as e:
        ctx.err(key, f"{d}/config.json is not readable JSON: {e}")
    return None


def _has_any(d: Path, patterns) -> bool:
    return any(next(d.glob(p), None) is not None for p in patterns)


def check_llm_dir(ctx, key: str, d: Path, family: str, hidden: int | None, what: str) -> bool:
    """An LLM folder: config (family, width), tokenizer and weight files. True when its config is usable."""
    cfg = _config_json(ctx, key, d)
    if cfg is None:
        return False
    t5 = bool(cfg.get("is_encoder_decoder", cfg.get("model_type") == "t5"))
    width = cfg.get("d_model") if t5 else cfg.get("hidden_size")
    ok = True
    if t5 != (family == "t5"):
        ctx.err(key, f"{d} holds a {cfg.get('model_type')} model; {what} needs a {family} LLM")
        ok = False
    elif hidden and width != hidden:
        ctx.err(key, f"{d} holds a {cfg.get('model_type')} LLM of width {width}; {what} projects to width {hidden}")
        ok = False
    if not _has_any(d, _TOKENIZER_FILES):
        ctx.err(key, f"{d} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    if not _has_any(d, _WEIGHT_GLOBS):
        ctx.err(key, f"{d} has no weight files (model.safetensors, pytorch_model.bin or a sharded index)")
    return ok


def check_bert_dir(ctx, key: str, d: Path, hidden: int, weights: bool) -> None:
    """A bert-base-uncased folder: the Q-Former's width, a vocabulary, and weights when training starts from them."""
    cfg = _config_json(ctx, key, d)
    if cfg is not None and cfg.get("hidden_size") != hidden:
        ctx.err(key, f"{d}/config.json hidden_size {cfg.get('hidden_size')} != the Q-Former's {hidden}")
    if not _has_any(d, ("vocab.txt", "tokenizer.json")):
        ctx.err(key, f"{d} has no tokenizer (vocab.txt or tokenizer.json)")
    if weights and not _has_any(d, ("model.safetensors", "pytorch_model.bin")):
        ctx.err(
            key, f"{d} has no weights (model.safetensors / pytorch_model.bin): the Q-Former is initialised from them"
        )


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _model_file(run: Path) -> Path | None:
    """``model.safetensors`` of a checkpoint dir, or of a run's newest complete checkpoint."""
    from ..checkpoint import latest_checkpoint

    if (run / "model.safetensors").exists():
        return run / "model.safetensors"
    ck = latest_checkpoint(run / "checkpoints") or latest_checkpoint(run)
    return Path(ck) / "model.safetensors" if ck is not None else None


def _no_checkpoint(ctx, key: str, run: Path) -> None:
    producer = ctx.producer(run)
    if producer is not None and producer.resolve() in ctx.batch:
        ctx.note(key, f"{run} holds no complete checkpoint yet: produced by {producer.name} of {producer.parent.name}")
    else:
        ctx.err(key, f"{run} holds no model.safetensors and no complete checkpoint (ckpt-<step>/ with manifest.json)")


def check_init_from(ctx, key: str, run: Path, model) -> None:
    """A parent run: it has a checkpoint, and the tensors both share have equal shapes (``assemble.load_init``)."""
    file = _model_file(run)
    if file is None:
        _no_checkpoint(ctx, key, run)
        return
    try:
        found = file_shapes(file)
    except Unreadable as e:
        ctx.err(key, str(e))
        return
    if model is None:
        return
    own = _shapes_of(model)
    shared = [k for k in found if k in own]
    bad = [k for k in shared if found[k] != own[k]]
    if not shared:
        ctx.err(key, f"{file} shares no tensor name with the configured model (not a blip2lib checkpoint?)")
    elif bad:
        k = sorted(bad)[0]
        ctx.err(
            key, f"{file}: {len(bad)} shape mismatches with the configured model (e.g. {k}: {found[k]} vs {own[k]})"
        )


def _kind_ok(ctx, key: str, kind: str, task: str, path: Path) -> bool:
    need = {"retrieval": "stage1", "vqa": "stage2", "caption": "stage2"}.get(task)
    if need and (kind in ("stage1", "retrieval")) != (need == "stage1"):
        want = "stage-1 / retrieval" if need == "stage1" else "stage-2"
        ctx.err(key, f"{path} holds a {kind} model; {task} needs a {want} model")
        return False
    return True


def check_checkpoint(ctx, path: Path, files: dict, keys: dict, task: str, row: str, image_size: int) -> None:
    """Any checkpoint source ``from_pretrained`` takes, with the row's frozen-tower files."""
    try:
        if path.is_dir() and (path / "config.json").exists() and not (path / "manifest.json").exists():
            _check_hf(ctx, path, keys["checkpoint"], task)
        elif path.is_dir():
            ck = path if (path / "manifest.json").exists() else (_model_file(path) or Path()).parent
            if ck == Path():
                _no_checkpoint(ctx, keys["checkpoint"], path)
            else:
                _check_training_ckpt(ctx, ck, files, keys, task)
        else:
            _check_lavis(ctx, path, files, keys, task, row, image_size)
    except Unreadable as e:
        ctx.err(keys["checkpoint"], str(e))


def _check_training_ckpt(ctx, ck: Path, files: dict, keys: dict, task: str) -> None:
    import dataclasses

    from ..config import config_from_dict

    key = keys["checkpoint"]
    try:
        run = json.loads((ck / "manifest.json").read_text())["config"]
        cfg = config_from_dict(run["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        ctx.err(key, f"{ck}/manifest.json has no usable model config: {type(e).__name__}: {e}")
        return
    kind = "stage1" if cfg.llm is None else "stage2"
    if not _kind_ok(ctx, key, kind, task, ck):
        return
    where = {k: (keys[k] if files.get(k) else f"{key} (manifest)") for k in ("vision_weights", "llm_path")}
    vw = files.get("vision_weights") or run.get("vision_weights") or ""
    if cfg.vision.freeze:
        if not vw:
            ctx.err(where["vision_weights"], f"{ck}: frozen ViT but no vision_weights (params or manifest)")
        elif (p := ctx.existing(where["vision_weights"], vw, "ViT file")) is not None:
            check_vision_file(ctx, where["vision_weights"], p, cfg.vision, f"checkpoint {ck.parent.parent.name}")
    if cfg.llm is not None:
        lp = files.get("llm_path") or run.get("llm_path") or cfg.llm.path
        d = ctx.existing(where["llm_path"], lp, "LLM folder") if lp else None
        if not lp:
            ctx.err(where["llm_path"], f"{ck}: stage-2 checkpoint but no llm_path (params or manifest)")
        if d is None or not check_llm_dir(ctx, where["llm_path"], d, cfg.llm.family, cfg.llm.hidden_size, str(ck)):
            return
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, path=str(d)))
    model = meta_model(ctx, key, cfg, kind)
    if model is None:
        return
    found = file_shapes(ck / "model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gap = compare(found, _shapes_of(model), absent_ok=lambda k: k not in trainable)
    if gap:
        ctx.err(key, f"{ck}/model.safetensors does not fit its own manifest's model: {gap}")


def _check_hf(ctx, d: Path, key: str, task: str) -> None:
    from ..convert import HF_ABSENT, config_from_hf, hf_to_ours

    hf = _config_json(ctx, key, d)
    if hf is None:
        return
    try:
        cfg, kind = config_from_hf(hf)
    except (ValueError, TypeError, KeyError) as e:
        ctx.err(key, f"{d}/config.json is not a BLIP-2 config blip2lib reads: {e}")
        return
    if not _kind_ok(ctx, key, kind, task, d):
        return
    if not _has_any(d, _TOKENIZER_FILES):
        ctx.err(key, f"{d} has no tokenizer files: the evaluation tokenizes with the checkpoint's own tokenizer")
    model = meta_model(ctx, key, cfg, kind)
    if model is None:
        return
    try:
        mapped = hf_to_ours(as_meta(dir_shapes(d)), cfg.vision)
    except ValueError as e:
        ctx.err(key, f"{d}: {e}")
        return
    absent = tuple(HF_ABSENT)  # cls.*, temp: re-created by the loader
    gap = compare({k: tuple(v.shape) for k, v in mapped.items()}, _shapes_of(model),
                  absent_ok=lambda k: k.split(".")[0] in absent, ties=_ties(model))  # fmt: skip
    if gap:
        ctx.err(key, f"{d} does not fit the architecture of its config.json: {gap}")


def _check_lavis(ctx, path: Path, files: dict, keys: dict, task: str, row: str, image_size: int) -> None:
    from ..config import PRESETS
    from ..convert import LAVIS_EXPECTED_UNUSED, lavis_to_ours
    from ..pretrained import LoadError, _infer_lavis_config

    key = keys["checkpoint"]
    shapes = file_shapes(path)
    if "query_tokens" not in shapes:
        ctx.err(key, f"{path} has no query_tokens: not a LAVIS BLIP-2 checkpoint ({describe_vision(shapes)}?)")
        return
    own_vit = any(k.startswith("visual_encoder.") for k in shapes)
    vis_path = None
    if files.get("vision_weights"):
        vis_path = ctx.existing(keys["vision_weights"], files["vision_weights"], "ViT file")
    elif not own_vit:
        ctx.err(keys["vision_weights"], f"{path} stores no ViT (pre-training files do not): set the ViT file")
    # The loader reads the ViT file even when the checkpoint carries its own fine-tuned ViT (which then overrides
    # it), so the file must fit in both cases.
    vis = file_shapes(vis_path) if vis_path is not None else {}
    qkey = "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"
    reads = shapes.get(qkey, (0, 0))[-1]  # the vision width the Q-Former's cross-attention was trained on
    if vis and reads and vision_width(vis) != reads:
        tower = {1408: " (EVA ViT-g)", 1024: " (CLIP ViT-L)"}.get(reads, "")
        ctx.err(keys["vision_weights"], f"{vis_path} holds a {describe_vision(vis)}, but {path.name}'s Q-Former "
                                        f"reads vision width {reads}{tower}")  # fmt: skip
        return
    if not vis and not own_vit:
        return
    fam = next((f for f in ("opt", "t5") if f"{f}_proj.weight" in shapes), None)
    llm_dir = None
    if fam is not None:
        if not files.get("llm_path"):
            ctx.err(keys["llm_path"], f"{path} is a stage-2 ({fam}) checkpoint: set the local LLM folder")
            return
        llm_dir = ctx.existing(keys["llm_path"], files["llm_path"], "LLM folder")
        width = shapes[f"{fam}_proj.weight"][0]
        if llm_dir is None or not check_llm_dir(
            ctx, keys["llm_path"], llm_dir, fam, width, f"{path.name} ({fam}_proj)"
        ):
            return
    if files.get("bert_dir") and (b := ctx.existing(keys["bert_dir"], files["bert_dir"], "BERT folder")):
        check_bert_dir(ctx, keys["bert_dir"], b, shapes["query_tokens"][-1], weights=False)
    try:
        scale = {"model_scale": ctx.scale} if ctx.scale != "full" else {}  # sizes the shapes cannot give
        cfg = _infer_lavis_config(as_meta(shapes), as_meta(vis), str(llm_dir or ""), image_size or None, **scale)
    except (LoadError, KeyError, AttributeError) as e:
        ctx.err(key, f"{path}: architecture not recognised: {e}")
        return
    preset = PRESETS.get(row) or PRESETS.get(row.split("_")[0])  # a row named after a preset: vitg_opt2.7b, vitl
    preset = scaled(preset, ctx.scale) if preset is not None else None
    if preset is not None and preset.vision.width != cfg.vision.width:
        ctx.err(key, f"row '{row}' names a ViT of width {preset.vision.width}; {path.name} is built on width "
                     f"{cfg.vision.width}")  # fmt: skip
    kind = "stage1" if cfg.llm is None else "stage2"
    if not _kind_ok(ctx, key, kind, task, path) or (model := meta_model(ctx, key, cfg, kind)) is None:
        return
    mapped, _ = lavis_to_ours(as_meta({k: s for k, s in shapes.items() if k not in LAVIS_EXPECTED_UNUSED}), cfg.vision)
    from_file_vit = own_vit  # else the tower comes from the ViT file, checked below

    def absent_ok(k: str) -> bool:
        top = k.split(".")[0]
        return top in ("cls", "temp", "language_model") or (top == "vision_model" and not from_file_vit)

    gap = compare({k: tuple(v.shape) for k, v in mapped.items()}, _shapes_of(model), absent_ok=absent_ok)
    if gap:
        ctx.err(key, f"{path} does not fit the architecture inferred from it: {gap}")
    if vis:
        check_vision_file(ctx, keys["vision_weights"], vis_path, cfg.vision, f"{path.name}")


# ----------------------------------------------------------------------------------------------------------------
# GPUs


def estimate_bytes(model, train: bool) -> int:
    """GPU bytes of weights (and, training, fp32 grads + two AdamW moments of the trainable ones) per process.

    Frozen ViT and LLM at 2 bytes (fp16 / bf16 on a GPU, ``blip2lib.precision``), everything else fp32. Activations
    are not included: they depend on batch size and sequence lengths, and come on top.
    """
    cfg, total = model.config, 0
    for name, p in model.named_parameters():
        if train and p.requires_grad:
            total += p.numel() * 16  # fp32 weight, grad, exp_avg, exp_avg_sq
        elif name.startswith("vision_model.") and cfg.vision.precision != "fp32" and not p.requires_grad:
            total += p.numel() * 2
        elif name.startswith("language_model.") and cfg.llm.precision != "fp32":
            total += p.numel() * 2
        else:
            total += p.numel() * 4
    return total


def check_gpus(ctx, num_gpus: int, models: list, train: bool = False) -> None:
    """``num_gpus`` against the GPUs torch sees, and the per-process memory estimate against the smallest GPU."""
    if not torch.cuda.is_available():
        if num_gpus > 1:
            ctx.err("num_gpus", f"{num_gpus} GPUs asked, but CUDA is not available on this machine "
                                "(torch.cuda.is_available() is False)")  # fmt: skip
        return  # one process: a CPU run (toy / smoke runs are meant for it)
    count = torch.cuda.device_count()
    if num_gpus > count:
        ctx.err("num_gpus", f"{num_gpus} GPUs asked, this machine has {count}")
    if not models:
        return
    need = max(estimate_bytes(m, train) for m in models)
    have = min(torch.cuda.get_device_properties(i).total_memory for i in range(min(max(num_gpus, 1), count)))
    text = (f"about {need / 2**30:.1f} GiB per process for weights{' and optimizer state' if train else ''} "
            f"(activations come on top), GPU has {have / 2**30:.1f} GiB")  # fmt: skip
    (ctx.err if need > have else ctx.note)("num_gpus", text)
