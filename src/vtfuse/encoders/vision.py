"""Vision encoders: an image (B, 3, H, W) becomes a grid of image tokens (B, h·w, dim).

Both built-ins are a *tokeniser* (a small CNN, or ViT's patch embedding) followed by a 2-D
position embedding and `depth` Transformer layers over the tokens.

A clip model (`vision.frames` F > 1) encodes each frame on its own, adds a learned temporal
embedding to every token of frame t and concatenates the frames: a clip (B, F, 3, H, W)
becomes (B, F·h·w, dim) — Flamingo's video input (Alayrac et al. 2022, §2.1).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtfuse.blocks import SelfAttentionBlock
from vtfuse.config import VisionConfig
from vtfuse.grad_checkpointing import Checkpointable
from vtfuse.registry import Registry

VISION_ENCODERS: Registry[VisionEncoder] = Registry("vision encoder")

# The CNN's output layer starts at this fraction of its default scale when a pixel shortcut runs
# beside it (see ConvStemEncoder)
CNN_BRANCH_GAIN = 0.3


class PositionEmbedding2D(nn.Module):
    """Learned factorised 2-D positions: token (r, c) gets row[r] + column[c] (as in DETR's
    learned variant), so the model can tell left from right and top from bottom."""

    def __init__(self, rows: int, cols: int, dim: int):
        super().__init__()
        # 0.2 each (0.3 summed), the scale of the word embeddings: position must be audible
        # next to the image content from the first step
        self.row = nn.Parameter(torch.randn(rows, 1, dim) * 0.2)
        self.col = nn.Parameter(torch.randn(1, cols, dim) * 0.2)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens + (self.row + self.col).flatten(0, 1)  # (B, rows·cols, dim)


class TemporalEmbedding(nn.Module):
    """Learned per-frame vectors, added to every token of frame t (Flamingo's learned temporal
    embeddings), so the fusion can tell which frame a token came from: without them a clip is
    a bag of tokens and "moves left" cannot be told from "moves right".

    Zero at initialisation: the model starts blind to frame order, and a clip of one repeated
    frame then gives the fusion exactly the still image's tokens, repeated — which attention
    reads as the still image (duplicated keys share their weight; true of cross_attention,
    resampler and the other fusions that only read the image, not of concat, whose
    self-attention weighs the copies against the words) — so a still-image model warm-started
    into a clip model (`--init-from`) starts as that model."""

    def __init__(self, frames: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(frames, dim))

    def forward(self, tokens: Tensor) -> Tensor:
        """Per-frame tokens (B, frames, N, dim) → one sequence (B, frames·N, dim), frame-major."""
        return (tokens + self.embedding[:, None]).flatten(1, 2)


class VisionEncoder(Checkpointable, nn.Module):
    """Base class: subclasses implement `tokenise`; this adds positions and the Transformer
    (its layers checkpointed with `grad_checkpointing`)."""

    # VisionConfig fields an encoder needs (e.g. a pretrained model's input size), set by the
    # command line's `--vision NAME` (see `vision_preset`)
    preset: ClassVar[dict[str, int]] = {}
    # Transformer layers over the tokens when `vision.depth` is None: ViT's patches know nothing
    # of each other without one (the CNNs' own default is below)
    default_depth: ClassVar[int] = 1

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.depth is None:
            config = dataclasses.replace(config, depth=self.default_depth)
        if config.image_size % config.patch_size:
            raise ValueError(
                f"vision.image_size {config.image_size} is not a multiple of "
                f"vision.patch_size {config.patch_size}"
            )
        self.config = config
        side = config.image_size // config.patch_size
        if config.pool < 1 or side % config.pool:
            raise ValueError(
                f"vision.pool {config.pool} must divide the {side}×{side} token grid "
                f"(image_size {config.image_size} / patch_size {config.patch_size})"
            )
        side //= config.pool
        self.grid_size = (side, side)
        self.positions = PositionEmbedding2D(side, side, config.dim)
        if config.frames < 1:
            raise ValueError(f"vision.frames must be at least 1, got {config.frames}")
        # only a clip model has one: a still-image model's weights are as they always were
        self.temporal = TemporalEmbedding(config.frames, config.dim) if config.frames > 1 else None
        self.layers = nn.ModuleList(
            SelfAttentionBlock(config.dim, config.heads, config.mlp_ratio, config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    def tokenise(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def pool(self, tokens: Tensor) -> Tensor:
        """Average each pool × pool block of the token grid. On the built-in scenes, pool 3 turns
        the 9 × 9 grid into one token per scene cell, so an object is one token rather than
        fragments over four, and the fused models learn several times faster."""
        k = self.config.pool
        if k == 1:
            return tokens
        batch, count, dim = tokens.shape
        side = math.isqrt(count)
        grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
        return F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W), normalised → tokens (B, h·w, dim), row-major over the grid."""
        x = self.positions(self.pool(self.tokenise(images)))
        for layer in self.layers:
            x = self.run_layer(layer, x)
        return self.norm(x)

    def encode(self, images: Tensor) -> Tensor:
        """What the fusion reads. Still images (B, 3, H, W) → (B, h·w, dim); for a clip model
        (vision.frames F > 1) clips (B, F, 3, H, W) → (B, F·h·w, dim): the B·F frames encoded
        as one batch, then tagged by frame (TemporalEmbedding). A clip model given still images
        reads each as a clip of F copies of itself (encoded once)."""
        frames = self.config.frames
        if self.temporal is None:
            if images.dim() != 4:
                raise ValueError(
                    f"a still-image model takes images (B, 3, H, W), got {tuple(images.shape)}; "
                    "clips need a clip model (vision.frames > 1, `vtfuse train --frames N`)"
                )
            return self(images)
        if images.dim() == 4:
            tokens = self(images)[:, None].expand(-1, frames, -1, -1)
        elif images.dim() == 5 and images.shape[1] == frames:
            tokens = self(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        else:
            raise ValueError(
                f"a clip model of {frames} frames takes clips (B, {frames}, 3, H, W) or still "
                f"images (B, 3, H, W), got {tuple(images.shape)}"
            )
        return self.temporal(tokens)


class ConvStemEncoder(VisionEncoder):
    """A CNN of one stage per halving (`stem`, ending in a 1×1 conv to `dim`): its last
    feature map, row by row, is the token grid.

    A **pixel shortcut** is added to the CNN's features: a linear embedding of each token's own
    patch_size × patch_size pixels and of their x, y coordinates (-1 to 1; CoordConv, Liu et
    al. 2018), ViT's patch embedding, taken around the whole stem as a residual stage's
    projection shortcut is (He et al. 2016). A token's colours and its place then reach the
    attention linearly from the first step, whatever the CNN has learned so far: "red" can
    find red, and read where it is, before the CNN knows a circle from a square.

    Why, measured (VQA from scratch on Sort-of-CLEVR, 9800 images, default model, 10 minutes
    on one core; the runs are in the note of issue 15): without the shortcut, "is the red
    object on the left or the right?" stayed at chance (0.52 at 5900 steps; 0.62 for the
    plain CNN); a ViT's linear patches answered it (0.99) but not the shape questions (0.61),
    which the CNN's features answer. With a shortcut of pixels only, shape 0.995 and place at
    chance; with coordinates fed to the whole CNN too, place 0.99 but shape stalled at 0.58 in
    three seeds out of three; with the coordinates in the shortcut only (this), place 0.99 in
    both seeds and, in one, shape 0.997 and overall 0.88 (the other still learning shape).

    The CNN starts **quieter than the shortcut**: its last 1×1 conv is initialised at
    `CNN_BRANCH_GAIN` times PyTorch's default, as residual branches are scaled down at
    initialisation (Goyal et al. 2017's zero-γ, Fixup: Zhang et al. 2019). An untrained CNN's
    features are random functions of the image; at full scale they vary across images 1.3–1.7×
    as much as the shortcut's colours do (three seeds), and how soon "red" found red under that
    noise was a lottery of the initial weights. Measured on the built-in scenes (VQA from
    scratch, 1200 steps, seeds 0–2: `benchmarks/steps_to_look.py --cnn-branch-gain G`, stored
    as `scenes_gain*` in `benchmarks/results/steps_to_look.json`): the non-relational questions
    at 900 steps went from 0.999 / 0.70 / 0.96 to 0.999 / 0.997 / 0.997; overall at 1200 steps
    from 0.795 ± 0.135 to 0.839 ± 0.058 (the relational ones are what still differs). At 0.1
    shape came later (0.785 overall, seeds 1 and 2); at zero (the CNN grown from nothing) place
    was learnt at once but shape stalled (0.58–0.68; both in the note of issue 15).
    """

    stem: nn.Sequential
    # No Transformer layer after the CNN unless asked: its convolutions already relate
    # neighbouring cells. Measured from scratch on Sort-of-CLEVR, one seed each: a layer on top
    # learns no faster ("what shape is the red object?", 1000 steps: 0.64 validation accuracy
    # either way, benchmarks/results/steps_to_look.json) and costs time (a captioner made 846
    # steps in 8 minutes without it, 735 with it; object F1 0.37 against 0.33).
    default_depth: ClassVar[int] = 0

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        _stages(config)
        self.pixel_shortcut = None
        if config.pixel_shortcut:
            patch = config.patch_size
            # input channels R, G, B, x, y
            self.pixel_shortcut = nn.Conv2d(3 + 2, config.dim, patch, stride=patch)
        self.stem = self.build_stem(config)
        if self.pixel_shortcut is not None:
            with torch.no_grad():
                for tensor in self.stem[-1].parameters():
                    tensor.mul_(CNN_BRANCH_GAIN)

    def build_stem(self, config: VisionConfig) -> nn.Sequential:
        """The CNN: (B, 3, H, W) → (B, dim, H / patch_size, W / patch_size), ending in a 1×1
        conv to `dim`."""
        raise NotImplementedError

    def tokenise(self, images: Tensor) -> Tensor:
        features = self.stem(images)  # (B, dim, h, w)
        if self.pixel_shortcut is not None:
            features = features + self.shortcut(images)
        return features.flatten(2).transpose(1, 2)  # (B, h·w, dim)

    def shortcut(self, images: Tensor) -> Tensor:
        """The pixel shortcut of (B, 3, H, W) images → (B, dim, h, w). The conv is linear, so
        its x, y part is the same for every image: computed once on one grid, then broadcast,
        rather than convolving two constant channels of each image."""
        conv = self.pixel_shortcut
        colours, place = conv.weight[:, :3], conv.weight[:, 3:]
        grid = coordinates(*images.shape[-2:], images)[None]  # (1, 2, H, W)
        stride = conv.stride
        return F.conv2d(images, colours, conv.bias, stride) + F.conv2d(grid, place, None, stride)


def coordinates(height: int, width: int, like: Tensor) -> Tensor:
    """(2, height, width): each pixel's x, then y, from -1 to 1 (CoordConv's channels), on
    `like`'s device and dtype."""
    ys = torch.linspace(-1, 1, height, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1, 1, width, device=like.device, dtype=like.dtype)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"))


@VISION_ENCODERS.register("cnn")
class ConvEncoder(ConvStemEncoder):
    """A small CNN: each stage is conv3×3 stride 2 → conv3×3, each conv followed by GroupNorm
    (Wu & He 2018) and GELU, halving the size, so log2(patch_size) stages give one token per
    patch_size × patch_size pixels. Without the norms the image content reaches the tokens
    ~40× weaker than the position embedding and training stalls."""

    def build_stem(self, config: VisionConfig) -> nn.Sequential:
        layers: list[nn.Module] = []
        width = 3
        for out in config.channels:
            layers += [
                nn.Conv2d(width, out, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, out), out),
                nn.GELU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.GroupNorm(min(8, out), out),
                nn.GELU(),
            ]
            width = out
        return nn.Sequential(*layers, nn.Conv2d(width, config.dim, 1))


def _stages(config: VisionConfig) -> int:
    """How many halvings `patch_size` asks for; the CNNs need one `channels` entry each."""
    stages = int(math.log2(config.patch_size))
    if 2**stages != config.patch_size or len(config.channels) != stages:
        raise ValueError(
            f"the CNN needs a power-of-two vision.patch_size and one entry of vision.channels "
            f"per halving: patch_size {config.patch_size} wants {stages} channels, "
            f"got {list(config.channels)}"
        )
    return stages


def _conv_norm(width: int, out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(width, out, 3, stride=stride, padding=1), nn.GroupNorm(min(8, out), out)]


class ResidualStage(nn.Module):
    """He et al. 2016's basic block, downsampling: y = GELU(F(x) + P(x)), F two 3×3 convs
    (the first with stride 2), P a strided 1×1 projection."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_norm(width, out, 2), nn.GELU(), *_conv_norm(out, out))
        self.shortcut = nn.Sequential(
            nn.Conv2d(width, out, 1, stride=2), nn.GroupNorm(min(8, out), out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.body(x) + self.shortcut(x))


@VISION_ENCODERS.register("resnet")
class ResNetEncoder(ConvStemEncoder):
    """A small ResNet: one residual stage per halving (GroupNorm for small batches)."""

    def build_stem(self, config: VisionConfig) -> nn.Sequential:
        widths = (3, *config.channels)
        stages = [ResidualStage(a, b) for a, b in itertools.pairwise(widths)]
        return nn.Sequential(*stages, nn.Conv2d(widths[-1], config.dim, 1))


@VISION_ENCODERS.register("vgg")
class VGGEncoder(ConvStemEncoder):
    """A small VGG (Simonyan & Zisserman 2015): per halving two 3×3 convs then a 2×2 max-pool,
    a plain stack with no shortcut."""

    def build_stem(self, config: VisionConfig) -> nn.Sequential:
        layers: list[nn.Module] = []
        width = 3
        for out in config.channels:
            layers += [*_conv_norm(width, out), nn.GELU(), *_conv_norm(out, out), nn.GELU()]
            layers.append(nn.MaxPool2d(2))
            width = out
        return nn.Sequential(*layers, nn.Conv2d(width, config.dim, 1))


@VISION_ENCODERS.register("vit")
class ViTEncoder(VisionEncoder):
    """ViT (Dosovitskiy et al. 2021): non-overlapping patches, linearly embedded."""

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        self.patch_embed = nn.Conv2d(3, config.dim, config.patch_size, stride=config.patch_size)

    def tokenise(self, images: Tensor) -> Tensor:
        return self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, h·w, dim)


def create_vision_encoder(config: VisionConfig, allow_pickle: bool = False) -> VisionEncoder:
    """A registered encoder by name; any other name is a Hugging Face vision model (hub name
    or local folder), loaded from pickle weights only if `allow_pickle`."""
    if config.name in VISION_ENCODERS:
        return VISION_ENCODERS.get(config.name)(config)
    from vtfuse.encoders.hf_vision import HuggingFaceVisionEncoder

    return HuggingFaceVisionEncoder(config, allow_pickle)


def vision_preset(name: str) -> dict[str, int]:
    """The VisionConfig fields encoder `name` fixes (a pretrained model's input size)."""
    if name in VISION_ENCODERS:
        return dict(VISION_ENCODERS.get(name).preset)
    from vtfuse.encoders.hf_vision import tower_preset

    return tower_preset(name)


def pretrained(module: nn.Module) -> nn.Module:
    """Mark `module` as holding pretrained weights: vtfuse's initialisation leaves it alone."""
    module.vtfuse_pretrained = True
    return module
