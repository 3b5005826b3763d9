"""The lean one-token decoding pass gives the model's own numbers, and steps aside for what it does not handle."""

import copy

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from chatbot.generation import decode_step
from chatbot.generation.quantize import quantize

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPT = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))


def tiny(kind: str, mode: str = "none", **sizes):
    torch.manual_seed(0)
    config, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
                           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    extra = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}} if kind == "llama" else {}
    return quantize(model_class(config(**(SIZES | sizes), **extra)).eval(), mode)


class CountingStep(decode_step.LeanStep):
    calls = 0

    def __call__(self, *args):
        CountingStep.calls += 1
        return super().__call__(*args)


@pytest.fixture(autouse=True)
def count_lean_steps(monkeypatch):
    CountingStep.calls = 0
    monkeypatch.setattr(decode_step, "LeanStep", CountingStep)


@pytest.mark.parametrize(("kind", "mode"), [("qwen2", "none"), ("llama", "none"), ("qwen2", "int4"), ("qwen2", "int8")])
def test_each_step_gives_the_logits_of_the_models_own_forward(kind, mode):
    model = tiny(kind, mode)
    original = model.forward
    assert decode_step.attach(model)
    with torch.inference_mode():
        ours, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(input_ids=PROMPT, past_key_values=ours)
        original(input_ids=PROMPT, past_key_values=theirs)
        token = PROMPT[:, -1:]
        for _ in range(6):  # positions move on, the cache grows
            got = model(input_ids=token, past_key_values=ours, use_cache=True).logits
            expected = original(input_ids=token, past_key_values=theirs, use_cache=True).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            token = expected[:, -1:].argmax(-1)
    assert CountingStep.calls == 6
    for layer_ours, layer_theirs in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(layer_ours.keys, layer_theirs.keys)
        torch.testing.assert_close(layer_ours.values, layer_theirs.values)


def test_a_layer_left_in_float32_among_quantized_ones_still_gives_the_models_logits():
    model = tiny("qwen2", "int4", intermediate_size=40)  # down_proj's 40 inputs pack neither as int4 nor int8
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    original = model.forward
    decode_step.attach(model)
    with torch.inference_mode():
        ours, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(input_ids=PROMPT, past_key_values=ours)
        original(input_ids=PROMPT, past_key_values=theirs)
        for token in PROMPT[0, :3]:
            torch.testing.assert_close(model(input_ids=token.view(1, 1), past_key_values=ours).logits,
                                       original(input_ids=token.view(1, 1), past_key_values=theirs).logits,
                                       rtol=1e-4, atol=1e-4)
    assert CountingStep.calls == 3


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_generate_writes_the_same_reply_and_uses_the_lean_step(mode):
    settings = dict(attention_mask=torch.ones_like(PROMPT), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.inference_mode():
        expected = tiny("qwen2", mode).generate(PROMPT, **settings)
        model = tiny("qwen2", mode)
        decode_step.attach(model)
        got = model.generate(PROMPT, **settings)
    assert torch.equal(got, expected)
    assert CountingStep.calls == 11  # the prompt is read by the model's own forward, then one lean step per token


def test_the_cache_grows_in_place_and_still_crops_copies_and_reads_prompts():
    model = tiny("qwen2", "int4")
    original = model.forward
    decode_step.attach(model)
    tokens = PROMPT[:, :1]
    with torch.inference_mode():
        ours, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(input_ids=PROMPT, past_key_values=ours)
        original(input_ids=PROMPT, past_key_values=theirs)
        model(input_ids=tokens, past_key_values=ours)  # the first step makes room behind the cache
        original(input_ids=tokens, past_key_values=theirs)
        storages = [layer.keys.untyped_storage().data_ptr() for layer in ours.layers]
        for _ in range(4):
            model(input_ids=tokens, past_key_values=ours)
            original(input_ids=tokens, past_key_values=theirs)
        # No copy of the cache per step (a DynamicCache concatenates, reallocating at every token).
        assert [layer.keys.untyped_storage().data_ptr() for layer in ours.layers] == storages
        # What the prefix cache does: a deep copy cropped to a shared prefix, then a new prompt tail and steps.
        ours, theirs = copy.deepcopy(ours), copy.deepcopy(theirs)
        ours.crop(-6)
        theirs.crop(-6)
        for chunk in (PROMPT[:, 2:5], tokens, tokens, PROMPT[:, :2], tokens):
            torch.testing.assert_close(model(input_ids=chunk, past_key_values=ours).logits,
                                       original(input_ids=chunk, past_key_values=theirs).logits, rtol=1e-4, atol=1e-4)
    assert CountingStep.calls == 8
    for layer_ours, layer_theirs in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(layer_ours.keys, layer_theirs.keys)
        torch.testing.assert_close(layer_ours.values, layer_theirs.values)


def test_reads_into_a_new_cache_grow_it_in_place_with_the_models_numbers():
    model = tiny("qwen2", "int4")
    original = model.forward
    decode_step.attach(model)
    with torch.inference_mode():
        ours, theirs = decode_step.new_cache(model.config), DynamicCache(config=model.config)
        for chunk in (PROMPT[:, :3], PROMPT[:, 3:5]):  # the second read makes room behind the cache
            model(input_ids=chunk, past_key_values=ours)
            original(input_ids=chunk, past_key_values=theirs)
        storages = [layer.keys.untyped_storage().data_ptr() for layer in ours.layers]
        for chunk in (PROMPT[:, 5:9], PROMPT[:, :1], PROMPT[:, 1:7]):  # prompt tails and a step
            torch.testing.assert_close(model(input_ids=chunk, past_key_values=ours).logits,
                                       original(input_ids=chunk, past_key_values=theirs).logits, rtol=1e-4, atol=1e-4)
        # A DynamicCache concatenates at every read, copying the whole cache: this one wrote into its room.
        assert [layer.keys.untyped_storage().data_ptr() for layer in ours.layers] == storages
        ours, theirs = copy.deepcopy(ours), copy.deepcopy(theirs)
        ours.crop(-4)
        theirs.crop(-4)
        for chunk in (PROMPT[:, 2:8], PROMPT[:, :1]):
            torch.testing.assert_close(model(input_ids=chunk, past_key_values=ours).logits,
                                       original(input_ids=chunk, past_key_values=theirs).logits, rtol=1e-4, atol=1e-4)
    for layer_ours, layer_theirs in zip(ours.layers, theirs.layers):
        assert type(layer_ours) is decode_step.GrowingLayer
        torch.testing.assert_close(layer_ours.keys, layer_theirs.keys)
        torch.testing.assert_close(layer_ours.values, layer_theirs.values)


def test_prompts_and_padded_batches_go_to_the_models_own_forward():
    model = tiny("qwen2")
    decode_step.attach(model)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=PROMPT, past_key_values=cache)  # several tokens at once
        model(input_ids=PROMPT[:, :1], attention_mask=torch.tensor([[0] * 9 + [1]]), past_key_values=cache)
        model(input_ids=PROMPT[:, :1], past_key_values=cache, output_hidden_states=True)
    assert CountingStep.calls == 0


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_reading_a_prompt_gives_the_models_logits_without_copying_the_cache_per_query_head(kind, monkeypatch):
    from transformers.integrations import sdpa_attention

    ours, theirs = tiny(kind), tiny(kind)  # the same weights; only `ours` is attached
    decode_step.attach(ours)
    copies = []
    repeat_kv = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: copies.append(a[0].shape) or repeat_kv(*a))
    with torch.inference_mode():
        cache_ours, cache_theirs = DynamicCache(config=ours.config), DynamicCache(config=theirs.config)
        for chunk in (PROMPT[:, :5], PROMPT[:, 5:], PROMPT[:, 2:8]):  # a first read (no mask), then reads after a cache
            copies.clear()
            got = ours(input_ids=chunk, past_key_values=cache_ours).logits
            assert not copies
            torch.testing.assert_close(got, theirs(input_ids=chunk, past_key_values=cache_theirs).logits,
                                       rtol=1e-5, atol=1e-5)
        # A padded batch of two is left to transformers' own attention.
        batch = torch.cat([PROMPT, PROMPT.flip(1)])
        mask = torch.ones_like(batch)
        mask[1, :3] = 0
        torch.testing.assert_close(ours(input_ids=batch, attention_mask=mask).logits,
                                   theirs(input_ids=batch, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    assert CountingStep.calls == 0


def test_architectures_it_does_not_know_keep_their_forward():
    model = tiny("qwen3")  # per-head q/k norms: not the layout the lean step computes
    forward = model.forward
    assert not decode_step.attach(model)
    assert model.forward == forward


def test_batched_reads_into_a_new_cache_give_the_models_numbers():
    model = tiny("qwen2")
    batch = torch.cat([PROMPT, PROMPT.flip(1)])
    with torch.inference_mode():
        ours, theirs = decode_step.new_cache(model.config), DynamicCache(config=model.config)
        for chunk in (batch[:, :4], batch[:, 4:7], batch[:, 7:]):
            torch.testing.assert_close(model(input_ids=chunk, past_key_values=ours).logits,
                                       model(input_ids=chunk, past_key_values=theirs).logits)
