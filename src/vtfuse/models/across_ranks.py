"""Losses over the global batch while training data-parallel (torch.distributed, DDP or FSDP).

DDP and FSDP average the ranks' gradients (and the trainer the accumulated micro-batches'), so
N processes × batch B step as one process × batch N·B only if each rank's loss is its share of
the global batch's loss. A mean over examples of equal count per rank is; a mean over the tokens
(or the answerable questions) each rank happens to hold is not — `cross_entropy` divides by
the step's mean count instead — nor is a loss whose examples meet each other (the contrastive
loss, which gathers the embeddings with `gather_rows`). Outside training and in one process
everything here is the plain, local computation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORED = -100  # a target F.cross_entropy leaves out (its default ignore_index)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORED,
    label_smoothing: float = 0.0,
    per_batch: Tensor | None = None,
) -> Tensor:
    """`F.cross_entropy`'s mean over the scored targets (those not `ignore_index`); with
    `per_batch` (the trainer's `targets_per_batch`: the step's mean count per micro-batch and
    rank), the sum divided by it instead, so that the mean the trainer and DDP/FSDP take over
    micro-batches and ranks is the mean over every target of the step."""
    loss = F.cross_entropy(
        logits,
        targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="mean" if per_batch is None else "sum",
    )
    return loss if per_batch is None else loss / per_batch


def scored(targets: Tensor, ignore_index: int = IGNORED) -> Tensor:
    """How many of `targets` `cross_entropy` scores (those not `ignore_index`)."""
    return (targets != ignore_index).sum()


def gather_rows(*tensors: Tensor) -> tuple[list[Tensor], int]:
    """Every rank's rows of each of `tensors` (which share their number of rows n_r; n_r may
    differ between ranks) concatenated in rank order, and where this rank's rows start.
    Differentiable: a gathered row's gradient is summed over the ranks and returned to the rank
    it came from."""
    sizes = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(size) for size in all_sizes]
    return [_gather(rows, counts) for rows in tensors], sum(counts[: dist.get_rank()])


def _gather(rows: Tensor, counts: list[int]) -> Tensor:
    padded = F.pad(rows, (0,) * 2 * (rows.dim() - 1) + (0, max(counts) - rows.shape[0]))
    if rows.is_floating_point():
        parts = _AllGather.apply(padded)
    else:  # indices: nothing to differentiate
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


class _AllGather(torch.autograd.Function):
    """all_gather forward; backward, every rank's gradient for all parts summed (all_reduce,
    which gloo has, unlike reduce_scatter) and this rank's part kept."""

    @staticmethod
    def forward(ctx, rows: Tensor) -> tuple[Tensor, ...]:
        parts = [torch.empty_like(rows) for _ in range(world())]
        dist.all_gather(parts, rows.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        summed = torch.stack(grads).contiguous()
        dist.all_reduce(summed)
        return summed[dist.get_rank()]


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
