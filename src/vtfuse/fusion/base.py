"""The fusion registry and what every strategy shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from vtfuse.attention import KVCache
from vtfuse.config import FusionConfig
from vtfuse.registry import Registry

FUSIONS: Registry[nn.Module] = Registry("fusion strategy")


@dataclass(frozen=True)
class FusionCall:
    """How the text reads its image in this call, the same for every block of a forward pass:
    `image_index` (B,) maps each text row to its image (None: one image per row); `cache` is a
    KVCache the strategy may fill once per image and reuse at every generation step;
    `token_mask` (B, T) marks real text tokens; `causal` says the text is a decoder (no
    position may see a later one); `image_mask` (B, T, N), True where word t may attend image
    token n (interleaved images; only strategies with `reads_image_mask`)."""

    cache: KVCache | None = None
    need_weights: bool = False
    image_index: Tensor | None = None
    token_mask: Tensor | None = None
    causal: bool = False
    image_mask: Tensor | None = None


class Fusion(nn.Module):
    """A dual-stream strategy: the step of a text block where the text takes in the image.

    `forward(text (B, T, dim), image, *, cache, need_weights, image_index, token_mask, causal,
    image_mask)` (see `FusionCall`) returns `(text, image, weights)`:

    * `image` comes in as the encoder's tokens (I, N, image_dim), one row per distinct image.
      A strategy that updates the image stream (co-attention) returns its new image stream,
      which the next block receives; the others return `image` as it came.
    * `weights` (B, heads, T, N), only when `need_weights`, is the attention of each text
      token over the image tokens, for the visualiser and the pointing score.

    A strategy implements `fuse(text, image, call: FusionCall)`. A single-stream strategy
    (`single_stream = True`, see `concat`) has no such step: it puts the image tokens into the
    text sequence itself, and the blocks' self-attention fuses them.
    """

    single_stream = False
    reads_image_mask = False  # attends a per-word subset of the image tokens (interleaved)

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
        image_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if image_mask is not None and not self.reads_image_mask:
            raise ValueError(f"{type(self).__name__} reads whole images: no interleaved images")
        call = FusionCall(cache, need_weights, image_index, token_mask, causal, image_mask)
        return self.fuse(text, image, call)

    def fuse(
        self, text: Tensor, image: Tensor, call: FusionCall
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


Attend = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]  # (queries, keys) → out, weights


def attend_per_position(
    attend: Attend, text: Tensor, image: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Each word attends to the image stream at its own position (or the shared one):
    text (B, T, dim), image (B, P, N, d) with P = 1 or T → (B, T, dim), weights (B, H, T, N).
    For strategies whose image stream a decoder keeps per word (co-attention, FiLM)."""
    batch, length, dim = text.shape
    positions, count, width = image.shape[1:]
    attended, weights = attend(
        text.reshape(batch * positions, length // positions, dim),
        image.reshape(batch * positions, count, width),
    )
    attended = attended.reshape(batch, length, dim)
    if weights is not None:  # (B·P, H, T/P, N) → (B, H, T, N)
        heads = weights.shape[1]
        weights = weights.view(batch, positions, heads, length // positions, count)
        weights = weights.transpose(1, 2).reshape(batch, heads, length, count)
    return attended, weights
