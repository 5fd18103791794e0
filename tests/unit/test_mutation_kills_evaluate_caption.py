"""Caption scoring plumbing (blip2lib/evaluate/caption.py): messages, SPICE availability, which scorer runs on what.

The mutation pass (docs/mutation.md) showed these unpinned: the exact error messages, the SPICE jar check and its
success path, the metric names and the x100 of each scorer, what the PTB tokenizer is handed, and which images each
NoCaps domain scores. Java is kept out: the tokenizer and the scorers are replaced by recorders (a direct
pycocoevalcap run is compared in test_eval_caption.py), so every expected value here is written out by hand.
"""

import json

import pycocoevalcap.spice.spice as spice_mod
import pytest

from blip2lib.evaluate import caption
from blip2lib.evaluate.caption import CaptionDecoding, JavaNotFoundError, coco_caption_scores, nocaps_breakdown


@pytest.fixture
def fake(monkeypatch):
    """PTB tokenizer = lower-case; each scorer returns a fixed score and records the image ids it was given."""
    log = {"tok": [], "bleu_n": []}

    class Tok:
        def tokenize(self, captions):  # {id: [{"caption"}]} -> {id: [str]}
            log["tok"].append(captions)
            return {i: [c["caption"].lower() for c in cs] for i, cs in captions.items()}

    def scorer(name, value):
        class Scorer:
            def __init__(self, *args):
                if args:
                    log["bleu_n"].append(args)

            def compute_score(self, gts, res, **kw):
                assert set(gts) == set(res)
                log.setdefault(name, []).append((sorted(gts), kw))
                return value, None

        return Scorer

    import pycocoevalcap.bleu.bleu
    import pycocoevalcap.cider.cider
    import pycocoevalcap.meteor.meteor
    import pycocoevalcap.rouge.rouge
    import pycocoevalcap.tokenizer.ptbtokenizer

    monkeypatch.setattr(caption.shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(pycocoevalcap.tokenizer.ptbtokenizer, "PTBTokenizer", Tok)
    monkeypatch.setattr(pycocoevalcap.bleu.bleu, "Bleu", scorer("bleu", [0.1, 0.2, 0.3, 0.4]))
    monkeypatch.setattr(pycocoevalcap.meteor.meteor, "Meteor", scorer("meteor", 0.5))
    monkeypatch.setattr(pycocoevalcap.rouge.rouge, "Rouge", scorer("rouge", 0.25))
    monkeypatch.setattr(pycocoevalcap.cider.cider, "Cider", scorer("cider", 1.5))
    monkeypatch.setattr(spice_mod, "Spice", scorer("spice", 0.125))
    monkeypatch.setattr(caption, "spice_models_available", lambda: (True, "ok"))
    return log


REFS = {1: ["A Dog", "a DOG"], 2: ["Cat"], 3: ["Bus"]}


def test_every_metric_by_name_in_percent(fake):
    out = coco_caption_scores({1: "Dog", 2: "CAT", 3: "x"}, REFS)
    assert out == {"Bleu_1": 10.0, "Bleu_2": 20.0, "Bleu_3": 30.0, "Bleu_4": 40.0, "METEOR": 50.0, "ROUGE_L": 25.0,
                   "CIDEr": 150.0, "SPICE": 12.5, "SPICE_status": "ok", "n_images": 3, "unit": "percent"}  # fmt: skip
    assert fake["bleu_n"] == [(4,)] and fake["bleu"] == [([1, 2, 3], {"verbose": 0})]
    refs_in, preds_in = fake["tok"]  # references first, then predictions, each {id: [{"caption": ...}]}
    assert refs_in == {
        1: [{"caption": "A Dog"}, {"caption": "a DOG"}],
        2: [{"caption": "Cat"}],
        3: [{"caption": "Bus"}],
    }
    assert preds_in == {1: [{"caption": "Dog"}], 2: [{"caption": "CAT"}], 3: [{"caption": "x"}]}


@pytest.mark.parametrize("metric", ["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"])
def test_only_the_chosen_metric_runs(fake, metric):
    out = coco_caption_scores({1: "d", 2: "c", 3: "b"}, REFS, metrics=(metric,))
    keys = {"BLEU": ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], "SPICE": ["SPICE", "SPICE_status"]}.get(metric, [metric])
    assert sorted(out) == sorted([*keys, "n_images", "unit"])


def test_subset_tokenises_only_predicted_images(fake):
    out = coco_caption_scores({2: "c"}, REFS, metrics=("CIDEr",), allow_subset=True)
    assert fake["tok"][0] == {2: [{"caption": "Cat"}]} and fake["cider"] == [([2], {})] and out["n_images"] == 1


def test_spice_paths(fake, monkeypatch, tmp_path):
    class Boom:
        def compute_score(self, gts, res):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(spice_mod, "Spice", Boom)
    out = coco_caption_scores({1: "d", 2: "c", 3: "b"}, REFS, metrics=("SPICE",))
    assert (out["SPICE"], out["SPICE_status"]) == (None, "not computed: SPICE failed (RuntimeError: out of memory)")
    monkeypatch.undo()
    monkeypatch.setattr(spice_mod, "__file__", str(tmp_path / "spice.py"))
    jar = tmp_path / "lib" / "stanford-corenlp-3.6.0.jar"
    assert caption.spice_models_available() == (False, (
        f"{jar} is missing; SPICE needs a one-time download of Stanford CoreNLP 3.6.0 (network): run "
        "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'`"))  # fmt: skip
    jar.parent.mkdir()
    jar.write_bytes(b"")
    assert caption.spice_models_available() == (True, "ok")


def test_spice_not_importable(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap.spice.spice", None)
    ok, reason = caption.spice_models_available()
    assert not ok and reason.startswith("pycocoevalcap SPICE not importable (") and reason.endswith(")")
    assert "pycocoevalcap.spice.spice" in reason


def test_messages(fake, monkeypatch):
    with pytest.raises(ValueError) as err:
        coco_caption_scores({"a": "x", 5: "x", 999: "x", 1000: "x", 1: "x"}, REFS)
    assert str(err.value) == "4 predicted image ids have no references, e.g. [1000, 5, 999]"  # sorted as text
    with pytest.raises(ValueError) as err:
        coco_caption_scores({1: "x"}, REFS)
    assert str(err.value) == ("2 reference images have no prediction (pass allow_subset=True to score only the "
                              "predicted images, as LAVIS does)")  # fmt: skip
    with pytest.raises(ValueError) as err:
        coco_caption_scores({1: "x"}, REFS, metrics=("CIDEr", "WER", "BLEU-4"))
    assert str(err.value) == ("unknown metrics ['WER', 'BLEU-4']; choose pycocoevalcap result names ['Bleu_1', "
                              "'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE'] or scorer groups "
                              f"{list(caption.ALL_METRICS)}")  # fmt: skip
    asked = []
    monkeypatch.setattr(caption.shutil, "which", lambda name: asked.append(name))
    with pytest.raises(JavaNotFoundError) as err:
        coco_caption_scores({1: "d", 2: "c", 3: "b"}, REFS)
    assert asked == ["java"] and str(err.value) == (
        "Java was not found on PATH. pycocoevalcap's PTB tokenizer, METEOR and SPICE run `java` subprocesses for "
        "caption scoring. Install a JRE >= 8, e.g. `apt-get install default-jre-headless` or `conda install -c "
        "conda-forge openjdk`, then re-run.")  # fmt: skip
    monkeypatch.setattr(caption.shutil, "which", lambda name: "/opt/jre/bin/java")
    assert caption.check_java() == "/opt/jre/bin/java"


def test_reference_forms(fake, tmp_path):
    coco = {"annotations": [{"image_id": 1, "caption": "A"}, {"image_id": 2, "caption": "B"},
                            {"image_id": 1, "caption": "C"}]}  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    for gt in (coco, path, str(path), {1: ("A", "C"), 2: ["B"]}):
        fake["tok"].clear()
        coco_caption_scores({1: "x", 2: "y"}, gt, metrics=("CIDEr",))
        assert fake["tok"][0] == {1: [{"caption": "A"}, {"caption": "C"}], 2: [{"caption": "B"}]}


NOCAPS = {"images": [{"id": 1, "domain": "in-domain"}, {"id": 2, "domain": "out-domain"},
                     {"id": 3, "domain": "in-domain"}],
          "annotations": [{"image_id": i, "caption": f"ref {i}"} for i in (1, 2, 3)]}  # fmt: skip


def test_nocaps_domains_score_their_own_images(fake, tmp_path):
    path = tmp_path / "nocaps.json"
    path.write_text(json.dumps(NOCAPS))
    out = nocaps_breakdown({1: "a", 2: "b", 3: "c"}, path, metrics=("CIDEr",))
    # no near-domain image: no near-domain entry; each domain its own corpus, then all images
    assert out == {"in-domain": {"CIDEr": 150.0, "n_images": 2}, "out-domain": {"CIDEr": 150.0, "n_images": 1},
                   "overall": {"CIDEr": 150.0, "n_images": 3}, "unit": "percent"}  # fmt: skip
    assert fake["cider"] == [([1, 3], {}), ([2], {}), ([1, 2, 3], {})] and len(fake["tok"]) == 2  # tokenised once
    fake["cider"].clear()
    nocaps_breakdown({1: "a", 2: "b", 3: "c"}, NOCAPS, domains={1: "near-domain", 2: "near-domain", 3: "out-domain"},
                     metrics=("CIDEr",))  # fmt: skip
    assert fake["cider"] == [([1, 2], {}), ([3], {}), ([1, 2, 3], {})]
    assert set(nocaps_breakdown({1: "a", 2: "b", 3: "c"}, NOCAPS)["overall"]) == {
        "CIDEr",
        "SPICE",
        "SPICE_status",
        "n_images",
    }  # the paper's two


def test_nocaps_messages(fake):
    preds = {i: "x" for i in range(1, 9)}
    refs = {i: ["r"] for i in range(1, 9)}
    domains = {1: "far", 2: "in-domain", 3: "mid", 4: "in-domain"}  # 5, 6, 7, 8 have none: 6 problems, 5 listed
    with pytest.raises(ValueError) as err:
        nocaps_breakdown(preds, refs, domains=domains, metrics=("CIDEr",))
    assert str(err.value) == ("every image needs a domain in ('in-domain', 'near-domain', 'out-domain'); bad or "
                              "missing: [5, 6, 7, 8, 'far']")  # fmt: skip
    with pytest.raises(ValueError, match="^1 reference images have no prediction"):  # NoCaps scores every image
        nocaps_breakdown({1: "x"}, {1: ["r"], 2: ["s"]}, domains={1: "in-domain", 2: "in-domain"}, metrics=("CIDEr",))
    with pytest.raises(ValueError, match="^unknown metrics"):
        nocaps_breakdown({1: "x"}, {1: ["r"]}, domains={1: "in-domain"}, metrics=("SPICE-2",))
    with pytest.raises(ValueError, match=r"^every image needs a domain .*missing: \[1\]$"):  # no "images" list
        nocaps_breakdown({1: "x"}, {"annotations": [{"image_id": 1, "caption": "r"}]}, metrics=("CIDEr",))


def test_submission_folder_is_created_with_its_parents(tmp_path):
    path = caption.write_nocaps_submission({2: "b", 10: "a"}, tmp_path / "x" / "y" / "nocaps.json")
    assert json.loads(path.read_text()) == [{"image_id": 2, "caption": "b"}, {"image_id": 10, "caption": "a"}]


def test_recipe_labels_and_length_rule_argument():
    assert CaptionDecoding.paper().source == "paper (Feb-2023 LAVIS CaptionTask)"
    assert CaptionDecoding.lavis_head().source == "LAVIS HEAD CaptionTask"
    kw = CaptionDecoding(length_rule="lavis_paper_time").generate_kwargs()
    assert kw == {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8, "repetition_penalty": 1.0,
                  "length_penalty": 1.0, "length_rule": "lavis_paper_time", "do_sample": False}  # fmt: skip
