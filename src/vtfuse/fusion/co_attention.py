"""Bidirectional co-attention: the text reads the image and the image reads the text."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtfuse.attention import KVCache, MultiHeadAttention
from vtfuse.config import FusionConfig
from vtfuse.feedforward import MLP
from vtfuse.fusion.base import FUSIONS, Fusion, FusionCall, attend_per_position, gather_images


@FUSIONS.register("co_attention")
class CoAttentionFusion(Fusion):
    """A co-attentional layer in the manner of ViLBERT (Lu et al. 2019, Fig. 2b): the image
    stream reads the words, then the words read the updated image,

        image ← image + tanh(γ_read) · CrossAttn(LN(image), text)
        image ← image + tanh(γ_ff)   · FF(LN(image))
        text  ← text  + CrossAttn(LN(text), image)

    and the updated image stream goes on to the next block, in its own width (`image_dim`).
    ViLBERT updates both streams in parallel; here the image goes first so that every weight of
    every layer, the last one's included, reaches the text that the task heads read.
    The image's updates are gated as in Flamingo, γ₀ = 0, so the layer starts as plain
    cross-attention and lets the image read the words as training asks. Ungated, unit-scale
    updates buried each image token under a mix of words it had not yet learned to pick: on the
    quickstart recipe the captioner's validation loss stalled at 0.30 (gated: 0.11) and the VQA
    model started from it stayed at 0.48 validation accuracy (gated: 0.71); one seed each.
    """

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__()
        score = config.score or "dot"
        self.norm_text = nn.LayerNorm(dim)
        self.text_reads_image = MultiHeadAttention(
            dim, heads, context_dim=image_dim, score=score, dropout=dropout
        )
        self.norm_image = nn.LayerNorm(image_dim)
        self.image_reads_text = MultiHeadAttention(
            image_dim, heads, context_dim=dim, score=score, dropout=dropout
        )
        self.read_gate = nn.Parameter(torch.zeros(()))
        self.norm_ff = nn.LayerNorm(image_dim)
        self.ff = MLP(image_dim, dropout=dropout)
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def fuse(
        self, text: Tensor, image: Tensor, call: FusionCall
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if image.dim() == 3:  # the encoder's tokens: one stream shared by every position
            image = gather_images(image, call.image_index)[:, None]
        image = self.read_text(image, text, call.cache, call.token_mask, call.causal)
        image = image + self.ff_gate.tanh() * self.ff(self.norm_ff(image))
        attended, weights = self.read_image(text, image, call.need_weights)
        return text + attended, image, weights

    def read_image(
        self, text: Tensor, image: Tensor, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Each word attends to the image stream at its own position (or the shared one)."""
        return attend_per_position(
            lambda words, cells: self.text_reads_image(words, cells, need_weights=need_weights),
            self.norm_text(text),
            image,
        )

    def read_text(
        self,
        image: Tensor,
        text: Tensor,
        cache: KVCache | None,
        token_mask: Tensor | None,
        causal: bool,
    ) -> Tensor:
        """image (B, P, N, d) attends to the words; in a decoder, position t to words ≤ t."""
        batch, length = text.shape[:2]
        if causal:
            image = image.expand(batch, length, *image.shape[2:])
        positions, count, width = image.shape[1:]
        mask = None
        if causal:
            past = cache.length if cache is not None else 0
            rows = torch.arange(positions, device=text.device).repeat_interleave(count) + past
            keys = torch.arange(past + length, device=text.device)
            mask = (keys[None, :] <= rows[:, None])[None, None]  # (1, 1, P·N, S)
        read, _ = self.image_reads_text(
            self.norm_image(image).reshape(batch, positions * count, width),
            text,
            key_mask=None if causal else token_mask,
            cache=cache,
            mask=mask,
            context_grows=True,
        )
        return image + self.read_gate.tanh() * read.view(batch, positions, count, width)
