"""A fixed number of learned latent queries read the image; the text reads the latents."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtfuse.config import FusionConfig
from vtfuse.feedforward import MLP
from vtfuse.fusion.base import FUSIONS, Fusion, FusionCall, gather_images
from vtfuse.fusion.cross_attention import CrossAttentionFusion


class PerceiverResampler(nn.Module):
    """M learned latents read the image (Alayrac et al. 2022, §2.1):

        z ← z + CrossAttn(LN(z), image);   z ← z + FF(LN(z))      z: M learned latents

    so whatever reads them sees M tokens whatever the image's size (M = `config.latents`)."""

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__()
        if config.latents < 1:
            raise ValueError(f"fusion.latents must be at least 1, got {config.latents}")
        self.latents = nn.Parameter(torch.randn(config.latents, dim))
        self.read_image = CrossAttentionFusion(dim, heads, image_dim, config, dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = MLP(dim, dropout=dropout)

    def resample(self, image: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """image (I, N, image_dim) → latents (I, M, dim) and, if asked, weights (I, H, M, N)."""
        z = self.latents.expand(image.shape[0], -1, -1)
        z, _, weights = self.read_image(z, image, need_weights=need_weights)
        return z + self.ff(self.norm_ff(z)), weights


@FUSIONS.register("resampler")
class ResamplerFusion(PerceiverResampler, Fusion):
    """Perceiver Resampler (Alayrac et al. 2022, §2.1) / Q-Former-style queries (Li et al. 2023)
    in every block: M latents read the image, then

        text ← text + CrossAttn(LN(text), z)

    The text side attends to M tokens whatever the image's size (M = `fusion.latents`). The
    attention map over the image is the text→latent weights times the latent→image weights.
    During generation the resampled latents' K/V are cached like an image's.
    """

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__(dim, heads, image_dim, config, dropout)
        self.read_latents = CrossAttentionFusion(dim, heads, dim, config, dropout)

    def fuse(
        self, text: Tensor, image: Tensor, call: FusionCall
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        latents = image_weights = None  # a static cache already holds the latents' K/V
        if call.need_weights or call.cache is None or not call.cache.static:
            latents, image_weights = self.resample(image, call.need_weights)
        text, _, weights = self.read_latents.fuse(text, latents, call)
        if call.need_weights:
            per_latent = gather_images(image_weights.mean(dim=1), call.image_index)  # (B, M, N)
            weights = weights @ per_latent[:, None]  # (B, H, T, M) @ (B, 1, M, N)
        return text, image, weights
