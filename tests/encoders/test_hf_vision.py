"""Hugging Face vision towers as tokenisers, offline: tiny random ViT, CLIP, SigLIP and DINOv2
configs saved with `save_pretrained` and loaded through the path a hub name takes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
from safetensors.torch import load_file

from vtfuse.config import ModelConfig, TextConfig, VisionConfig
from vtfuse.data.images import normalise
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.encoders.hf_vision import HuggingFaceVisionEncoder, load_vision_tower
from vtfuse.encoders.vision import create_vision_encoder, vision_preset
from vtfuse.models.base import CheckpointError
from vtfuse.models.factory import create_model, load_pretrained

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VISION = dict(image_size=32, patch_size=8, **SIZES)
TOWERS = {
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**VISION)),
    "clip": lambda: transformers.CLIPModel(
        transformers.CLIPConfig(text_config=dict(SIZES, vocab_size=50), vision_config=VISION)
    ),
    "siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**VISION)),
}
CLIP_MEAN, CLIP_STD = [0.481, 0.458, 0.408], [0.269, 0.261, 0.276]


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower_folder(request, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    TOWERS[request.param]().save_pretrained(folder)
    if request.param == "clip":  # its own normalisation, as a real CLIP checkpoint has
        settings = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD}
        (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    return folder


def vision(folder) -> VisionConfig:
    return VisionConfig(name=str(folder), dim=16, depth=0, heads=2, **vision_preset(str(folder)))


def test_patch_tokens_are_the_towers_own(tower_folder):
    encoder = create_vision_encoder(vision(tower_folder)).eval()
    assert isinstance(encoder, HuggingFaceVisionEncoder) and encoder.grid_size == (4, 4)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    reference = load_vision_tower(str(tower_folder)).eval()
    mean, std = (CLIP_MEAN, CLIP_STD) if "clip" in tower_folder.name else ([0.5] * 3, [0.5] * 3)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    pixels = (images.float() / 255 - mean) / std  # the tower's own preprocessing
    with torch.no_grad():
        expected = encoder.project(reference(pixel_values=pixels).last_hidden_state[:, -16:])
        torch.testing.assert_close(encoder.tokenise(normalise(images)), expected)
        assert encoder(normalise(images)).shape == (2, 16, 16)
    assert not any(p.requires_grad for p in encoder.tower.parameters())


def test_a_model_keeps_the_pretrained_tower_and_saves_only_what_trains(tower_folder, tmp_path):
    config = ModelConfig(vision=vision(tower_folder), text=TextConfig(vocab_size=12, dim=16))
    model = create_model(config)  # its initialisation must leave the tower's weights alone
    reference = load_vision_tower(str(tower_folder)).state_dict()
    for name, tensor in model.vision.tower.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    model.save_pretrained(tmp_path, Tokenizer.build(["a red circle"]))
    saved = load_file(tmp_path / "model.safetensors")
    assert "vision.project.weight" in saved and not any(".tower." in n for n in saved)
    loaded, _ = load_pretrained(tmp_path)
    images, tokens = (
        torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8),
        torch.tensor([[1, 5]]),
    )
    with torch.no_grad():
        assert torch.equal(model.eval()(images, tokens)[0], loaded(images, tokens)[0])


def test_a_wrong_input_size_or_unknown_name_is_explained(tower_folder, tmp_path):
    with pytest.raises(ValueError, match="takes 32 px images in patches of 8"):
        create_vision_encoder(VisionConfig(name=str(tower_folder), image_size=64, patch_size=8))
    with pytest.raises(ValueError, match="neither registered"):
        vision_preset(str(tmp_path / "no-such-model"))


def test_a_tower_with_only_pickle_weights_loads_only_if_allowed(
    tower_folder, pickle_only, tmp_path
):
    """A tower folder holding only pytorch_model.bin is refused, naming the file and the way
    in; allowed (create_model, then load_pretrained of the model that names it), it gives the
    original's tokens."""
    pickled = pickle_only(tower_folder)
    with pytest.raises(CheckpointError) as info:
        create_vision_encoder(vision(pickled))
    message = str(info.value)
    assert str(pickled / "pytorch_model.bin") in message and "--allow-pickle" in message
    config = ModelConfig(vision=vision(pickled), text=TextConfig(vocab_size=12, dim=16))
    torch.manual_seed(0)
    model = create_model(config, allow_pickle=True).eval()
    torch.manual_seed(0)
    original = create_model(replace(config, vision=vision(tower_folder))).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), original.encode_image(images))
    model.save_pretrained(tmp_path / "saved", Tokenizer.build(["a red circle"]))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a pickle file"):
        load_pretrained(tmp_path / "saved")
    loaded, _ = load_pretrained(tmp_path / "saved", allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))


CNNS = {
    "resnet": lambda: transformers.ResNetModel(
        transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic"
        )
    ),
    "convnext": lambda: transformers.ConvNextModel(
        transformers.ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])
    ),
}


@pytest.mark.parametrize("family", sorted(CNNS))
def test_cnn_backbones_give_one_token_per_feature_map_place(family, tmp_path):
    torch.manual_seed(0)
    CNNS[family]().save_pretrained(tmp_path)
    preset = vision_preset(str(tmp_path))
    assert preset == {"image_size": 224, "patch_size": 32}
    config = VisionConfig(
        name=str(tmp_path), dim=16, depth=0, heads=2, image_size=64, patch_size=32
    )
    encoder = create_vision_encoder(config).eval()
    assert encoder.grid_size == (2, 2)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    reference = load_vision_tower(str(tmp_path)).eval()
    with torch.no_grad():
        features = reference(pixel_values=normalise(images)).last_hidden_state  # (2, 32, 2, 2)
        expected = encoder.project(features.flatten(2).transpose(1, 2))
        torch.testing.assert_close(encoder.tokenise(normalise(images)), expected)
