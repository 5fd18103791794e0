"""The evaluation notebooks' library calls: evaluate several checkpoints on one split, tabulate per paper table."""

from __future__ import annotations

from pathlib import Path

from ..evaluate.__main__ import SCHEMAS as EVAL_SCHEMAS
from ..evaluate.__main__ import run_params
from ..paths import safe_name
from .run import TARGETS, Run, compare_to_paper

# The evaluator behind each VQA figure, by (result task, the result's "scorer"); named in the paper comparison.
SCORER_LABELS = {
    ("vqa", "official"): "official VQA evaluator (GT-Vision-Lab)",
    ("vqa", "lavis"): "LAVIS's VQA evaluator",
    ("gqa", "lavis"): "LAVIS's GQA exact match",
}


def resolve_data_root(data_root: str, toy_world: str = "full") -> str:
    """``""`` → the embedded toy world's ``data_root`` (built once, then cached)."""
    if data_root:
        return data_root
    from ..toy import build_toy_world

    return str(build_toy_world(size=toy_world, progress=False).data_root)


def evaluate_checkpoints(task: str, checkpoints: dict[str, str], out_dir: str | Path, **settings) -> dict[str, dict]:
    """Run ``python -m blip2lib.evaluate <task>`` for each named checkpoint; returns name → result dict.

    Args:
        task: ``vqa``, ``caption`` or ``retrieval``.
        checkpoints: model name → checkpoint (a run folder, a transformers dir, a LAVIS file, or ``tiny``), or
            → ``{"checkpoint", "vision_weights", "llm_path", "bert_dir"}`` when models need different local files.
        out_dir: each result goes to ``out_dir/<name>/result.json`` (resumable from cached predictions).
        **settings: any key of the task's params schema (``split``, ``data_root``, decoding overrides …).
    """
    for name in checkpoints:  # every name first: a bad one must not stop the run after others were evaluated
        safe_name(name, "checkpoints", f"{task} evaluation")
    results = {}
    for name, ckpt in checkpoints.items():
        own = ckpt if isinstance(ckpt, dict) else {"checkpoint": ckpt}
        values = {**settings, **own, "out_dir": str(Path(out_dir) / name)}
        params = EVAL_SCHEMAS[task].from_dict(values, source=f"{task} evaluation of '{name}'")
        results[name] = {**run_params(task, params, f"{task}:{name}"), "out_dir": values["out_dir"]}
    return results


def _pick(metrics: dict, key: str):
    for part in key.split("."):  # "lavis.overall": a value nested one level down
        metrics = metrics.get(part) if isinstance(metrics, dict) else None
    return metrics


def metric_table(results: dict[str, dict], keys: list[str] | None = None):
    """One row per model with the chosen metrics (percent; ``"a.b"`` picks a nested one) — what the notebook shows."""
    import pandas as pd

    rows = []
    for name, res in results.items():
        m = res["metrics"] or {}
        pick = keys or [k for k, v in m.items() if isinstance(v, (int, float))]
        rows.append({"model": name, **{k: _pick(m, k) for k in pick}})
    return pd.DataFrame(rows)


_TASK_KEYS = {"vqa": ("recipe",), "caption": ("recipe", "metrics"), "retrieval": ("k", "fusion")}


def evaluate_table(task: str, params, run_dir: str | Path, split: str | None = None, **extra) -> dict[str, dict]:
    """Evaluate every ``params.checkpoints`` entry on ``split`` (default ``params.split``) into ``run_dir``."""
    data_root = resolve_data_root(params.data_root, params.toy_world)
    settings = {"split": split or params.split, "data_root": data_root, "images_root": params.images_root,
                "image_size": params.image_size, "vision_weights": params.vision_weights,
                "llm_path": params.llm_path, "bert_dir": params.bert_dir, "batch_size": params.batch_size,
                "seed": params.seed, "progress": False}  # fmt: skip
    settings.update({k: getattr(params, k) for k in _TASK_KEYS[task] if hasattr(params, k)})
    settings.update(extra)
    folder = Path(settings.get("ann_file") or settings["split"]).stem  # one cache folder per evaluated file
    return evaluate_checkpoints(task, params.checkpoints, Path(run_dir) / folder, **settings)


def transfer_settings(transfer: str) -> dict:
    """Settings for the NoCaps-style transfer split: a FORMATS key, or an annotation file with a ``_gt`` sibling."""
    if not transfer.endswith(".json"):
        return {"split": transfer}
    return {"split": "coco_karpathy_test", "ann_file": transfer, "gt_file": transfer.replace(".json", "_gt.json")}


def flat_metrics(result: dict, prefix: str) -> dict[str, float]:
    """``{prefix}_{metric}`` for every numeric metric of a result (nested per-type dicts flattened one level).

    A VQA result's ``overall`` becomes ``{prefix}_vqa_acc`` (the official evaluator's); LAVIS's figures kept beside
    it under ``"lavis"`` become ``{prefix}_lavis_vqa_acc`` and ``{prefix}_lavis_per_answer_type_*``.
    """
    return _flat(result.get("metrics") or {}, prefix)


def _flat(metrics: dict, prefix: str) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n_questions":
            out[f"{prefix}_{'vqa_acc' if k == 'overall' else k}"] = float(v)
        elif k == "lavis" and isinstance(v, dict):
            out.update(_flat(v, f"{prefix}_lavis"))
        elif isinstance(v, dict):
            out.update({f"{prefix}_{k}_{kk}".replace(" ", "_").replace("/", "_"): float(vv)
                        for kk, vv in v.items() if isinstance(vv, (int, float))})  # fmt: skip
    return out


def vqa_scorers(results: dict[str, dict]) -> dict[str, str]:
    """Metric name (as ``flat_metrics`` records it) -> the evaluator that produced that VQA / GQA accuracy."""
    out = {}
    for name, res in results.items():
        m, task = res.get("metrics") or {}, res.get("task", "vqa")
        if "scorer" in m:
            out[f"{name}_vqa_acc"] = SCORER_LABELS[(task, m["scorer"])]
        if "scorer" in (m.get("lavis") or {}):
            out[f"{name}_lavis_vqa_acc"] = SCORER_LABELS[(task, m["lavis"]["scorer"])]
    return out


def compare_vqa_to_paper(run: Run, targets: dict, results: dict[str, dict], path: Path = TARGETS, show: bool = True):
    """``compare_to_paper`` whose rows also name the evaluator behind each reproduced VQA / GQA accuracy.

    The name goes into the row's ``scorer`` field and after its target label, so the displayed table,
    ``metrics.json`` and the README results block all say which evaluator the comparison used.
    """
    import pandas as pd

    compare_to_paper(run.metrics, targets, path=path, run=run, show=False)
    scorers = vqa_scorers(results)
    for row in run.comparison:
        scorer = scorers.get(row["metric"].split("@")[0])
        if scorer:
            row["scorer"], row["target"] = scorer, f"{row['target']} (ours: {scorer})"
    run.save()
    table = pd.DataFrame(run.comparison)
    if show:
        try:
            from IPython.display import display

            display(table, metadata={"blip2": {"role": "paper-table"}})  # same role as compare_to_paper's table
        except ImportError:
            pass
    return table


def toy_vqa_goals(results: dict, margin: float, toy_world: str = "full") -> dict:
    """Toy goal per model: VQA accuracy ≥ the blind (question-only) accuracy of its LLM family + ``margin``."""
    from ..toy import build_toy_world

    base = build_toy_world(size=toy_world, progress=False).baselines.get("vqa", {})
    goals = {}
    for name, res in results.items():
        family = "t5" if "t5" in name else "opt"
        split = "test" if "test" in res.get("split", "") else "val"
        blind = ((base.get(split) or base.get("test") or {}).get(f"{family}_blind") or {}).get("overall")
        if blind is not None:
            goals[f"{name}_vqa_acc"] = {
                "goal": round(blind + margin, 2),
                "direction": ">=",
                "baseline": blind,
                "label": f"zero-shot VQA ≥ blind {family} LLM + {margin:g} points",
            }
    return goals


def examples(result: dict, data_root: str, n: int = 8) -> tuple[list, list[str]]:
    """Images and "question → answer" / caption strings of the first ``n`` predictions (report galleries)."""
    import json

    from PIL import Image

    from ..data import FORMATS

    out_dir = Path(result["out_dir"]) if "out_dir" in result else None
    fmt = FORMATS.get(result.get("split", ""), {})
    if out_dir is None or not fmt:
        return [], []
    ann = json.loads((Path(data_root) / fmt["file"]).read_text())
    root = Path(data_root) / fmt.get("images_root", "")
    images, texts = [], []
    if result["task"] == "vqa":
        preds = {p["question_id"]: p["answer"] for p in json.loads((out_dir / "predictions.json").read_text())}
        for a in ann:
            if a["question_id"] in preds and len(images) < n:
                images.append(Image.open(root / a["image"]).convert("RGB"))
                texts.append(f"{a['question']} → {preds[a['question_id']]}")
    elif result["task"] == "caption":
        caps = json.loads((out_dir / "captions.json").read_text())[:n]
        by_id = {}
        for a in ann:
            by_id.setdefault(int(Path(a["image"]).stem.split("_")[-1]), a["image"])
        for c in caps:
            if c["image_id"] in by_id:
                images.append(Image.open(root / by_id[c["image_id"]]).convert("RGB"))
                texts.append(c["caption"])
    return images, texts


# ----------------------------------------------------------------------------------------------------------------
# The README's "paper path" table: which released file reproduces which paper cell, with which params file. It is
# read from the params files (their checkpoints and paper_targets), never typed; tests/unit/test_params_paper.py
# checks the README against it.

# Where each released checkpoint comes from, by the file or folder name the params files give it. LAVIS: the
# ``load_model`` name / ``model_type`` whose model-zoo yaml (lavis/configs/models/blip2/) downloads the file; Hub: the
# transformers repository (converted from the LAVIS file of the same model).
RELEASED = {
    "blip2_pretrained.pth": "LAVIS blip2_image_text_matching / pretrain",
    "blip2_pretrained_vitL.pth": "LAVIS blip2_image_text_matching / pretrain_vitL",
    "blip2_pretrained_opt2.7b.pth": "LAVIS blip2_opt / pretrain_opt2.7b",
    "blip2_pretrained_opt6.7b.pth": "LAVIS blip2_opt / pretrain_opt6.7b",
    "blip2_pretrained_flant5xl.pth": "LAVIS blip2_t5 / pretrain_flant5xl",
    "blip2_pretrained_flant5xl_vitL.pth": "LAVIS blip2_t5 / pretrain_flant5xl_vitL",
    "blip2_pretrained_flant5xxl.pth": "LAVIS blip2_t5 / pretrain_flant5xxl",
    "blip2_caption_opt2.7b.pth": "LAVIS blip2_opt / caption_coco_opt2.7b",
    "blip2_caption_opt6.7b.pth": "LAVIS blip2_opt / caption_coco_opt6.7b",
    "blip2_caption_flant5xl.pth": "LAVIS blip2_t5 / caption_coco_flant5xl",
    "blip2_finetune_coco.pth": "LAVIS blip2_image_text_matching / coco",
    **{name: f"Hub Salesforce/{name}" for name in (
        "blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-flan-t5-xl", "blip2-flan-t5-xxl", "blip2-opt-2.7b-coco",
        "blip2-opt-6.7b-coco", "blip2-flan-t5-xl-coco", "blip2-itm-vit-g", "blip2-itm-vit-g-coco")},
}  # fmt: skip
PAPER_PATH_NOTEBOOKS = ("41_zeroshot_vqa", "42_captioning", "43_vqa_finetuned", "44_retrieval", "46_ablation_stage1",
                        "50_parity")  # fmt: skip
NO_CELL = "no paper cell (parity with transformers)"


def released_as(checkpoint: str) -> str:
    """How a checkpoint path of a params file is obtained: a released file (LAVIS / Hub name) or our own run.

    Raises:
        ValueError: a ``weights/`` path whose name is not in :data:`RELEASED` (add it there, with its source).
    """
    parts = Path(checkpoint).parts
    if parts and parts[0] == "runs":
        return f"not released: our run `{'/'.join(parts[:3])}`"
    name = Path(checkpoint).name
    if name not in RELEASED:
        raise ValueError(f"checkpoint {checkpoint!r}: '{name}' is not a known released file ({sorted(RELEASED)})")
    return f"{RELEASED[name]} (`{checkpoint}`)"


def _model_rows(data: dict) -> dict[str, str]:
    """Model row → its checkpoint path (41–44, 50), or ``""`` for an ablation variant that this file trains (46)."""
    ckpts = data.get("checkpoints") or {}
    if isinstance(ckpts, list):  # parity: a plain list of checkpoints
        return {c: c for c in ckpts}
    rows = {r: (c if isinstance(c, str) else c["checkpoint"]) for r, c in ckpts.items()}
    return {**rows, **{v: "" for v in data.get("variants") or {}}}


def paper_path_rows(params_root: str | Path | None = None, targets_path: Path = TARGETS) -> list[tuple[str, str, str]]:
    """``(paper cells, released file, params files)`` of every model row of the ``paper_*`` params files.

    The evaluation, ablation and parity notebooks' files are read; rows are sorted by paper table then row. A row's
    paper cells are the ``paper_targets`` of its metrics (``<row>_<metric>``; the longest row name that prefixes a
    metric owns it). Rows with the same released file and the same paper row are merged: their columns and params
    files are listed in the same order (e.g. the four Table 2 columns of one checkpoint).
    """
    from ..config import load_params_yaml
    from .run import load_targets

    root = Path(params_root) if params_root else TARGETS.parent
    by_id = {t["id"]: t for t in load_targets(targets_path)}
    merged: dict[tuple, tuple[dict[tuple[str, str], list[str]], list[str]]] = {}
    for path in sorted(root.glob("*/paper_*.yaml")):
        if path.parent.name not in PAPER_PATH_NOTEBOOKS:
            continue
        data = load_params_yaml(path)
        rows = _model_rows(data)
        owned: dict[str, list[str]] = {r: [] for r in rows}
        for metric, ref in (data.get("paper_targets") or {}).items():
            owners = [r for r in rows if metric.split("@")[0].startswith(f"{r}_")]
            if owners:
                owned[max(owners, key=len)].append(ref)
        for row, ckpt in rows.items():
            groups: dict[tuple[str, str], list[str]] = {}  # (table, paper row) → columns
            for ref in owned[row]:
                groups.setdefault((by_id[ref]["table"], by_id[ref]["row"]), []).append(by_id[ref]["column"])
            released = released_as(ckpt) if ckpt else "not released: trained by this file"
            key = (tuple(groups), released)
            cells, files = merged.setdefault(key, ({g: [] for g in groups}, []))
            for g, cols in groups.items():
                cells[g] += [c for c in cols if c not in cells[g]]
            files.append(f"`{path.parent.name}/{path.name}`")

    def sort_key(item):
        (groups, released), _ = item
        if not groups:
            return (2, 0, "", released)
        kind, _, num = groups[0][0].partition(" ")
        return (kind != "Table", int(num) if num.isdigit() else 0, groups[0][1], released)

    out = []
    for (groups, released), (cells, files) in sorted(merged.items(), key=sort_key):
        text = "; ".join(f"{table} · {row} · {', '.join(cells[(table, row)])}" for table, row in groups) or NO_CELL
        out.append((text, released, ", ".join(dict.fromkeys(files))))
    return out


def paper_path_markdown(params_root: str | Path | None = None, targets_path: Path = TARGETS) -> str:
    """:func:`paper_path_rows` as the README's Markdown table."""
    lines = ["| paper cell | released file (LAVIS name / Hub name) | params file(s) under `params/` |", "|---|---|---|"]
    rows = paper_path_rows(params_root, targets_path)
    lines += [f"| {cell} | {released} | {files} |" for cell, released, files in rows]
    return "\n".join(lines) + "\n"
