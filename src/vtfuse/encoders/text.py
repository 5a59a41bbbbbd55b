"""The text side: token + position embeddings, then blocks of self-attention → fusion → MLP.

`causal=True` makes it a caption decoder (each token sees only earlier ones, K/V cached during
generation); `causal=False` makes it a question encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtfuse.blocks import FusionBlock, LayerCache
from vtfuse.config import FusionConfig, TextConfig


class FusedTextTransformer(nn.Module):
    def __init__(self, config: TextConfig, image_dim: int, fusion: FusionConfig, causal: bool):
        super().__init__()
        self.config = config
        self.causal = causal
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.blocks = nn.ModuleList(
            FusionBlock(
                config.dim,
                config.heads,
                image_dim,
                fusion,
                causal=causal,
                mlp_ratio=config.mlp_ratio,
                dropout=config.dropout,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.embedding_scale = config.dim**0.5  # see TaskModel.init_weights
        self.dropout = nn.Dropout(config.dropout)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    def forward(
        self,
        tokens: Tensor,
        image: Tensor,
        *,
        token_mask: Tensor | None = None,
        caches: list[LayerCache] | None = None,
        need_weights: bool = False,
        prefix: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """tokens (B, T) and image tokens (I, N, image_dim) → states (B, T', dim).

        `image_index` (B,) maps each row to its image (see `vtfuse.fusion`).
        `prefix` (B, P, dim), e.g. a [CLS] vector, is put before the token embeddings.
        With `caches`, the tokens continue the cached sequence. Returns the states and, if
        `need_weights`, each block's attention over the image (B, heads, T', N).
        """
        past = caches[0].self_attn.length if caches else 0
        x = self.token_embedding(tokens) * self.embedding_scale
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        length = past + x.shape[1]
        if length > self.config.max_length:
            raise ValueError(
                f"sequence of {length} tokens is longer than text.max_length "
                f"{self.config.max_length}"
            )
        positions = torch.arange(past, length, device=tokens.device)
        x = self.dropout(x + self.position_embedding(positions) * self.embedding_scale)
        all_weights = []
        for i, block in enumerate(self.blocks):
            x, weights = block(
                x,
                image,
                token_mask=token_mask,
                cache=caches[i] if caches else None,
                need_weights=need_weights,
                image_index=image_index,
            )
            if need_weights:
                all_weights.append(weights)
        return self.norm(x), all_weights
