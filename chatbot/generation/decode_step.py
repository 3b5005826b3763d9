"""A lean forward pass for the one-token steps of decoding, for Llama-family models, and attention
for reading prompts that does not copy the KV cache per query head.

While a reply is generated, every step runs the model on a single new token. The
model's own forward then spends about a quarter of its time on Python and small
tensor ops around the matmuls (module calls, mask building, rotary helpers); at
batch 1 on a CPU that overhead is as large as the gap to llama.cpp. This pass does
the same arithmetic with fewer ops, through the model's own modules and weights
(quantized or not), and is plugged in under the model's forward: `generate`
(streamers, logits processors, stopping criteria) is unchanged, and every other
call (reading a prompt, batches, padding) goes to the original forward.

Reading a prompt (a turn's new tail, after the cached history) stays with the model's
forward, with one attention function swapped in through transformers' registry: the
query heads that share a key/value head attend as that head's rows, as in the one-token
step, where transformers' own attention copies the whole cache once per query head.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from chatbot.generation.quantize import Int4Linear, Int8Linear, SiblingSlice

# Architectures whose decoder layer is exactly: RMSNorm → q/k/v (rotary) → attention → o_proj → residual,
# RMSNorm → down(silu(gate) * up) → residual. Others keep their own forward.
SUPPORTED = ("llama", "qwen2", "mistral")
_ATTENTION, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def attach(model: nn.Module) -> bool:
    """Route `model`'s one-token decoding steps through `LeanStep` if its architecture fits."""
    if not LeanStep.fits(model):
        return False
    step = LeanStep(model)
    original = model.forward
    if model.config._attn_implementation == "sdpa":
        _register_grouped_attention()
        model.set_attn_implementation(GROUPED)

    @functools.wraps(original)  # generate() inspects the signature
    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        if step.takes(input_ids, attention_mask, past_key_values, kwargs):
            return step(input_ids, past_key_values)
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, **kwargs)

    model.forward = forward
    return True


class LeanStep:
    """One decoding step (batch 1, one token, a DynamicCache holding everything before it)."""

    # Keyword arguments generate() passes that do not change the arithmetic of a one-token step.
    _HARMLESS = {"cache_position", "use_cache", "return_dict", "logits_to_keep", "inputs_embeds",
                 "output_attentions", "output_hidden_states"}

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = model.model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.group = self.heads // self.kv_heads  # query heads per key/value head
        layers = self.base.layers
        self.qkv = [_projections(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers]
        self.gate_up = [_projections(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in layers]
        # Quantized matmuls take bfloat16 inputs: the norms write them so directly (no separate conversion). A layer
        # left in float32 (a shape the kernels cannot pack) needs float32 inputs: then all get them.
        linears = [model.lm_head, *(getattr(layer.self_attn, name) for layer in layers for name in _ATTENTION),
                   *(getattr(layer.mlp, name) for layer in layers for name in _MLP)]
        self.dtype = torch.bfloat16 if all(map(_quantized, linears)) else self.base.norm.weight.dtype

    @staticmethod
    def fits(model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        base = getattr(model, "model", None)
        if config is None or base is None or config.model_type not in SUPPORTED:
            return False
        if getattr(config, "hidden_act", None) != "silu" or not hasattr(base, "rotary_emb"):
            return False
        for layer in base.layers:
            attn = layer.self_attn
            if getattr(attn, "sliding_window", None) or hasattr(attn, "q_norm"):
                return False
            if not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm)):
                return False
        return hasattr(base.norm, "variance_epsilon")

    def takes(self, input_ids, attention_mask, cache, kwargs: dict) -> bool:
        if input_ids is None or input_ids.shape != (1, 1) or type(cache) is not DynamicCache:
            return False
        if kwargs.get("inputs_embeds") is not None or kwargs.get("output_attentions") or \
                kwargs.get("output_hidden_states") or not set(kwargs) <= self._HARMLESS:
            return False
        # A zero in the mask would mean padding, which this step does not handle.
        return attention_mask is None or bool(attention_mask.all())

    def __call__(self, input_ids: torch.Tensor, cache: DynamicCache) -> CausalLMOutputWithPast:
        base = self.base
        x = base.embed_tokens(input_ids)  # [1, 1, hidden]
        position = cache.get_seq_length()
        cos, sin = base.rotary_emb(x, torch.tensor([[position]]))  # [1, 1, head_dim]
        # rotate_half(t) * sin == roll(t, half) * sin with its first half negated: one op instead of four.
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        q_and_k = (self.heads + self.kv_heads) * self.head_dim
        for index, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = self.qkv[index](self._norm(x, layer.input_layernorm))
            # Queries and keys are rotated together, as the heads of one tensor, in float32 as the model does.
            qk = qkv[..., :q_and_k].view(1, self.heads + self.kv_heads, self.head_dim).float()
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            k, v = _append(cache, index, qk[:, self.heads:, None],
                           qkv[..., q_and_k:].view(1, self.kv_heads, 1, self.head_dim))
            # One query attends to every cached position: no mask needed. The query heads sharing a key/value
            # head go in as that head's rows, so the cache is read as it is: `enable_gqa` copied it per query
            # head in bfloat16 (34.5 against 2.7 ms a step for 24 layers at 1,400 cached tokens).
            out = F.scaled_dot_product_attention(qk[:, :self.heads].view(1, self.kv_heads, self.group, self.head_dim),
                                                 k, v, scale=attn.scaling)
            # A quantized matmul's bfloat16 output is added to the float32 residual as it is (promoted, exact).
            x = x + attn.o_proj(out.view(1, 1, -1).to(self.dtype))
            gate, up = self.gate_up[index](self._norm(x, layer.post_attention_layernorm)).chunk(2, dim=-1)
            # silu(gate) * up in float32 as the model does, rounded once into the matmul's bfloat16 input.
            x = x + mlp.down_proj(torch.mul(F.silu(gate.float()), up, out=up))
        logits = self.model.lm_head(self._norm(x, base.norm))
        return CausalLMOutputWithPast(logits=logits.float(), past_key_values=cache)

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """The model's RMSNorm of one position, its mean square as one dot product (F.rms_norm took 8 small ops)."""
        flat = x.view(-1)
        scale = (float(torch.dot(flat, flat)) / flat.numel() + norm.variance_epsilon) ** -0.5
        return (x * scale).mul_(norm.weight).to(self.dtype)


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with each key/value head's query heads as its rows (batch 1).

    transformers repeats the keys and values for every query head when several tokens are read
    (`repeat_kv`): 32 new tokens after 1,240 cached copied 9 MB a layer, and the attention took 30 ms more
    than after 250 cached, against 25 ms this way (the same logits to ≈1e-6: the kernel sums in another order).
    The mask comes from `grouped_mask`, already in that row layout.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads, known = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = attention_mask is not None and attention_mask.shape[-2] == group * length != length
    # Without a mask, the tokens read are all there is (a first read): SDPA's own causal path, nothing to copy.
    if not grouped or batch != 1 or dropout or kwargs.get("position_bias") is not None or \
            kwargs.get("cache") is not None:
        if grouped:
            attention_mask = attention_mask[..., :length, :]  # the first query head's rows: the mask as it was
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(1, kv_heads, group * length, dim), key, value,
                                         attn_mask=attention_mask[..., :known].to(query.dtype), scale=scaling)
    return out.view(1, heads, length, dim).transpose(1, 2).contiguous(), None


def grouped_mask(*args, config=None, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask, made once per forward in `grouped_attention`'s rows and as additive floats.

    Repeated per query head and turned from booleans into floats in each of the 24 layers instead, it made
    a 32-token read after 1,240 cached 3 ms slower (209 against 206 ms, medians of 8 alternating runs;
    the same logits).
    """
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    group = config.num_attention_heads // config.num_key_value_heads if config is not None else 1
    if mask is None or mask.dtype != torch.bool or mask.shape[0] != 1 or group == 1:
        return mask
    additive = torch.zeros_like(mask, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    _, _, length, known = mask.shape
    return additive.expand(1, group, length, known).reshape(1, 1, group * length, known)


GROUPED = "grouped_sdpa"


@functools.cache
def _register_grouped_attention() -> None:
    # Imported once a model is loaded, not with this module: transformers' masking imports torch's compiler
    # stack and with it triton (50 MB), unless the backend has marked triton absent first.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, grouped_mask)  # unregistered, the attention would get no mask


# The KV cache grows by this many positions at a time, in place: a DynamicCache concatenates at every step,
# copying the whole cache (1.5 ms a step for 24 layers at 600 positions, more in a long chat).
GROWTH = 256


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes what is read (a turn's tail, a chunk of a prompt) into spare room behind its
    tensors, as the one-token step does, instead of concatenating, which copies the whole cache at every read
    (28 tokens read after 1,240 cached: 190.4 → 188.5 ms, medians of 10 alternating runs).
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or not self.keys.numel() or key_states.shape[0] != 1:  # batches concatenate
            return super().update(key_states, value_states, *args, **kwargs)
        return _grow(self, key_states, value_states)


def new_cache(config) -> DynamicCache:
    """An empty cache for a model of `config` whose full-attention layers grow in place (`GrowingLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _append(cache: DynamicCache, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update` for one position, written in place whatever made the cache (see `_grow`)."""
    layer = cache.layers[index] if index < len(cache.layers) else None
    if type(layer) not in (DynamicLayer, GrowingLayer) or not layer.is_initialized or not layer.keys.numel():
        return cache.update(key, value.to(key.dtype), index)
    return _grow(layer, key, value)


def _grow(layer: DynamicLayer, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `key` and `value` ([1, heads, k, dim]) to the layer, in spare room behind its tensors (made if missing).

    The layer's keys and values stay plain tensors of the cached length (views of a longer buffer), so
    everything else that handles a DynamicCache (crop, copy, the model's own forward) works on them as before.
    """
    keys, values = layer.keys, layer.values
    added = key.shape[2]
    if not (_has_room(keys, added) and _has_room(values, added)):
        keys, values = _with_room(keys, added), _with_room(values, added)
    layer.keys, layer.values = _grown(keys, key), _grown(values, value)
    return layer.keys, layer.values


def _has_room(t: torch.Tensor, added: int) -> bool:
    """Whether the storage behind `t` ([1, heads, n, dim]) has positions n to n + added free for each head.

    A layer's tensors are its own (concatenations, these buffers, or crops and deep copies of them), so what
    lies past their end is never anyone else's data.
    """
    _, heads, n, dim = t.shape
    end = n + added
    return (t.shape[0] == 1 and t.stride(3) == 1 and t.stride(2) == dim and (heads == 1 or t.stride(1) >= end * dim)
            and t.storage_offset() + (heads - 1) * t.stride(1) + end * dim
            <= t.untyped_storage().nbytes() // t.element_size())


def _with_room(t: torch.Tensor, added: int) -> torch.Tensor:
    _, heads, n, dim = t.shape
    buffer = t.new_empty(1, heads, n + added + GROWTH, dim)
    buffer[:, :, :n] = t
    return buffer[:, :, :n]


def _grown(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    _, heads, n, dim = t.shape
    grown = t.as_strided((1, heads, n + rows.shape[2], dim), t.stride())
    grown[:, :, n:] = rows
    return grown


def _projections(*modules: nn.Module):
    """A function computing the outputs of sibling projections of one input, side by side: one matmul if fused."""
    shared = getattr(modules[0], "shared", None)
    if all(isinstance(m, SiblingSlice) and m.shared is shared and m.index == i for i, m in enumerate(modules)):
        return shared.fused
    return lambda h: torch.cat([m(h) for m in modules], dim=-1)


def _quantized(module: nn.Module) -> bool:
    matmul = module.shared.fused if isinstance(module, SiblingSlice) else module
    return isinstance(matmul, (Int4Linear, Int8Linear))
