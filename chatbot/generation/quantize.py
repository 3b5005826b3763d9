"""Weight-only quantization of a model's linear layers, for fast batch-1 decoding on the CPU.

Decoding one token reads every weight once, so on a CPU it is bound by memory
traffic: storing weights in 8 or 4 bits makes each token proportionally cheaper.
Both modes use torch's own packed CPU kernels (no extra dependency). Activations
are bfloat16 only inside those matmuls; the rest of the model stays fp32, because
torch's bfloat16 attention on the CPU was up to 10x slower over a long chat history.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "int8", "int4")
# Sibling projections that Llama-family blocks apply to the same input one after another. At batch 1 each
# kernel call has a fixed cost, so one matmul over the stacked weights beats two or three small ones.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
INT4_GROUP_SIZE = 32  # the GGUF's own block size; on Qwen2.5-0.5B, 64 raised the KL to fp32 by 60%, 128 by 130%
_ROWS_PER_CHUNK = 4096


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output channel (symmetric)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weights, scales = zip(*map(_int8_rows, _row_chunks(linear)))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.cat(weights))
        self.register_buffer("scale", torch.cat(scales).to(torch.bfloat16))
        self.bias = _copy_bias(linear)

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        # The kernel silently returns wrong numbers (or crashes) for other widths.
        return linear.in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        return _finish(out, x, self.out_features, self.bias)


class Int4Linear(nn.Module):
    """nn.Linear with 4-bit weights, asymmetric, one scale and zero point per group of input channels."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        packed, scales_and_zeros = zip(*(_int4_rows(rows, group_size) for rows in _row_chunks(linear)))
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        self.register_buffer("weight_int4", torch.cat(packed))
        # The kernel wants [groups, rows, (scale, zero)].
        self.register_buffer("scales_and_zeros",
                             torch.cat(scales_and_zeros).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.bias = _copy_bias(linear)

    @staticmethod
    def supports(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        # The packing kernel works on tiles of 16 output rows and whole groups of input columns.
        return linear.in_features % group_size == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size,
                                                         self.scales_and_zeros)
        return _finish(out, x, self.out_features, self.bias)


def _row_chunks(linear: nn.Linear) -> tuple[torch.Tensor, ...]:
    # Quantizing in slices of rows bounds the fp32 temporaries (the Qwen2.5-0.5B head alone is 0.5 GB);
    # a multiple of the int4 packing tile, so packed slices concatenate into the packed whole.
    return linear.weight.detach().split(_ROWS_PER_CHUNK)


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp_(min=1e-8).div_(127)
    return (weight / scale[:, None]).round_().to(torch.int8), scale


def _int4_rows(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed 4-bit codes and [rows, groups, (scale, zero)] for a slice of a weight matrix."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = torch.aminmax(groups, dim=-1)
    scale = (high - low).clamp_(min=1e-8).div_(15)
    # A search over clipped ranges (least squared error) moved the KL to fp32 by only ~5% and tripled the load time.
    codes = (groups - low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.int32)
    # The kernel computes (code - 8) * scale + zero, so its zero point is the value of code 8.
    zero = low + 8 * scale
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(n, k), 1), torch.stack([scale, zero], -1)


def _copy_bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


def _finish(out: torch.Tensor, x: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    out = out.reshape(*x.shape[:-1], out_features).to(x.dtype)
    return out if bias is None else out + bias


class _SharedMatmul:
    """One quantized matmul for sibling projections; each sibling takes its slice of the output.

    The first sibling called with an input computes all slices; the others pick theirs up if they are
    called with that same tensor, and compute afresh otherwise (so any call order stays correct).
    """

    def __init__(self, fused: nn.Module, sizes: list[int]):
        self.fused, self.sizes = fused, sizes
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or index not in self._pending:
            self._input, self._pending = x, dict(enumerate(self.fused(x).split(self.sizes, dim=-1)))
        out = self._pending.pop(index)
        if not self._pending:
            self._input = None  # do not keep activations alive between forward passes
        return out


class SiblingSlice(nn.Module):
    """Stands in for one of the fused sibling projections (e.g. k_proj)."""

    def __init__(self, shared: _SharedMatmul, index: int, fused: nn.Module | None = None):
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features, self.out_features = shared.fused.in_features, shared.sizes[index]
        if fused is not None:
            self.fused = fused  # registered once (on the first sibling), so state_dict and .to() see it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(self.index, x)


def _fuse_siblings(model: nn.Module, make) -> None:
    for parent in list(model.modules()):
        for names in SIBLINGS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(m) is nn.Linear for m in linears):
                continue
            if len({m.in_features for m in linears}) > 1 or len({m.bias is None for m in linears}) > 1:
                continue
            stacked = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears),
                                bias=linears[0].bias is not None)
            stacked.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
            if stacked.bias is not None:
                stacked.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
            fused = make(stacked)
            if fused is None:
                continue
            shared = _SharedMatmul(fused, [m.out_features for m in linears])
            for index, name in enumerate(names):
                setattr(parent, name, SiblingSlice(shared, index, fused if index == 0 else None))


def _replace_linears(model: nn.Module, make) -> None:
    # Names collected first (replacing while iterating would revisit the new modules); only names, so that
    # each fp32 layer can be freed as soon as it is replaced.
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        replacement = make(model.get_submodule(name))
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Quantize `model`'s nn.Linear layers in place (and return it) for CPU inference.

    mode: "none" (unchanged), "int8" (per-channel int8 weights) or "int4" (group-wise int4
    weights). A layer whose shape a kernel cannot take gets the next-best kind: int4 → int8 → fp32.
    Sibling projections of one input (q/k/v, gate/up) become one matmul over their stacked weights
    (the same numbers: quantization works per output row). An output head tied to the input
    embeddings is quantized too (at batch 1 it is the largest matmul, 896×151936 in Qwen2.5-0.5B):
    it gets its own quantized copy, the embeddings stay exact.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    kinds = (Int4Linear, Int8Linear) if mode == "int4" else (Int8Linear,)
    make = lambda linear: next((kind(linear) for kind in kinds if kind.supports(linear)), None)  # noqa: E731
    _fuse_siblings(model, make)
    _replace_linears(model, make)
    return model
