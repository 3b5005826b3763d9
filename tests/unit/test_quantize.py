"""quantize() on a tiny randomly initialised causal LM: logits stay close to fp32 and generate still works;
a quantized checkpoint saved once loads back to the very same model without building fp32 weights."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from chatbot.generation import decode_step
from chatbot.generation.quantize import MODES, Int8Embedding, load_quantized, quantize, save_quantized


def tiny_lm() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("mode", "tolerance"), [("none", 0.0), ("int8", 0.03), ("int4", 0.15)])
def test_logits_stay_close_to_fp32(mode, tolerance):
    reference = logits(tiny_lm(), IDS)
    assert relative_error(logits(quantize(tiny_lm(), mode), IDS), reference) <= tolerance


@pytest.mark.parametrize("mode", MODES)
def test_generate_works(mode):
    model = quantize(tiny_lm(), mode)
    with torch.inference_mode():
        out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizes_every_linear_including_the_tied_head(mode):
    model = quantize(tiny_lm(), mode)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # The input embeddings the head was tied to become int8 rows, looked up row by row, close to the fp32 ones.
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    exact = tiny_lm().get_input_embeddings()(IDS)
    assert relative_error(model.get_input_embeddings()(IDS), exact) <= 0.01
    model.tie_weights()  # transformers may re-tie later (e.g. on resize); the quantized head must survive it
    assert not isinstance(model.lm_head, nn.Linear)


def test_int4_falls_back_to_int8_then_fp32_where_the_shape_does_not_pack():
    torch.manual_seed(0)
    layers = {"packs": nn.Linear(64, 64), "odd_rows": nn.Linear(64, 250), "odd_columns": nn.Linear(30, 16)}
    inputs = {name: torch.randn(2, layer.in_features) for name, layer in layers.items()}
    expected = {name: layer(inputs[name]).detach() for name, layer in layers.items()}
    model = quantize(nn.ModuleDict(layers), "int4")
    assert [type(m).__name__ for m in model.values()] == ["Int4Linear", "Int8Linear", "Linear"]
    for name, layer in model.items():
        assert relative_error(layer(inputs[name]), expected[name]) <= 0.15


def test_unknown_mode_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="int4"):
        quantize(tiny_lm(), "int3")


@pytest.mark.parametrize(("mode", "tolerance"), [("int8", 0.03), ("int4", 0.15)])
def test_a_layer_taller_than_one_quantization_slice_stays_close(mode, tolerance):
    torch.manual_seed(0)
    layer = nn.Linear(64, 4096 + 32)  # rows are quantized in slices of 4096 and packed slices concatenated
    x = torch.randn(3, 64)
    expected = layer(x).detach()
    assert relative_error(quantize(nn.Sequential(layer), mode)(x), expected) <= tolerance


def _greedy(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_saved_quantized_checkpoint_loads_back_to_the_same_logits(mode, tmp_path):
    in_memory = quantize(tiny_lm(), mode)
    save_quantized(in_memory, tmp_path)
    loaded = load_quantized(tmp_path)
    assert torch.equal(logits(loaded, IDS), logits(in_memory, IDS))
    # The lean decoding pass takes the loaded model (fused siblings included) and decodes the same tokens.
    assert decode_step.attach(loaded)
    assert torch.equal(_greedy(loaded), _greedy(in_memory))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_a_quantized_checkpoint_builds_no_fp32_weights(mode, tmp_path, monkeypatch):
    save_quantized(quantize(tiny_lm(), mode), tmp_path)
    built = []
    original = nn.Linear.reset_parameters
    # Any fp32 weight matrix made for real (not on the meta device) on the way would pass through here.
    monkeypatch.setattr(nn.Linear, "reset_parameters",
                        lambda self: built.append(self.weight.shape) if not self.weight.is_meta else original(self))
    model = load_quantized(tmp_path)
    assert built == []
    state = model.state_dict()
    # Full-precision weights left: only vectors (norms, biases); every matrix is stored as 8- or 4-bit codes.
    assert all(t.dim() == 1 for name, t in state.items() if name.endswith((".weight", ".bias")))
    assert {t.dtype for name, t in state.items() if name.endswith(("weight_int8", "weight_int4"))} <= {torch.int8,
                                                                                                     torch.uint8}
    assert not any(t.is_meta for t in model.state_dict().values())


def test_a_checkpoint_of_another_torch_version_is_refused(tmp_path):
    save_quantized(quantize(tiny_lm(), "int4"), tmp_path)
    manifest = tmp_path / "quantized.json"
    manifest.write_text(manifest.read_text().replace(torch.__version__, "0.0.1"))
    with pytest.raises(ValueError, match="torch version"):
        load_quantized(tmp_path)


def test_the_embedding_rows_are_mapped_from_the_checkpoint_and_looked_up_without_holding_its_pages(tmp_path):
    in_memory = quantize(tiny_lm(), "int4")
    save_quantized(in_memory, tmp_path)
    model = load_quantized(tmp_path)
    table = model.get_input_embeddings().weight_int8
    mapped = [m for m in _mappings() if m["start"] <= table.data_ptr() < m["end"]]
    assert mapped and Path(mapped[0]["file"]).parent == tmp_path  # a file-backed view, not anonymous memory
    assert torch.equal(logits(model, IDS), logits(in_memory, IDS))
    # The looked-up rows were copied out and the file's pages let go: none count as the process's memory.
    assert sum(m["rss_kb"] for m in _mappings() if m["file"].startswith(str(tmp_path))) == 0


def _mappings() -> list[dict]:
    """This process's memory mappings from /proc/self/smaps: start, end, file ("" if anonymous), rss_kb."""
    found = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append({"start": start, "end": end, "file": fields[5] if len(fields) > 5 else "", "rss_kb": 0})
        elif fields[0] == "Rss:":
            found[-1]["rss_kb"] = int(fields[1])
    return found
