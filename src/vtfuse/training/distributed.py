"""Data-parallel training on PyTorch's own engine: `torchrun --nproc-per-node N -m vtfuse train`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `Distributed.from_environment` joins the
process group (gloo on CPU, nccl on CUDA). Every rank computes the same shuffled order of
examples, reseeded per epoch; each global batch of `world × batch_size` is cut into one slice
per rank (`GlobalBatchSampler`), so N processes with batch B take exactly the steps one process
with batch N·B would (DDP averages the gradients). Decisions that end a loop (time limit, a
signal) are agreed by all ranks.

Exactly, for every loss but one: those that average over what a batch happens to hold (caption
tokens, answerable questions) divide by the step's mean count over ranks and micro-batches
(`trainer.share_the_step`), and the contrastive loss contrasts every rank's texts with every
rank's images (`vtfuse.models.across_ranks`). The exception: the matching loss draws its hard
negatives from the rank's own batch. (With `--grad-accum`, the contrastive and matching losses
see one micro-batch at a time.)

How a step runs over the processes is a `DataParallel` here (one process, or DDP: every rank
holds the whole model) or a `FullyShardedParallel` (training/fsdp.py: each rank a shard of it);
the training loop sees only their common interface.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

from vtfuse.data.items import grouped_order


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0 logs, validates and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)  # this rank's GPU, for nccl's collectives too
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, local_rank)

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process on CUDA; the CPU is shared."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def wrap(self, module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
        """DDP around `module`; `find_unused`: some parameters may get no gradient."""
        if not self.enabled:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            module, device_ids=ids, find_unused_parameters=find_unused
        )

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: a stop must be taken together."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, value: Tensor) -> Tensor:
        """`value` summed over the ranks (itself in one process)."""
        if not self.enabled:
            return value
        value = value.to(_collective_device())
        dist.all_reduce(value)
        return value

    def close(self) -> None:
        """Leave the process group together, once gloo has let go of every tensor.

        A gloo worker thread releases a collective's tensors only after telling the caller it
        finished. If Python has dropped the tensor by then, that release frees its Python object
        and takes the GIL; should the interpreter be finalizing, the thread is killed inside a
        C++ destructor and the process aborts ("terminate called without an active exception",
        seen on rank 1, which reaches exit first; pytorch/pytorch#179291). So the last
        collective runs on a tensor held here, and we wait, sleeping without the GIL, until the
        worker has released it; any worker still releasing an earlier collective takes the GIL
        meanwhile. (A barrier is worse: its work holds the collectives before it, and is
        itself released late.)"""
        if not (self.enabled and dist.is_initialized()):
            return
        last = torch.zeros(1, device=_collective_device())
        dist.all_reduce(last)
        if dist.get_backend() == "gloo":  # nccl's destroy_process_group joins its own threads
            deadline = time.monotonic() + 10
            while last._use_count() > 1 and time.monotonic() < deadline:
                time.sleep(0.001)
        dist.destroy_process_group()


class GlobalBatchSampler(DistributedSampler):
    """torch's DistributedSampler (`set_epoch` reseeds the shuffle every epoch) in the order
    vtfuse trains on: an image's examples stand together, at most `per_image` a group
    (`grouped_order`: a batch encodes each image once), and each rank takes its contiguous
    slice of every global batch of `world × batch_size` — not every N-th example — so N ranks
    with batch B read exactly the batches one process with batch N·B would. A last global
    batch too small to give every rank a full share is dropped (all ranks step together); one
    process keeps everything. The first `skip` batches of the epoch are left out (resuming
    mid-epoch)."""

    def __init__(
        self,
        image_ids: list[int],
        batch_size: int,
        parallel: Distributed,
        shuffle: bool = True,
        seed: int = 0,
        skip: int = 0,
        per_image: int = 0,
    ):
        super().__init__(
            image_ids, num_replicas=parallel.world, rank=parallel.rank, shuffle=shuffle, seed=seed
        )
        self.image_ids, self.batch_size, self.skip = image_ids, batch_size, skip
        self.per_image = per_image

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine()[self.skip * self.batch_size :])

    def __len__(self) -> int:
        mine = examples_per_rank(len(self.image_ids), self.batch_size, self.num_replicas)
        return max(0, mine - self.skip * self.batch_size)

    def _mine(self) -> list[int]:
        order = list(range(len(self.image_ids)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = grouped_order(self.image_ids, generator, self.per_image)
        if self.num_replicas == 1:
            return order
        step = self.batch_size * self.num_replicas
        first = self.rank * self.batch_size
        return [
            order[start + offset]
            for start in range(0, len(order) // step * step, step)
            for offset in range(first, first + self.batch_size)
        ]


class TrainingStep(nn.Module):
    """The loss as a module's forward, so DistributedDataParallel sees (and synchronises) it:
    `loss` and the terms it is made of (`TaskModel.training_losses`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> dict[str, Tensor]:
        return self.model.training_losses(batch, label_smoothing)


class DataParallel:
    """One process, or DDP: every rank holds the whole model and the gradients are averaged
    in the backward pass."""

    def __init__(self, model: nn.Module, parallel: Distributed, device: torch.device):
        self.model, self.parallel = model, parallel
        unused = getattr(model, "leaves_parameters_unused", False)
        self.step = parallel.wrap(TrainingStep(model), device, find_unused=unused)

    def accumulating(self) -> AbstractContextManager:
        """Around a micro-batch before the last of a step: its gradients stay local."""
        return self.step.no_sync() if self.parallel.enabled else nullcontext()

    def clip_grad_norm(self, limit: float) -> Tensor:
        """The step's gradients, complete on every rank, clipped to `limit`: → their norm."""
        return nn.utils.clip_grad_norm_(self.model.parameters(), limit)

    def full_model(self) -> nn.Module | None:
        """The whole model, with the current weights, on the main rank (None elsewhere), to
        validate and save; every rank calls this at the same point."""
        return self.model if self.parallel.main else None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimiser's whole state dict on the main rank (None elsewhere); every rank
        calls this at the same point."""
        return optimizer.state_dict() if self.parallel.main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore a whole state dict (as `optimizer_state` gave); every rank calls this."""
        optimizer.load_state_dict(state)


def examples_per_rank(examples: int, batch_size: int, world: int) -> int:
    """How many of an epoch's examples each rank reads: all of them in one process; under
    several, its share of the whole global batches only (every rank steps together)."""
    if world == 1:
        return examples
    return examples // (batch_size * world) * batch_size


def _collective_device() -> torch.device:
    """Where a tensor for a collective must be: nccl's on this rank's GPU, gloo's anywhere."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
