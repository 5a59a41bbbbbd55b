"""Training: the loop (`train`), its schedule and optimiser, and atomic checkpoints."""

from vtfuse.training.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
