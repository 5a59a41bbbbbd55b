"""The fusion registry and what every strategy shares."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vtfuse.attention import KVCache
from vtfuse.config import FusionConfig
from vtfuse.registry import Registry

FUSIONS: Registry[nn.Module] = Registry("fusion strategy")


class Fusion(nn.Module):
    """A dual-stream strategy: the step of a text block where the text takes in the image.

    `forward(text (B, T, dim), image, *, cache, need_weights, image_index, token_mask, causal)`
    returns `(text, image, weights)`:

    * `image` comes in as the encoder's tokens (I, N, image_dim), one row per distinct image,
      with `image_index` (B,) mapping each text row to its image (None: one image per row).
      A strategy that updates the image stream (co-attention) returns its new image stream,
      which the next block receives; the others return `image` as it came.
    * `weights` (B, heads, T, N), only when `need_weights`, is the attention of each text
      token over the image tokens, for the visualiser and the pointing score.
    * `cache` is a KVCache the strategy may fill once per image and reuse at every generation
      step; `token_mask` (B, T) marks real text tokens; `causal` says the text is a decoder
      (no position may see a later one).

    A single-stream strategy (`single_stream = True`, see `concat`) has no such step: it puts
    the image tokens into the text sequence itself, and the blocks' self-attention fuses them.
    """

    single_stream = False

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        *,
        cache: KVCache | None = None,
        need_weights: bool = False,
        image_index: Tensor | None = None,
        token_mask: Tensor | None = None,
        causal: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError


@dataclass(frozen=True)
class FusionBuilder:
    """A strategy chosen and configured, not yet built: what the text side is handed, so a
    block neither looks a strategy up by name nor reads its config. `builder(dim, heads,
    image_dim, dropout)` builds one (a fusion step per block; for a single stream, the image
    prefix opening the sequence)."""

    strategy: type[Fusion]
    config: FusionConfig

    @property
    def single_stream(self) -> bool:
        """The image tokens join the text sequence and the blocks' self-attention fuses them."""
        return self.strategy.single_stream

    @property
    def self_attention_score(self) -> str:
        """The blocks' self-attention score: a single stream's is the strategy's score."""
        return (self.config.score or "dot") if self.single_stream else "dot"

    def __call__(self, dim: int, heads: int, image_dim: int, dropout: float = 0.0) -> nn.Module:
        return self.strategy(dim, heads, image_dim, self.config, dropout)


def fusion_builder(config: FusionConfig) -> FusionBuilder:
    """The registered strategy `config.name` with its config (an unknown name is an error)."""
    return FusionBuilder(FUSIONS.get(config.name), config)


def gather_images(image: Tensor, image_index: Tensor | None) -> Tensor:
    """Image rows (I, ...) → one row per text row (B, ...); None means they already match."""
    return image if image_index is None else image.index_select(0, image_index)
