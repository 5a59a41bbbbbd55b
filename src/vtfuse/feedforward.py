"""The position-wise feed-forward network of a Transformer block."""

from __future__ import annotations

from torch import Tensor, nn

from vtfuse.linear import Linear


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        layers = [Linear(dim, hidden), nn.GELU(), Linear(hidden, dim)]
        self.net = nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
