"""Tiny random models written in exactly the released files' formats (the dress rehearsal's ``weights/``).

Every file or folder name a ``paper_*`` params file names under ``weights/`` gets a model of the rehearsal sizes
(``blip2lib.config.REHEARSAL_*``) in the format of the real file of that name (docs/paper_map.md §8.2):

* ``eva_vit_g.pth`` / ``clip_vit_L.pth``: a bare tower state dict in LAVIS / OpenAI-CLIP key names, with one block
  more than is built (the real files hold 40 / 24 blocks, BLIP-2 builds 39 / 23), 224-px position table;
* ``blip2_*.pth``: ``{"model": state_dict}`` in LAVIS key names; ``visual_encoder.*`` only in the files whose ViT
  was trained (caption and COCO-retrieval fine-tunes, 364 px), the Q-Former's ``position_ids`` buffer included;
* ``blip2-*`` hub folders (``Salesforce/blip2-opt-2.7b`` …): ``save_pretrained_hf`` output (``config.json``,
  ``model.safetensors``, processor and tokenizer files), verified against stock transformers when written;
* LLM folders (``opt-2.7b``, ``flan-t5-xl`` …): transformers ``save_pretrained`` with the real vocabulary size and
  special-token ids, plus a tokenizer over the toy vocabulary;
* ``bert-base-uncased``: ``BertForPreTraining`` weights and a 30522-entry WordPiece ``vocab.txt`` whose special
  tokens sit at the real ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path

import torch

from ..config import LLMS, PRESETS, LLMConfig, rehearsal_llm_config, scaled_config

log = logging.getLogger(__name__)

SCALE = "rehearsal"
# LAVIS release name → (our preset, the ViT is stored as visual_encoder.* at 364 px). docs/paper_map.md §8.2.
LAVIS_FILES = {
    "blip2_pretrained.pth": ("vitg", False),
    "blip2_pretrained_vitL.pth": ("vitl", False),
    "blip2_finetune_coco.pth": ("vitg", True),
    "blip2_pretrained_opt2.7b.pth": ("vitg_opt2.7b", False),
    "blip2_pretrained_opt6.7b.pth": ("vitg_opt6.7b", False),
    "blip2_caption_opt2.7b.pth": ("vitg_opt2.7b", True),
    "blip2_caption_opt6.7b.pth": ("vitg_opt6.7b", True),
    "blip2_pretrained_flant5xl.pth": ("vitg_flant5xl", False),
    "blip2_pretrained_flant5xl_vitL.pth": ("vitl_flant5xl", False),
    "blip2_pretrained_flant5xxl.pth": ("vitg_flant5xxl", False),
    "blip2_caption_flant5xl.pth": ("vitg_flant5xl", True),
}
VISION_FILES = {"eva_vit_g.pth": "vitg", "clip_vit_L.pth": "vitl"}
LLM_DIRS = {"opt-2.7b": "opt2.7b", "opt-6.7b": "opt6.7b", "flan-t5-xl": "flant5xl", "flan-t5-xxl": "flant5xxl"}
# transformers hub folder (last path part) → (our preset, image size). ``-coco``: the COCO fine-tunes (364 px).
HUB_DIRS = {
    "blip2-opt-2.7b": ("vitg_opt2.7b", 224),
    "blip2-opt-6.7b": ("vitg_opt6.7b", 224),
    "blip2-flan-t5-xl": ("vitg_flant5xl", 224),
    "blip2-flan-t5-xxl": ("vitg_flant5xxl", 224),
    "blip2-opt-2.7b-coco": ("vitg_opt2.7b", 364),
    "blip2-opt-6.7b-coco": ("vitg_opt6.7b", 364),
    "blip2-flan-t5-xl-coco": ("vitg_flant5xl", 364),
    "blip2-itm-vit-g": ("vitg", 224),
    "blip2-itm-vit-g-coco": ("vitg", 364),
}
BERT_DIRS = ("bert-base-uncased",)
BERT_VOCAB = 30522  # bert-base-uncased; the Q-Former adds [DEC] as id 30522
_BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def kind_of(name: str) -> str:
    """The format a ``weights/`` name stands for: ``vision``, ``lavis``, ``llm``, ``bert`` or ``hub``.

    Raises:
        ValueError: a name that is no released file the rehearsal knows (names the file and the known names).
    """
    base = Path(name).name
    for kind, names in (("vision", VISION_FILES), ("lavis", LAVIS_FILES), ("llm", LLM_DIRS), ("bert", BERT_DIRS),
                        ("hub", HUB_DIRS)):  # fmt: skip
        if base in names:
            return kind
    known = sorted([*VISION_FILES, *LAVIS_FILES, *LLM_DIRS, *BERT_DIRS, *HUB_DIRS])
    raise ValueError(f"{name}: no released file of that name is known to the rehearsal (known: {known})")


def _seed(name: str) -> None:
    torch.manual_seed(zlib.crc32(Path(name).name.encode()))  # same file name → same tensors, on any machine


def _vision_cfg(preset: str, image_size: int, extra_blocks: int = 0):
    v = scaled_config(PRESETS[preset], SCALE).vision
    return dataclasses.replace(v, image_size=image_size, depth=v.depth + extra_blocks, precision="fp32")


def vision_file_state(preset: str) -> dict[str, torch.Tensor]:
    """The tower of ``eva_vit_g.pth`` / ``clip_vit_L.pth`` at rehearsal size: built depth + 1 blocks, 224 px."""
    from ..convert import ours_to_lavis
    from ..vision import build_vision_tower

    cfg = _vision_cfg(preset, 224, extra_blocks=1)  # the real files carry the block BLIP-2 drops
    tower = build_vision_tower(cfg)
    lavis = ours_to_lavis({f"vision_model.{k}": v for k, v in tower.state_dict().items()}, None, cfg.arch)
    return {k.removeprefix("visual_encoder."): v.contiguous() for k, v in lavis.items()}


def _model(preset: str, image_size: int, tokenizer=None):
    from ..model import Blip2, Blip2QFormerModel

    cfg = scaled_config(PRESETS[preset], SCALE)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=image_size, precision="fp32"))
    if cfg.llm is None:
        model = Blip2QFormerModel(cfg)
        model.tokenizer = tokenizer
        return model
    name = next(k for k, c in LLMS.items() if c.hf_config == PRESETS[preset].llm.hf_config)
    llm = LLMConfig(cfg.llm.family, hf_config=rehearsal_llm_config(name), hidden_size=cfg.llm.hidden_size,
                    precision="fp32", exact_gelu=cfg.llm.exact_gelu)  # fmt: skip
    return Blip2(cfg.replace(llm=llm), tokenizer=tokenizer)


def lavis_file_state(name: str) -> dict[str, torch.Tensor]:
    """``checkpoint["model"]`` of the LAVIS release ``name`` at rehearsal size, in LAVIS key names."""
    from ..convert import ours_to_lavis

    preset, with_vit = LAVIS_FILES[Path(name).name]
    model = _model(preset, 364 if with_vit else 224)
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    out = ours_to_lavis(sd, cfg.llm.family if cfg.llm else None, cfg.vision.arch)
    if not with_vit:  # pre-training files hold no ViT: it comes from eva_vit_g.pth / clip_vit_L.pth
        out = {k: v for k, v in out.items() if not k.startswith("visual_encoder.")}
    # LAVIS's BERT registers position_ids as a saved buffer (ours is not saved): every released file has it.
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(cfg.qformer.max_position_embeddings)[None]
    return {k: v.contiguous() for k, v in out.items()}


def bert_vocab() -> list[str]:
    """30522 WordPiece entries: bert-base-uncased's special ids, the toy world's words, then filler pieces."""
    from ..toy.vocab import WORDS

    vocab = [f"[unused{i}]" for i in range(BERT_VOCAB)]
    for tok, i in _BERT_SPECIAL_IDS.items():
        vocab[i] = tok
    words = [w for w in dict.fromkeys(WORDS) if w not in _BERT_SPECIAL_IDS]
    for j, w in enumerate(words):
        vocab[1000 + j] = w  # bert-base-uncased's own words start at 999 ('!'); ours right after
    for i in range(1000 + len(words), BERT_VOCAB):
        vocab[i] = f"##r{i}"
    return vocab


def bert_tokenizer():
    """The uncased WordPiece tokenizer over :func:`bert_vocab` (what ``bert-base-uncased`` holds, in miniature)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(bert_vocab())}, do_lower_case=True)


def write_bert(out: Path, name: str = "bert-base-uncased") -> None:
    """``bert-base-uncased`` at rehearsal size: ``config.json``, ``model.safetensors``, tokenizer files."""
    from transformers import BertConfig, BertForPreTraining

    q = scaled_config(PRESETS["vitg"], SCALE).qformer
    out.mkdir(parents=True, exist_ok=True)
    _seed(name)
    cfg = BertConfig(vocab_size=BERT_VOCAB, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                     num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                     max_position_embeddings=q.max_position_embeddings)  # fmt: skip
    BertForPreTraining(cfg).save_pretrained(out)
    bert_tokenizer().save_pretrained(out)  # tokenizer.json, tokenizer_config.json
    (out / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n")  # as the hub folder has it too


def write_llm(out: Path, folder: str) -> None:
    """The LLM folder ``folder`` (``opt-2.7b`` …) written to ``out``: ``save_pretrained`` + the family's tokenizer."""
    from ..llm import build_llm
    from ..toy.vocab import build_opt_tokenizer, build_t5_tokenizer

    name = LLM_DIRS[folder]
    family = LLMS[name].family
    _seed(folder)
    lm = build_llm(LLMConfig(family, hf_config=rehearsal_llm_config(name), precision="fp32"))
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out)
    (build_opt_tokenizer() if family == "opt" else build_t5_tokenizer()).save_pretrained(out)


def write_hub(out: Path) -> None:
    """A ``Salesforce/blip2-*`` folder: our exporter's transformers layout, checked against transformers."""
    from ..pretrained import save_pretrained_hf
    from ..toy.vocab import build_opt_tokenizer, build_t5_tokenizer

    preset, size = HUB_DIRS[out.name]
    _seed(out.name)
    cfg = PRESETS[preset]
    if cfg.llm is None:
        tok = bert_tokenizer()
        tok.add_special_tokens({"bos_token": "[DEC]"})  # id 30522, as the Q-Former tokenizer has it
    else:
        tok = build_opt_tokenizer() if cfg.llm.family == "opt" else build_t5_tokenizer()
    model = _model(preset, size, tok).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained_hf(model, out)


def write_weight(root: Path, name: str) -> Path:
    """Write the rehearsal model for ``name`` (a path under ``root``, e.g. ``weights/eva_vit_g.pth``); returns it.

    An existing file or folder is kept (the tree is built once, then reused).
    """
    path = root / name.rstrip("/")
    if path.exists():
        return path
    kind = kind_of(name)
    log.info("rehearsal weights: %s (%s)", name, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    if kind in ("vision", "lavis"):
        _seed(name)
        sd = vision_file_state(VISION_FILES[path.name]) if kind == "vision" else lavis_file_state(path.name)
        torch.save(sd if kind == "vision" else {"model": sd}, tmp)  # LAVIS: {"model": ...}; ViT files: bare
        tmp.rename(path)
        return path
    if kind == "hub":
        write_hub(path)  # save_pretrained_hf writes beside it and renames when its check passed
        return path
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    (write_llm if kind == "llm" else write_bert)(tmp, path.name)
    tmp.rename(path)
    return path
