"""Encoders: images to a grid of tokens (`VISION_ENCODERS`), text to fused token states."""

from vtfuse.encoders.efficientnet import EfficientNetEncoder, EfficientNetLite0
from vtfuse.encoders.text import FusedTextTransformer
from vtfuse.encoders.vision import VISION_ENCODERS, ConvEncoder, VisionEncoder, ViTEncoder

__all__ = [
    "VISION_ENCODERS",
    "ConvEncoder",
    "EfficientNetEncoder",
    "EfficientNetLite0",
    "FusedTextTransformer",
    "ViTEncoder",
    "VisionEncoder",
]
