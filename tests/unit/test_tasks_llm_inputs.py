"""Stage2Task's LLM inputs: exact token ids, masks and loss targets, hand-worked with the tiny word-level tokenizers.

Tiny OPT vocabulary (blip2lib.toy.synthetic): <s> 0, <pad> 1, </s> 2 (BOS, prepended), <unk> 3, "\\n" 4, then the words
a 5, photo 6, of 7, dog 8, red 10, blue 11, the 13, question 16, answer 17, ":" 19, "?" 20, what 21, is 22,
colour 23, sky 24, circle 27, two 31. Tiny T5: <pad> 0, </s> 1 (EOS, appended), <unk> 2, then a 3, photo 4, of 5,
dog 6, red 8, blue 9, the 11, question 14, answer 15, ":" 17, "?" 18, what 19, is 20, colour 21, sky 22, circle 25,
two 29. -100 marks positions without a loss.

What the LLM is trained to predict (BLIP-2 / LAVIS): stage 2 OPT, every caption token plus "\\n" and — with the
empty prompt — the leading BOS too; caption fine-tuning OPT, nothing of BOS + prompt; VQA fine-tuning OPT, nothing
of BOS + the filled question template, then the answer and "\\n"; VQA fine-tuning T5, the template to the encoder
and answer + EOS as decoder labels; T5 pre-training, a prefix of the caption to the encoder and the rest as labels.
The T5 caption fine-tuning target is not pinned here.
"""

import pytest

from blip2lib.config import tiny_config
from blip2lib.model import Blip2
from blip2lib.tasks import Stage2Task
from blip2lib.toy.synthetic import tiny_llm_tokenizer

X = -100
TEMPLATE = "question : {} answer :"  # the tiny vocabulary is lower case
QUESTIONS = ["what colour is the sky ?", "what is red ?"]
ANSWERS = ["blue", "two circle"]


@pytest.fixture(scope="module")
def opt():
    return Blip2(tiny_config("opt"), tokenizer=tiny_llm_tokenizer("opt"))


@pytest.fixture(scope="module")
def t5():
    return Blip2(tiny_config("t5"), tokenizer=tiny_llm_tokenizer("t5"))


def _equal(out: dict, **expected) -> None:
    for key, value in expected.items():
        assert out[key].tolist() == value, key


def test_opt_stage2_supervises_every_token_including_bos(opt):
    out = Stage2Task(opt, prompt="").llm_inputs({"text_input": ["a red circle", "the dog"]})
    _equal(out,
           input_ids=[[2, 5, 10, 27, 4], [2, 13, 8, 4, 1]],  # BOS caption "\n", right-padded with <pad>
           attention_mask=[[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
           labels=[[2, 5, 10, 27, 4], [2, 13, 8, 4, X]])  # fmt: skip


def test_opt_caption_finetuning_masks_bos_and_the_prompt(opt):
    # the prompt is prepended unless the caption already starts with it
    out = Stage2Task(opt, prompt="a photo of").llm_inputs({"text_input": ["a red circle", "a photo of the dog"]})
    _equal(out,
           input_ids=[[2, 5, 6, 7, 5, 10, 27, 4], [2, 5, 6, 7, 13, 8, 4, 1]],
           attention_mask=[[1] * 8, [1] * 7 + [0]],
           labels=[[X, X, X, X, 5, 10, 27, 4], [X, X, X, X, 13, 8, 4, X]])  # fmt: skip


def test_opt_vqa_finetuning_supervises_the_answer_only(opt):
    batch = {"text_input": QUESTIONS, "answer": ANSWERS}
    out = Stage2Task(opt, question_template=TEMPLATE).llm_inputs(batch)
    # "question : what colour is the sky ? answer : blue \n" and "question : what is red ? answer : two circle \n"
    _equal(out,
           input_ids=[[2, 16, 19, 21, 23, 22, 13, 24, 20, 17, 19, 11, 4],
                      [2, 16, 19, 21, 22, 10, 20, 17, 19, 31, 27, 4, 1]],
           attention_mask=[[1] * 13, [1] * 12 + [0]],
           labels=[[X] * 11 + [11, 4],  # BOS + 10 template tokens masked, "blue \n" supervised
                   [X] * 9 + [31, 27, 4, X]])  # fmt: skip


def test_t5_vqa_finetuning_template_to_the_encoder_answer_to_the_labels(t5):
    out = Stage2Task(t5, question_template=TEMPLATE).llm_inputs({"text_input": QUESTIONS, "answer": ANSWERS})
    _equal(out,
           input_ids=[[14, 17, 19, 21, 20, 11, 22, 18, 15, 17, 1], [14, 17, 19, 20, 8, 18, 15, 17, 1, 0, 0]],
           attention_mask=[[1] * 11, [1] * 9 + [0, 0]],
           labels=[[9, 1, X], [29, 25, 1]],  # answer + EOS, pad ignored
           decoder_attention_mask=[[1, 1, 0], [1, 1, 1]])  # fmt: skip


def test_t5_prefix_lm_splits_each_caption_into_encoder_prefix_and_target(t5):
    # two and three words: the split point is forced to after the first word; one word: nothing to condition on
    out = Stage2Task(t5, prefix_lm=True).llm_inputs({"text_input": ["a red circle", "the dog", "blue"]})
    _equal(out,
           input_ids=[[3, 1], [11, 1], [1, 0]],  # "a" / "the" / "" (EOS only)
           attention_mask=[[1, 1], [1, 1], [1, 0]],
           labels=[[8, 25, 1], [6, 1, X], [9, 1, X]],  # "red circle" / "dog" / "blue"
           decoder_attention_mask=[[1, 1, 1], [1, 1, 0], [1, 1, 0]])  # fmt: skip
    whole = Stage2Task(t5, prefix_lm=False).llm_inputs({"text_input": ["a red circle"]})
    _equal(whole, input_ids=[[1]], labels=[[3, 8, 25, 1]])  # no split: the whole caption is the target
