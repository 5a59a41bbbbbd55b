"""Early fusion, single stream: the image tokens join the text sequence."""

from __future__ import annotations

from torch import Tensor, nn

from vtfuse.config import FusionConfig
from vtfuse.fusion.base import FUSIONS, gather_images


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """Merged attention over [image; text] (VisualBERT, Li et al. 2019; the prefix of LLaVA and
    nanoVLM): the image tokens, projected to the text width, are put before the text, and the
    text blocks' own self-attention and MLP process both — there is no fusion sub-layer.

        x = [W image + b ; text]        x ← x + SelfAttn(LN(x));  x ← x + MLP(LN(x))

    In a decoder the joint sequence is causal, as in LLaVA: the image tokens come first, so
    every word sees the whole image and the image never sees a word; during generation the
    image's keys and values sit at the start of the self-attention cache. The attention map
    of a word is its self-attention over the image columns, renormalised over the image.
    `fusion.score` sets the score of that merged self-attention.
    """

    single_stream = True

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__()
        self.project = nn.Linear(image_dim, dim)  # the modality projector; its bias marks images

    def forward(self, image: Tensor, image_index: Tensor | None = None) -> Tensor:
        """image (I, N, image_dim) → the tokens that open each row's sequence (B, N, dim)."""
        return gather_images(self.project(image), image_index)
