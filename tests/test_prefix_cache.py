"""Reusing the KV cache of earlier prompts: same replies, far fewer prompt tokens re-read."""

import pytest
import torch

from chatbot.decoder import GenerationSettings, load_generator
from chatbot.prefix_cache import PrefixCache, common_prefix_length
from chatbot.state import Message

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0)
SYSTEM = Message("system", "You are helpful.")


@pytest.fixture
def generator(tiny_causal_dir):
    return load_generator(str(tiny_causal_dir))


class PrefillLengths:
    """Records how many tokens each forward pass of the model reads."""

    def __init__(self, model):
        self.model, self.lengths = model, []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.lengths.append(kwargs["input_ids"].shape[1])

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def conversation(generator, turns):
    """Replies and prefill lengths for successive user turns, each turn resending the whole history."""
    messages, replies, prefill = [SYSTEM], [], []
    for text in turns:
        messages.append(Message("user", text))
        with PrefillLengths(generator.model) as seen:
            reply = "".join(generator.stream(messages, GREEDY))
        prefill.append(seen.lengths[0])
        replies.append(reply)
        messages.append(Message("assistant", reply))
    return replies, prefill


def test_reused_cache_gives_the_same_replies_and_reads_only_the_new_tail(generator, tiny_causal_dir):
    turns = ["hello what is the name of my cat", "tell me about the weather today", "and tomorrow please"]
    replies, prefill = conversation(generator, turns)
    uncached = load_generator(str(tiny_causal_dir))
    uncached.prefix_cache = None
    fresh, full = conversation(uncached, turns)
    assert replies == fresh
    assert prefill[0] == full[0]  # nothing to reuse on the first turn
    # Everything up to the previous reply was read last turn; only the reply and the new question are read now.
    for previous_prompt, cached, whole in zip(full, prefill[1:], full[1:]):
        assert cached <= whole - previous_prompt


def test_prefill_of_the_system_prompt_is_used_by_a_first_turn(generator):
    generator.prefill([SYSTEM])
    with PrefillLengths(generator.model) as seen:
        "".join(generator.stream([SYSTEM, Message("user", "hello cat")], GREEDY))
    full = generator.encode_prompt([SYSTEM, Message("user", "hello cat")])["input_ids"].shape[1]
    assert seen.lengths[0] < full - 3


def test_regenerating_the_same_prompt_reuses_all_but_one_token(generator):
    messages = [SYSTEM, Message("user", "hello cat")]
    first = "".join(generator.stream(messages, GREEDY))
    with PrefillLengths(generator.model) as seen:
        again = "".join(generator.stream(messages, GREEDY))
    assert again == first and seen.lengths[0] == 1


def test_common_prefix_length():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix_length(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix_length(a, torch.tensor([1, 2])) == 2
    assert common_prefix_length(a, a) == 4
    assert common_prefix_length(a, torch.tensor([7])) == 0


def test_pool_keeps_the_most_recent_slots_and_drops_superseded_entries(generator):
    pool = PrefixCache(slots=2, min_reuse=1)

    def cache_for(ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=generator.model.config)
        with torch.no_grad():
            generator.model(input_ids=ids[None], past_key_values=cache, use_cache=True)
        return cache

    a, b, c = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]), torch.tensor([11, 12, 13])
    pool.put(a, cache_for(a))
    pool.put(torch.cat([a, b]), cache_for(torch.cat([a, b])))  # the same conversation, later: replaces `a`
    assert len(pool) == 1
    pool.put(b, cache_for(b))
    pool.put(c, cache_for(c))
    assert len(pool) == 2 and pool.take(torch.cat([a, b, c])) is None  # the oldest was evicted
    reused = pool.take(torch.cat([c, a]))
    assert reused.get_seq_length() == 3
