"""EfficientNet-Lite0 with the packaged ImageNet weights: right classes on real photos, the 7×7
token grid, and a frozen backbone inside a vtfuse model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import skimage
import torch
from PIL import Image

from vtfuse.config import ModelConfig, TextConfig, VisionConfig
from vtfuse.data.images import image_to_uint8, normalise
from vtfuse.encoders.efficientnet import load_efficientnet_lite0, packaged_weights_path
from vtfuse.models import create_model

PHOTOS = Path(skimage.__file__).parent / "data"  # shipped with scikit-image, no download
# ImageNet-1k indices: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat;
# 504 coffee mug, 967 espresso, 968 cup
CLASSES = {"chelsea.png": {281, 282, 283, 284, 285}, "coffee.png": {504, 967, 968}}


@pytest.fixture(scope="module")
def classifier():
    return load_efficientnet_lite0()


@pytest.mark.parametrize("photo", sorted(CLASSES))
def test_imagenet_top5_holds_the_right_class(classifier, photo):
    image = normalise(image_to_uint8(Image.open(PHOTOS / photo), 224)[None])
    with torch.no_grad():
        top5 = classifier(image).topk(5).indices[0].tolist()
    assert CLASSES[photo] & set(top5), top5
    assert top5[0] in CLASSES[photo]


@pytest.mark.parametrize(("size", "grid"), [(224, 7), (225, 8), (96, 3)])
def test_features_are_one_per_32_pixels_as_tensorflow_pads(classifier, size, grid):
    with torch.no_grad():
        features = classifier.features(torch.zeros(1, 3, size, size))
    assert features.shape == (1, 1280, grid, grid)


def tiny_model() -> torch.nn.Module:
    vision = VisionConfig(name="efficientnet-lite0", dim=32, depth=0, heads=2)
    vision = dataclasses.replace(vision, image_size=224, patch_size=32)
    text = TextConfig(vocab_size=12, dim=32, depth=1, heads=2, max_length=16)
    return create_model(ModelConfig(task="caption", vision=vision, text=text))


def test_a_model_gets_a_frozen_pretrained_7x7_tokeniser(classifier):
    model = tiny_model()
    assert model.grid_size == (7, 7)
    backbone = model.vision.backbone
    reference = {n: t for n, t in classifier.state_dict().items() if "classifier" not in n}
    for name, tensor in backbone.state_dict().items():  # untouched by the model's init
        assert torch.equal(tensor, reference[name]), name
    assert not any(p.requires_grad for p in backbone.parameters())

    model.train()
    assert not backbone.training  # ImageNet batch-norm statistics are kept
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    logits, _ = model(images, torch.randint(3, 12, (2, 5)))
    logits.sum().backward()
    assert model.vision.project.weight.grad is not None
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(backbone.head.norm.running_mean, reference["head.norm.running_mean"])


def test_the_encoder_names_the_patch_size_it_needs():
    with pytest.raises(ValueError, match="patch_size must be 32 for efficientnet-lite0"):
        create_model(ModelConfig(vision=VisionConfig(name="efficientnet-lite0")))


def test_a_wrong_weights_file_is_named(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match=r"other\.pth: not an EfficientNet-Lite0 state dict"):
        load_efficientnet_lite0(bad)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read EfficientNet-Lite0 weights .*broken\.pth"):
        load_efficientnet_lite0(broken)
    assert packaged_weights_path().is_file()
