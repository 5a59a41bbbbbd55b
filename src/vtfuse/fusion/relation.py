"""Relation network: pairs of image cells become tokens; the text reads the pairs."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vtfuse.attention import MultiHeadAttention
from vtfuse.config import FusionConfig
from vtfuse.fusion.base import FUSIONS, Fusion, FusionCall
from vtfuse.linear import Linear


def pooling_matrix(side: int, cells: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """P (cells², side²): row c averages the tokens of grid cell c's window, both grids
    row-major, with the windows of `adaptive_avg_pool2d` (they overlap when `cells` does not
    divide `side`). Pooled tokens are P · tokens; a map over the cells goes back to the tokens
    as w · P, each cell's weight spread evenly over the tokens it averaged (rows of P sum to 1,
    so the map keeps its sum)."""
    i = torch.arange(cells, device=device)
    start = (i * side) // cells
    end = ((i + 1) * side + cells - 1) // cells
    position = torch.arange(side, device=device)
    inside = (position >= start[:, None]) & (position < end[:, None])  # (cells, side)
    one_axis = inside.to(dtype) / inside.sum(dim=1, keepdim=True).to(dtype)
    # cell (r, c) averages rows r' and columns c' of its window: P[(r,c),(r',c')] = A[r,r']·A[c,c']
    return (one_axis[:, None, :, None] * one_axis[None, :, None, :]).reshape(cells**2, side**2)


def cell_coordinates(cells: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(cells², 2): each cell's (x, y) centre in [-1, 1], row-major (y down the rows)."""
    centres = (torch.arange(cells, device=device, dtype=dtype) * 2 + 1) / cells - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def marginalise(pair_weights: Tensor, pooling: Tensor | None = None) -> Tensor:
    """Weights over the pairs (…, M²), pair (i, j) at i·M + j → weights over the tokens (…, N).

    Cell k's weight is ½(Σ_j w_kj + Σ_i w_ik), half of what its pairs carry as either member
    (a self-pair (k, k) gives k its whole weight), so the map over the M cells sums to what
    the pairs did; `pooling` (M, N) then spreads each cell's weight over the tokens it pooled.
    """
    cells = math.isqrt(pair_weights.shape[-1])
    grid = pair_weights.unflatten(-1, (cells, cells))
    per_cell = (grid.sum(dim=-1) + grid.sum(dim=-2)) / 2
    return per_cell if pooling is None else per_cell @ pooling


@FUSIONS.register("relation")
class RelationFusion(Fusion):
    """A relation network (Santoro et al. 2017), RN(O) = f(Σ_{i,j} g(o_i, o_j, q)), with the
    question's sum made an attention over pair tokens:

        o_i  = [image token i ; (x_i, y_i)]             cells of a ≤ S × S grid (S = relation_side)
        r_ij = g(o_i, o_j),  g's first layer  W_a·o_i + W_b·o_j + b   (= W·[o_i ; o_j] + b)
        text ← text + CrossAttn(LN(text), LN(r))                      f: the block's MLP after

    * Objects are the image tokens, the cells of the encoder's square grid (row-major), each
      with its cell's centre appended, as the RN paper appends coordinates to its CNN cells:
      a pair token can then say "left of" or "near" and not only "red and square".
    * g is an MLP over every ordered pair (self-pairs included, as in the paper). Its first
      layer is a linear map of the concatenation [o_i ; o_j], computed as two maps of the
      objects broadcast to (I, M, M, hidden), so no (M², 2·dim) concatenation is built.
    * The RN feeds q into g and sums g over all pairs. Here g sees the image alone and the
      words weigh the pairs by attention: Σ_ij softmax_ij(q · k(r_ij)) v(r_ij) is the RN's sum
      with q-dependent weights ("the shape of the object closest to red": large weight on
      pairs (red, j) with j near). That keeps the pair tokens per image, not per word, so
      their K/V are computed once per image and cached during generation as an image's are.
    * f is left to the fusion block's MLP (x ← x + MLP(LN(x)) right after this step; after
      an injected block in a pretrained LM, the LM layer's own): it already is a per-word
      MLP on the summed relation, and a second one here would only add depth.
    * Pair count: M objects make M² pairs, and the g MLP, the pairs' K/V and every word's
      attention logits all scale with M². The grid is average-pooled to at most S × S cells
      (S = 6 by default: 36 objects → 1,296 pairs, the order of the RN paper's small CNN
      feature maps); a 14 × 14 ViT grid unpooled would make 38,416 pairs per image per block.
    * The map returned for the visualiser is over the original image tokens (B, heads, T, N):
      each cell gets half its pairs' weight as either member (`marginalise`), spread back
      evenly over the tokens its cell pooled, so each row still sums to 1.

    The image stream is returned unchanged. A clip's frames·h·w tokens are not one square
    grid (refused unless the count happens to be square, which would pair them as one grid),
    nor are interleaved images (`image_mask`) supported.
    """

    def __init__(
        self, dim: int, heads: int, image_dim: int, config: FusionConfig, dropout: float = 0.0
    ):
        super().__init__()
        if config.relation_side < 1:
            raise ValueError(f"fusion.relation_side must be at least 1, got {config.relation_side}")
        self.max_side = config.relation_side
        object_dim = image_dim + 2  # a token and its cell's (x, y)
        self.g_first = Linear(object_dim, dim)  # W_a·o_i + b
        self.g_second = Linear(object_dim, dim, bias=False)  # W_b·o_j
        self.g_rest = nn.Sequential(nn.ReLU(), Linear(dim, dim), nn.ReLU(), Linear(dim, dim))
        self.norm_pairs = nn.LayerNorm(dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(
            dim, heads, context_dim=dim, score=config.score or "dot", dropout=dropout
        )

    def grid(self, count: int) -> tuple[int, int]:
        """N image tokens → (side of their grid, side of the pooled grid ≤ max_side)."""
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(
                f"relation pairs the cells of a square token grid; {count} image tokens are not "
                "one (a clip's frames·h·w tokens, interleaved images)"
            )
        return side, min(side, self.max_side)

    def objects(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """image (I, N, image_dim) → objects (I, M, image_dim + 2), M ≤ max_side²: the tokens,
        average-pooled if the grid is larger, with their cells' (x, y); and the pooling
        matrix (M, N) (None: the tokens are the objects)."""
        side, cells = self.grid(image.shape[1])
        pooling = None
        if cells < side:
            pooling = pooling_matrix(side, cells, image.device, image.dtype)
            image = pooling @ image
        xy = cell_coordinates(cells, image.device, image.dtype)
        return torch.cat([image, xy.expand(image.shape[0], -1, -1)], dim=-1), pooling

    def pair_tokens(self, objects: Tensor) -> Tensor:
        """objects (I, M, d) → pair tokens r (I, M², dim), pair (i, j) at i·M + j."""
        first = self.g_first(objects)[:, :, None] + self.g_second(objects)[:, None]  # (I,M,M,h)
        return self.norm_pairs(self.g_rest(first).flatten(1, 2))

    def fuse(
        self, text: Tensor, image: Tensor, call: FusionCall
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        pairs = pooling = None  # a static cache already holds the pair tokens' K/V
        if call.cache is None or not call.cache.static:
            objects, pooling = self.objects(image)
            pairs = self.pair_tokens(objects)
        elif call.need_weights:
            side, cells = self.grid(image.shape[1])
            if cells < side:
                pooling = pooling_matrix(side, cells, image.device, image.dtype)
        attended, weights = self.attn(
            self.norm(text),
            pairs,
            cache=call.cache,
            need_weights=call.need_weights,
            context_index=call.image_index,
        )
        if weights is not None:
            weights = marginalise(weights, None if pooling is None else pooling.to(weights.dtype))
        return text + attended, image, weights
