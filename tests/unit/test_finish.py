"""Replies near the token limit end at a sentence end instead of mid-sentence."""

import torch
from transformers import AutoTokenizer

from chatbot.generation.base import GenerationSettings
from chatbot.generation.transformers_backend import _StopAtSentenceEnd


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
