"""What a step reads: an epoch's batches (seeded, per process, resumable mid-epoch), grouped
into optimiser steps, each micro-batch told the step's share of the targets."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from vtfuse.config import TrainConfig
from vtfuse.data.bank import ImageTextDataset
from vtfuse.data.items import collate
from vtfuse.data.shards import ShardDataset
from vtfuse.models.base import TaskModel
from vtfuse.training.distributed import Distributed, GlobalBatchSampler, examples_per_rank

SINGLE_PROCESS = Distributed()
Batch = dict[str, torch.Tensor]


def micro_batches_per_epoch(examples: int, config: TrainConfig, parallel: Distributed) -> int:
    """Batches each process reads per epoch (several make one step with `grad_accum`)."""
    mine = examples_per_rank(examples, config.batch_size, parallel.world)
    return math.ceil(mine / config.batch_size)


def steps_of(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of `size` micro-batches, one optimiser step each (the last of an
    epoch may be shorter)."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, size)):
        yield group


def share_the_step(model: TaskModel, micro_batches: list[Batch], parallel: Distributed) -> None:
    """Give every micro-batch of a step `targets_per_batch`: the mean, over the step's
    micro-batches and ranks, of the targets they score (`TaskModel.scored_targets`). The losses
    that average over what a batch happens to hold (caption tokens, answerable questions)
    divide their sum by it, so K micro-batches on N ranks step as one batch of them all."""
    counts = [model.scored_targets(batch) for batch in micro_batches]
    if any(count is None for count in counts):
        return
    total = parallel.sum(torch.stack(counts).sum().float())
    per_batch = total / (len(micro_batches) * parallel.world)
    for batch in micro_batches:
        batch["targets_per_batch"] = per_batch


def epoch_batches(
    train_set: ImageTextDataset | ShardDataset,
    epoch: int,
    skip: int,
    config: TrainConfig,
    parallel: Distributed = SINGLE_PROCESS,
) -> Iterable[dict[str, torch.Tensor]]:
    """This process's batches of one epoch after the first `skip` (resuming mid-epoch). In
    memory: the examples of an image stand together in a seeded shuffled order, or in file
    order without `shuffle`, each process taking its slice of every global batch
    (`GlobalBatchSampler`). Streamed: the shards' order, shuffled the same way."""
    if isinstance(train_set, ShardDataset):
        train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_size=config.batch_size,
            collate_fn=collate,
            num_workers=config.num_workers,
            generator=_loader_generator(config, epoch),
        )
        return itertools.islice(loader, skip, None)
    sampler = GlobalBatchSampler(
        train_set.image_ids,
        config.batch_size,
        parallel,
        config.shuffle,
        config.seed,
        skip,
        per_image=config.examples_per_image,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
        generator=_loader_generator(config, epoch),
    )


def _loader_generator(config: TrainConfig, epoch: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from this generator each time it is iterated,
    from the global one without it: that draw would shift the dropout masks of a run resumed
    mid-epoch (it re-creates the epoch's loader) away from the straight run's."""
    return torch.Generator().manual_seed(config.seed * 100_003 + epoch)
