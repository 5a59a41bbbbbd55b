"""Vision encoders: token grids, 2-D positions and token pooling."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vtfuse.config import VisionConfig
from vtfuse.encoders.vision import create_vision_encoder

SMALL = dict(image_size=48, patch_size=8, channels=(8, 8, 16), dim=16, depth=1, heads=2)


@pytest.mark.parametrize("name", ["cnn", "resnet", "vgg", "vit"])
def test_grid_of_tokens(name):
    encoder = create_vision_encoder(VisionConfig(name=name, **SMALL))
    tokens = encoder(torch.randn(2, 3, 48, 48))
    assert encoder.grid_size == (6, 6)
    assert tokens.shape == (2, 36, 16)


@pytest.mark.parametrize("name", ["cnn", "resnet", "vgg", "vit"])
def test_pool_averages_blocks_of_tokens(name):
    encoder = create_vision_encoder(VisionConfig(name=name, pool=3, **SMALL))
    assert encoder.grid_size == (2, 2)
    assert encoder(torch.randn(1, 3, 48, 48)).shape == (1, 4, 16)
    grid = torch.arange(36.0).reshape(1, 6, 6, 1).expand(1, 6, 6, 16)
    pooled = encoder.pool(grid.reshape(1, 36, 16))
    # row-major 6 × 6 grid: the top-left 3 × 3 block holds 0,1,2 / 6,7,8 / 12,13,14 (mean 7)
    assert pooled[0, :, 0].tolist() == [7.0, 10.0, 25.0, 28.0]


def test_pool_that_does_not_divide_the_grid_is_refused():
    with pytest.raises(ValueError, match=r"vision\.pool 4 must divide the 6×6 token grid"):
        create_vision_encoder(VisionConfig(pool=4, **SMALL))


def test_position_embedding_tells_cells_apart():
    """A blank image still yields distinct tokens per cell: left differs from right."""
    encoder = create_vision_encoder(VisionConfig(pool=3, **SMALL))
    tokens = encoder(torch.zeros(1, 3, 48, 48))[0]
    distances = torch.cdist(tokens, tokens)
    assert (distances + torch.eye(4) * 1e3).min() > 0.1


def test_resnet_stages_have_a_shortcut_and_vgg_stages_do_not():
    """With its residual bodies zeroed, a ResNet stage still passes the image through its
    shortcut; the VGG stack is one plain Sequential of convs, norms and max-pools."""
    resnet = create_vision_encoder(VisionConfig(name="resnet", **SMALL))
    for stage in resnet.stem[:-1]:
        torch.nn.init.zeros_(stage.body[-1].weight)  # the last GroupNorm's scale: F(x) = 0
        torch.nn.init.zeros_(stage.body[-1].bias)
    images = torch.randn(2, 3, 48, 48)
    assert resnet.tokenise(images).abs().sum() > 0
    vgg = create_vision_encoder(VisionConfig(name="vgg", **SMALL))
    kinds = {type(m).__name__ for m in vgg.stem}
    assert kinds == {"Conv2d", "GroupNorm", "GELU", "MaxPool2d"}
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in vgg.stem) == 3  # one per halving


@pytest.mark.parametrize(("name", "layers"), [("cnn", 0), ("resnet", 0), ("vgg", 0), ("vit", 1)])
def test_unset_depth_is_the_encoders_own_and_a_model_saves_it(name, layers, tmp_path):
    """`vision.depth` None: no Transformer layer after a CNN, one for ViT; the model's config
    (and so its saved config.json) holds the number, not None."""
    from vtfuse.config import ModelConfig
    from vtfuse.data.tokenizer import Tokenizer
    from vtfuse.models.factory import create_model

    unset = {key: value for key, value in SMALL.items() if key != "depth"}
    encoder = create_vision_encoder(VisionConfig(name=name, **unset))
    assert len(encoder.layers) == layers and encoder.config.depth == layers
    config = ModelConfig(task="vqa", vision=VisionConfig(name=name, **unset), num_answers=3)
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=20))
    model = create_model(config)
    assert model.config.vision.depth == layers
    model.save_pretrained(tmp_path, Tokenizer.build(["a"], answers=["x", "y", "z"]))
    saved = json.loads((tmp_path / "config.json").read_text())["model"]["vision"]["depth"]
    assert saved == layers


@pytest.mark.parametrize("name", ["cnn", "resnet", "vgg"])
def test_untrained_cnn_is_quieter_than_the_pixel_shortcut(name):
    """At initialisation the image-to-image variation of the CNN's features is below that of
    the shortcut's colours, so attention can find a colour before the CNN has learned anything
    (ConvStemEncoder, CNN_BRANCH_GAIN); without a shortcut the CNN keeps its full scale."""
    config = VisionConfig(name=name, **(SMALL | {"dim": 64}))
    images = torch.rand(16, 3, 48, 48) * 2 - 1

    def across_images(features: torch.Tensor) -> float:
        return features.std(0).pow(2).mean().sqrt().item()

    torch.manual_seed(0)
    encoder = create_vision_encoder(config)
    with torch.no_grad():
        cnn, shortcut = encoder.stem(images), encoder.shortcut(images)
    assert across_images(cnn) < 0.6 * across_images(shortcut)
    plain = create_vision_encoder(dataclasses.replace(config, pixel_shortcut=False))
    quiet, full = encoder.stem[-1].weight.std(), plain.stem[-1].weight.std()
    assert (quiet / full).item() == pytest.approx(0.3, rel=0.15)  # 64 × 16 draws of each
