"""Transformer building blocks shared by the encoders and decoders (pre-norm, GPT-2 style)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from vtfuse.attention import KVCache, MultiHeadAttention
from vtfuse.feedforward import MLP
from vtfuse.fusion import FusionBuilder


class SelfAttentionBlock(nn.Module):
    """x ← x + SelfAttn(LN(x)); x ← x + MLP(LN(x)). Used over image tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x))[0]
        return x + self.mlp(self.norm_mlp(x))


class DecodingState(Protocol):
    """Per-row state carried between decoding steps (e.g. `encoders.context.RecurrentCache`)."""

    def reorder(self, index: Tensor) -> None: ...  # row i continues old row index[i]
    def expand(self, index: Tensor) -> None: ...  # row i starts from row index[i]


@dataclass
class LayerCache:
    """What one fusion block keeps between generation steps."""

    self_attn: KVCache = field(default_factory=KVCache)
    fusion: KVCache = field(default_factory=KVCache)

    def reorder(self, index: Tensor) -> None:
        self.self_attn.reorder(index)
        self.fusion.reorder(index)


class DecoderCache(list[LayerCache]):
    """One LayerCache per block, the text side's own state (a recurrent stack's, or None), the
    number of positions read so far, and what beam search does to them."""

    def __init__(self, layers: Iterable[LayerCache], context: DecodingState | None = None):
        super().__init__(layers)
        self.context = context
        self.length = 0  # positions read so far (a single stream's image tokens included)

    def reorder(self, index: Tensor) -> None:
        """Follow beam search: row i becomes old row `index[i]` (per-image K/V stay)."""
        for cache in self:
            cache.reorder(index)
        if self.context is not None:
            self.context.reorder(index)

    def expand(self, index: Tensor) -> None:
        """Give each row `index[i]`'s state, the per-image K/V included (beams from images)."""
        for cache in self:
            cache.self_attn.select_rows(index)
            cache.fusion.select_rows(index)
        if self.context is not None:
            self.context.expand(index)


class FusionBlock(nn.Module):
    """Self-attention → fusion with the image (cross-attention by default) → MLP, all pre-norm.

    With `causal=True` this is a caption decoder block; with `causal=False` a question encoder
    block. The fusion step is a registered module (see `vtfuse.fusion`), so strategies swap in
    without touching this class. A single-stream strategy has no fusion step: the image tokens
    are already in the sequence, the self-attention (with the strategy's score) merges them,
    and its weights are the block's attention map. With `self_attention=False` (the words were
    contextualised before the blocks, by a recurrent stack) a dual-stream block is fusion → MLP;
    a single stream keeps its self-attention, since that is where its fusing happens.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        image_dim: int,
        fusion: FusionBuilder,
        causal: bool,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        self_attention: bool = True,
    ):
        super().__init__()
        self.causal = causal
        self.norm_attn = self.attn = None
        if self_attention or fusion.single_stream:
            self.norm_attn = nn.LayerNorm(dim)
            score = fusion.self_attention_score
            self.attn = MultiHeadAttention(dim, heads, score=score, dropout=dropout)
        self.fusion = None
        if not fusion.single_stream:
            self.fusion = fusion(dim, heads, image_dim, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(
        self,
        x: Tensor,
        image: Tensor | None,
        *,
        token_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        need_weights: bool = False,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """→ the new states, the image (stream) for the next block, and the attention map:
        the fusion's over the image (B, H, T, N), or for a single stream the self-attention's
        over the whole sequence (B, H, T, S)."""
        weights = None
        if self.attn is not None:
            attended, weights = self.attn(
                self.norm_attn(x),
                key_mask=token_mask,
                causal=self.causal,
                cache=cache.self_attn if cache else None,
                need_weights=need_weights and self.fusion is None,
            )
            x = x + attended
        if self.fusion is not None and image is not None:  # no image: a text-only encoder
            x, image, weights = self.fusion(
                x,
                image,
                cache=cache.fusion if cache else None,
                need_weights=need_weights,
                image_index=image_index,
                token_mask=token_mask,
                causal=self.causal,
            )
        return x + self.mlp(self.norm_mlp(x)), image, weights
