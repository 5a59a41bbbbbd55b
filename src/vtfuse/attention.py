"""The attention core: one multi-head attention module for self- and cross-attention.

Every other part of vtfuse (encoders, fusion strategies, decoders) attends through
`MultiHeadAttention`. Two paths compute the same thing:

* the fast path, `torch.nn.functional.scaled_dot_product_attention` (SDPA), used whenever the
  caller does not ask for the attention weights;
* the reference path, written out as the formulas below, used per call when the caller asks
  for the weights (to visualise or score where the model looks).

Three score functions, each a registered module (Vaswani et al. 2017; Graves et al. 2014 for
cosine/content addressing; the distance kernel as in "Attention as a kernel", Tsai et al. 2019):

* ``dot``:          w = softmax(q·k / √d)
* ``cosine``:       w = softmax(τ · cos(q, k)), τ a learned temperature
* ``neg_distance``: w(i, j) = exp(−‖q_i − k_j‖²) / Σ_k exp(−‖q_i − k_k‖²)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtfuse.linear import Linear
from vtfuse.registry import Registry

SCORES: Registry[nn.Module] = Registry("attention score")


class Score(nn.Module):
    """A score function, expressed two ways.

    `fast(q, k)` rewrites it as `scale · q'·k'ᵀ + key_bias` so SDPA can compute it;
    `logits(q, k)` is the plain formula, the reference the fast form is tested against.
    """

    def fast(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, float, Tensor | None]:
        raise NotImplementedError

    def logits(self, q: Tensor, k: Tensor) -> Tensor:
        raise NotImplementedError


@SCORES.register("dot")
class DotProductScore(Score):
    def fast(self, q, k):
        return q, k, 1.0 / math.sqrt(q.shape[-1]), None

    def logits(self, q, k):
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)


@SCORES.register("cosine")
class CosineScore(Score):
    """Cosine similarity times a learned temperature τ = exp(t), capped at 100 as CLIP does."""

    def __init__(self, initial_temperature: float = 10.0):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(initial_temperature)))

    def temperature(self) -> Tensor:
        return self.log_temperature.clamp(max=math.log(100.0)).exp()

    def fast(self, q, k):
        q = F.normalize(q, dim=-1) * self.temperature().to(q.dtype)
        return q, F.normalize(k, dim=-1), 1.0, None

    def logits(self, q, k):
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return self.temperature() * cos


@SCORES.register("neg_distance")
class NegativeDistanceScore(Score):
    """−‖q − k‖² = 2 q·k − ‖k‖² − ‖q‖²; the ‖q‖² term is the same for every key of a query and
    cancels in the softmax, so the fast path is SDPA on (2q, k) plus a per-key bias −‖k‖²."""

    def fast(self, q, k):
        key_bias = -(k * k).sum(-1)[:, :, None, :]  # (B, H, 1, S)
        return 2 * q, k, 1.0, key_bias

    def logits(self, q, k):
        diff = q[:, :, :, None, :] - k[:, :, None, :, :]  # (B, H, T, S, head_dim)
        return -(diff * diff).sum(-1)


@dataclass
class KVCache:
    """Keys and values kept between generation steps, shape (B, heads, S, head_dim).

    Self-attention appends each step's keys in place into storage that grows by doubling (no
    re-copy of the whole cache every step, as `torch.cat` would do); cross-attention fills it
    once from the image and reuses it at every step (`static`).
    """

    key: Tensor | None = None  # storage: (B, heads, capacity, head_dim); the first `length` used
    value: Tensor | None = None
    static: bool = False
    length: int = 0

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, heads, t, head_dim) after the cached positions → all keys and values so far."""
        end = self.length + key.shape[2]
        if self.key is None or end > self.key.shape[2]:
            self._grow(key, max(2 * end, 16))
        self.key[:, :, self.length : end] = key
        self.value[:, :, self.length : end] = value
        self.length = end
        return self.current()

    def current(self) -> tuple[Tensor, Tensor]:
        """The cached keys and values, (B, heads, length, head_dim) each."""
        return self.key[:, :, : self.length], self.value[:, :, : self.length]

    def fill(self, key: Tensor, value: Tensor) -> None:
        """Keep K/V computed once (an image's) for every later step."""
        self.key, self.value, self.static, self.length = key, value, True, key.shape[2]

    def _grow(self, like: Tensor, capacity: int) -> None:
        batch, heads, _, head_dim = like.shape
        key = like.new_empty(batch, heads, capacity, head_dim)
        value = like.new_empty(batch, heads, capacity, head_dim)
        if self.key is not None:
            key[:, :, : self.length] = self.key[:, :, : self.length]
            value[:, :, : self.length] = self.value[:, :, : self.length]
        self.key, self.value = key, value

    def select_rows(self, index: Tensor) -> None:
        """Row i becomes old row index[i] (the per-image K/V too)."""
        if self.key is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)

    def reorder(self, index: Tensor) -> None:
        """Follow beam search: row i of the batch becomes old row index[i]; a static cache
        holds each image's K/V, which beams of one image share, and stays."""
        if not self.static:
            self.select_rows(index)


def attention_mask(
    key_mask: Tensor | None, causal: bool, num_queries: int, num_keys: int, device: torch.device
) -> Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True where query i may attend to key j.

    `key_mask` (B, S) is True for real keys and False for padding. With `causal`, the T queries
    are the *last* T of the S positions (as during cached decoding), so query i sees keys
    j ≤ i + S − T.
    """
    mask = None
    if causal and num_queries > 1:  # one query is the last position: it sees every key
        offset = num_keys - num_queries
        rows = torch.arange(num_queries, device=device)[:, None] + offset
        mask = (torch.arange(num_keys, device=device)[None, :] <= rows)[None, None]  # (1,1,T,S)
    if key_mask is not None:
        padding = key_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        mask = padding if mask is None else mask & padding
    return mask


class MultiHeadAttention(nn.Module):
    """Multi-head attention; `context=None` is self-attention, a `context` is cross-attention."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None = None,
        score: str = "dot",
        dropout: float = 0.0,
        project_query: bool = True,
        project_output: bool = True,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.to_q = Linear(dim, dim) if project_query else nn.Identity()
        self.to_kv = Linear(context_dim or dim, 2 * dim)
        self.to_out = Linear(dim, dim) if project_output else nn.Identity()
        self.score = SCORES.get(score)()

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        key, value = self.to_kv(source).chunk(2, dim=-1)
        return self.split_heads(key), self.split_heads(value)  # (B, H, S, hd) each

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        need_weights: bool = False,
        context_index: Tensor | None = None,
        mask: Tensor | None = None,
        context_grows: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, dim) attends to itself or to `context` (B, S, context_dim).

        A static `cache` (cross-attention K/V filled on an earlier step) is used as it is, and
        `context` may then be None. With `context_grows` the context continues the cached one
        (co-attention's image reading the text during decoding): its K/V are appended, as
        self-attention's are.

        `key_mask` (B, S) marks real keys (for self-attention with a cache: all S keys so far).
        `context_index` (B,) lets several rows share a context row: the context (I, S, ·) holds
        each distinct image once, its keys and values are projected once and then gathered.
        `mask` (B or 1, 1, T, S), True where attention is allowed, adds to the other masks.
        Returns the output (B, T, dim) and, only if `need_weights`, the weights (B, H, T, S).
        """
        q = self.split_heads(self.to_q(x))
        if cache is not None and cache.static:
            k, v = cache.key, cache.value  # image K/V computed once, reused at every step
        elif context is None or context_grows:
            k, v = self.project_kv(x if context is None else context)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            k, v = self.project_kv(context)
            if context_index is not None:
                k, v = k.index_select(0, context_index), v.index_select(0, context_index)
            if cache is not None:
                cache.fill(k, v)

        causal_only = causal and key_mask is None and mask is None
        allowed = attention_mask(key_mask, causal, q.shape[2], k.shape[2], q.device)
        if mask is not None:
            allowed = mask if allowed is None else allowed & mask
        if need_weights:
            out, weights = self.reference(q, k, v, allowed)
        else:
            out, weights = self.fast(q, k, v, allowed, causal_only), None
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, T, dim)
        return self.to_out(out), weights

    def fast(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal_only: bool):
        q, k, scale, key_bias = self.score.fast(q, k)
        dropout = self.dropout if self.training else 0.0
        if key_bias is None and causal_only and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=scale
            )
        if dropout == 0.0 and _plain_is_faster(q, k):
            return self.plain(q, k, v, scale, key_bias, mask)
        if key_bias is not None:
            # SDPA takes one additive mask: the per-key bias plus −inf where attention is barred.
            blocked = torch.zeros((), dtype=q.dtype, device=q.device)
            if mask is not None:
                blocked = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                blocked = blocked.masked_fill(~mask, float("-inf"))
            mask = key_bias.to(q.dtype) + blocked
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale
        )

    @staticmethod
    def plain(
        q: Tensor, k: Tensor, v: Tensor, scale: float, key_bias: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        """softmax(scale · q·kᵀ + key_bias, masked) · v in plain ops (see `_plain_is_faster`)."""
        logits = (q @ k.transpose(-2, -1)) * scale
        if key_bias is not None:
            logits = logits + key_bias
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1) @ v

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None):
        logits = self.score.logits(q, k)  # (B, H, T, S)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        dropped = F.dropout(weights, self.dropout) if self.training else weights
        return dropped @ v, weights


def _plain_is_faster(q: Tensor, k: Tensor) -> bool:
    """Whether matmul → softmax → matmul beats SDPA for this shape. Measured on a 2-core CPU
    (benchmarks/): for one query per row (a decoding step) over ≤ 32 keys with ≥ 32 batch × head
    rows, the plain ops take 0.7–0.8× SDPA's time; with fewer rows, or more keys, SDPA is as fast
    or faster (its fixed cost shows at batch 1). On CUDA, SDPA's fused kernels always win."""
    batch, heads, queries, _ = q.shape
    return q.device.type == "cpu" and queries == 1 and k.shape[2] <= 32 and batch * heads >= 32
