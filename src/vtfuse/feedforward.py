"""The position-wise feed-forward network of a Transformer block."""

from __future__ import annotations

from torch import Tensor, nn

from vtfuse.linear import Linear


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(
            Linear(dim, hidden), nn.GELU(), Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
