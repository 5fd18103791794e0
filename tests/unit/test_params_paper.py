"""The ``paper_*`` params files describe real runs: every row names its own files, metric names are accepted.

What is pinned here:

* per-row ``checkpoints`` mappings are validated when params are loaded (unknown key → the file, row and key, with
  the nearest valid key);
* the caption evaluator accepts pycocoevalcap's result names (``Bleu_4`` ...) as well as its scorer groups, and
  computes the same numbers for both spellings;
* every ``paper_*`` file loads with its notebook's schema, every row names the checkpoint, vision tower file and LLM
  directory its model needs (read from the model name, independently of the params files), paper-target ids exist;
* the README's "paper path" table equals the one generated from the params files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from blip2lib.config import ParamsError
from blip2lib.workbook.runner import load_params
from blip2lib.workbook.schemas import CaptioningParams, ZeroShotVQAParams

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# per-row checkpoint mappings


def _write(tmp_path: Path, notebook: str, text: str) -> Path:
    path = tmp_path / "params" / notebook / "paper_x.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_row_with_unknown_key_names_file_row_key_and_nearest(tmp_path):
    row = "checkpoints:\n  vitg_opt2.7b: {checkpoint: a.pth, llm_dir: weights/opt-2.7b}\n"
    path = _write(tmp_path, "41_zeroshot_vqa", row)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: key 'checkpoints': row 'vitg_opt2.7b': unknown key 'llm_dir'")
    assert "did you mean 'llm_path'?" in msg
    assert "['checkpoint', 'vision_weights', 'llm_path', 'bert_dir']" in msg


def test_row_key_far_from_every_valid_key_gets_no_suggestion():
    with pytest.raises(ParamsError, match=r"unknown key 'zzz' \(valid keys: "):
        ZeroShotVQAParams.from_dict({"checkpoints": {"m": {"checkpoint": "a", "zzz": "b"}}}, "f.yaml")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"llm_path": "weights/opt-2.7b"}, r"f\.yaml: key 'checkpoints': row 'm' names no 'checkpoint'"),
        ({"checkpoint": "a", "llm_path": 3}, r"row 'm': key 'llm_path' must be a string, got 3"),
        (7, r"row 'm' must be a path or a mapping of \['checkpoint', 'vision_weights', 'llm_path', 'bert_dir'\]"),
    ],
)
def test_malformed_rows_are_refused(row, match):
    with pytest.raises(ParamsError, match=match):
        ZeroShotVQAParams.from_dict({"checkpoints": {"m": row}}, "f.yaml")


def test_rows_mix_plain_paths_and_mappings():
    rows = {"a": "runs/x", "b": {"checkpoint": "b.pth", "vision_weights": "v.pth", "llm_path": "l", "bert_dir": "d"}}
    assert ZeroShotVQAParams.from_dict({"checkpoints": rows}, "f.yaml").checkpoints == rows


# ---------------------------------------------------------------------------------------------------------------
# caption metric names


def test_caption_params_accept_result_names_and_groups():
    names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert CaptioningParams.from_dict({"metrics": names}, "c.yaml").metrics == names
    groups = ["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert CaptioningParams.from_dict({"metrics": groups}, "c.yaml").metrics == groups


def test_caption_params_unknown_metric_names_it_and_the_choices():
    with pytest.raises(ParamsError) as err:
        CaptioningParams.from_dict({"metrics": ["Bleu_4", "BLEU-4"]}, "c.yaml")
    msg = str(err.value)
    assert msg.startswith("c.yaml: key 'metrics': unknown metrics ['BLEU-4']")
    assert "['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE']" in msg
    assert "['BLEU', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE']" in msg


def test_evaluator_params_accept_result_names():
    from blip2lib.evaluate.__main__ import SCHEMAS, _check

    p = SCHEMAS["caption"].from_dict({"metrics": ["Bleu_4", "CIDEr"], "data_root": "d", "out_dir": "o",
                                      "split": "coco_karpathy_test"}, "e.yaml")  # fmt: skip
    _check(p, "e.yaml")
    p = SCHEMAS["caption"].from_dict({"metrics": ["Bleu4"], "data_root": "d", "out_dir": "o",
                                      "split": "coco_karpathy_test"}, "e.yaml")  # fmt: skip
    with pytest.raises(ParamsError, match=r"e\.yaml: key 'metrics': unknown metrics \['Bleu4'\]"):
        _check(p, "e.yaml")


def test_metric_groups_order_and_mapping():
    from blip2lib.evaluate.caption import metric_groups

    assert metric_groups(["SPICE", "Bleu_4", "CIDEr", "Bleu_1"]) == ("BLEU", "CIDEr", "SPICE")
    assert metric_groups(["ROUGE_L", "METEOR", "BLEU"]) == ("BLEU", "METEOR", "ROUGE_L")
    assert metric_groups([]) == ()


def test_result_names_score_like_groups():
    """``Bleu_4`` runs the BLEU scorer: the numbers equal pycocoevalcap's own on the PTB-tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from blip2lib.evaluate.caption import coco_caption_scores

    refs = {1: ["a dog on the grass.", "a brown dog runs on grass"], 2: ["a cat in a kitchen", "the cat sits inside"],
            3: ["a man near a road", "a person walks by the road"]}  # fmt: skip
    preds = {1: "A dog on the grass!", 2: "a cat sitting in the kitchen", 3: "a red bus"}
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in preds})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in preds})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    ours = coco_caption_scores(preds, refs, metrics=("Bleu_4", "CIDEr"))
    assert ours["Bleu_4"] == pytest.approx(100 * bleu[3], abs=1e-9)
    assert ours["Bleu_1"] == pytest.approx(100 * bleu[0], abs=1e-9)  # the scorer reports all four orders
    assert ours["CIDEr"] == pytest.approx(100 * cider, abs=1e-9)
    assert "METEOR" not in ours and "SPICE" not in ours


# ---------------------------------------------------------------------------------------------------------------
# the paper_* files themselves

PAPER_FILES = sorted((ROOT / "params").glob("*/paper_*.yaml"))
TABLE_FILES = [p for p in PAPER_FILES if p.parent.name[:2] in ("41", "42", "43", "44")]
# the released files, as LAVIS's model zoo and the Hub name them (written out here, not read from the library)
LAVIS_FILES = {"blip2_pretrained.pth", "blip2_pretrained_vitL.pth", "blip2_pretrained_opt2.7b.pth",
               "blip2_pretrained_opt6.7b.pth", "blip2_pretrained_flant5xl.pth", "blip2_pretrained_flant5xl_vitL.pth",
               "blip2_pretrained_flant5xxl.pth", "blip2_caption_opt2.7b.pth", "blip2_caption_opt6.7b.pth",
               "blip2_caption_flant5xl.pth", "blip2_finetune_coco.pth", "eva_vit_g.pth", "clip_vit_L.pth"}  # fmt: skip
HUB = {  # Hub repository → (vision tower, LLM) of the model it holds
    "blip2-opt-2.7b": ("g", "opt2.7b"), "blip2-opt-6.7b": ("g", "opt6.7b"), "blip2-flan-t5-xl": ("g", "flant5xl"),
    "blip2-flan-t5-xxl": ("g", "flant5xxl"), "blip2-opt-2.7b-coco": ("g", "opt2.7b"),
    "blip2-opt-6.7b-coco": ("g", "opt6.7b"), "blip2-flan-t5-xl-coco": ("g", "flant5xl"),
    "blip2-itm-vit-g": ("g", None), "blip2-itm-vit-g-coco": ("g", None),
}  # fmt: skip
VISION = {"l": "weights/clip_vit_L.pth", "g": "weights/eva_vit_g.pth"}
LLM_DIR = {"opt2.7b": "weights/opt-2.7b", "opt6.7b": "weights/opt-6.7b", "flant5xl": "weights/flan-t5-xl",
           "flant5xxl": "weights/flan-t5-xxl"}  # fmt: skip


def _model(row: str) -> tuple[str, str | None]:
    """(vision tower, LLM) a row's name asks for: ``vitg_opt2.7b...`` → ("g", "opt2.7b"); Table 6 rows are ViT-g."""
    if row.startswith("itc_itm"):
        return "g", None
    m = re.match(r"vit([lg])(?:_(opt2\.7b|opt6\.7b|flant5xxl|flant5xl))?(?:_|$)", row)
    assert m, f"row name {row!r} names no model"
    return m.group(1), m.group(2)


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", PAPER_FILES, ids=[f"{p.parent.name}/{p.name}" for p in PAPER_FILES])
def test_paper_file_loads_with_its_notebook_schema(path):
    assert load_params(path)


@pytest.mark.parametrize("path", TABLE_FILES, ids=[f"{p.parent.name}/{p.name}" for p in TABLE_FILES])
def test_every_row_names_the_files_its_model_needs(path):
    data = _yaml(path)
    retrieval = path.parent.name == "44_retrieval"
    assert "vision_weights" not in data and "llm_path" not in data, "per-row files only, no file-level default"
    for row, value in data["checkpoints"].items():
        vit, llm = _model(row)
        ckpt = value if isinstance(value, str) else value["checkpoint"]
        name = Path(ckpt).name
        if name in HUB:  # a Hub snapshot holds every tower and tokenizer: nothing else may be named
            assert isinstance(value, str), f"{row}: a Hub directory row names only its directory"
            assert HUB[name] == (vit, None if retrieval else llm), f"{row}: {name} holds another model"
            continue
        assert isinstance(value, dict), f"{row}: a LAVIS file or run folder row names its own tower and LLM"
        assert value["vision_weights"] == VISION[vit], row
        assert value.get("llm_path") == (None if retrieval else LLM_DIR[llm]), row
        if ckpt.endswith(".pth"):
            assert name in LAVIS_FILES, f"{row}: {name} is not a released LAVIS file"
            assert ("vitL" in name) == (vit == "l"), f"{row}: {name} has another vision tower"
            assert retrieval or llm in name, f"{row}: {name} has another LLM"
        else:
            assert ckpt.startswith("runs/"), f"{row}: {ckpt} is neither a released file nor one of our runs"
        assert value.get("bert_dir", data.get("bert_dir")) == "weights/bert-base-uncased", row


def test_every_released_name_in_the_params_is_a_real_release():
    named = set()
    for path in PAPER_FILES:
        named |= set(re.findall(r"weights/([\w.-]+)", path.read_text()))
    tokens = {"bert-base-uncased", *(Path(d).name for d in LLM_DIR.values())}
    assert named - tokens <= LAVIS_FILES | set(HUB), sorted(named - tokens - LAVIS_FILES - set(HUB))
    assert set(HUB) <= named, f"Hub checkpoints in no params file: {sorted(set(HUB) - named)}"


def test_hub_files_reproduce_the_cells_of_their_lavis_twins():
    for hf in (p for p in TABLE_FILES if p.stem.endswith("_hf")):
        twin = _yaml(hf.with_name(hf.stem[:-3] + ".yaml"))
        data = _yaml(hf)
        assert set(data["checkpoints"]) <= set(twin["checkpoints"]), hf.name
        rows = set(twin["checkpoints"])
        owner = {
            m: max((r for r in rows if m.split("@")[0].startswith(f"{r}_")), key=len) for m in twin["paper_targets"]
        }
        want = {m: t for m, t in twin["paper_targets"].items() if owner[m] in data["checkpoints"]}
        assert data["paper_targets"] == want, hf.name
        assert {k: v for k, v in data.items() if k not in ("checkpoints", "paper_targets", "bert_dir")} == {
            k: v for k, v in twin.items() if k not in ("checkpoints", "paper_targets", "bert_dir")
        }, f"{hf.name}: settings differ from its LAVIS twin"


def test_no_params_file_carries_schema_gap_notes():
    for path in sorted((ROOT / "params").rglob("*.yaml")):
        text = path.read_text().lower()
        assert "schema gap" not in text and "helper report" not in text, path


# ---------------------------------------------------------------------------------------------------------------
# Figure 5: rows without a published number, curves from the ablation's kept checkpoints


def test_figure5_rows_have_no_number_and_every_curve_is_reproduced():
    targets = _yaml(ROOT / "params" / "paper_targets.yaml")["targets"]
    fig5 = {t["id"]: t for t in targets if t["table"] == "Figure 5"}
    curves = {f"f5_blip_2_vit_g_{m}_{w}_stage1" for m in ("opt6_7b", "flant5xl") for w in ("with", "without")}
    assert set(fig5) == curves
    assert all(t["value"] is None and t["tolerance"] is None for t in fig5.values())
    for panel, tid in (("opt6.7b", "opt6_7b"), ("flant5xl", "flant5xl")):
        data = _yaml(ROOT / "params" / "46_ablation_stage1" / f"paper_vitg_{panel}.yaml")
        assert data["paper_targets"] == {f"{v}_vqa_acc_mean": f"f5_blip_2_vit_g_{tid}_{v}"
                                         for v in ("without_stage1", "with_stage1")}  # fmt: skip
        assert data["base"]["model"] == f"vitg_{panel}" and data["base"]["llm_path"] == LLM_DIR[panel]
        assert data["variants"]["without_stage1"] == {"init_from": ""}
        assert data["variants"]["with_stage1"]["init_from"] == "runs/10_stage1_pretrain/paper_vitg"


def test_figure5_curve_points_are_checkpoints_the_ablation_keeps():
    from blip2lib.train import TrainParams

    curves = _yaml(ROOT / "params" / "41_zeroshot_vqa" / "paper_fig5_curves.yaml")
    points = 0
    for panel in ("opt6.7b", "flant5xl"):
        data = _yaml(ROOT / "params" / "46_ablation_stage1" / f"paper_vitg_{panel}.yaml")
        base = data["base"]
        assert base["keep_last"] == 0, "every checkpoint is a point of a curve: none may be pruned"
        steps = range(base["ckpt_every"], base["steps"] + 1, base["ckpt_every"])
        for variant, overrides in data["variants"].items():
            TrainParams.from_dict({**base, **overrides}, f"{panel} {variant}")  # the runs the ablation will start
            for seed in data["seeds"]:
                for step in steps:
                    row = curves["checkpoints"][f"vitg_{panel}_{variant}_{step // 1000}k"]
                    assert row["checkpoint"] == (f"runs/46_ablation_stage1/paper_vitg_{panel}/{variant}/seed{seed}"
                                                 f"/checkpoints/ckpt-{step}")  # fmt: skip
                    assert (row["vision_weights"], row["llm_path"]) == (VISION["g"], LLM_DIR[panel])
                    assert curves["paper_targets"][f"vitg_{panel}_{variant}_{step // 1000}k_vqa_acc"] == (
                        f"f5_blip_2_vit_g_{panel.replace('.', '_')}_{variant}"
                    )
                    points += 1
    assert points == len(curves["checkpoints"]) == 20


def test_compare_to_paper_lists_a_row_without_a_published_number(tmp_path):
    from blip2lib.workbook.run import compare_to_paper

    path = tmp_path / "targets.yaml"
    rows = [{"id": "f5", "table": "Figure 5", "row": "with", "column": "acc", "value": None, "tolerance": None},
            {"id": "t2", "table": "Table 2", "row": "r", "column": "c", "value": 53.5, "tolerance": 0.5}]  # fmt: skip
    path.write_text(yaml.safe_dump({"targets": rows}))
    table = compare_to_paper({"a": 51.2345, "b": 53.2}, {"a": "f5", "b": "t2", "c": "f5"}, path=path, show=False)
    got = table.set_index("metric")
    assert got.loc["a", "verdict"] == "no published number" and got.loc["a", "reproduced"] == 51.23
    assert got.loc["a", "target"] == "Figure 5 · with · acc"
    assert got.loc[["a", "c"], ["paper / goal", "delta", "tolerance"]].isna().all().all()  # None → NaN in pandas
    assert got.loc["c", "verdict"] == "no published number" and got.loc[["c"], "reproduced"].isna().all()
    assert got.loc["b", "verdict"] == "match" and got.loc["b", "delta"] == pytest.approx(-0.3)


# ---------------------------------------------------------------------------------------------------------------
# the README's paper-path table


def _readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- paper-path table:")
    body = text[text.index("\n", start) + 1 : text.index("<!-- end of paper-path table -->")]
    return body


def test_readme_paper_path_table_is_the_generated_one():
    from blip2lib.workbook.tables import paper_path_markdown

    assert _readme_table() == paper_path_markdown(), "regenerate the README table: see its paragraph"


def test_readme_paper_path_table_covers_every_file_release_and_paper_row():
    table = _readme_table()
    names = {f"{p.parent.name}/{p.name}" for p in PAPER_FILES if p.parent.name[:2] in ("41", "42", "43", "44", "46",
                                                                                        "50")}  # fmt: skip
    assert {n for n in names if f"`{n}`" in table} == names
    assert all(f"Hub Salesforce/{h} (`weights/{h}`)" in table for h in HUB)
    for t in _yaml(ROOT / "params" / "paper_targets.yaml")["targets"]:
        assert f"{t['table']} · {t['row']} · " in table, t["id"]


def test_paper_path_rows_pair_columns_with_files_and_refuse_unknown_releases(tmp_path):
    from blip2lib.workbook.tables import paper_path_rows, released_as

    root = tmp_path / "params"
    (root / "41_zeroshot_vqa").mkdir(parents=True)
    targets = tmp_path / "targets.yaml"
    rows = [{"id": i, "table": "Table 2", "row": "R", "column": c, "value": 1.0, "tolerance": 0.5}
            for i, c in (("a", "val"), ("b", "gqa"))]  # fmt: skip
    targets.write_text(yaml.safe_dump({"targets": rows}))
    for stem, ref in (("paper_v", "a"), ("paper_g", "b")):
        (root / "41_zeroshot_vqa" / f"{stem}.yaml").write_text(
            f"checkpoints: {{m: {{checkpoint: weights/blip2_pretrained_opt2.7b.pth}}, m_x: runs/20_x/y/z}}\n"
            f"paper_targets: {{m_vqa_acc: {ref}, m_x_vqa_acc: {ref}}}\n"
        )
    got = paper_path_rows(root, targets)
    lavis = "LAVIS blip2_opt / pretrain_opt2.7b (`weights/blip2_pretrained_opt2.7b.pth`)"
    files = "`41_zeroshot_vqa/paper_g.yaml`, `41_zeroshot_vqa/paper_v.yaml`"
    assert got == [("Table 2 · R · gqa, val", lavis, files),
                   ("Table 2 · R · gqa, val", "not released: our run `runs/20_x/y`", files)]  # fmt: skip
    with pytest.raises(ValueError, match=r"'weights/blip2_new\.pth': 'blip2_new\.pth' is not a known released file"):
        released_as("weights/blip2_new.pth")


# ---------------------------------------------------------------------------------------------------------------
# parity: local snapshot folders of the released Hub checkpoints


def test_parity_paper_file_lists_every_released_hub_checkpoint_as_a_local_folder():
    data = _yaml(ROOT / "params" / "50_parity" / "paper_hf.yaml")
    assert data["checkpoints"] == [f"weights/{h}" for h in HUB]  # every one, nothing else, in a stable order
    assert data["skip_missing"] is False


def test_parity_refuses_a_bare_hub_id_with_the_download_hint():
    from blip2lib.workbook.schemas import ParityParams

    with pytest.raises(ParamsError) as err:
        ParityParams.from_dict({"checkpoints": ["tiny-opt", "Salesforce/blip2-itm-vit-g"]}, "p.yaml")
    assert str(err.value) == (
        "p.yaml: key 'checkpoints': 'Salesforce/blip2-itm-vit-g' looks like a Hub id and is no local path; download "
        "it once (huggingface-cli download Salesforce/blip2-itm-vit-g --local-dir weights/blip2-itm-vit-g), name "
        "'weights/blip2-itm-vit-g'"
    )
    ok = ["tiny-t5", "weights/blip2-opt-2.7b", "runs/20_stage2_pretrain/toy/opt", "params"]  # local names pass
    assert ParityParams.from_dict({"checkpoints": ok}, "p.yaml").checkpoints == ok
