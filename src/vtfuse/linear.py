"""The affine layer of every attention and MLP: y = x·W + b, with W stored input-major.

`torch.nn.Linear` keeps W as (out, in) and computes x·Wᵀ. Decoding one token at a time makes
each projection a matrix-vector product, bound by how fast the weights stream from memory, and
on CPU (MKL) that product reads the (in, out) layout about twice as fast: measured on the
2-core benchmark machine, a 256 → 768 projection of one row takes 9 µs against 18 µs, and at
32 rows 122 µs against 145 µs; large batches (training, image encoders) are equal. GPT-2's
`Conv1D` stores its weights the same way. The layout is part of the checkpoint format
(`FORMAT_VERSION` 3); older checkpoints are transposed on load (`vtfuse.models.base`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight).view(
            *x.shape[:-1], self.out_features
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
