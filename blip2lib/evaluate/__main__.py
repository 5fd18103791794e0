"""Command line: ``python -m blip2lib.evaluate {vqa,caption,retrieval} --params FILE``.

FILE is a flat YAML mapping validated like every ``blip2lib.config.Params`` (an unknown key or a wrong type is an
error naming the file and the key). Multi-GPU: ``torchrun --nproc_per_node N -m blip2lib.evaluate vqa --params F``
(each rank generates its shard; re-running with the same ``out_dir`` resumes). Example (zero-shot VQAv2 val)::

    checkpoint: /models/blip2-flan-t5-xl            # blip2lib.from_pretrained source, or "tiny" (smoke test)
    data_root: /data                                # layout of blip2lib/data/README.md
    split: vqa_val_eval                             # a blip2lib.data.FORMATS key
    recipe: paper                                   # paper | lavis; keys below override it
    batch_size: 64                                  # or auto: from free GPU memory (16 on a CPU)
    out_dir: runs/eval/vqav2_val_flant5xl

Exit status: 0 done; 2 a user error (the message names the file and the key or entry); 3 unreadable images were
skipped (the scores exclude them; ``--allow-incomplete`` accepts that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from blip2lib.errors import add_verbosity, log_level, run_guarded

TASKS = ("caption", "retrieval", "vqa")  # the keys of SCHEMAS below


def build_parser() -> argparse.ArgumentParser:
    """The command line (torch-free: ``--help`` is answered before torch loads)."""
    parser = argparse.ArgumentParser(prog="python -m blip2lib.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--params", required=True, help="flat YAML params file")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="exit 0 even when unreadable images were skipped (default: exit status 3)")  # fmt: skip
    add_verbosity(parser)
    return parser


if __name__ == "__main__":  # python -m: --help and usage errors exit here, before the torch imports below
    build_parser().parse_args()

import torch  # noqa: E402

from blip2lib import dist  # noqa: E402
from blip2lib.config import Params, ParamsError, tiny_config  # noqa: E402
from blip2lib.data import (  # noqa: E402
    FORMATS,
    CaptionEvalDataset,
    CaptionProcessor,
    GQAEvalDataset,
    NoCapsDataset,
    QuestionProcessor,
    RetrievalEvalDataset,
    VQAEvalDataset,
    image_eval_transform,
)
from blip2lib.evaluate.caption import ALL_METRICS, CaptionDecoding, metric_groups  # noqa: E402
from blip2lib.evaluate.drivers import run_caption, run_retrieval, run_vqa  # noqa: E402
from blip2lib.evaluate.integrity import checkpoint_identity, file_identity  # noqa: E402
from blip2lib.evaluate.pipeline import PIPELINES  # noqa: E402
from blip2lib.evaluate.retrieval import FUSIONS  # noqa: E402
from blip2lib.evaluate.vqa import VQADecoding  # noqa: E402
from blip2lib.generation import ENGINES, LENGTH_RULES  # noqa: E402


@dataclass
class EvalParams(Params):
    """Keys shared by the three evaluations (plus ``Params``' run_dir, seed, data_root, …)."""

    checkpoint: str = "tiny"  # path for blip2lib.from_pretrained, or "tiny" (random tiny model + tokenizers)
    family: str = "opt"  # LLM family of the "tiny" model: opt | t5
    split: str = ""  # a blip2lib.data.FORMATS key, e.g. vqa_val_eval, gqa_testdev, coco_karpathy_test
    ann_file: str = ""  # override FORMATS[split]["file"] (relative to data_root, or absolute)
    images_root: str = ""  # override FORMATS[split]["images_root"]
    image_size: int = 0  # 0 -> the checkpoint's (LAVIS files: from the pos-embed); tiny: 28
    vision_weights: str = ""  # LAVIS / training checkpoints: local ViT file (blip2lib.from_pretrained)
    llm_path: str = ""  # LAVIS / training checkpoints: local LLM directory
    bert_dir: str = ""  # local bert-base-uncased directory (Q-Former tokenizer)
    batch_size: int | str = 16  # vqa / caption also take "auto" (free GPU memory; 16 on a CPU)
    num_workers: int = 0
    out_dir: str = ""  # "" -> run_dir
    device: str = "auto"  # auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda | cuda:N
    autocast: str = ""  # "" | fp16 | bf16 (generation only)
    progress: bool = True
    dist_timeout_s: float = float(dist.DEFAULT_TIMEOUT_S)  # several processes: seconds a rank waits for a hung one

    ranges = {"batch_size": "[1, inf)", "num_workers": "[0, inf)",
              "image_size": "[0, inf) (0 keeps the checkpoint's own)", "num_beams": "[1, inf)",
              "max_new_tokens": "[1, inf)", "min_new_tokens": "[0, inf)", "repetition_penalty": "(0, inf)",
              "k": "[1, inf)", "text_max_len": "[1, inf)", "itm_batch_size": "[1, inf)"}  # fmt: skip


@dataclass
class VQAParams(EvalParams):
    """Zero-shot VQA; decoding keys left at None take the recipe's value."""

    recipe: str = "paper"  # paper (lengths = generated tokens) | lavis (lengths counted as LAVIS HEAD does)
    prompt: str = ""  # "" -> the recipe's prompt for the family
    num_beams: int | None = None
    length_penalty: float | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    length_rule: str | None = None  # new | lavis_head | lavis_paper_time (blip2lib.generation.new_token_bounds)
    decode_engine: str = "auto"  # auto | hf | static (blip2lib.generation engine: the same answers)
    pipeline: str = "auto"  # auto | grouped (one soft prompt per image) | per_question (blip2lib.evaluate.pipeline)
    annotations: str = ""  # official annotation file (relative to data_root); "" -> the split file's answers
    lemmatize: bool | None = None  # None -> True for okvqa splits (OK-VQA answers are lemmatised)


@dataclass
class CaptionParams(EvalParams):
    """Captioning; decoding keys left at None take the recipe's value."""

    recipe: str = "paper"  # paper (lengths = generated tokens) | lavis (lengths counted as LAVIS HEAD does)
    prompt: str | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    length_rule: str | None = None  # new | lavis_head | lavis_paper_time (blip2lib.generation.new_token_bounds)
    decode_engine: str = "auto"  # auto | hf | static (blip2lib.generation engine: the same captions)
    gt_file: str = ""  # "" -> FORMATS[split + "_gt"] when it exists; "none" -> no scoring
    metrics: list[str] = field(default_factory=lambda: list(ALL_METRICS))


@dataclass
class RetrievalParams(EvalParams):
    """Retrieval: captions go through ``blip_caption`` (``CaptionProcessor``, 50 words) as in LAVIS's eval."""

    k: int = 128
    fusion: str = "itm+itc"  # itm+itc | itm | itc
    text_max_len: int = 35
    itm_batch_size: int = 128


SCHEMAS = {"vqa": VQAParams, "caption": CaptionParams, "retrieval": RetrievalParams}  # keys: TASKS
_CHOICES = {"family": ("opt", "t5"), "recipe": ("paper", "lavis"), "autocast": ("", "fp16", "bf16"), "fusion": FUSIONS,
            "length_rule": (None, *LENGTH_RULES), "decode_engine": ENGINES, "pipeline": PIPELINES}  # fmt: skip


def _check(p: EvalParams, source: str) -> None:
    for key, choices in _CHOICES.items():
        if hasattr(p, key) and getattr(p, key) not in choices:
            raise ParamsError(f"{source}: key '{key}' must be one of {list(choices)}, got {getattr(p, key)!r}")
    if isinstance(p.batch_size, str) and (p.batch_size != "auto" or isinstance(p, RetrievalParams)):
        allowed = "a positive integer" + ("" if isinstance(p, RetrievalParams) else " or 'auto'")
        raise ParamsError(f"{source}: key 'batch_size' must be {allowed}, got {p.batch_size!r}")
    if p.dist_timeout_s <= 0:
        raise ParamsError(f"{source}: key 'dist_timeout_s' must be > 0 seconds, got {p.dist_timeout_s}")
    if not p.data_root:
        raise ParamsError(f"{source}: key 'data_root' is required (folder laid out as blip2lib/data/README.md)")
    if not (p.out_dir or p.run_dir):
        raise ParamsError(f"{source}: key 'out_dir' is required")
    if p.split not in FORMATS and not (p.ann_file and p.images_root):
        raise ParamsError(
            f"{source}: key 'split' must be a blip2lib.data.FORMATS key (or set ann_file and "
            f"images_root), got {p.split!r}"
        )
    if isinstance(p, CaptionParams):
        try:
            metric_groups(p.metrics)
        except ValueError as e:
            raise ParamsError(f"{source}: key 'metrics': {e}") from e


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{dist.get_local_rank()}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _from_pretrained():
    import blip2lib

    fn = getattr(blip2lib, "from_pretrained", None)
    if fn is None:
        try:
            from blip2lib.pretrained import from_pretrained as fn
        except ImportError:
            return None
    return fn


def load_model(p: EvalParams, task: str, source: str = "<params>"):
    """(model, Q-Former tokenizer or None) from ``p.checkpoint``; "tiny" = a random tiny model for smoke tests."""
    from blip2lib.model import Blip2, Blip2QFormerModel

    if p.checkpoint == "tiny":
        from blip2lib.toy.synthetic import tiny_bert_tokenizer, tiny_llm_tokenizer

        torch.manual_seed(p.seed)
        cfg = tiny_config(None if task == "retrieval" else p.family, image_size=p.image_size or 28)
        if task == "retrieval":
            return Blip2QFormerModel(cfg), tiny_bert_tokenizer()
        return Blip2(cfg, tokenizer=tiny_llm_tokenizer(p.family)), None
    from_pretrained = _from_pretrained()
    if from_pretrained is None:
        raise ParamsError(
            f"{source}: checkpoint {p.checkpoint!r}: loading from a path needs blip2lib.from_pretrained "
            "(blip2lib/pretrained.py), which this installation does not have; use checkpoint: tiny, or call "
            "blip2lib.evaluate.run_vqa / run_caption / run_retrieval on an in-memory model"
        )
    extra = {k: getattr(p, k) for k in ("vision_weights", "llm_path", "bert_dir") if getattr(p, k)}
    model = from_pretrained(p.checkpoint, image_size=p.image_size or None, model_scale=p.model_scale, **extra)
    want = Blip2QFormerModel if task == "retrieval" else Blip2
    if not isinstance(model, want):
        raise ParamsError(
            f"{source}: checkpoint {p.checkpoint!r} holds a {type(model).__name__}; {task} needs a "
            f"{want.__name__} ({'stage-1 / retrieval' if task == 'retrieval' else 'stage-2'} model)"
        )
    if task == "retrieval":  # stage-1 models carry the BERT tokenizer as .tokenizer (blip2lib.pretrained)
        tok = getattr(model, "qformer_tokenizer", None) or getattr(model, "tokenizer", None)
        if tok is None:
            raise ParamsError(f"{source}: the checkpoint has no Q-Former tokenizer; set bert_dir")
        return model, tok
    if model.tokenizer is None:
        raise ParamsError(f"{source}: the checkpoint has no LLM tokenizer; set llm_path")
    return model, None


def rehearsal_stand_ins(p: EvalParams, source: str = "<params>") -> EvalParams:
    """Under ``model_scale: rehearsal`` only: the two inputs a shortened CPU run cannot have, replaced and logged.

    A dress rehearsal trains a few steps, so a checkpoint named by a paper step (``.../checkpoints/ckpt-16000`` of a
    Figure 5 curve) does not exist: the newest checkpoint of that folder stands in. A host without spaCy's
    ``en_core_web_sm`` cannot lemmatise OK-VQA answers: the rehearsal scores them unlemmatised. A real run
    (``model_scale: full``) never takes either path: it fails with the missing file or the spaCy install command.
    """
    import logging
    import re

    if p.model_scale != "rehearsal":
        return p
    log = logging.getLogger(__name__)
    path = Path(p.checkpoint)
    if not path.exists() and re.fullmatch(r"ckpt-\d+", path.name) and path.parent.is_dir():
        from blip2lib.checkpoint import latest_checkpoint

        newest = latest_checkpoint(path.parent)
        if newest is not None:
            log.warning("%s: rehearsal: %s was not trained (a few steps only); %s stands in", source, path, newest)
            p = dataclasses.replace(p, checkpoint=str(newest))
    if getattr(p, "lemmatize", False) is None and p.split.startswith("okvqa"):  # VQA params only
        from blip2lib.evaluate.vqa import LemmatizerUnavailable, load_lemmatizer

        try:
            load_lemmatizer()
        except LemmatizerUnavailable:
            log.warning("%s: rehearsal: spaCy's en_core_web_sm is missing; OK-VQA answers are scored unlemmatised "
                        "(a real run stops here and says how to install it)", source)  # fmt: skip
            p = dataclasses.replace(p, lemmatize=False)
    return p


def _ann_path(p: EvalParams) -> Path:
    return Path(p.data_root) / (p.ann_file or FORMATS.get(p.split, {})["file"])


def run_identity(p: EvalParams) -> dict:
    """Checkpoint and annotation-file identity of a run: recorded in ``result.json``, part of the cache key."""
    if p.checkpoint == "tiny":  # a random model: the seed and family make it
        ckpt = {"checkpoint": "tiny", "seed": p.seed, "family": p.family, "image_size": p.image_size or 28}
    else:
        ckpt = checkpoint_identity(p.checkpoint)
    extra = {k: str(Path(getattr(p, k)).resolve()) for k in ("vision_weights", "llm_path") if getattr(p, k)}
    return {"checkpoint": {**ckpt, **extra}, "ann_file": file_identity(_ann_path(p))}


def build_dataset(p: EvalParams, task: str, image_size: int):
    """The reader for ``p.split`` under ``p.data_root`` with the eval transform.

    Retrieval captions go through ``blip_caption`` (LAVIS ``ret_*_eval.yaml``: lower-case, punctuation, 50 words).
    """
    root = Path(p.data_root)
    fmt = FORMATS.get(p.split, {})
    ann = _ann_path(p)
    images = root / (p.images_root or fmt["images_root"])
    transform = image_eval_transform(image_size)
    if task == "vqa":
        cls = GQAEvalDataset if p.split.startswith("gqa") else VQAEvalDataset
        return cls(images, ann, transform, QuestionProcessor())
    if task == "caption":
        cls = NoCapsDataset if p.split.startswith("nocaps") else CaptionEvalDataset
        return cls(images, ann, transform)
    return RetrievalEvalDataset(images, ann, transform, CaptionProcessor())


def _override(recipe, p: Params, keys: tuple[str, ...], source: str):
    changes = {k: getattr(p, k) for k in keys if getattr(p, k) not in (None, "")}
    new = dataclasses.replace(recipe, **changes)
    return new if new == recipe else dataclasses.replace(new, source=f"{recipe.source}, overridden by {source}")


def run(task: str, params_path: str | Path) -> dict:
    """Validate the params file, load model and data, run the driver; returns the result dict."""
    return run_params(task, SCHEMAS[task].from_yaml(params_path), str(params_path))


def run_params(task: str, p: EvalParams, params_path: str = "<params>") -> dict:
    """Run one evaluation from validated params (notebooks call this; ``params_path`` names the source)."""
    _check(p, str(params_path))
    p = rehearsal_stand_ins(p, str(params_path))
    # Cheap inputs first: the annotation file is read and validated before minutes of model loading. The transform
    # gets the checkpoint's own resolution once the model is known (``image_size: 0``).
    dataset = build_dataset(p, task, p.image_size or 224)
    torch.manual_seed(p.seed)
    model, qformer_tok = load_model(p, task, str(params_path))
    model.place(_device(p.device))
    if model.config.vision.image_size != (p.image_size or 224):
        dataset.transform = image_eval_transform(model.config.vision.image_size)
    out_dir = Path(p.out_dir or p.run_dir)
    common = dict(batch_size=p.batch_size, num_workers=p.num_workers, progress=p.progress, identity=run_identity(p))
    if task == "retrieval":
        return run_retrieval(
            model,
            dataset,
            qformer_tok,
            k=p.k,
            fusion=p.fusion,
            text_max_len=p.text_max_len,
            out_dir=out_dir,
            split_name=p.split,
            itm_batch_size=p.itm_batch_size,
            **common,
        )
    autocast = p.autocast or None
    if task == "vqa":
        base = VQADecoding.paper(model.family) if p.recipe == "paper" else VQADecoding.lavis_head(model.family)
        keys = ("prompt", "num_beams", "length_penalty", "max_new_tokens", "min_new_tokens", "length_rule")
        decoding = _override(base, p, keys, str(params_path))
        annotations = Path(p.data_root) / p.annotations if p.annotations else None
        lemmatize = p.split.startswith("okvqa") if p.lemmatize is None else p.lemmatize
        return run_vqa(
            model,
            dataset,
            decoding,
            out_dir=out_dir,
            split_name=p.split,
            annotations=annotations,
            gqa=p.split.startswith("gqa"),
            lemmatize=lemmatize,
            autocast=autocast,
            pipeline=p.pipeline,
            decode_engine=p.decode_engine,
            **common,
        )
    base = CaptionDecoding.paper() if p.recipe == "paper" else CaptionDecoding.lavis_head()
    keys = ("prompt", "num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty",
            "length_rule")  # fmt: skip
    decoding = _override(base, p, keys, str(params_path))
    gt_key = f"{p.split}_gt"
    if p.gt_file == "none":
        gt = None
    elif p.gt_file:
        gt = Path(p.data_root) / p.gt_file
    else:
        gt = Path(p.data_root) / FORMATS[gt_key]["file"] if gt_key in FORMATS else None
    return run_caption(
        model,
        dataset,
        decoding,
        gt,
        out_dir=out_dir,
        split_name=p.split,
        metrics=tuple(p.metrics),
        autocast=autocast,
        decode_engine=p.decode_engine,
        **common,
    )


def main(argv: list[str] | None = None) -> int:
    """Evaluate; exit 0, 2 on a user error (params, annotations, files), 3 when images were unreadable."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=log_level(args, logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    outcome: dict = {}

    def body() -> int:
        # the collective timeout is a param: read the file before joining the process group
        timeout_s = SCHEMAS[args.task].from_yaml(args.params).dist_timeout_s
        started = dist.init_distributed(timeout_s=timeout_s)
        try:
            with dist.explain_timeouts(f"evaluation {args.task}"):
                outcome["result"] = run(args.task, args.params)
            outcome["main"] = dist.is_main()
        finally:
            if started:
                dist.cleanup()
        return 0

    status = run_guarded(body, args.verbose)
    if status or not outcome.get("main"):
        return status
    result = outcome["result"]
    counts = result.get("counts") or {}
    print(json.dumps({"metrics": result.get("metrics"), "counts": counts}, indent=2, default=str))
    if counts.get("complete", True) or args.allow_incomplete:
        return 0
    bad = (counts.get("bad_samples") or {}).get("count", "some")
    print(f"error: incomplete evaluation: {bad} unreadable sample(s) were skipped and excluded from the scores "
          "(listed in result.json); --allow-incomplete accepts that", file=sys.stderr)  # fmt: skip
    return 3


if __name__ == "__main__":
    sys.exit(main())
