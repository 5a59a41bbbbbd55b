"""Caption generation: batched greedy decoding, sampling and beam search over the K/V caches.

The image is encoded once, its cross-attention keys and values are computed at the first step
and reused at every later step; self-attention keys and values grow by one token a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class DecodingCache(Protocol):
    def reorder(self, index: Tensor) -> None: ...  # beam i continues old row index[i]
    def expand(self, index: Tensor) -> None: ...  # row i starts from row index[i], image too


class IncrementalDecoder(Protocol):
    """What decoding needs of a captioner (vtfuse's own, or a pretrained LM with eyes)."""

    def start(self, images: Tensor) -> tuple[Tensor, DecodingCache]: ...

    def step(
        self, tokens: Tensor, image: Tensor, caches: Any, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]: ...


@dataclass
class Generated:
    tokens: list[list[int]]  # per image, the generated ids up to and including <eos>
    # per image, if asked: cross-attention (steps, layers, heads, N) at the step that produced
    # each token
    attention: list[Tensor] | None = None


Pick = Callable[[Tensor], Tensor]  # next-token logits (B, V) → chosen ids (B, 1)


def most_likely(logits: Tensor) -> Tensor:
    return logits.argmax(-1, keepdim=True)


def nucleus(temperature: float = 1.0, top_p: float = 1.0, generator=None) -> Pick:
    """Sample from softmax(logits / temperature), restricted to the smallest set of tokens whose
    probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020)."""
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")

    def pick(logits: Tensor) -> Tensor:
        probs = (logits.float() / temperature).softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top one stays
        chosen = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, chosen)

    return pick


@torch.inference_mode()
def greedy(
    model: IncrementalDecoder,
    images: Tensor,
    max_length: int = 48,
    bos_id: int = 1,
    eos_id: int = 2,
    need_weights: bool = False,
    prompt: Tensor | None = None,
    pick: Pick = most_likely,
) -> Generated:
    """Pick the most likely token (or, with `pick=nucleus(...)`, a sampled one) at each step
    until every caption has <eos> or `max_length`. The first step reads `prompt` (B, P) —
    e.g. in-context examples — instead of <bos>."""
    image, caches = model.start(images)
    batch = images.shape[0]
    current = torch.full((batch, 1), bos_id, dtype=torch.long, device=images.device)
    if prompt is not None:
        current = prompt.to(images.device)
    done = torch.zeros(batch, dtype=torch.bool, device=images.device)
    steps, maps = [], []
    for _ in range(max_length):
        logits, weights = model.step(current, image, caches, need_weights=need_weights)
        current = pick(logits)  # (B, 1)
        current = current.masked_fill(done[:, None], eos_id)  # finished: <eos> again
        steps.append(current)
        if need_weights:
            maps.append(torch.stack([w[:, :, -1] for w in weights], dim=1))  # (B, layers, H, N)
        done |= current[:, 0] == eos_id
        if done.all():
            break
    sequences = torch.cat(steps, dim=1).tolist()
    tokens = [_until_eos(seq, eos_id) for seq in sequences]
    attention = None
    if need_weights:
        stacked = torch.stack(maps, dim=1).cpu()  # (B, steps, layers, H, N)
        attention = [stacked[b, : len(tokens[b])] for b in range(batch)]
    return Generated(tokens, attention)


def _until_eos(sequence: list[int], eos_id: int) -> list[int]:
    return sequence[: sequence.index(eos_id) + 1] if eos_id in sequence else sequence


@torch.inference_mode()
def beam_search(
    model: IncrementalDecoder,
    images: Tensor,
    beam_size: int = 4,
    max_length: int = 48,
    length_penalty: float = 1.0,
    bos_id: int = 1,
    eos_id: int = 2,
) -> Generated:
    """Keep the `beam_size` best partial captions per image; rank the finished ones by
    log-probability / length^length_penalty (as transformers' `generate` does)."""
    device = images.device
    batch, k = images.shape[0], beam_size
    image, caches = model.start(images)
    logits, _ = model.step(torch.full((batch, 1), bos_id, device=device), image, caches)
    # Expand to B·K rows only after the first step: the image K/V were computed once per image.
    expand = torch.arange(batch, device=device).repeat_interleave(k)
    caches.expand(expand)
    image = image.index_select(0, expand)

    log_probs = logits.log_softmax(-1)  # (B, V)
    vocab = log_probs.shape[-1]
    scores, first = log_probs.topk(k, dim=-1)  # (B, K)
    sequences = first.reshape(batch * k, 1)
    scores = scores.reshape(batch * k)
    done = sequences[:, 0] == eos_id
    lengths = torch.ones(batch * k, device=device)
    offsets = (torch.arange(batch, device=device) * k).repeat_interleave(k)

    for _ in range(max_length - 1):
        if done.all():
            break
        logits, _ = model.step(sequences[:, -1:], image, caches)
        log_probs = logits.log_softmax(-1)  # (B·K, V)
        # A finished beam may only "extend" with <eos> at no cost, so its score is frozen.
        frozen = torch.full_like(log_probs, float("-inf"))
        frozen[:, eos_id] = 0.0
        log_probs = torch.where(done[:, None], frozen, log_probs)
        candidates = (scores[:, None] + log_probs).view(batch, k * vocab)
        scores, flat = candidates.topk(k, dim=-1)  # (B, K)
        parent = (flat // vocab).view(-1) + offsets  # row in the B·K batch each beam extends
        token = (flat % vocab).view(-1, 1)
        caches.reorder(parent)
        sequences = torch.cat([sequences.index_select(0, parent), token], dim=1)
        was_done = done.index_select(0, parent)
        lengths = lengths.index_select(0, parent) + (~was_done).float()
        done = was_done | (token[:, 0] == eos_id)
        scores = scores.view(-1)

    normalised = (scores / lengths.pow(length_penalty)).view(batch, k)
    best = normalised.argmax(-1) + torch.arange(batch, device=device) * k
    return Generated([_until_eos(sequences[i].tolist(), eos_id) for i in best.tolist()])
