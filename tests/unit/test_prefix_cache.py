"""Reusing the KV cache of earlier prompts: same replies, far fewer prompt tokens re-read."""

import threading
import time

import pytest
import torch

from chatbot.conversation.service import ChatService
from chatbot.conversation.store import ConversationStore
from chatbot.generation import transformers_backend as decoder
from chatbot.generation.prefix_cache import PrefixCache, common_prefix_length
from chatbot.generation.transformers_backend import (
    GenerationSettings,
    load_generator,
    wait_idle,
)
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import Conversation, Message, Role, Turn

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


def cache_maker(generator):
    """A function giving the KV cache of the model having read `ids`."""
    from transformers import DynamicCache

    def cache_for(ids):
        cache = DynamicCache(config=generator.model.config)
        with torch.no_grad():
            generator.model(input_ids=ids[None], past_key_values=cache, use_cache=True)
        return cache

    return cache_for


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
    generator.prefill([SYSTEM]).result()
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
    cache_for = cache_maker(generator)

    a, b, c = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]), torch.tensor([11, 12, 13])
    pool.put(a, cache_for(a))
    pool.put(torch.cat([a, b]), cache_for(torch.cat([a, b])))  # the same conversation, later: replaces `a`
    assert len(pool) == 1
    pool.put(b, cache_for(b))
    pool.put(c, cache_for(c))
    assert len(pool) == 2 and pool.take(torch.cat([a, b, c])) is None  # the oldest was evicted
    reused = pool.take(torch.cat([c, a]))
    assert reused.get_seq_length() == 3


HISTORY = [SYSTEM, Message("user", "hello what is the name of my cat"), Message("assistant", "my cat is red")]
NEXT = HISTORY + [Message("user", "and the dog")]


def prompt_length(generator, messages) -> int:
    return generator.encode_prompt(messages)["input_ids"].shape[1]


def test_prefill_reads_in_chunks_and_the_next_turn_reads_only_its_new_tail(generator, monkeypatch):
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 4)
    with PrefillLengths(generator.model) as ahead:
        generator.prefill(HISTORY).result()
    assert len(ahead.lengths) > 3 and set(ahead.lengths[:-1]) == {4}
    monkeypatch.undo()  # a reply reads a long prompt in chunks too; this tail is shorter than one
    with PrefillLengths(generator.model) as seen:
        "".join(generator.stream(NEXT, GREEDY))
    assert seen.lengths[0] == prompt_length(generator, NEXT) - sum(ahead.lengths)


def test_prefill_gives_way_to_a_reply_waiting_for_the_model(generator, monkeypatch):
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 10_000)  # a reply reads its prompt in one pass: lengths[0]
    lengths = read_ahead_then_reply(generator)
    assert lengths[0] == prompt_length(generator, NEXT)  # nothing was read ahead: the reply came first


def read_ahead_then_reply(generator, conversation: str | None = None) -> list[int]:
    """HISTORY read ahead and a reply to NEXT queued behind it on the model thread; the lengths read."""
    gate = threading.Event()
    decoder._MODEL_THREAD.submit(gate.wait)  # keep the model thread busy while both are queued
    replies = []
    with PrefillLengths(generator.model) as seen:
        ahead = generator.prefill(HISTORY, conversation=conversation)
        reply = threading.Thread(
            target=lambda: replies.append("".join(generator.stream(NEXT, GREEDY, conversation=conversation))))
        reply.start()
        while not generator._replies_waiting:
            time.sleep(0.01)
        gate.set()
        reply.join(timeout=60)
    assert ahead.result() is None and replies
    return seen.lengths


@pytest.mark.parametrize("read_ahead", [True, False])
def test_turns_where_the_window_moves_read_only_their_tail_when_read_ahead(tiny_causal_dir, tmp_path, monkeypatch,
                                                                           read_ahead):
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 10_000)  # a reply reads its prompt in one pass: lengths[0]
    generator = load_generator(str(tiny_causal_dir), max_context=600)
    generator.prefix_cache.max_bytes = 2**40
    if not read_ahead:
        monkeypatch.setattr(generator, "prefill", lambda messages, conversation=None: None)
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), generator, store, GenerationSettings(8, temperature=0),
                          system_prompt=SYSTEM.content)
    budget = generator.prompt_budget(service.settings)
    conv, reads, window = service.new_conversation(), [], []
    for i in range(30):
        with PrefillLengths(generator.model) as seen:
            list(service.respond("key:ana", conv, f"tell me about the weather today and tomorrow {i}"))
        reads.append(seen.lengths[0])
        window.append(len(conv.render(generator.count_tokens, budget)))
        wait_idle()  # the user reads the reply and types the next message
    moves = sum(later < earlier for earlier, later in zip(window, window[1:]))  # fewer turns kept: it moved
    assert moves >= 2
    # A turn's new tail is its question and the previous reply (~25 tokens); the window is several times that.
    if read_ahead:
        assert max(reads[1:]) < budget // 4
        # Whatever the memory budget, the window in use and the one read ahead: the windows it left are gone.
        assert len(generator.prefix_cache) <= 2
    else:
        assert max(reads[1:]) > budget // 2


def test_with_the_tracked_state_block_a_turn_reads_only_the_block_and_its_question(tiny_causal_dir, tmp_path,
                                                                                    monkeypatch):
    """The block sits in front of the newest question and is gone from it a turn later; the history without it
    is read ahead after each reply, so the previous question and reply are not read again while the user waits."""
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 10_000)  # a reply reads its prompt in one pass: lengths[0]
    generator = load_generator(str(tiny_causal_dir))
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), generator, store, GenerationSettings(8, temperature=0),
                          system_prompt=SYSTEM.content)
    conv = service.new_conversation()
    list(service.respond("key:ana", conv, "My daughter's name is Matilda and she is seven."))
    wait_idle()
    # Questions the fact relates to: a message related to nothing in the state gets no block.
    for question in ["What should my daughter eat tonight?", "Where could my daughter go this weekend?",
                     "How old is my daughter now?"]:
        asked = Conversation.from_dict(conv.to_dict())
        asked.add_user_turn(Turn(role=Role.USER, text=question))
        prompt = service.prompt(asked)
        assert "Matilda" in prompt[-1].content  # the block is there, in front of the question
        block_and_question = prompt_length(generator, prompt) - prompt_length(generator, prompt[:-1])
        with PrefillLengths(generator.model) as seen:
            list(service.respond("key:ana", conv, question))
        assert seen.lengths[0] <= block_and_question + 2  # + the reply header's tokens at most
        wait_idle()  # the user reads the reply and types the next message


def test_turns_before_a_window_move_also_read_only_the_block_and_their_question(tiny_causal_dir, tmp_path,
                                                                                  monkeypatch):
    """Near a move, both are read ahead after a reply: the history without the block, then the moved window."""
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 10_000)  # a reply reads its prompt in one pass: lengths[0]
    generator = load_generator(str(tiny_causal_dir), max_context=600)
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), generator, store, GenerationSettings(8, temperature=0),
                          system_prompt=SYSTEM.content)
    budget = generator.prompt_budget(service.settings)
    conv = service.new_conversation()
    list(service.respond("key:ana", conv, "My daughter's name is Matilda and she is seven."))
    wait_idle()
    near = 0
    for i in range(30):
        question = f"What should my daughter eat tonight, number {i}?"
        asked = Conversation.from_dict(conv.to_dict())
        asked.add_user_turn(Turn(role=Role.USER, text=question))
        prompt = service.prompt(asked)
        assert "Matilda" in prompt[-1].content  # the block, in front of the question
        block_and_question = prompt_length(generator, prompt) - prompt_length(generator, prompt[:-1])
        near += conv.render_ahead(generator.count_tokens, budget) is not None
        with PrefillLengths(generator.model) as seen:
            list(service.respond("key:ana", conv, question))
        assert seen.lengths[0] <= block_and_question + 2, i  # + the reply header's tokens at most
        wait_idle()  # the user reads the reply and types the next message
    assert near >= 3  # turns where the moved window was read ahead


def test_pool_drops_the_oldest_entries_beyond_its_memory_budget(generator):
    cache_for = cache_maker(generator)

    a, b, c = torch.arange(5, 25), torch.arange(30, 50), torch.arange(60, 80)
    one = sum(t.untyped_storage().nbytes() for layer in cache_for(a).layers for t in (layer.keys, layer.values))
    pool = PrefixCache(slots=8, min_reuse=1, max_bytes=2 * one)
    for ids in (a, b, c):
        pool.put(ids, cache_for(ids))
    assert len(pool) == 2 and pool.take(torch.cat([a, c])) is None  # the oldest went, though slots were free
    assert pool.take(torch.cat([c, a])).get_seq_length() == len(c)
    small = PrefixCache(slots=8, min_reuse=1, max_bytes=1)
    small.put(a, cache_for(a))
    assert len(small) == 1  # the newest stays, whatever its size


def test_a_continuing_prompt_takes_the_entry_over_and_a_diverging_one_gets_a_copy(generator):
    cache_for = cache_maker(generator)

    shared, mine, theirs = torch.arange(5, 15), torch.arange(20, 40), torch.arange(50, 70)
    pool = PrefixCache(min_reuse=1)
    stored = cache_for(torch.cat([shared, mine]))
    pool.put(torch.cat([shared, mine]), stored)
    other = pool.take(torch.cat([shared, theirs]))  # shares a third: a copy, the entry stays
    assert other is not stored and other.get_seq_length() == len(shared) and len(pool) == 1
    again = pool.take(torch.cat([shared, mine, theirs]))  # continues it: handed over, no copy
    assert again is stored and again.get_seq_length() == len(shared) + len(mine) and len(pool) == 0


def test_a_stopped_reply_reads_nothing_ahead(tiny_causal_dir, tmp_path, monkeypatch):
    """A stop frees the CPU at once: the read-ahead after a reply must not start after a stop."""
    generator = load_generator(str(tiny_causal_dir))
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), generator, store, GenerationSettings(64, temperature=0),
                          system_prompt=SYSTEM.content)
    asked = []
    monkeypatch.setattr(generator, "prefill", lambda messages, conversation=None: asked.append(messages))
    conv = service.new_conversation()
    list(service.respond("key:ana", conv, "hello what is the weather today"))
    assert len(asked) == 1  # a finished reply: the start of the next prompt is read ahead
    for _ in service.respond("key:ana", conv, "and tomorrow"):
        service.stop("key:ana", conv.id)
    assert conv.turns[-1].interrupted and len(asked) == 1


def test_reused_caches_give_the_logits_of_reading_each_prompt_from_scratch(tiny_causal_dir, tmp_path, monkeypatch):
    """A long chat through the service (read-ahead after every reply, the window moving, replies continued,
    prompts read in chunks that start anywhere): every reply has the tokens and logits of a fresh reading."""
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 16)  # many chunk boundaries, none where a turn starts
    generator = load_generator(str(tiny_causal_dir), max_context=600)
    model, original = generator.model, generator.model.generate
    reused, worst = [], []

    def generate(**kwargs):  # each reply also generated without a cache, from the same prompt ids
        fresh = original(**{k: v for k, v in kwargs.items() if k not in ("past_key_values", "streamer")},
                         output_logits=True, return_dict_in_generate=True)
        cache = kwargs.get("past_key_values")
        reused.append(cache.get_seq_length() if cache is not None else 0)
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, fresh.sequences)
        worst.append(max(float((a - b).abs().max()) for a, b in zip(out.logits, fresh.logits, strict=True)))
        return out.sequences

    monkeypatch.setattr(model, "generate", generate)
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), generator, store, GenerationSettings(8, temperature=0),
                          system_prompt=SYSTEM.content)
    budget = generator.prompt_budget(service.settings)
    conv, window = service.new_conversation(), []
    for i in range(24):
        list(service.respond("key:ana", conv, f"tell me about the weather today and tomorrow {i}"))
        if i % 5 == 2 and conv.turns[-1].cut:
            list(service.continue_reply("key:ana", conv))
        window.append(len(conv.render(generator.count_tokens, budget)))
        wait_idle()  # the read-ahead runs before the next message, as when the user reads and types
    assert sum(later < earlier for earlier, later in zip(window, window[1:])) >= 2  # the window moved
    assert sum(n > 0 for n in reused) >= len(reused) - 1  # nearly every reply started from a reused cache
    assert max(worst) < 1e-4  # float32 rounding only (3e-6 seen): no position, entry or crop is off


def test_a_reply_moving_onto_a_window_read_ahead_for_it_drops_the_window_it_left(generator):
    cache_for = cache_maker(generator)

    shared = torch.arange(5, 15)
    left, moved, other = (torch.cat([shared, torch.arange(start, start + 20)]) for start in (20, 50, 80))
    pool = PrefixCache(min_reuse=1)
    pool.put(other, cache_for(other), "bob")
    pool.put(left, cache_for(left), "ana")  # ana's last reply
    # Read ahead: the window ana's next turns move to, begun from a copy of the shared system prompt.
    assert pool.take(moved, "ana", ahead=True).get_seq_length() == len(shared)
    pool.put(moved, cache_for(moved), "ana")
    still = torch.cat([left, torch.tensor([3])])
    pool.put(still, pool.take(still, "ana"), "ana")  # a turn still on the old window keeps the one read ahead
    pool.put(left, pool.take(still, "ana", ahead=True), "ana")  # and so does reading that window again
    further = torch.cat([moved, torch.tensor([9])])
    pool.put(further, pool.take(further, "ana", ahead=True), "ana")  # or the moved one further
    assert len(pool) == 3
    assert pool.take(torch.cat([moved, torch.tensor([7])]), "ana").get_seq_length() == len(moved)
    assert len(pool) == 1  # ana's old window went; bob's entry stays
    assert pool.take(torch.cat([other, torch.tensor([1])]), "bob").get_seq_length() == len(other)


def test_a_copy_for_another_conversation_holds_only_the_shared_prefix(generator):
    cache_for = cache_maker(generator)

    window = torch.arange(5, 105)
    pool = PrefixCache(min_reuse=1)
    pool.put(window, cache_for(window))
    copied = pool.take(torch.cat([window[:10], torch.arange(200, 230)]))
    assert copied.get_seq_length() == 10 and len(pool) == 1
    for layer in copied.layers:
        for t in (layer.keys, layer.values):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # not the 100-token window's storage


def test_a_read_ahead_that_gives_way_to_a_reply_leaves_it_the_cache(generator, monkeypatch):
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 10_000)  # a reply reads its prompt in one pass: lengths[0]
    "".join(generator.stream(HISTORY[:2], GREEDY, conversation="ana"))
    lengths = read_ahead_then_reply(generator, "ana")
    # The read-ahead took the first reply's cache over and read nothing: the reply still reads only its tail.
    assert lengths[0] <= prompt_length(generator, NEXT) - prompt_length(generator, HISTORY[:2])


def test_a_copy_of_a_sliding_window_cache_keeps_the_shared_prefix():
    from transformers import DynamicCache, MistralConfig

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    cache = DynamicCache(config=config)
    for index in range(2):
        cache.update(torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), index)
    pool = PrefixCache(min_reuse=1)
    pool.put(torch.arange(12), cache)
    copied = pool.take(torch.cat([torch.arange(4), torch.arange(50, 60)]))
    assert copied.get_seq_length() == 4 and [layer.keys.shape[2] for layer in copied.layers] == [4, 4]
