r"""Closed toy vocabulary, the three offline tokenizers, and the text corpora the frozen models learn from.

Tokenizers are ``tokenizers`` WordLevel models wrapped in ``PreTrainedTokenizerFast`` and saved with
``save_pretrained``, so ``AutoTokenizer.from_pretrained(local_dir)`` loads them like the real ones:

* OPT: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``"\n"``=4. ``</s>`` is prepended as BOS (as OPT does) and
  ``"\n"`` is a single token, the end-of-caption / end-of-answer marker LAVIS uses for OPT (docs/paper_map.md §3.1,
  §5.1).
* T5: ``<pad>``=0 (also the decoder start), ``</s>``=1 (appended), ``<unk>``=2.
* BERT: ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4; ``[DEC]`` is added later by the Q-Former
  (id = ``len(tokenizer)``), as BLIP-2 adds it to bert-base-uncased (docs/paper_map.md §1.3).

All three lower-case their input and split off punctuation, so the workbook prompts ``"Question: {} Answer:"``
(OPT) and ``"Question: {} Short answer:"`` (FlanT5) become ``question : ... ? answer :`` in toy tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from . import world

# Every word the toy world writes (captions, questions, answers, prompts), in a fixed order.
WORDS = (
    *world.SIZES, *world.COLOURS, *world.SHAPES, *(s + "s" for s in world.SHAPES),
    "0", "1", "2", "3", "4", *world.NUMBER_WORDS, "yes", "no",
    "a", "the", "and", "of", "left", "right", "from", "to", "there", "is", "are", "object", "objects", "single",
    "picture", "what", "colour", "color", "shape", "size", "how", "many", "question", "short", "answer",
    ",", "?", ":", ".",
)  # fmt: skip
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "\n")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
OPT_BOS = OPT_EOS = 2
OPT_PAD = 1
OPT_NEWLINE = 4
T5_PAD = 0
T5_EOS = 1

# The prompt templates of the workbook's zero-shot VQA (docs/paper_map.md §5.1), used verbatim in LLM pretraining.
OPT_PROMPT = "Question: {} Answer:"
T5_PROMPT = "Question: {} Short answer:"

_SPLIT = re.compile(r"\n|[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    r"""What the tokenizers' normaliser + pre-tokeniser produce (lower-case; ``\n`` and punctuation isolated)."""
    return _SPLIT.findall(text.lower())


def _vocab(specials: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate((*specials, *WORDS))}


def _word_level(vocab: dict[str, int], unk: str, keep_newline: bool) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    ws = r"[^\S\n]+" if keep_newline else r"\s+"  # OPT keeps "\n" as a token; the others treat it as space
    steps = [pre_tokenizers.Split(Regex(ws), behavior="removed")]
    if keep_newline:
        steps.append(pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"))
    steps.append(pre_tokenizers.Punctuation(behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return tok


def build_opt_tokenizer() -> PreTrainedTokenizerFast:
    r"""OPT-style tokenizer: BOS ``</s>`` first, no EOS appended, ``"\n"`` a single token."""
    vocab = _vocab(OPT_SPECIALS)
    tok = _word_level(vocab, "<unk>", keep_newline=True)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", OPT_BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=128,
    )  # fmt: skip


def build_t5_tokenizer() -> PreTrainedTokenizerFast:
    """T5-style tokenizer: ``</s>`` appended, ``<pad>`` = 0 = decoder start."""
    tok = _word_level(_vocab(T5_SPECIALS), "<unk>", keep_newline=False)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=128
    )


def build_bert_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style tokenizer: ``[CLS] text [SEP]``, ``[PAD]`` = 0; room for the Q-Former's added ``[DEC]``."""
    tok = _word_level(_vocab(BERT_SPECIALS), "[UNK]", keep_newline=False)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip


def encode(text: str, vocab: dict[str, int]) -> list[int]:
    """Fast ids for a text (no specials added); equal to the saved tokenizer's ids (a unit test checks)."""
    return [vocab[w] for w in split_words(text)]


def save_tokenizer(tok: PreTrainedTokenizerFast, out: Path) -> None:
    """``save_pretrained`` into ``out`` (loadable with ``AutoTokenizer.from_pretrained(out)``)."""
    tok.save_pretrained(str(out))


# ----------------------------------------------------------------------------------------------------------------
# Text corpora (description → question → answer), the only data the frozen LLMs ever see


def qa_prompt(question: str, family: str) -> str:
    """The zero-shot prompt text for a question (``OPT_PROMPT`` / ``T5_PROMPT``)."""
    return (OPT_PROMPT if family == "opt" else T5_PROMPT).format(question)
