"""Weight-only quantization of a model's linear layers, for fast batch-1 decoding on the CPU.

Decoding one token reads every weight once, so on a CPU it is bound by memory
traffic: storing weights in 8 or 4 bits makes each token proportionally cheaper.
Both modes use torch's own packed CPU kernels (no extra dependency). Activations
are bfloat16 only inside those matmuls; the rest of the model stays fp32, because
torch's bfloat16 attention on the CPU was up to 10x slower over a long chat history.
The input embeddings are stored as int8 rows too (looked up row by row, never as a whole).

A quantized model is saved once (`save_quantized`, packed tensors) and later loaded
straight into its quantized form (`load_quantized`): no fp32 copy of the weights is
ever built, which is what keeps later starts small and quick. The embedding rows are
memory-mapped from the cache rather than read: a chat only ever touches the rows of the
tokens it uses, so most of the table never takes up memory.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

MODES = ("none", "int8", "int4")
# Sibling projections that Llama-family blocks apply to the same input one after another. At batch 1 each
# kernel call has a fixed cost, so one matmul over the stacked weights beats two or three small ones.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
INT4_GROUP_SIZE = 32  # the GGUF's own block size; on Qwen2.5-0.5B, 64 raised the KL to fp32 by 60%, 128 by 130%
_ROWS_PER_CHUNK = 4096


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output channel (symmetric)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | str | None = None):
        """An empty layer of this shape (filled by `quantized` or by loading a saved state)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = _empty_bias(out_features, device) if bias else None

    @classmethod
    def quantized(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        weights, scales = zip(*map(_int8_rows, _row_chunks(linear)))
        layer.weight_int8, layer.scale = torch.cat(weights), torch.cat(scales).to(torch.bfloat16)
        layer.bias = _copy_bias(linear)
        return layer

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

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = INT4_GROUP_SIZE,
                 device: torch.device | str | None = None):
        """An empty layer of this shape (filled by `quantized` or by loading a saved state)."""
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # Two 4-bit codes per byte, in the kernel's own (CPU-specific) tile order.
        self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        # The kernel wants [groups, rows, (scale, zero)].
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                             dtype=torch.bfloat16, device=device))
        self.bias = _empty_bias(out_features, device) if bias else None

    @classmethod
    def quantized(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device="meta")
        packed, scales_and_zeros = zip(*(_int4_rows(rows, group_size) for rows in _row_chunks(linear)))
        layer.weight_int4 = torch.cat(packed)
        layer.scales_and_zeros = torch.cat(scales_and_zeros).transpose(0, 1).contiguous().to(torch.bfloat16)
        layer.bias = _copy_bias(linear)
        return layer

    @staticmethod
    def supports(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        # The packing kernel works on tiles of 16 output rows and whole groups of input columns.
        return linear.in_features % group_size == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size,
                                                         self.scales_and_zeros)
        return _finish(out, x, self.out_features, self.bias)


class Int8Embedding(nn.Module):
    """nn.Embedding stored as int8 codes with one scale per group of columns; a lookup dequantizes only its rows.

    The Qwen2.5-0.5B table is 151,936 × 896: 545 MB in fp32, 140 MB like this.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.register_buffer("weight_int8", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(num_embeddings, embedding_dim // group_size, device=device))
        self.mapped_files: list[mmap.mmap] = []  # set by `load_quantized`: the files the buffers are mapped from

    @classmethod
    def quantized(cls, embedding: nn.Embedding) -> Int8Embedding:
        dim = embedding.embedding_dim
        # Groups as small as the GGUF's blocks (its token_embd is Q5_0, blocks of 32) keep the rows' outliers local.
        group = INT4_GROUP_SIZE if dim % INT4_GROUP_SIZE == 0 else dim
        layer = cls(embedding.num_embeddings, dim, group, device="meta")
        codes, scales = zip(*(_int8_rows(rows.reshape(-1, group)) for rows in embedding.weight.detach().split(_ROWS_PER_CHUNK)))
        layer.weight_int8 = torch.cat(codes).reshape(-1, dim)
        layer.scale = torch.cat(scales).reshape(-1, dim // group)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(ids, self.weight_int8).float()
        scales = F.embedding(ids, self.scale)
        for view in self.mapped_files:
            # The rows are copied out: let go of the file's pages (the OS keeps them cached). Left mapped, they
            # would count as this process's memory, whole 2 MB page-cache folios at a time on a recent kernel.
            view.madvise(mmap.MADV_DONTNEED)
        return (codes.unflatten(-1, (-1, self.group_size)) * scales[..., None]).flatten(-2)


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


def _empty_bias(size: int, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(size, device=device), requires_grad=False)


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
    for parent_name, parent in list(model.named_modules()):
        for names in SIBLINGS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(m) is nn.Linear for m in linears):
                continue
            if len({m.in_features for m in linears}) > 1 or len({m.bias is None for m in linears}) > 1:
                continue
            stacked = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears),
                                bias=linears[0].bias is not None, device=linears[0].weight.device)
            stacked.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
            if stacked.bias is not None:
                stacked.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
            fused = make(_join(parent_name, names[0], "fused"), stacked)
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
        replacement = make(name, model.get_submodule(name))
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _restructure(model: nn.Module, make_linear, make_embedding) -> None:
    _fuse_siblings(model, make_linear)
    _replace_linears(model, make_linear)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    # Encoder-decoder models share one table between encoder, decoder and head: left exact.
    if type(embeddings) is nn.Embedding and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        name = next(n for n, m in model.named_modules() if m is embeddings)
        if (compact := make_embedding(name, embeddings)) is not None:
            model.set_input_embeddings(compact)
            # The head (if it was tied) has its own copy now: nothing is left to tie, and re-tying would fail.
            model.config.tie_word_embeddings = False


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Quantize `model`'s nn.Linear layers (and a causal LM's input embeddings) in place, and return it.

    mode: "none" (unchanged), "int8" (per-channel int8 weights) or "int4" (group-wise int4
    weights). A layer whose shape a kernel cannot take gets the next-best kind: int4 → int8 → fp32.
    Sibling projections of one input (q/k/v, gate/up) become one matmul over their stacked weights
    (the same numbers: quantization works per output row). An output head tied to the input
    embeddings is quantized too (at batch 1 it is the largest matmul, 896×151936 in Qwen2.5-0.5B):
    it gets its own quantized copy; the embeddings become int8 rows with group-wise scales.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    kinds = (Int4Linear, Int8Linear) if mode == "int4" else (Int8Linear,)
    _restructure(model, lambda name, linear: next((kind.quantized(linear) for kind in kinds if kind.supports(linear)), None),
                 lambda name, embedding: Int8Embedding.quantized(embedding))
    return model


FORMAT_VERSION = 2  # 2: embedding rows in raw files of their own, memory-mapped
_FORMAT = f"chatbot-quantized-{FORMAT_VERSION}"
# torch's own format rather than safetensors: safetensors hands out tensors at the file's unaligned offsets,
# and torch's packed int8 kernel crashed (segfault) on those. Loaded with weights_only=True, so the file can
# hold nothing but tensors; read into memory, not mapped: the packed matmuls ran 20x slower on
# memory-mapped weights here (4 KiB file pages rather than the huge pages anonymous memory gets).
WEIGHTS_FILE, MANIFEST_FILE = "quantized.pt", "quantized.json"


def save_quantized(model: nn.Module, directory: Path) -> None:
    """Write a `quantize`d model's packed tensors and config to `directory` (for `load_quantized`)."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = {name: [m.in_features, m.out_features, getattr(m, "group_size", 0)] for name, m in model.named_modules()
              if isinstance(m, (Int4Linear, Int8Linear))}
    embeddings = {name for name, m in model.named_modules() if isinstance(m, Int8Embedding)}
    shapes |= {name: [m.num_embeddings, m.embedding_dim, m.group_size] for name, m in model.named_modules()
               if name in embeddings}
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    # Embedding rows are looked up, never read whole: raw files that a later start maps instead of reading.
    mapped = {key: state.pop(key) for key in list(state) if key.rpartition(".")[0] in embeddings}
    for key, tensor in mapped.items():
        (directory / f"{key}.bin").write_bytes(tensor.numpy().tobytes())
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / MANIFEST_FILE).write_text(json.dumps({
        "format": _FORMAT, "torch": torch.__version__, "modules": shapes,
        "mapped": {key: [str(t.dtype).removeprefix("torch."), list(t.shape)] for key, t in mapped.items()}}, indent=1))
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def load_quantized(directory: Path) -> nn.Module:
    """A causal LM saved by `save_quantized`, built empty and filled with the saved packed tensors.

    The model skeleton has no weights at all until the saved ones are put in, so no fp32 copy of a
    quantized layer ever exists.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    if manifest.get("format") != _FORMAT or manifest.get("torch") != torch.__version__:
        # The int4 packing is the CPU kernel's own layout, which a torch release may change.
        raise ValueError(f"{directory} holds a quantized checkpoint of another format or torch version")
    modules = manifest["modules"]
    state = torch.load(directory / WEIGHTS_FILE, weights_only=True)
    views = {key: _mapped(directory / f"{key}.bin") for key in manifest["mapped"]}
    state |= {key: torch.frombuffer(views[key], dtype=getattr(torch, dtype)).reshape(shape)  # keeps the view alive
              for key, (dtype, shape) in manifest["mapped"].items()}
    config = AutoConfig.from_pretrained(directory)
    # Parameters on the meta device (no memory); buffers such as rotary frequencies are computed for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def linear(name: str, layer: nn.Linear) -> nn.Module | None:
        if name not in modules:
            return None
        in_features, out_features, group_size = modules[name]
        if f"{name}.weight_int4" in state:
            return Int4Linear(in_features, out_features, layer.bias is not None, group_size, device="meta")
        return Int8Linear(in_features, out_features, layer.bias is not None, device="meta")

    def embedding(name: str, layer: nn.Embedding) -> nn.Module | None:
        return Int8Embedding(*modules[name], device="meta") if name in modules else None

    _restructure(model, linear, embedding)
    model.load_state_dict(state, strict=True, assign=True)
    for name, module in model.named_modules():
        if isinstance(module, Int8Embedding):
            module.mapped_files = [view for key, view in views.items() if key.rpartition(".")[0] == name]
    if missing := [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]:
        raise ValueError(f"{directory / WEIGHTS_FILE} lacks {', '.join(missing[:5])}")
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _mapped(path: Path) -> mmap.mmap:
    """A raw file mapped into memory: pages are read in when touched, and only those count."""
    with open(path, "rb") as file:
        # Copy-on-write: a private view (the file is never changed) that torch may treat as writable.
        view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    view.madvise(mmap.MADV_RANDOM)  # rows are read one token at a time: no read-ahead around each
    return view
