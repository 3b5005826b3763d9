"""Replies near the token limit end at a sentence end instead of mid-sentence."""

import torch
from transformers import AutoTokenizer

from chatbot.generation.base import GenerationSettings
from chatbot.generation.transformers_backend import _BreakLoops, _DontRepeatYourself, _StopAtSentenceEnd


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


def dry(prompt: list[int], reply: list[int], breakers=frozenset({30})) -> torch.Tensor:
    """The penalty each token gets (positive: lowered) after `prompt + reply`."""
    scores = torch.zeros(1, 50)
    _DontRepeatYourself(len(prompt), breakers, multiplier=1.0, base=2.0, allowed=2)(
        torch.tensor([prompt + reply]), scores)
    return -scores[0]


def test_dry_lowers_a_token_that_would_extend_a_copy_the_more_the_longer_it_is():
    # "… 3 4 5 6 … 3 4" → 5 would repeat "3 4 5": a run of 2 → penalty 1 * 2 ** 0
    assert dry([1], [3, 4, 5, 6, 7, 3, 4])[5] == 1.0
    # "3 4 5 6 7 … 3 4 5 6" → 7 would repeat a run of 4 → 2 ** 2
    penalty = dry([1], [3, 4, 5, 6, 7, 8, 3, 4, 5, 6])
    assert penalty[7] == 4.0
    assert torch.count_nonzero(penalty) == 1  # nothing else is touched


def test_dry_allows_short_repeats_the_prompt_and_runs_across_a_breaker():
    assert not dry([1], [3, 4, 5, 4]).any()  # a run of one token ("the") is allowed
    assert not dry([3, 4, 5, 6], [3, 4]).any()  # the prompt's words may be copied (a name, a fact, code)
    assert not dry([1], [3, 4, 5, 30, 3, 4, 30]).any()  # after a breaker (a line break): a new phrase
    # A match does not reach back across a breaker: "30 3 4" matched as "3 4" only.
    assert dry([1], [30, 3, 4, 5, 30, 3, 4])[5] == 1.0


def test_the_generator_applies_dry_only_when_its_multiplier_is_set(tiny_causal_dir):
    from chatbot.generation.transformers_backend import load_generator

    generator = load_generator(str(tiny_causal_dir))
    newline = generator.tokenizer("a\n", add_special_tokens=False)["input_ids"][-1]
    assert newline in generator.breakers
    kinds = [type(p) for p in generator._processors(5, GenerationSettings(dry_multiplier=0.8))]
    assert kinds == [_BreakLoops, _DontRepeatYourself]
    assert [type(p) for p in generator._processors(5, GenerationSettings(dry_multiplier=0))] == [_BreakLoops]
