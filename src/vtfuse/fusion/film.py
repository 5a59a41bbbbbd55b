"""FiLM: the words modulate the image's channels, then the words read the modulated image."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vtfuse.attention import KVCache
from vtfuse.config import FusionConfig
from vtfuse.fusion.base import FUSIONS, Fusion, FusionCall, attend_per_position, gather_images
from vtfuse.fusion.cross_attention import CrossAttentionFusion
from vtfuse.linear import Linear


@FUSIONS.register("film")
class FiLMFusion(Fusion):
    """Feature-wise linear modulation (Perez et al. 2018, "FiLM: Visual Reasoning with a General
    Conditioning Layer"): the question scales and shifts each channel of the image features,

        FiLM(F | c) = γ(c) ⊙ F + β(c)                                  (Eq. 1–3)

    inside a residual block over the token grid (their Fig. 3: 1×1 conv, ReLU, 3×3 conv, BN,
    FiLM, ReLU, residual). Here, per block, with c the conditioning vector of the words:

        x      = ReLU(W · LN(image))                  the 1×1 conv, one Linear per token
        F      = LN'(DWConv3×3(x))                    over the √N × √N grid, row-major
        (Δγ, β) = G(c),  γ = 1 + Δγ
        image ← image + tanh(α) · ReLU(γ ⊙ F + β)
        text  ← text  + CrossAttn(LN(text), image)

    and the modulated image stream goes on to the next block, which modulates it again, as
    the paper stacks its FiLM-ed ResBlocks.

    Departures from the paper, each for a reason:

    * c is not a GRU's final state but the mean of the words' (normalised) states: over
      `token_mask` in an encoder; in a decoder, position t is conditioned on the mean of the
      words ≤ t (see `condition`), so the image stream is one per position (B, T, N, d), as
      co-attention's is, and no position sees a later word.
    * The grid is read from N = side² alone (the strategy is not told the vision encoder's
      grid): a clip model's F·h·w tokens are refused when F·h·w is not a square, and
      convolved as one wrongly tiled grid when it is (F = 4): film is for still images.
    * The 3×3 conv is depthwise (one 3×3 filter per channel; the 1×1 Linear before it mixes
      the channels): a full 3×3 conv costs 9·d² weights a block, and in a decoder it runs
      over one grid per word. No coordinate maps are appended: the image tokens already
      carry the vision encoder's position embeddings.
    * The norm is a LayerNorm over each token's channels without its own affine (FiLM is
      the affine), not BatchNorm: it does not depend on the other rows of the batch, so
      training, evaluation and cached decoding compute the same thing.
    * The skip connection is the stream's own (image ← image + ...), not the paper's skip from
      after the 1×1 conv, and the branch is gated as in Flamingo, α₀ = 0: the block starts as
      exactly plain cross-attention over the encoder's tokens (the image stream passes through
      untouched) and lets the words modulate the image as training asks. Zeroing Δγ and β
      alone could not do that: the unmodulated branch ReLU(F) is not zero.
    * The generator G(c) = c·W_G + b_G predicts Δγ, γ = 1 + Δγ, and starts at zero: the
      modulation starts as the identity (γ = 1, β = 0 for every question), so when the gate
      opens the branch first adds the same ReLU(F) whatever the words, and the words' effect
      grows from nothing rather than from a random per-question rescaling of every channel
      (under vtfuse's N(0, 1/fan_in) Linear initialisation Δγ and β start with a standard
      deviation of about 0.5). Predicting Δγ is what makes zero the identity: γ = 0 would
      zero the features and their gradients, and weight decay now pulls towards "leave the
      channel as it is". W_G and b_G are plain Parameters, not a Linear, which
      `TaskModel.init_weights` would redraw; they still get a gradient as soon as the gate is
      open, ∂L/∂W_G = c ⊗ ∂L/∂(Δγ, β). Nothing bounds γ: the paper's trained γ include many
      near 0 and negative ones (their Fig. 5).

    The attention map (B, heads, T, N) is the words' over the modulated image's tokens, which
    are the image's tokens, in place: the visualiser and the pointing score read it as any
    cross-attention's.
    """

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__()
        self.norm_image = nn.LayerNorm(image_dim)
        self.project = Linear(image_dim, image_dim)  # the paper's 1×1 conv
        self.spatial = nn.Conv2d(image_dim, image_dim, 3, padding=1, groups=image_dim)
        self.norm_features = nn.LayerNorm(image_dim, elementwise_affine=False)
        # no affine of its own: the generator, a linear map, would absorb it
        self.norm_condition = nn.LayerNorm(dim, elementwise_affine=False)
        self.generator_weight = nn.Parameter(torch.zeros(dim, 2 * image_dim))  # c → (Δγ, β)
        self.generator_bias = nn.Parameter(torch.zeros(2 * image_dim))
        self.gate = nn.Parameter(torch.zeros(()))
        self.read = CrossAttentionFusion(dim, heads, image_dim, config, dropout)

    def fuse(
        self, text: Tensor, image: Tensor, call: FusionCall
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if image.dim() == 3:  # the encoder's tokens: one stream shared by every position
            image = gather_images(image, call.image_index)[:, None]
        condition = self.condition(text, call.cache, call.token_mask, call.causal)
        image = self.modulate(image, condition)
        attended, weights = self.read_image(text, image, call.need_weights)
        return text + attended, image, weights

    def features(self, image: Tensor) -> Tensor:
        """F = LN'(DWConv3×3(ReLU(W · LN(image)))): (B, P, N, d) → (B, P, N, d), the words
        not yet involved."""
        batch, positions, count, width = image.shape
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(
                f"film convolves a square grid of image tokens (N = side², row-major), got "
                f"N = {count}; a clip's frames·h·w tokens are not one grid"
            )
        x = self.project(self.norm_image(image)).relu()
        grid = x.reshape(batch * positions, side, side, width).permute(0, 3, 1, 2)
        x = self.spatial(grid).permute(0, 2, 3, 1).reshape(batch, positions, count, width)
        return self.norm_features(x)

    def modulate(self, image: Tensor, condition: Tensor) -> Tensor:
        """image (B, P, N, d), c (B, C, dim) → image + tanh(α) · ReLU(γ(c) ⊙ F + β(c)),
        (B, max(P, C), N, d): in a decoder the shared stream of the first block becomes one
        per position here."""
        generated = condition @ self.generator_weight + self.generator_bias
        delta_gamma, beta = generated[:, :, None].chunk(2, dim=-1)  # (B, C, 1, d) each
        modulated = ((1 + delta_gamma) * self.features(image) + beta).relu()
        return image + self.gate.tanh() * modulated

    def condition(
        self, text: Tensor, cache: KVCache | None, token_mask: Tensor | None, causal: bool
    ) -> Tensor:
        """The words' conditioning vector: the mean of LN(text) over the real words (B, 1, dim)
        in an encoder; in a decoder, for each position t the mean over the words ≤ t
        (B, T, dim), a running sum divided by a running count.

        During generation the cache keeps the sum and the count of the words decoded so far,
        (B, 1, 1, dim) and (B, 1, 1, 1) in the places of keys and values, so a step of t words
        continues the prefix sums that recomputing the whole caption would compute, and beam
        search reorders them with the rest of the cache (it is never `static`). Sums and
        counts are kept in float32, whatever the autocast: a bfloat16 count stops at 256."""
        states = self.norm_condition(text).float()
        if token_mask is None:
            weight = states.new_ones(*states.shape[:2], 1)
        else:
            weight = token_mask[..., None].float()
        states = states * weight
        if not causal:
            total = states.sum(dim=1, keepdim=True)
            return (total / weight.sum(dim=1, keepdim=True).clamp_min(1)).to(text.dtype)
        sums, counts = states.cumsum(dim=1), weight.cumsum(dim=1)
        if cache is not None:
            if cache.length:  # the words before this call
                sums, counts = sums + cache.key[:, 0], counts + cache.value[:, 0]
            cache.key, cache.value = sums[:, None, -1:], counts[:, None, -1:]
            cache.length += text.shape[1]
        return (sums / counts.clamp_min(1)).to(text.dtype)

    def read_image(
        self, text: Tensor, image: Tensor, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Each word attends to the modulated image at its own position (or the shared one)."""
        call = FusionCall(need_weights=need_weights)
        return attend_per_position(
            lambda words, cells: self.read.attend(words, cells, call), text, image
        )
