"""quantize() on a tiny randomly initialised causal LM: logits stay close to fp32 and generate still works."""

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from chatbot.generation.quantize import MODES, quantize


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
    # The input embeddings the head was tied to keep their exact fp32 values.
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(model.get_input_embeddings().weight, tiny_lm().get_input_embeddings().weight)
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
