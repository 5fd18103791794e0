"""Preflight: check everything a params file names before any kernel starts, without loading a model.

``python -m blip2lib.workbook check PARAMS...`` (and ``run`` / ``run-all`` before they start a kernel) lists every
problem at once, each naming the params file and the key (and the row of a table's ``checkpoints``):

* paths exist: weights, LLM and BERT directories, ``data_root`` with the split's annotation files and image
  folders, pre-training shards, ``init_from`` / run-folder checkpoints (a run folder that another params file of
  the same batch produces is reported as "produced by", not as an error);
* checkpoint files are readable in their format (safetensors header, ``.pth`` with ``weights_only=True`` and
  ``mmap=True``, transformers ``config.json``) and their keys and shapes fit the configured architecture: the
  architecture is built on the meta device and compared key by key (:mod:`.preflight_weights`);
* annotation entries validate against ``blip2lib.data.FORMATS`` (huge files only by a leading prefix, and the
  problem list says so: :mod:`.preflight_data`);
* LLM and BERT directories hold a config and tokenizer files; Java is on PATH where captions are scored;
* ``num_gpus`` against the GPUs torch sees, and an estimate of GPU memory per process against theirs.

Toy and tiny models, the toy world (``data_root: ""``) and synthetic data are produced on demand: nothing to check.
No tensor data is read: safetensors headers, and ``.pth`` files memory-mapped (only their key names and shapes).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS, ParamsError, load_params_yaml
from ..data import FORMATS
from . import preflight_data as pd
from . import preflight_weights as pw
from .run import REPO_ROOT

log = logging.getLogger(__name__)

ON_DEMAND_DATA = ("toy", "synthetic", "")  # train_data / val_data the code builds itself


@dataclass(frozen=True)
class Problem:
    """One finding: ``level`` "error" stops a run, "note" is only shown (pending upstream runs, estimates...)."""

    params: str
    key: str
    message: str
    level: str = "error"

    def __str__(self) -> str:
        return f"{'' if self.level == 'error' else 'note: '}{self.params}: {self.key}: {self.message}"


class PreflightFailed(RuntimeError):
    """At least one params file of a run names something missing or unfit; ``problems`` holds every finding."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        errors = [p for p in problems if p.level == "error"]
        super().__init__(f"preflight found {len(errors)} problem(s):\n" + "\n".join(f"  {p}" for p in errors))


@dataclass
class _Ctx:
    """Where one params file's findings go, and how its paths resolve."""

    shown: str
    root: Path
    runs: Path
    batch: set[Path]
    hardware: bool
    problems: list[Problem] = field(default_factory=list)
    models: list = field(default_factory=list)  # meta-device models built for this file (GPU memory estimate)
    scale: str = "full"  # the params' model_scale, where the library has that size override (dress rehearsal)

    def err(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.shown, key, message))

    def note(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.shown, key, message, "note"))

    def path(self, text: str) -> Path:
        """A params path: absolute as given, ``runs/...`` under the runs root, anything else under the repo root."""
        p = Path(text)
        if p.is_absolute():
            return p
        if p.parts and p.parts[0] == "runs":
            return self.runs.joinpath(*p.parts[1:])
        return self.root / p

    def producer(self, path: Path) -> Path | None:
        """The params file whose run folder holds ``path`` (``runs/<notebook>/<variant>/...``), if there is one."""
        try:
            parts = path.resolve().relative_to(self.runs.resolve()).parts
        except ValueError:
            return None
        candidate = self.root / "params" / parts[0] / f"{parts[1]}.yaml" if len(parts) >= 2 else None
        return candidate if candidate is not None and candidate.exists() else None

    def existing(self, key: str, text: str, what: str, missing_ok: str = "") -> Path | None:
        """``text`` resolved when it exists; otherwise one finding (a pending upstream run is only a note)."""
        path = self.path(text)
        if path.exists():
            return path
        producer = self.producer(path)
        if producer is not None and producer.resolve() in self.batch:
            self.note(
                key, f"{text} does not exist yet: produced by {_rel(producer, self.root)} (checked in this batch)"
            )
        elif missing_ok:
            self.note(key, f"{text} does not exist: {missing_ok}")
        elif producer is not None:
            self.err(key, f"{what} {text} does not exist: produced by {_rel(producer, self.root)}, which has not run "
                          "(run it first, or run / check both together)")  # fmt: skip
        else:
            self.err(key, f"{what} {text} does not exist ({path})")
        return None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def check(params_paths: Iterable[str | Path], root: Path = REPO_ROOT, runs: Path | None = None,
          hardware: bool = True, notebooks: list[str] | None = None,
          overrides: list[dict] | dict | None = None) -> list[Problem]:  # fmt: skip
    """Every finding (errors and notes) for the given params files, checked as one batch.

    Args:
        params_paths: params files (a run-all's whole variant is one batch: upstream run folders of files in the
            batch are "produced by", not missing).
        root: repository root (relative paths in params files start there).
        runs: runs root (``runs/...`` paths in params files are read under it; default ``<root>/runs``).
        hardware: check ``num_gpus`` and GPU memory against this machine (off for CPU rehearsals of GPU runs).
        notebooks: the notebook of each params file (default: its folder's name, ``params/<notebook>/``).
        overrides: values applied over each file's own, so that the effective params are checked: one mapping for
            every file, or one per file (the runner passes each job's typed ``-p`` / ``--runs`` values).

    Returns:
        Findings in file order; ``level == "error"`` ones stop a run.
    """
    root = Path(root)
    runs = Path(runs) if runs is not None else root / "runs"
    paths = [Path(p) if Path(p).is_absolute() or Path(p).exists() else root / p for p in params_paths]
    batch = {p.resolve() for p in paths}
    problems: list[Problem] = []
    pd.clear_cache()  # a new check sees the file system anew
    library = logging.getLogger("blip2lib")  # the loaders' info lines (dropped blocks, LLM built) are not findings
    level = library.level
    library.setLevel(max(level, logging.WARNING))
    try:
        per_file = overrides if isinstance(overrides, list) else [overrides or {}] * len(paths)
        for i, path in enumerate(paths):
            problems += _check_file(path, i, root, runs, batch, hardware, notebooks, per_file[i])
    finally:
        library.setLevel(level)
    return problems


def _check_file(path: Path, i: int, root: Path, runs: Path, batch: set, hardware: bool, notebooks: list | None,
                overrides: dict | None) -> list[Problem]:  # fmt: skip
    """The findings of one params file (the ``i``-th of the batch)."""
    from .schemas import schema_for

    ctx = _Ctx(_rel(path, root), root, runs, batch, hardware)
    try:
        schema = schema_for(notebooks[i] if notebooks else path.parent.name)
        values = {**load_params_yaml(path), **(overrides or {})}
        if "notebook" not in schema.__dataclass_fields__:
            values.pop("notebook", None)  # a file outside params/ may name its notebook: not a parameter
        params = schema.from_dict(values, source=str(path))
    except KeyError as e:
        ctx.err("(file)", str(e.args[0]))
    except (ParamsError, OSError) as e:
        ctx.err("(file)", str(e))
    else:
        _check_params(ctx, params)
    return ctx.problems


def preflight(params_paths: Iterable[str | Path], root: Path = REPO_ROOT, runs: Path | None = None,
              hardware: bool = True, **kw) -> list[Problem]:  # fmt: skip
    """:func:`check` (``kw``: its ``notebooks`` / ``overrides``), notes logged; :class:`PreflightFailed` on errors."""
    problems = check(params_paths, root, runs, hardware, **kw)
    for p in problems:
        if p.level == "note":
            log.info("[pre ] %s", p)
    if any(p.level == "error" for p in problems):
        raise PreflightFailed(problems)
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Per notebook kind


def _check_params(ctx: _Ctx, p) -> None:
    from ..train import TrainParams
    from .schemas import ExploreParams, ParityParams, PrepareDataParams, _AblationParams, _TableParams

    ctx.scale = getattr(p, "model_scale", "full")
    if p.data_root:
        ctx.existing("data_root", p.data_root, "data folder")
    if isinstance(p, TrainParams):
        _check_training(ctx, p)
    elif isinstance(p, _TableParams):
        _check_table(ctx, p)
    elif isinstance(p, _AblationParams):
        _check_ablation(ctx, p)
    elif isinstance(p, ExploreParams):
        for key in ("checkpoint", "stage1_checkpoint"):
            task = "retrieval" if key == "stage1_checkpoint" else "vqa"
            fallback = "the notebook falls back to a random tiny model" if p.missing_ok else ""
            _check_checkpoint(ctx, key, {"checkpoint": getattr(p, key)}, task, fallback)
    elif isinstance(p, ParityParams):
        for i, ckpt in enumerate(p.checkpoints):
            if not ckpt.startswith("tiny"):
                skip = "the notebook skips it (skip_missing)" if p.skip_missing else ""
                _check_checkpoint(ctx, f"checkpoints[{i}]", {"checkpoint": ckpt}, "", skip)
    elif isinstance(p, PrepareDataParams) and p.src_root:
        ctx.existing("src_root", p.src_root, "folder of official downloads")
    if ctx.hardware and not isinstance(p, TrainParams):  # training estimates its own model's memory
        pw.check_gpus(ctx, p.num_gpus, ctx.models)


def _stage_config(p):
    """The preset's configuration as ``blip2lib.assemble`` shapes it for ``p.stage`` (text path, LLM, image size)."""
    import dataclasses

    from ..assemble import GENERATIVE

    cfg = pw.scaled(PRESETS[p.model], getattr(p, "model_scale", "full"))
    vision = dataclasses.replace(cfg.vision, image_size=p.image_size, freeze=p.freeze_vit)
    qformer = dataclasses.replace(cfg.qformer, use_text_input=True) if p.stage == "vqa_ft" else cfg.qformer
    llm = cfg.llm if p.stage in GENERATIVE else None
    return cfg.replace(vision=vision, qformer=qformer, llm=llm)


def _check_training(ctx: _Ctx, p, prefix: str = "") -> None:
    """A training stage (10–32, and each variant of an ablation): weights, parent runs, data, GPUs."""
    import dataclasses

    real = p.model not in ("toy", "tiny")
    if real and p.model not in PRESETS:
        ctx.err(f"{prefix}model", f"'{p.model}' is not toy, tiny or a preset ({sorted(PRESETS)})")
        real = False
    cfg = model = None
    if real:
        cfg = _stage_config(p)
        for key, what in (("vision_weights", "ViT file"), ("bert_dir", "bert-base-uncased folder"),
                          ("llm_path", "LLM folder")):  # fmt: skip
            if not getattr(p, key) and (key != "llm_path" or cfg.llm is not None):
                ctx.err(prefix + key, f"required for model '{p.model}' (stage {p.stage}): a local {what}")
        if p.vision_weights and (vw := ctx.existing(prefix + "vision_weights", p.vision_weights, "ViT file")):
            pw.check_vision_file(ctx, prefix + "vision_weights", vw, cfg.vision, f"model '{p.model}'")
        llm_ok = cfg.llm is None
        if cfg.llm is not None and p.llm_path and (d := ctx.existing(prefix + "llm_path", p.llm_path, "LLM folder")):
            llm_ok = pw.check_llm_dir(ctx, prefix + "llm_path", d, cfg.llm.family, cfg.llm.hidden_size, p.model)
            cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, path=str(d)))  # resolved: not a Hub id to look up
        if p.bert_dir and (d := ctx.existing(prefix + "bert_dir", p.bert_dir, "BERT folder")):
            pw.check_bert_dir(ctx, prefix + "bert_dir", d, cfg.qformer.hidden_size, weights=not p.init_from)
        if llm_ok:
            model = pw.meta_model(ctx, prefix + "model", cfg, "stage1" if cfg.llm is None else "stage2")
    for part in [s.strip() for s in p.init_from.split(",") if s.strip()]:
        if part == "{parent}":
            continue  # an ablation's parent run, trained by the notebook itself
        if (run := ctx.existing(prefix + "init_from", part, "parent run")) is not None:
            pw.check_init_from(ctx, prefix + "init_from", run, model)
    _check_training_data(ctx, p, prefix)
    if p.stage == "caption_ft" and p.val_data and not shutil.which("java"):
        ctx.note(prefix + "val_data", "Java is not on PATH: the caption validation (CIDEr + BLEU-4, PTB tokenizer) "
                                      "will be skipped and checkpoints not selected by it")  # fmt: skip
    if ctx.hardware and not prefix:
        pw.check_gpus(ctx, p.num_gpus, [model] if model is not None else [], train=True)


def _check_training_data(ctx: _Ctx, p, prefix: str) -> None:
    from ..assemble import is_shard_spec

    data_root = ctx.path(p.data_root) if p.data_root else ctx.root
    if p.data_root and not data_root.exists():
        return  # already reported under data_root
    if p.train_data not in ON_DEMAND_DATA:
        if is_shard_spec(p.train_data):
            pd.check_shards(ctx, prefix + "train_data", p.train_data, data_root)
        else:
            fields, label = pd.fields_for(p.train_data, p.stage)
            if p.train_data.endswith((".jsonl", ".csv")):  # a user manifest (blip2lib.data.ManifestDataset)
                fields, label = {}, "the manifest format"
            images = data_root / p.images_root
            pd.check_annotations(ctx, prefix + "train_data", data_root / p.train_data, fields, label, images)
    if p.val_data not in ON_DEMAND_DATA:
        fields, label = pd.fields_for(p.val_data, "val")
        pd.check_annotations(ctx, prefix + "val_data", data_root / p.val_data, fields, label, data_root / p.images_root)


def _rows(p) -> list[tuple[str, dict, dict]]:
    """``(row, files, keys)`` of a table: a row's own files, else the file-level ones (``llm_path`` ...).

    ``keys`` names where each value came from: ``checkpoints.<row>.llm_path`` or ``llm_path (row <row>)``.
    """
    out = []
    for name, entry in p.checkpoints.items():
        own = dict(entry) if isinstance(entry, dict) else {"checkpoint": entry}
        files, keys = {"checkpoint": own.get("checkpoint", "")}, {"checkpoint": f"checkpoints.{name}"}
        for k in ("vision_weights", "llm_path", "bert_dir"):
            if own.get(k):
                files[k], keys[k] = own[k], f"checkpoints.{name}.{k}"
            else:
                files[k], keys[k] = getattr(p, k), f"{k} (row {name})"
        if isinstance(entry, dict):
            keys["checkpoint"] = f"checkpoints.{name}.checkpoint"
            out += [
                (name, {"unknown": k}, {"unknown": f"checkpoints.{name}.{k}"}) for k in sorted(set(own) - set(files))
            ]
        out.append((name, files, keys))
    return out


def _table_task(p) -> str:
    from .schemas import CaptioningParams, RetrievalTableParams

    return (
        "retrieval" if isinstance(p, RetrievalTableParams) else "caption" if isinstance(p, CaptioningParams) else "vqa"
    )


def _check_table(ctx: _Ctx, p) -> None:
    """An evaluation table (41–44): every row's files, the split's files, Java for caption scoring."""
    task = _table_task(p)
    for name, files, keys in _rows(p):
        if "unknown" in files:
            ctx.err(keys["unknown"], "unknown row key (known: checkpoint, vision_weights, llm_path, bert_dir)")
            continue
        if not files["checkpoint"]:
            ctx.err(keys["checkpoint"], "no checkpoint given for this row")
            continue
        _check_checkpoint(ctx, keys["checkpoint"], files, task, "", keys, row=name, image_size=p.image_size)
    if p.data_root and ctx.path(p.data_root).exists():
        data_root = ctx.path(p.data_root)
        _check_split(ctx, "split", p.split, data_root, p.images_root, task)
        transfer = getattr(p, "transfer_split", "")
        if transfer.endswith(".json"):
            fmt = FORMATS["coco_karpathy_test"]  # the toy NoCaps analogue is a Karpathy-format file
            images = data_root / fmt["images_root"]
            label = "FORMATS['coco_karpathy_test']"
            pd.check_annotations(ctx, "transfer_split", data_root / transfer, fmt["fields"], label, images)
            pd.check_gt(ctx, "transfer_split", data_root / transfer.replace(".json", "_gt.json"))
        elif transfer:
            _check_split(ctx, "transfer_split", transfer, data_root, "", task)
    if task == "caption":
        from ..evaluate.caption import metric_groups, spice_models_available

        try:
            metric_groups(p.metrics)  # the evaluator's own check (also made when the params file is loaded)
        except ValueError as e:
            ctx.err("metrics", str(e))
        if not shutil.which("java"):
            asked = [m for m in p.metrics if m in ("METEOR", "SPICE")]
            also = f"; {' and '.join(asked)} asked here" if asked else ""
            ctx.err("metrics", f"Java is not on PATH: caption scoring runs java (pycocoevalcap's PTB tokenizer{also}); "
                               "install a JRE >= 8")  # fmt: skip
        elif "SPICE" in p.metrics and not (spice := spice_models_available())[0]:
            ctx.note("metrics", f"SPICE will be reported as not computed: {spice[1]}")


def _check_split(ctx: _Ctx, key: str, split: str, data_root: Path, images_root: str, task: str) -> None:
    if split not in FORMATS:
        ctx.err(key, f"'{split}' is not a blip2lib.data.FORMATS key ({sorted(FORMATS)})")
        return
    fmt = FORMATS[split]
    images = data_root / (images_root or fmt.get("images_root", ""))
    pd.check_annotations(ctx, key, data_root / fmt["file"], fmt["fields"], f"FORMATS['{split}']", images)
    if task == "caption" and f"{split}_gt" in FORMATS:
        pd.check_gt(ctx, key, data_root / FORMATS[f"{split}_gt"]["file"])


def _check_ablation(ctx: _Ctx, p) -> None:
    """Each variant's training params (base + overrides), and the parent run's."""
    from ..train import TrainParams

    runs = {"parent": p.parent} if p.parent else {}
    runs.update({f"variants.{name}": {**p.base, **(over or {})} for name, over in p.variants.items()})
    for key, values in runs.items():
        try:
            scale = {"model_scale": ctx.scale} if ctx.scale != "full" else {}  # as the ablation passes it on
            tp = TrainParams.from_dict({**values, "num_gpus": p.num_gpus, **scale}, f"{key} of {ctx.shown}")
        except ParamsError as e:
            ctx.err(key, str(e))
            continue
        _check_training(ctx, tp, prefix=f"{key}.")
    if p.data_root and ctx.path(p.data_root).exists():
        _check_split(ctx, "eval_split", p.eval_split, ctx.path(p.data_root), "", p.eval_task)


def _check_checkpoint(ctx: _Ctx, key: str, files: dict, task: str, missing_ok: str = "",
                      keys: dict | None = None, row: str = "", image_size: int = 0) -> None:  # fmt: skip
    """A checkpoint of any source (run folder, transformers dir, LAVIS file) with its frozen-tower files.

    ``missing_ok``: why an absent checkpoint is fine (a note then, not an error); ``keys``: the params key of each of
    ``files`` (default: ``key`` for all of them).
    """
    text = files["checkpoint"]
    if text == "tiny":
        return
    keys = keys or {k: key for k in ("checkpoint", "vision_weights", "llm_path", "bert_dir")}
    path = ctx.existing(key, text, "checkpoint", missing_ok=missing_ok)
    if path is not None:
        pw.check_checkpoint(ctx, path, files, keys, task, row, image_size)
