"""Late fusion: one pooled image vector mixed into every text state by learned modality weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtfuse.config import FusionConfig
from vtfuse.fusion.base import FUSIONS, Fusion, FusionCall, gather_images


@FUSIONS.register("weighted_sum")
class WeightedSumFusion(Fusion):
    """Each modality projected to one space, combined by softmax-normalised weights w = softmax(β):

        text_t ← text_t + w_text · W_t LN(text_t) + w_image · W_i mean_n(image_n)

    No text token meets an image token: the image enters as its mean, so this strategy sees
    *what* is in the picture but not *where* — the baseline the attention-based strategies
    should beat on relational questions. Its "attention" is the uniform mean over the tokens.
    """

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.modality_logits = nn.Parameter(torch.zeros(2))  # β: equal weights at the start
        self.dropout = nn.Dropout(dropout)

    def fuse(
        self, text: Tensor, image: Tensor, call: FusionCall
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        pooled = gather_images(self.image_proj(image.mean(dim=1)), call.image_index)  # (B, dim)
        w_text, w_image = self.modality_logits.softmax(dim=0)
        fused = w_text * self.text_proj(self.norm(text)) + w_image * pooled[:, None, :]
        weights = None
        if call.need_weights:
            batch, length, count = text.shape[0], text.shape[1], image.shape[1]
            weights = text.new_full((batch, 1, length, count), 1.0 / count)
        return text + self.dropout(fused), image, weights
