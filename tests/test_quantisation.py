"""Inference weights at int8 and bf16: every linear layer converted, outputs within a stated
tolerance of fp32, loaded through the same path as a user's run folder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vtfuse import quantisation
from vtfuse.config import ModelConfig, TextConfig, VisionConfig
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.linear import Linear
from vtfuse.models.factory import create_model
from vtfuse.pipeline import Pipeline
from vtfuse.quantisation import Bf16Linear, convert_weights

VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=1, heads=2)
TEXT = TextConfig(dim=64, depth=2, heads=2, max_length=16)
WORDS = ["a red square at the top left.", "a blue circle in the middle?"]


def tiny(task: str) -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        task=task,
        vision=VISION,
        text=TextConfig(**{**TEXT.__dict__, "vocab_size": 24}),
        num_answers=4 if task == "vqa" else 0,
    )
    return create_model(config).eval()


def batch(task: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(4, 24, (3, 10), generator=generator)
    return {"images": images, "tokens": tokens}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture
def bf16_units(monkeypatch):
    """bf16 products run on any CPU (emulated where it has no bf16 units, only slower): the
    numbers are checked wherever the suite runs."""
    monkeypatch.setattr(quantisation, "bf16_is_fast", lambda device: True)


# weights → (the layer it becomes, bound on the logits' relative error ‖got − fp32‖ / ‖fp32‖ on a
# random model of 2 blocks): int8 measured 2.1 % for the captioner (per-channel weights,
# per-call activation ranges); bf16 keeps 8 bits of mantissa, a few 0.1 %
CONVERSIONS = {
    "int8": (torch.ao.nn.quantized.dynamic.Linear, 0.05),
    "bf16": (Bf16Linear, 0.01),
}


@pytest.mark.parametrize("weights", list(CONVERSIONS))
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_every_linear_layer_is_converted_and_stays_within_its_bound(task, weights, bf16_units):
    layer, bound = CONVERSIONS[weights]
    model = tiny(task)
    inputs = batch(task)
    with torch.inference_mode():
        want = model(inputs["images"], inputs["tokens"])[0]
        convert_weights(model, weights)
        got = model(inputs["images"], inputs["tokens"])[0]
    left = [name for name, m in model.named_modules() if isinstance(m, (Linear, nn.Linear))]
    assert left == []
    assert len([m for m in model.modules() if isinstance(m, layer)]) > 2 * TEXT.depth
    assert got.dtype == torch.float32 and 0 < relative_error(got, want) < bound


@pytest.mark.parametrize("weights", list(CONVERSIONS))
def test_a_saved_model_loads_at_lower_precision_and_captions_like_fp32(
    tmp_path, weights, bf16_units
):
    """The pipeline path (`--weights int8|bf16`): the first step's probabilities within the
    conversion's bound of fp32's, decoded by PyTorch (compiled packages and ONNX graphs are
    fp32 or int8 only), and it decodes."""
    model = tiny("caption")
    tokenizer = Tokenizer.build(WORDS)
    model.save_pretrained(tmp_path / "model", tokenizer)
    fp32 = Pipeline.load(tmp_path / "model", "cpu")
    lower = Pipeline.load(tmp_path / "model", "cpu", weights=weights)
    assert lower.runtime == "torch"
    images = batch("caption")["images"]
    with torch.inference_mode():
        tokens = torch.full((3, 1), tokenizer.bos_id)
        want = fp32.model(images, tokens)[0].softmax(-1)
        got = lower.model(images, tokens)[0].softmax(-1)
    assert relative_error(got, want) < CONVERSIONS[weights][1]
    assert len(lower.generate(images, max_length=6).tokens) == 3


def test_int8_refuses_what_it_cannot_do():
    model = tiny("caption")
    with pytest.raises(ValueError, match="unknown weight precision 'int4'"):
        convert_weights(model, "int4")
    with pytest.raises(ValueError, match="eval mode"):
        convert_weights(model.train(), "int8")
    assert convert_weights(model, "fp32") is model


def test_bf16_refuses_hardware_without_bf16_units(monkeypatch):
    monkeypatch.setattr(quantisation, "bf16_is_fast", lambda device: False)
    with pytest.raises(ValueError, match=r"bf16 weights need bf16 matrix units.*this cpu has none"):
        convert_weights(tiny("caption"), "bf16")
