"""The rehearsal's ``data/``: every dataset the ``paper_*`` params name, in its official / LAVIS layout and names.

The toy world's writers (``blip2lib/toy/writers.py``) produce COCO Karpathy, VQAv2 (LAVIS lists and the official
question / annotation files), GQA and NoCaps files from a few rendered scenes; the datasets they do not write are
laid out here from the same scenes under their own file names (Flickr30K, OK-VQA, VG captions, the NoCaps test
list) with image folders as relative symlinks, and WebDataset tar shards for the pre-training ``train_data``
patterns (one real shard, every other name a hard link to it: a 12,900-shard pattern costs one file).
Every path a params file names is checked afterwards, so a name the rehearsal cannot provide fails here, naming
the params file and key.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..data import FORMATS

SPLIT_SIZES = {"train": 8, "val": 4, "test": 4, "novel": 6}  # images per toy split (a few eval samples)
SEED = 0
_COPIES = {  # file written from a toy-world file: target → source (both relative to data_root)
    "flickr30k/annotations/flickr30k_train.json": "coco/annotations/coco_karpathy_train.json",
    "flickr30k/annotations/flickr30k_val.json": "coco/annotations/coco_karpathy_val.json",
    "flickr30k/annotations/flickr30k_test.json": "coco/annotations/coco_karpathy_test.json",
    "okvqa/annotations/okvqa_train.json": "coco/annotations/vqa_train.json",
    "okvqa/annotations/okvqa_val_eval.json": "coco/annotations/vqa_val_eval.json",
    "vg/annotations/vg_caption.json": "coco/annotations/coco_karpathy_train.json",
    "nocaps/annotations/nocaps_test.json": "nocaps/annotations/nocaps_val.json",
}
_IMAGE_LINKS = ("flickr30k/images", "vg/images")  # → ../coco/images (the toy writer links gqa/ and nocaps/)
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
SPLIT_KEYS = ("split", "transfer_split", "eval_split")  # params keys that name a FORMATS key
PATH_KEYS = ("train_data", "val_data", "annotations")  # params keys that name files under data_root


def write_base(root: Path) -> None:
    """Toy scenes in every layout ``blip2lib.data.FORMATS`` describes, under ``root`` (kept when present)."""
    from ..toy import writers

    if (root / "coco" / "annotations" / "coco_karpathy_train.json").exists():
        return
    splits = {name: writers.make_split(name, n, SEED) for name, n in SPLIT_SIZES.items()}
    writers.write_dataset(root, splits, SEED)
    # NoCaps val has three domains (the toy writer marks every novel image out-domain): cycle them, so each
    # per-domain metric the paper reports is computed
    noc = root / FORMATS["nocaps_val"]["file"]
    entries = json.loads(noc.read_text())
    for i, e in enumerate(entries):
        e["domain"] = NOCAPS_DOMAINS[i % len(NOCAPS_DOMAINS)]
    noc.write_text(json.dumps(entries) + "\n")
    for target, source in _COPIES.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / source, root / target)
    for link in _IMAGE_LINKS:
        if not (root / link).is_symlink():
            os.symlink("../coco/images", root / link, target_is_directory=True)


def write_shards(root: Path, spec: str) -> list[Path]:
    """WebDataset shards for a ``train_data`` pattern (``shards/x-{00000..12899}.tar``) under ``root``.

    One shard is written from the toy train split (``.jpg`` + ``.txt`` + ``.json`` per sample); every other name
    of the pattern is a hard link to it.
    """
    from braceexpand import braceexpand

    from ..data.shards import write_shards as wds_write

    names = [root / u for part in spec.split(",") if part.strip() for u in braceexpand(part.strip())]
    first = names[0]
    if not first.exists():
        ann = json.loads((root / FORMATS["coco_karpathy_train"]["file"]).read_text())
        images = root / FORMATS["coco_karpathy_train"]["images_root"]
        samples = [(f"s{i:06d}", (images / a["image"]).read_bytes(), [a["caption"]]) for i, a in enumerate(ann)]
        tmp = first.parent / ".rehearsal-shard"
        written = wds_write(samples, str(tmp / "%06d.tar"), maxcount=len(samples))
        first.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written[0], first)
        shutil.rmtree(tmp, ignore_errors=True)
    for n in names[1:]:
        if not n.exists():
            n.parent.mkdir(parents=True, exist_ok=True)
            os.link(first, n)
    return names


def is_shards(spec: str) -> bool:
    """``train_data`` names tar shards (the assembler's rule)."""
    from ..assemble import is_shard_spec

    return is_shard_spec(spec)


def data_problems(root: Path, values: dict, source: str) -> list[str]:
    """What a params file names under ``root`` (its ``data_root``) and is not there: one line per key."""
    problems = []
    for key in SPLIT_KEYS:
        split = values.get(key) or ""
        if not split or split.endswith(".json"):
            path = root / split if split else None
            if path is not None and not path.exists():
                problems.append(f"{source}: key '{key}': {path} does not exist")
            continue
        if split not in FORMATS:
            problems.append(f"{source}: key '{key}': {split!r} is no blip2lib.data.FORMATS key")
        elif not (root / FORMATS[split]["file"]).exists():
            problems.append(f"{source}: key '{key}': {root / FORMATS[split]['file']} does not exist")
    for key in PATH_KEYS:
        spec = values.get(key) or ""
        if not spec or spec in ("toy", "synthetic") or is_shards(spec):
            continue
        if not (root / spec).exists():
            problems.append(f"{source}: key '{key}': {root / spec} does not exist")
    images = values.get("images_root") or ""
    if images and not (root / images).is_dir():
        problems.append(f"{source}: key 'images_root': {root / images} is not a folder")
    return problems


def write_data(root: Path, params: dict[str, dict]) -> None:
    """Write everything the params name under ``root`` (``params``: source name → its flat values).

    Raises:
        FileNotFoundError: a named dataset the rehearsal does not provide (every such key listed).
    """
    write_base(root)
    for values in params.values():
        spec = values.get("train_data") or ""
        if spec and is_shards(spec):
            write_shards(root, spec)
    problems = [p for source, values in params.items() for p in data_problems(root, values, source)]
    if problems:
        raise FileNotFoundError("the rehearsal data lacks what params name:\n" + "\n".join(problems))
