"""The text side: token embeddings, a contextualiser, then blocks of self-attention → fusion → MLP.

The contextualiser (`text.encoder`, see `vtfuse.encoders.context`) says how the words meet each
other: learned positions and the blocks' self-attention (`transformer`, the default), or one
recurrent stack under the blocks (`lstm`, `gru`), whose blocks are then fusion → MLP.
`causal=True` makes it a caption decoder (each token sees only earlier ones, K/V and recurrent
state cached during generation); `causal=False` makes it a question encoder. With a
single-stream strategy (`concat`) the projected image tokens open the sequence and the blocks
have no fusion step.
With `grad_checkpointing` the blocks recompute their activations in the backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtfuse.blocks import DecoderCache, FusionBlock, LayerCache
from vtfuse.config import TextConfig
from vtfuse.encoders.context import CONTEXTUALISERS, embedding_scale
from vtfuse.fusion import FusionBuilder
from vtfuse.grad_checkpointing import Checkpointable


class FusedTextTransformer(Checkpointable, nn.Module):
    def __init__(self, config: TextConfig, image_dim: int, fusion: FusionBuilder, causal: bool):
        super().__init__()
        self.config = config
        self.causal = causal
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.context = CONTEXTUALISERS.get(config.encoder)(config, causal)
        self.image_prefix = None  # single stream: image tokens (B, N, dim) opening the sequence
        if fusion.single_stream:
            self.image_prefix = fusion(config.dim, config.heads, image_dim, config.dropout)
        self.blocks = nn.ModuleList(
            FusionBlock(
                config.dim,
                config.heads,
                image_dim,
                fusion,
                causal=causal,
                mlp_ratio=config.mlp_ratio,
                dropout=config.dropout,
                self_attention=self.context.blocks_attend,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.embedding_scale = embedding_scale(config)  # see TaskModel.init_weights
        self.dropout = nn.Dropout(config.dropout)

    def new_cache(self) -> DecoderCache:
        return DecoderCache((LayerCache() for _ in self.blocks), self.context.new_cache())

    def forward(
        self,
        tokens: Tensor,
        image: Tensor | None,
        *,
        token_mask: Tensor | None = None,
        caches: DecoderCache | None = None,
        need_weights: bool = False,
        prefix: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """tokens (B, T) and image tokens (I, N, image_dim) → states (B, T', dim).

        `image_index` (B,) maps each row to its image (see `vtfuse.fusion`).
        `prefix` (B, P, dim), e.g. a [CLS] vector, is put before the token embeddings.
        Without an `image` the blocks skip their fusion step: a text-only encoder with the
        same weights (as BLIP's text encoder is, for its contrastive loss).
        With `caches`, the tokens continue the cached sequence. Returns the states and, if
        `need_weights`, each block's attention over the image (B, heads, T', N).
        """
        past = caches.length if caches is not None else 0
        single_stream = self.image_prefix is not None and image is not None
        image_tokens = image.shape[1] if single_stream else 0
        opens = past == 0  # this call starts the sequence (a single stream puts the image here)
        x = self.token_embedding(tokens) * self.embedding_scale
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        text_past = past - (0 if opens else image_tokens)
        context_cache = caches.context if caches is not None else None
        x = self.dropout(self.context(x, text_past, token_mask, context_cache))
        text_length = x.shape[1]
        if single_stream and opens:
            x = torch.cat([self.image_prefix(image, image_index), x], dim=1)
            if token_mask is not None:
                opened = token_mask.new_ones(x.shape[0], image_tokens)
                token_mask = torch.cat([opened, token_mask], dim=1)
        all_weights = []
        for i, block in enumerate(self.blocks):
            x, image, weights = self.run_layer(
                block,
                x,
                image,
                token_mask=token_mask,
                cache=caches[i] if caches else None,
                need_weights=need_weights,
                image_index=image_index,
            )
            if need_weights:
                all_weights.append(self.over_image(weights, text_length, image_tokens))
        if caches is not None:
            caches.length += x.shape[1]
        return self.norm(x[:, -text_length:]), all_weights

    def over_image(self, weights: Tensor, text_length: int, image_tokens: int) -> Tensor:
        """A block's map → the text rows' attention over the image (B, H, T, N). A single
        stream's self-attention map is cut to the image columns and renormalised over them."""
        if self.image_prefix is None:
            return weights
        over_image = weights[:, :, -text_length:, :image_tokens]
        return over_image / over_image.sum(-1, keepdim=True).clamp_min(1e-12)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions where `mask` (B, T) is True: (B, T, D) → (B, D)."""
    keep = mask[:, :, None].to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1)


def read_with_cls(
    text: FusedTextTransformer,
    cls: Tensor,
    tokens: Tensor,
    token_mask: Tensor | None,
    image: Tensor | None,
    image_index: Tensor | None = None,
    need_weights: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """A bidirectional reading of the words with a learned [CLS] (1, 1, D) in front: the mean
    state over [CLS] and the words (B, D), and each block's attention over the image for the
    words (B, heads, T, N), the [CLS] row dropped. `image` None: the words alone.

    The mean, not [CLS] alone: the loss then reaches each word's own cross-attention directly
    ("red" learns to look at red) instead of only through [CLS]'s self-attention, which at
    initialisation barely listens to any word."""
    batch = tokens.shape[0]
    if token_mask is None:
        token_mask = torch.ones_like(tokens, dtype=torch.bool)
    token_mask = torch.cat([token_mask.new_ones(batch, 1), token_mask], dim=1)
    hidden, weights = text(
        tokens,
        image,
        token_mask=token_mask,
        need_weights=need_weights,
        prefix=cls.expand(batch, -1, -1),
        image_index=image_index,
    )
    return masked_mean(hidden, token_mask), [w[:, :, 1:] for w in weights]
