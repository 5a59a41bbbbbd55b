"""Give a pretrained causal language model eyes: cross-attention injected between its layers.

As Flamingo (Alayrac et al. 2022), Idefics and Llama 3.2 Vision do: the language model — any
`transformers` causal LM, by hub name or local folder — keeps its weights (frozen by default),
and a fusion block (Flamingo's gated cross-attention unless told otherwise) is inserted before
every k-th decoder layer. With the gates at 0 the fused model's logits are the LM's own.

How the image reaches the wrapped layers without touching the LM's forward signature: every
inserted block reads one shared `ImageContext`, which the captioner fills for the length of an
LM call. The decoder layers are found by inspection — the `nn.ModuleList` holding
`config.num_hidden_layers` modules — so GPT-2, Llama, Mistral, Qwen2, Phi and GPT-NeoX need no
per-family table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vtfuse.attention import KVCache
from vtfuse.fusion import FusionBuilder
from vtfuse.fusion.base import gather_images


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers: the one ModuleList with num_hidden_layers modules."""
    count = lm.config.num_hidden_layers
    stacks = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        raise ValueError(
            f"cannot find the decoder layers of {type(lm).__name__}: expected one ModuleList of "
            f"{count} layers, found {len(stacks)}"
        )
    return stacks[0]


@dataclass
class ImageContext:
    """What the inserted blocks read during one LM call (empty: they pass the text through)."""

    image: Tensor | None = None  # (I, N, image_dim); interleaved: (B, M·N, image_dim)
    image_index: Tensor | None = None  # (B,) row → image, None: one image per row
    caches: list[KVCache] | None = None  # one per inserted block, for decoding
    need_weights: bool = False
    weights: list[Tensor] = field(default_factory=list)  # filled: (B, H, T, N) per block
    interleaved: Interleaving | None = None  # which image each word may see
    latent_map: Tensor | None = None  # resampler: each latent's attention over the grid
    token_mask: Tensor | None = None  # (B, T) real words (an encoder's padding is not a word)
    causal: bool = False  # a decoder: no position may see a later word (co_attention, film)


@dataclass
class Interleaving:
    """Several images in one sequence, each opened by an <image> token (Flamingo, §2.3).

    `image_mask` (B, T, M·N) lets each word attend the tokens of its latest image (or, with
    `all_previous`, of every image so far); `blind` (B, T) marks words before the first image,
    which the inserted blocks leave exactly as they are.
    """

    image_mask: Tensor
    blind: Tensor

    @classmethod
    def of(
        cls,
        tokens: Tensor,
        image_token_id: int,
        images_per_row: int,
        tokens_per_image: int,
        seen_before: Tensor | None = None,
        all_previous: bool = False,
    ) -> tuple[Interleaving, Tensor]:
        """Masks for `tokens` (B, T), which follow `seen_before` (B,) images; also returns how
        many images each row has seen after them."""
        seen = (tokens == image_token_id).cumsum(dim=1)
        if seen_before is not None:
            seen = seen + seen_before[:, None]
        # (B, T): index of the latest image, −1 before the first; an opener past the last
        # image (a decoded <s>) leaves the words on the last one
        latest = (seen - 1).clamp(max=images_per_row - 1)
        key_image = torch.arange(images_per_row, device=tokens.device)
        key_image = key_image.repeat_interleave(tokens_per_image)  # (M·N,)
        up_to_latest = key_image <= latest[..., None]
        allowed = up_to_latest if all_previous else key_image == latest[..., None]
        blind = latest < 0
        # a blind word attends anywhere (no all-masked softmax); its result is thrown away
        return cls(allowed | blind[..., None], blind), seen[:, -1]


class CrossAttendingLayer(nn.Module):
    """An LM decoder layer with a fusion block before it: text ← fusion(text, image), then the
    layer, called exactly as the LM calls it."""

    def __init__(self, layer: nn.Module, fusion: nn.Module, context: ImageContext, slot: int):
        super().__init__()
        self.fusion = fusion
        self.layer = layer
        self.slot = slot
        self._context = [context]  # in a list: shared, not a submodule

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        context = self._context[0]
        if context.image is not None:
            hidden_states = self.fuse(hidden_states, context)
        return self.layer(hidden_states, *args, **kwargs)

    def fuse(self, text: Tensor, context: ImageContext) -> Tensor:
        interleaved = context.interleaved
        options = {} if interleaved is None else {"image_mask": interleaved.image_mask}
        fused, _, weights = self.fusion(
            text,
            context.image,
            cache=context.caches[self.slot] if context.caches else None,
            need_weights=context.need_weights,
            image_index=context.image_index,
            token_mask=context.token_mask,
            causal=context.causal,
            **options,
        )
        if weights is not None:
            if context.latent_map is not None:  # over latents → over the image grid
                latent_map = gather_images(context.latent_map, context.image_index)
                weights = weights @ latent_map[:, None]  # (B, H, T, M) @ (B, 1, M, N)
            context.weights.append(weights)
        if interleaved is not None:
            fused = torch.where(interleaved.blind[..., None], text, fused)
        return fused


def inject_cross_attention(
    lm: nn.Module, image_dim: int, fusion: FusionBuilder, every: int = 1
) -> tuple[ImageContext, list[CrossAttendingLayer]]:
    """Wrap every `every`-th decoder layer of `lm` (0, k, 2k, ...) in place."""
    if every < 1:
        raise ValueError(f"xattn_every must be at least 1, got {every}")
    if fusion.single_stream:
        raise ValueError(f"{fusion.config.name} cannot be injected into a pretrained LM's layers")
    layers = decoder_layers(lm)
    dim, heads = lm.config.hidden_size, lm.config.num_attention_heads
    context, wrapped = ImageContext(), []
    for slot, i in enumerate(range(0, len(layers), every)):
        block = fusion(dim, heads, image_dim)
        layers[i] = CrossAttendingLayer(layers[i], block, context, slot)
        wrapped.append(layers[i])
    return context, wrapped
