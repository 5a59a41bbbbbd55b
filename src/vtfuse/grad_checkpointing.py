"""Activation ("gradient") checkpointing: a layer keeps only its input in the forward pass and
recomputes its activations in the backward pass, trading about one more forward for the memory
of every layer's activations (Chen et al. 2016). `torch.utils.checkpoint` without re-entry.

It acts only while training with gradients: `eval()`, `torch.no_grad()` and generation with
caches run every layer as it is. vtfuse's own stacks (the text blocks, the vision Transformer
layers) run each layer through `run_layer`; a Hugging Face model (a pretrained LM, a vision
tower) uses its own checkpointing, if it supports it.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointable:
    """A stack whose layers `run_layer` checkpoints once `grad_checkpointing` is set."""

    grad_checkpointing: bool = False

    def checkpoints(self) -> bool:
        """Checkpoint now: switched on, training, and gradients being recorded."""
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def run_layer(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """`layer(*args, **kwargs)`, its activations recomputed in the backward pass when
        `checkpoints()`; a layer given a `cache` runs as it is (recomputed, it would write
        the cache twice)."""
        if self.checkpoints() and kwargs.get("cache") is None:
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)


def _is_hf_model(module: nn.Module) -> bool:
    return hasattr(module, "supports_gradient_checkpointing") and hasattr(module, "config")


def _set_hf(model: nn.Module, enabled: bool) -> bool:
    """A Hugging Face model's own checkpointing (non-re-entrant); False if it has none."""
    if not model.supports_gradient_checkpointing:
        if enabled:
            warnings.warn(
                f"{type(model).__name__} does not support gradient checkpointing: it keeps "
                "its activations",
                stacklevel=3,
            )
        return False
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_disable()
    # re-entrant checkpointing needs inputs that require grad, so transformers makes the input
    # embeddings' output require it; without re-entry that only backpropagates through a frozen
    # LM's layers below the first fusion block, for nothing
    with contextlib.suppress(AttributeError):  # no such hook was registered
        model.disable_input_require_grads()
    return True


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> list[str]:
    """Switch checkpointing on (or off) in every part of `model` that offers it; returns the
    names of the parts switched (a Hugging Face model counts once, whatever it holds)."""
    switched: list[str] = []
    handled: list[str] = []  # Hugging Face models already switched, whole
    for name, module in model.named_modules():
        if any(name.startswith(f"{prefix}.") for prefix in handled):
            continue
        if isinstance(module, Checkpointable):
            module.grad_checkpointing = enabled
            switched.append(name)
        elif _is_hf_model(module):
            handled.append(name)
            if _set_hf(module, enabled):
                switched.append(name)
    return switched


def train_checkpointing_layers(model: nn.Module, mode: bool) -> None:
    """A frozen pretrained model runs in eval mode (no dropout), yet activations flow through
    it to what trains, and Hugging Face checkpoints a layer only in training mode: set the
    `training` flag of its checkpointing layers alone (their submodules, dropout included,
    stay in eval mode). A no-op when checkpointing is off."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = mode
