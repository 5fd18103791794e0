"""The built toy world (tiny size): files, formats, readers, determinism, concurrent builds; the full world's bars."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from blip2lib.data import readers
from blip2lib.toy import world, writers
from blip2lib.toy.build import build_toy_world, world_key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    return build_toy_world(tmp_path_factory.mktemp("toy") / "w", seed=3, progress=False, size="tiny")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
            and p.name != "baselines.json"}  # fmt: skip


def test_same_seed_same_files_and_weights(tiny, tmp_path):
    again = build_toy_world(tmp_path / "w2", seed=3, progress=False, size="tiny")
    assert _digest(tiny.root) == _digest(again.root)
    assert any(k.endswith("model.safetensors") for k in _digest(tiny.root))
    other = writers.make_split("test", 6, seed=4)
    assert other.jpegs != writers.make_split("test", 6, seed=3).jpegs


def test_cache_key_and_reuse(tiny, tmp_path, monkeypatch):
    assert world_key(0, "full") != world_key(1, "full") != world_key(0, "tiny")
    again = build_toy_world(tiny.root, seed=3, progress=False, size="tiny")  # manifest present → no rebuild
    assert again.root == tiny.root and again.baselines == tiny.baselines
    monkeypatch.setenv("BLIP2LIB_CACHE", str(tmp_path / "cache"))
    from blip2lib.toy.build import cache_dir

    assert cache_dir() == tmp_path / "cache" / "toy"


def test_failed_build_leaves_nothing_and_dead_partials_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys

    from blip2lib.toy import build as tb

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"w.tmp{int(gone.stdout)}"  # a build killed earlier: its process no longer exists
    (dead / "vit").mkdir(parents=True)
    alive = tmp_path / f"w.tmp{os.getppid()}"  # a build still running elsewhere is left alone
    alive.mkdir()

    def boom(out, *a):
        (out / "half").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(tb, "_build", boom)
    with pytest.raises(KeyboardInterrupt):
        build_toy_world(tmp_path / "w", seed=3, progress=False, size="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]


def _build_tiny(root: str) -> dict:
    return build_toy_world(root, seed=3, progress=False, size="tiny").baselines["build_seconds"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_building_one_world_build_it_once(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = str(tmp_path / "w")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        first, second = pool.map(_build_tiny, [root, root])
    assert first == second  # the waiting process loaded the world the other one built (timings would differ)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no partial folders left


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_script_without_a_main_guard_can_build_the_world(tmp_path):
    """The build's workers are fresh interpreters: nothing re-runs the calling script (a spawned child would)."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "from blip2lib.toy.build import build_toy_world\n"
        f"w = build_toy_world({str(tmp_path / 'w')!r}, seed=3, progress=False, size='tiny')\n"
        "print('built', w.root.name)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("built w") == 1


def test_a_failing_worker_stops_the_build_with_its_log(tmp_path):
    from tqdm import tqdm

    from blip2lib.toy import build as tb

    (tmp_path / "vit").mkdir()  # the ViT worker cannot create its folder
    with pytest.raises(RuntimeError, match=r"(?s)worker \['opt', 'bert', 'vit'\] failed.*FileExistsError"):
        tb._run_jobs(tmp_path, 3, "tiny", tqdm(disable=True))


def test_files_have_documented_formats(tiny):
    ann = tiny.annotations
    train = json.loads(ann["coco_karpathy_train"].read_text())
    assert set(train[0]) == {"image", "caption", "image_id"} and train[0]["image_id"].startswith("coco_")
    test = json.loads(ann["coco_karpathy_test"].read_text())
    assert all(len(e["caption"]) == 5 and (tiny.images_dir / e["image"]).is_file() for e in test)
    gt = json.loads(ann["coco_karpathy_test_gt"].read_text())
    assert len(gt["annotations"]) == 5 * len(gt["images"])
    qs = json.loads(ann["v2_OpenEnded_mscoco_test_questions"].read_text())
    an = json.loads(ann["v2_mscoco_test_annotations"].read_text())
    assert set(qs["questions"][0]) == {"image_id", "question", "question_id"}
    a0 = an["annotations"][0]
    assert set(a0) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"}
    assert len(a0["answers"]) == 10 and set(a0["answers"][0]) == {"answer", "answer_confidence", "answer_id"}
    assert a0["answer_type"] in ("yes/no", "number", "other") and a0["question_type"] in world.FAMILIES
    lavis = json.loads(ann["vqa_test"].read_text())
    assert [e["question_id"] for e in lavis] == [q["question_id"] for q in qs["questions"]]
    gqa = json.loads(ann["gqa_testdev_balanced_questions"].read_text())
    assert isinstance(gqa[0]["question_id"], str) and isinstance(gqa[0]["answer"], str)
    assert (tiny.data_root / "gqa" / "images" / gqa[0]["image"]).is_file()
    noc = json.loads(ann["nocaps_val"].read_text())
    assert (tiny.data_root / "nocaps" / "images" / noc[0]["image"]).is_file()


def test_read_back_through_blip2lib_readers(tiny):
    root, F = tiny.data_root, readers.FORMATS

    def files(name):
        return root / F[name]["file"], root / F[name]["images_root"]

    ann, img_root = files("coco_karpathy_train")
    ds = readers.CaptionDataset(img_root, ann)
    assert len(ds) == 5 * 12 and ds[0]["text_input"] and ds[0]["image"].size == (64, 64)
    ann, img_root = files("coco_karpathy_test")
    ret = readers.RetrievalEvalDataset(img_root, ann)
    assert len(ret.text) == 5 * len(ret.image)
    cap = readers.CaptionEvalDataset(img_root, ann)
    gt = readers.load_caption_gt(root / F["coco_karpathy_test_gt"]["file"])
    assert {cap[i]["image_id"] for i in range(len(cap))} == set(gt)
    ann, img_root = files("vqa_val_eval")
    vqa = readers.VQAEvalDataset(img_root, ann)
    assert len(vqa) == 4 * 6 and vqa[0]["image"].size == (64, 64)
    fams = {a["question_type"] for a in vqa.annotation}  # toy extra keys → per-family VQA accuracy in the reports
    assert fams <= set(world.FAMILIES) and len(fams) >= 3
    assert all(a["answer_type"] == world.answer_type(a["question_type"]) for a in vqa.annotation)
    ann, img_root = files("vqa_train")
    assert readers.VQADataset(img_root, ann)[0]["weights"]
    ann, img_root = files("gqa_testdev")
    assert readers.GQAEvalDataset(img_root, ann)[0]["answer"]
    ann, img_root = files("nocaps_val")
    assert readers.NoCapsDataset(img_root, ann)[0]["domain"] == "out-domain"
    official = [root / "coco/annotations/v2_OpenEnded_mscoco_val_questions.json",
                root / "coco/annotations/v2_mscoco_val_annotations.json"]  # fmt: skip
    from_official = readers.load_annotations(official)
    from_lavis = readers.load_annotations(root / F["vqa_val_eval"]["file"])
    strip = lambda es: [(e["question_id"], e["image"], e["answer"]) for e in es]  # noqa: E731
    assert strip(from_official) == strip(from_lavis)


def test_models_load_from_local_dirs(tiny):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from blip2lib.vision import build_vision_tower, load_vision_weights

    assert AutoModelForCausalLM.from_pretrained(str(tiny.opt_dir)).config.model_type == "opt"
    assert AutoModelForSeq2SeqLM.from_pretrained(str(tiny.t5_dir)).config.model_type == "t5"
    assert AutoModelForMaskedLM.from_pretrained(str(tiny.bert_dir)).config.model_type == "bert"
    assert AutoTokenizer.from_pretrained(str(tiny.opt_dir)).bos_token_id == 2
    tower = build_vision_tower(tiny.vision_config)
    missing, unexpected = load_vision_weights(tower, tiny.vit_weights, tiny.vision_config)
    assert missing == [] and unexpected == []
    assert set(tiny.baselines) >= {"vqa", "retrieval_chance", "vision_probe", "build_seconds"}


# ---------------------------------------------------------------------------------------------------------------
# the full world meets its bars (builds once from scratch, ~2.5 min alone on 2 cores; builder version 11 measured 97.19
# / 98.25 text oracle and 100 slot and column probe on the test split; version 9's T5 fell to 94.62 on another CPU).
# Not part of `make test` (marker `world`, run by `make test-world`): `make demo` builds the same world (seed 0, full)
# and its 01_toy_world report judges the test-split oracle and probe bars; run this after changing blip2lib/toy.


@pytest.mark.world
@pytest.mark.timeout(1800)
def test_full_world_meets_bars(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2LIB_CACHE", str(tmp_path))  # a fresh build, never a cached world
    w = build_toy_world(seed=0, progress=False)
    for split in ("test", "novel"):
        vqa = w.baselines["vqa"][split]
        assert vqa["opt_oracle"]["overall"] >= 95.0, vqa
        assert vqa["t5_oracle"]["overall"] >= 95.0, vqa
        for llm in ("opt", "t5"):  # the description carries the answers: blind is far below the oracle
            assert vqa[f"{llm}_blind"]["overall"] < vqa[f"{llm}_oracle"]["overall"] - 30, vqa
    probe = w.baselines["vision_probe"]["test"]
    assert probe["slot_accuracy"] >= 95.0 and probe["column_accuracy"] >= 95.0, probe  # what and where


def test_toy_qformer_takes_its_dropout_from_its_bert(tiny):
    """As LAVIS's Q-Former takes bert-base's config (dropout 0.1), the toy Q-Former takes the toy BERT's (none)."""
    import json

    from blip2lib.assemble import _toy_components
    from blip2lib.train import TrainParams

    bert = json.loads((tiny.bert_dir / "config.json").read_text())
    assert bert["hidden_dropout_prob"] == 0.0 and bert["attention_probs_dropout_prob"] == 0.0
    params = TrainParams(stage="stage1", model="toy", train_data="toy", data_root=str(tiny.root), image_size=64,
                         progress=False)  # fmt: skip
    q = _toy_components(params)["config"].qformer
    assert q.hidden_dropout_prob == 0.0 and q.attention_probs_dropout_prob == 0.0
    assert q.hidden_size == bert["hidden_size"] and q.num_hidden_layers == bert["num_hidden_layers"]
