"""Build (or load from cache) the embedded toy world: data files, frozen stage-0 models and their baselines.

``build_toy_world()`` is deterministic in ``seed``: the same seed gives byte-identical annotation files, images and
weights (same library versions; every model trains on one thread in its own worker process). The world lives in
``$BLIP2LIB_CACHE/toy/<key>`` (default ``~/.cache/blip2lib/toy/<key>``), ``key`` hashing the builder version, seed
and sizes, and is built once into a temporary folder that is renamed into place when complete (an interrupted build
never looks finished).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import OPTForCausalLM, T5ForConditionalGeneration

from ..config import VisionConfig
from ..vision import build_vision_tower, load_vision_weights
from . import baselines as B
from . import llm_pretrain as L
from . import llm_texts as LT
from . import vit_pretrain as VP
from . import vocab as V
from . import world, writers

log = logging.getLogger(__name__)

BUILDER_VERSION = "11"  # 2: OPT embedding init, 4 questions per description, longer ViT; 3: VQA list types;
# 4: BERT with a paraphrase-contrastive [CLS]; 5: objects on the patch grid, per-patch probe, LLM batch 16 +
# short-scenes-first curriculum, stage-0 models trained in 2 parallel single-threaded workers; 6: no two scenes of an
# evaluation split share a canonical caption (models unchanged); 7: fused AdamW in every stage-0 trainer (same
# recipe, ~10 % faster steps; weights differ from 6 by float rounding); 8: the LLMs learn with the reading objectives
# of toy/reading.py (text oracle OPT 82 → 99, T5 71 → 96), OPT 2400 steps, T5 alone in one worker; 9: the ViT's
# patch tokens also learn their column and row (object patches' column read-out 16 → 99.9 %); 10: T5 2400 steps (1500
# left its text oracle between 90.5 and 96.4 across seeds and CPUs, 2400 gave 98.9-99.3) with answers and captions
# decoded in separate passes (same loss, ~1/3 less work per step), alone in one worker; the OPT answers after random
# "junk" descriptions in 10 % of its question sequences (zero-shot VQA through soft prompts 12-33 → 64-68 %);
# 11: 30 % of both LLMs' descriptions come as 8 fused object vectors, noisy for the T5 (T5 zero-shot VQA 44-48 →
# 69-77 % with 800 stage-2 steps; OPT 54-68 → 60-76 %)
# Sizes: "full" is the default world (≤ 3 min on 2 cores is the target); "tiny" is for fast tests of the machinery.
SIZES: dict[str, dict[str, int]] = {
    "full": dict(train=3000, val=300, test=300, novel=200, vit_images=3000, vit_steps=250, text_scenes=8000,
                 opt_steps=2400, t5_steps=2400, bert_steps=600, probe_images=500),
    "tiny": dict(train=12, val=6, test=6, novel=6, vit_images=16, vit_steps=2, text_scenes=32, opt_steps=2,
                 t5_steps=2, bert_steps=2, probe_images=12),
}  # fmt: skip


@dataclass
class ToyWorld:
    """Where everything of a built toy world is (all paths absolute)."""

    root: Path  # the world folder (holds manifest.json)
    data_root: Path  # pass as ``data_root``: the same layout as the real datasets (blip2lib.data.readers.FORMATS)
    images_dir: Path  # data_root/coco/images
    annotations: dict[str, Path]  # name → file (coco_karpathy_*, vqa_*, v2_*, gqa_*, nocaps_*, scenes_*)
    vit_weights: Path  # safetensors with timm Eva keys (load with blip2lib.vision.load_vision_weights)
    vit_config: dict  # VisionConfig fields
    opt_dir: Path  # transformers dir: OPTForCausalLM + tokenizer (AutoModelForCausalLM / AutoTokenizer)
    t5_dir: Path  # transformers dir: T5ForConditionalGeneration + tokenizer
    bert_dir: Path  # transformers dir: BertForMaskedLM + tokenizer (Q-Former init)
    baselines_path: Path
    seed: int = 0
    size: str = "full"
    baselines: dict = field(default_factory=dict)

    @property
    def vision_config(self) -> VisionConfig:
        """The tower's :class:`~blip2lib.config.VisionConfig`."""
        return VisionConfig(**self.vit_config)


def cache_dir() -> Path:
    """``$BLIP2LIB_CACHE/toy`` or ``~/.cache/blip2lib/toy``."""
    base = os.environ.get("BLIP2LIB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blip2lib")
    return Path(base) / "toy"


def world_key(seed: int, size: str) -> str:
    """Cache key: hash of the builder version, seed and sizes."""
    blob = json.dumps({"version": BUILDER_VERSION, "seed": seed, "sizes": SIZES[size]}, sort_keys=True)
    return f"{size}-s{seed}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def _annotation_paths(data_root: Path) -> dict[str, Path]:
    ann = data_root / "coco" / "annotations"
    out = {p.stem: p for p in sorted(ann.glob("*.json"))}
    out.update({f"gqa_{p.stem}": p for p in sorted((data_root / "gqa" / "annotations").glob("*.json"))})
    out.update({p.stem: p for p in sorted((data_root / "nocaps" / "annotations").glob("*.json"))})
    out.update({p.stem: p for p in sorted((data_root / "toy").glob("*.json"))})
    return out


def load_toy_world(root: str | Path) -> ToyWorld:
    """Open an already built world folder (raises FileNotFoundError if it is incomplete)."""
    root = Path(root).resolve()
    manifest = json.loads((root / "manifest.json").read_text())
    data_root = root / "data"
    return ToyWorld(
        root=root, data_root=data_root, images_dir=data_root / "coco" / "images",
        annotations=_annotation_paths(data_root), vit_weights=root / "vit" / "model.safetensors",
        vit_config=manifest["vit_config"], opt_dir=root / "opt", t5_dir=root / "t5", bert_dir=root / "bert",
        baselines_path=root / "baselines.json", seed=manifest["seed"], size=manifest["size"],
        baselines=json.loads((root / "baselines.json").read_text()),
    )  # fmt: skip


def build_toy_world(
    root: str | Path | None = None, seed: int = 0, force: bool = False, progress: bool = True, size: str = "full"
) -> ToyWorld:
    """Build the toy world (or return the cached one).

    Args:
        root: World folder; None → ``cache_dir() / world_key(seed, size)``.
        seed: Everything (scenes, renders, answers, model inits, batches) derives from it.
        force: Rebuild even when a complete world is there.
        progress: Show a tqdm bar while building.
        size: ``"full"`` (default world) or ``"tiny"`` (seconds; for tests of the machinery).

    Returns:
        The :class:`ToyWorld` paths and baselines.
    """
    in_cache = root is None
    root = Path(root) if root is not None else cache_dir() / world_key(seed, size)
    if (root / "manifest.json").exists() and not force:
        return load_toy_world(root)
    # One builder per world folder: a second process (e.g. two notebooks started at once) waits, then loads it.
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"blip2lib-toy-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "manifest.json").exists() and not force:
            return load_toy_world(root)
        return _build_into(root, in_cache, seed, size, progress)


def _build_into(root: Path, in_cache: bool, seed: int, size: str, progress: bool) -> ToyWorld:
    _remove_dead_partials(root.parent, "*" if in_cache else root.name)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # baselines in this process; the models train in 1-thread workers
    try:
        _build(tmp, seed, size, progress)
    except BaseException:  # Ctrl-C or an error: no half-built folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return load_toy_world(root)


def _remove_dead_partials(folder: Path, name: str) -> None:
    """Delete ``<name>.tmp<pid>`` folders of builds whose process is gone (killed builds; a live one is kept)."""
    for partial in folder.glob(f"{name}.tmp*"):
        pid = partial.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing the partial build %s (process %s is gone)", partial, pid)
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


# Stage-0 models in two worker processes of about equal work (measured, version 10 on this 2-core machine: T5 150 s
# alone on one, OPT 80 + BERT 29 + ViT 22 s on the other; version 9's T5 of 1500 one-pass steps took 129 s). Two
# single-threaded processes use the 2 cores better than one process with two threads (these tiny models' matrices
# are too small to split well), and each model's weights do not depend on the machine's thread count. The workers
# are fresh interpreters (``python -m blip2lib.toy.stage0``), not multiprocessing children: a spawned child
# re-imports the caller's ``__main__``, which for a script without a ``__name__`` guard re-runs the script (found: a
# training script calling ``train()`` hung, its workers waiting for the world their parent was building).
_WORKERS = (("t5",), ("opt", "bert", "vit"))


def train_stage0(job: str, out: Path, seed: int, size: str, tick: Callable[[], None]) -> None:
    """Train one frozen stage-0 model (``vit``, ``opt``, ``t5`` or ``bert``) and save it under ``out/<job>``."""
    sz = SIZES[size]
    if job == "vit":
        imgs, patch_labels, slot_labels = VP.image_pool(sz["vit_images"], seed)
        tower = VP.train_vit(imgs, patch_labels, slot_labels, sz["vit_steps"], seed, tick=tick)
        (out / "vit").mkdir()
        save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(out / "vit" / "model.safetensors"))
        (out / "vit" / "config.json").write_text(json.dumps(dataclasses.asdict(VP.vit_config()), indent=1) + "\n")
        return
    pool = LT.text_pool(sz["text_scenes"], seed)
    if job == "opt":
        _save_hf(L.train_opt(pool, sz["opt_steps"], seed, tick=tick), V.build_opt_tokenizer(), out / "opt")
    elif job == "t5":
        _save_hf(L.train_t5(pool, sz["t5_steps"], seed, tick=tick), V.build_t5_tokenizer(), out / "t5")
    else:
        bert = L.train_bert([ex.captions for ex in pool], sz["bert_steps"], seed, batch=32, tick=tick)
        _save_hf(bert, V.build_bert_tokenizer(), out / "bert")


def _run_jobs(out: Path, seed: int, size: str, bar) -> dict[str, float]:
    """Run :data:`_WORKERS` as two subprocesses, advancing ``bar`` by their steps; any failure stops both."""
    package_root = str(Path(__file__).resolve().parents[2])  # importable even when blip2lib is not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="blip2lib-stage0-") as tmp:
        procs = []
        try:
            for i, jobs in enumerate(_WORKERS):
                status, logf = Path(tmp) / f"{i}.json", open(Path(tmp) / f"{i}.log", "w")
                cmd = [sys.executable, "-m", "blip2lib.toy.stage0", str(out), str(seed), size, str(status), *jobs]
                procs.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), status, logf))
            shown = 0
            while not all(p.poll() == 0 for p, _, _ in procs):
                time.sleep(0.5)
                steps = sum(_status(st).get("steps", 0) for _, st, _ in procs)
                bar.update(steps - shown)
                shown = steps
                for (p, _, logf), jobs in zip(procs, _WORKERS):
                    if p.poll() not in (None, 0):
                        logf.flush()
                        tail = Path(logf.name).read_text()[-3000:]
                        raise RuntimeError(f"toy-world worker {list(jobs)} failed (exit {p.returncode}):\n{tail}")
            return {job: sec for _, st, _ in procs for job, sec in _status(st)["seconds"].items()}
        finally:
            for p, _, logf in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                logf.close()


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write (the worker replaces it atomically)
        return {}


def _build(out: Path, seed: int, size: str, progress: bool) -> None:
    sz = SIZES[size]
    total = 4 + sz["vit_steps"] + sz["opt_steps"] + sz["t5_steps"] + sz["bert_steps"] + 3
    bar = tqdm(total=total, desc="toy world", disable=not progress, unit="step")
    tick = bar.update
    times: dict[str, float] = {}
    t0 = t = time.perf_counter()
    splits = {name: writers.make_split(name, sz[name], seed) for name in writers.SPLITS}
    records = writers.write_dataset(out / "data", splits, seed, tick=tick)
    times["data"] = time.perf_counter() - t

    t = time.perf_counter()
    bar.set_postfix_str("vit, opt, t5, bert")
    times.update(_run_jobs(out, seed, size, bar))
    times["stage0_wall"] = time.perf_counter() - t
    opt = OPTForCausalLM.from_pretrained(str(out / "opt")).eval()
    t5 = T5ForConditionalGeneration.from_pretrained(str(out / "t5")).eval()
    vcfg = VP.vit_config()
    tower = build_vision_tower(vcfg)
    load_vision_weights(tower, out / "vit" / "model.safetensors", vcfg)
    tower.eval()

    t = time.perf_counter()
    bar.set_postfix_str("baselines")
    base = _baselines(splits, records, opt, t5, tower, seed, sz, tick)
    times["baselines"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    base["build_seconds"] = {k: round(v, 1) for k, v in times.items()}
    (out / "baselines.json").write_text(json.dumps(base, indent=1, sort_keys=True) + "\n")
    manifest = {"builder_version": BUILDER_VERSION, "seed": seed, "size": size, "sizes": sz,
                "vit_config": dataclasses.asdict(vcfg), "opt_special_ids": _opt_ids(), "t5_special_ids": _t5_ids(),
                "bert_special_ids": _bert_ids(), "novel_pairs": [list(p) for p in world.NOVEL_PAIRS]}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    bar.close()
    log.info("toy world built in %.0f s: %s", times["total"], base["build_seconds"])


def _save_hf(model, tokenizer, out: Path) -> None:
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _opt_ids() -> dict:
    return {"bos": V.OPT_BOS, "eos": V.OPT_EOS, "pad": V.OPT_PAD, "newline": V.OPT_NEWLINE, "vocab_size": len(LT.OPT_V)}


def _t5_ids() -> dict:
    return {"pad": V.T5_PAD, "eos": V.T5_EOS, "decoder_start": V.T5_PAD, "vocab_size": len(LT.T5_V)}


def _bert_ids() -> dict:
    return {
        "pad": 0,
        "unk": 1,
        "cls": 2,
        "sep": 3,
        "mask": 4,
        "vocab_size": len(LT.BERT_V),
        "dec_when_added": len(LT.BERT_V),
    }


def _baselines(splits, records, opt, t5, tower, seed: int, sz: dict, tick) -> dict:
    """The LLMs' blind / text-oracle VQA, retrieval chance and the ViT probe (``baselines.json``)."""
    out: dict = {"vqa": {}, "retrieval_chance": {}, "vision_probe": {}}
    desc = {s: {sc.image_id: c[0] for sc, c in zip(splits[s].scenes, splits[s].captions)} for s in ("test", "novel")}

    def llm_vqa(name: str, llm, answer) -> dict:  # the canonical (first) caption is the oracle's description
        return {(s, f"{name}_{kind}"): B.summarize(answer(llm, records[s], d), records[s])
                for s in ("test", "novel") for kind, d in (("blind", None), ("oracle", desc[s]))}  # fmt: skip

    def probe() -> dict:
        train = splits["train"]
        n = min(sz["probe_images"], len(train.scenes))
        tr_imgs = np.stack([world.decode(b) for b in train.jpegs[:n]])
        tr_patches = np.stack([world.patch_labels(s) for s in train.scenes[:n]])
        heads = VP.fit_probe(VP.features(tower, tr_imgs), tr_patches, seed)  # one fit, read on both splits
        res = {}
        for split in ("test", "novel"):
            sp = splits[split]
            feats = VP.features(tower, np.stack([world.decode(b) for b in sp.jpegs]))
            patches = np.stack([world.patch_labels(s) for s in sp.scenes])
            res[split] = VP.probe_accuracy(heads, feats, patches, np.asarray([s.slot_labels() for s in sp.scenes]))
        return res

    answers = {**llm_vqa("opt", opt, B.opt_answers), **llm_vqa("t5", t5, B.t5_answers)}
    tick()
    out["vision_probe"] = probe()
    tick()
    for split in ("test", "novel"):
        recs, sp = records[split], splits[split]
        out["vqa"][split] = {
            **{name: answers[(split, name)] for name in ("opt_blind", "opt_oracle", "t5_blind", "t5_oracle")},
            "majority_per_family": B.summarize(_majority(records["train"], recs), recs),
            "num_questions": len(recs),
        }
        out["retrieval_chance"][split] = {**B.retrieval_chance(len(sp.scenes)),
                                          "caption_ceiling": B.caption_ceiling(sp.captions)}  # fmt: skip
    tick()
    return out


def _majority(train_records: list[dict], records: list[dict]) -> list[str]:
    """The most common training answer of each question template (a language-prior baseline without any LLM)."""
    from collections import Counter

    def template(q: str) -> str:
        return " ".join(w for w in q.split()[:3])

    counts: dict[str, Counter] = {}
    for r in train_records:
        counts.setdefault(template(r["question"]), Counter())[r["answer"]] += 1
    return [counts.get(template(r["question"]), Counter({"yes": 1})).most_common(1)[0][0] for r in records]
