r"""Offline tiny tokenizers and synthetic batches for tests and ``smoke`` runs (no network, no files needed).

The tokenizers follow the real conventions the model code depends on: BERT ``[PAD]=0``, ``[CLS]``, ``[SEP]`` and an
added ``[DEC]`` bos token (docs/paper_map.md §1.3); OPT prepends BOS ``</s>`` and has a ``"\n"`` token used as end of
caption (docs/paper_map.md §1.5); T5 appends ``</s>`` (id 1) and pads with 0.
"""

from __future__ import annotations

import torch

WORDS = [
    "a",
    "photo",
    "of",
    "dog",
    "cat",
    "red",
    "blue",
    "green",
    "the",
    "on",
    "mat",
    "question",
    "answer",
    "short",
    ":",
    "?",
    "what",
    "is",
    "colour",
    "sky",
    "small",
    "large",
    "circle",
    "square",
    "left",
    "right",
    "two",
]


def tiny_bert_tokenizer(vocab_size: int = 100):
    """BERT WordPiece tokenizer over :data:`WORDS` (+ filler) with ``[DEC]`` added as bos → id ``vocab_size - 1``."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + WORDS
    words += [f"x{i}" for i in range(vocab_size - 1 - len(words))]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def tiny_llm_tokenizer(family: str, vocab_size: int = 99):
    """WordLevel tokenizer wrapped as ``PreTrainedTokenizerFast`` with OPT ("opt") or T5 ("t5") conventions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "\n"] if family == "opt" else ["<pad>", "</s>", "<unk>"]
    words = specials + WORDS
    words += [f"x{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    if family == "opt":  # OPT prepends BOS </s> (id 2), pad 1
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def synthetic_batch(batch: int, image_size: int, seed: int = 0, with_image_ids: bool = False) -> dict:
    """Random images and short captions from :data:`WORDS` (``image``, ``text_input``[, ``image_id``])."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    n = len(WORDS) - 4
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, n, (3 + b % 3,), generator=g)) for b in range(batch)]
    out = {"image": images, "text_input": texts}
    if with_image_ids:
        out["image_id"] = torch.arange(batch) // 2  # two captions per image
    return out


class SyntheticImageText(torch.utils.data.Dataset):
    """Deterministic random PIL images with captions from :data:`WORDS` (``train_data: synthetic`` smoke runs).

    Returns LAVIS sample keys after the train transform is applied by the caller's pipeline: ``image`` (tensor),
    ``text_input``, ``image_id`` (string: the one-hot ITC branch); with ``vqa=True`` also ``answers``/``weights``.
    """

    def __init__(self, n: int, image_size: int, seed: int = 0, vqa: bool = False):
        self.n, self.size, self.seed, self.vqa = n, image_size, seed, vqa

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        image = torch.rand(3, self.size, self.size, generator=g)  # already a tensor: no PIL round trip needed
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS) - 4, (4,), generator=g)]
        out = {"image": image, "text_input": " ".join(words), "image_id": f"synthetic_{i}"}
        if self.vqa:
            out.update(answers=[words[0], words[1]], weights=[0.7, 0.3])
        return out
