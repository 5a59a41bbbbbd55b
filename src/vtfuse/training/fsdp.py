"""Fully sharded data parallelism: `vtfuse train --fsdp` under torchrun (FSDP2's
`torch.distributed.fsdp.fully_shard`; gloo on CPU, nccl on CUDA).

Every rank holds a shard of each parameter; a layer's parameters are gathered for its forward
and its backward and freed after, and its gradients reduce-scattered, so each rank keeps 1/N of
the weights, gradients and optimiser state. The units: every member of a `ModuleList` (the text
blocks, the vision layers, a pretrained LM's decoder layers), deepest first, then the rest as
the root. Frozen parameters are sharded too, and no gradient is reduced for them. Scalar
parameters (the gates, the temperatures), which `fully_shard` cannot shard, stay whole on every
rank, their gradients averaged here. The data is split as under DDP (`GlobalBatchSampler`),
so N processes with batch B take the steps of one process with batch N·B.

Checkpoints: every rank takes part in gathering the trainable weights whole (a full state
dict) onto rank 0, which loads them into its unsharded copy of the model to validate it and
write `best`/`last` as usual; the optimiser state is gathered whole too, into the same files
as without FSDP, and cut back into shards on `--resume`, so a run resumes exactly.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from vtfuse.training.distributed import Distributed, TrainingStep

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)
SHARDED = StateDictOptions(full_state_dict=False)

# A fusion block returns the image stream it was given, a view: FSDP2 warns that an in-place
# op on it would skip a hook. vtfuse's layers change no activation in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def shard_units(root: nn.Module, model: nn.Module, keep_whole: set[nn.Parameter]) -> nn.Module:
    """`fully_shard` every member of `model`'s ModuleLists (children before parents), then
    `root`, which owns the rest; the parameters in `keep_whole` are left alone. A member that
    shares parameters with a unit outside its own line (the joint model's decoder blocks share
    all but their self-attention with the encoder's) is no unit of its own: FSDP gives each
    parameter one owner, so the shared ones stay with the root."""
    order = {id(module): i for i, module in enumerate(model.modules())}
    candidates = {
        id(m): m for stack in model.modules() if isinstance(stack, nn.ModuleList) for m in stack
    }
    for unit in sorted(_disjoint(list(candidates.values())), key=lambda m: -order[id(m)]):
        fully_shard(unit, ignored_params=keep_whole)
    fully_shard(root, ignored_params=keep_whole)
    return root


def _disjoint(units: list[nn.Module]) -> list[nn.Module]:
    """The units whose parameters no other unit holds, but one inside them or around them."""
    inside = {id(unit): {id(m) for m in unit.modules()} for unit in units}
    holders: dict[int, set[int]] = defaultdict(set)
    for unit in units:
        for parameter in unit.parameters():
            holders[id(parameter)].add(id(unit))

    def related(a: int, b: int) -> bool:
        return b in inside[a] or a in inside[b]

    return [
        unit
        for unit in units
        if all(related(id(unit), other) for p in unit.parameters() for other in holders[id(p)])
    ]


class FullyShardedParallel:
    """`DataParallel`'s interface over FSDP2 (see the module's docstring)."""

    def __init__(self, model: nn.Module, parallel: Distributed, device: torch.device):
        if not parallel.enabled:
            raise ValueError(
                "--fsdp shards the model over several processes: add --nproc N (or run under "
                "torchrun --nproc-per-node N)"
            )
        self.model, self.parallel = model, parallel
        self.copy = copy.deepcopy(model) if parallel.main else None  # what rank 0 saves
        self.whole = [p for p in model.parameters() if p.dim() == 0]
        self.step = shard_units(TrainingStep(model), model, set(self.whole))

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Around a micro-batch before the last of a step: no reduce-scatter yet."""
        self.step.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.step.set_requires_gradient_sync(True)

    def clip_grad_norm(self, limit: float) -> Tensor:
        """Average the whole (scalar) parameters' gradients over the ranks, then clip every
        gradient as `torch.nn.utils.clip_grad_norm_` does, by the norm over all shards."""
        for parameter in self.whole:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= self.parallel.world
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = _global_norm(grads, next(self.model.parameters()).device)
        scale = min(1.0, limit / (norm.item() + 1e-6))
        if scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
        return norm

    def full_model(self) -> nn.Module | None:
        """Gather the trainable weights whole onto rank 0 (every rank calls this) and load
        them into its copy; → that copy on rank 0, None elsewhere."""
        weights = get_model_state_dict(self.step, options=GATHER)
        if self.copy is None:
            return None
        own = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
        _, unexpected = self.copy.load_state_dict(own, strict=False)
        if unexpected:
            raise RuntimeError(f"gathered weights the model does not have: {unexpected[:5]}")
        return self.copy

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """Gather the optimiser's state whole onto rank 0 (every rank calls this); → it as
        `optimizer.state_dict()` would give it unsharded (parameters by index), None elsewhere."""
        whole = get_optimizer_state_dict(self.step, optimizer, options=WHOLE)
        if not self.parallel.main:
            return None
        index = {name: i for i, name in enumerate(_names(whole))}
        return {
            "state": {index[name]: slots for name, slots in whole["state"].items()},
            "param_groups": [
                {**group, "params": [index[name] for name in group["params"]]}
                for group in whole["param_groups"]
            ],
        }

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Cut a whole state dict (parameters by index, as saved) into this rank's shards;
        every rank calls this, with the same `state`."""
        # The names from this rank's sharded view: a whole view offloaded to the CPU is
        # empty on every rank but 0.
        names = _names(get_optimizer_state_dict(self.step, optimizer, options=SHARDED))
        by_name = {
            "state": {names[int(i)]: slots for i, slots in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[i] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.step, optimizer, by_name, options=options)


def _names(whole: dict) -> list[str]:
    """The parameters' names in the optimiser's order: its groups', one after the other."""
    return [name for group in whole["param_groups"] for name in group["params"]]


def _global_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    """The L2 norm of all gradients together: each rank's squared shards summed over the ranks
    (one all-reduce), the whole ones added once."""
    squares = [g.to_local().float().square().sum() for g in grads if isinstance(g, DTensor)]
    sharded = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    dist.all_reduce(sharded)
    whole = [g.float().square().sum() for g in grads if not isinstance(g, DTensor)]
    return (sharded + (torch.stack(whole).sum() if whole else 0.0)).sqrt()
