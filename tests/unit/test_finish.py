"""Replies near the token limit end at a sentence end instead of mid-sentence."""

import torch
from transformers import AutoTokenizer

from chatbot.generation.base import GenerationSettings
from chatbot.generation.transformers_backend import _BreakLoops, _StopAtSentenceEnd


def stops(tokenizer, prompt: str, reply: str, settings: GenerationSettings) -> bool:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(reply, add_special_tokens=False)["input_ids"]])
    return bool(_StopAtSentenceEnd(tokenizer, len(prompt_ids), settings)(ids, None)[0])


def test_stops_at_a_sentence_end_only_near_the_limit(tiny_causal_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_dir)
    reply_tokens = len(tokenizer("the cat sat on the mat.", add_special_tokens=False)["input_ids"])
    near = GenerationSettings(max_new_tokens=reply_tokens + 2, sentence_tail=8)
    far = GenerationSettings(max_new_tokens=reply_tokens + 40, sentence_tail=8)
    assert stops(tokenizer, "hello", "the cat sat on the mat.", near)
    assert not stops(tokenizer, "hello", "the cat sat on the mat.", far)  # not near the limit: go on
    assert not stops(tokenizer, "hello", "the cat sat on the mat", near)  # mid-sentence
    assert not stops(tokenizer, "hello", "the cat sat on mat 1.", near)  # "1." starts a list item


def banned(prompt: list[int], reply: list[int]) -> set[int]:
    scores = torch.zeros(1, 50)
    _BreakLoops(len(prompt), numbers=frozenset({40, 41, 42}))(torch.tensor([prompt + reply]), scores)
    return set(torch.nonzero(scores[0] == -float("inf")).flatten().tolist())


def test_a_phrase_may_not_start_a_fourth_copy_in_a_row():
    assert banned([1, 2], [5, 7, 9, 7, 9, 7, 9]) == {7}  # "sunglasses, sunglasses, sunglasses," → not again
    assert banned([1, 2], [3, 4, 6, 3, 4, 6, 3, 4, 6]) == {3}  # a longer phrase
    assert banned([1, 2], [8, 8, 8]) == {8}
    assert banned([1, 2], [3, 40, 6, 3, 41, 6, 3, 42, 6]) == {3}  # "In 1610, … In 1611, … In 1612, …"
    assert banned([1, 2], [40, 6, 41, 6, 42, 6]) == {40, 41, 42}  # a copy would start with a number


def test_repeats_that_are_not_loops_are_allowed():
    assert banned([1, 2], [7, 9, 7, 9]) == set()  # two copies: a list may name a thing twice
    assert banned([7, 9, 7, 9, 7, 9], [7, 9]) == set()  # the prompt's copies do not count: facts may be copied
    assert banned([1, 2], [7, 9, 5, 7, 9, 5, 7, 9]) == set()  # not back to back at the end
