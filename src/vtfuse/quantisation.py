"""Weight precision for inference (`--weights fp32|bf16|int8`): fewer bytes a weight, faster
decoding.

Decoding one token at a time is a chain of matrix-vector products, each bound by how fast its
weights stream from memory (README: Performance). `int8` turns every linear layer — the
attention and MLP projections (vtfuse's input-major `Linear`) and `nn.Linear` layers such as
the output layer — into a dynamically quantised one: weights stored as int8 with one scale per
output channel (symmetric, `per_channel_dynamic_qconfig`), each call's activations quantised to
uint8 with their own range, an int8 GEMM with int32 accumulation (fbgemm / x86, what
`torch.ao.quantization.quantize_dynamic` uses). Embeddings, norms, convolutions and attention
scores stay fp32. `bf16` stores every linear layer's weights and bias in bfloat16 (half of
fp32's bytes, the same exponent range) and computes each product in bf16 with fp32
accumulation (oneDNN on a CPU with AVX-512 BF16 or AMX, tensor cores on CUDA); its input is cast
to bf16 and its output back, so norms, softmax and the residual stream stay fp32. Both are
inference conversions: the converted model is not trained further and is never saved.

Why dynamic and not weight-only int8: in a one-off check on this project's 2-core CPU (one
thread, a 512 → 2048 projection, the other core busy), torch's weight-only kernel
(`torch._weight_int8pack_mm`, int8 weights times fp32 activations) took 4.7× *longer* than the
fp32 product for one row and 40× longer for 32, the dynamic layer 5.2× and 4.8× *less*. Whole
models: `benchmarks/run.py` (speed against transformers) and `benchmarks/weights.py` (quality
and speed of trained models).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from vtfuse.linear import Linear
from vtfuse.runtime import bf16_is_fast

WEIGHTS = ("fp32", "bf16", "int8")


def convert_weights(model: nn.Module, weights: str) -> nn.Module:
    """`model` (in eval mode) with its linear layers at `weights` precision, converted in place;
    "fp32" leaves it as it is."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weight precision {weights!r}; choose one of: {WEIGHTS}")
    if weights == "fp32":
        return model
    if model.training:
        raise ValueError(f"{weights} weights are for inference: put the model in eval mode first")
    devices = {p.device.type for p in model.parameters()}
    if weights == "bf16":
        slow = [kind for kind in sorted(devices) if not bf16_is_fast(torch.device(kind))]
        if slow:
            raise ValueError(
                f"bf16 weights need bf16 matrix units (a CPU with AVX-512 BF16 or AMX, a CUDA "
                f"GPU with bf16); this {slow[0]} has none, where bf16 runs slower than fp32"
            )
        _to_bf16_linears(model)
        return model
    if devices != {"cpu"}:
        raise ValueError(
            f"int8 weights run on the CPU (fbgemm kernels); this model is on {sorted(devices)}"
        )
    _as_torch_linears(model)
    return quantise_torch_linears(model)


def quantise_torch_linears(model: nn.Module) -> nn.Module:
    """Every `nn.Linear` of `model` dynamically quantised to int8 in place, per-channel weight
    scales (any model: the benchmark quantises transformers' the same way)."""
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch's notice that quantized tensors move to torchao
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel)")
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True
        )
    return model


class Bf16Linear(nn.Module):
    """y = x·W + b with W (input-major, as `vtfuse.linear.Linear`) and b in bf16: the product
    in bf16, its input cast to bf16 and its output back to the input's dtype."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape
        self.weight = nn.Parameter(weight.to(torch.bfloat16).contiguous(), requires_grad=False)
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        y = x.to(torch.bfloat16) @ self.weight
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


def _to_bf16_linears(module: nn.Module) -> None:
    """Replace every linear layer below `module` (vtfuse's input-major `Linear`, `nn.Linear`)
    by its `Bf16Linear`."""
    for name, child in module.named_children():
        if isinstance(child, Linear):
            setattr(module, name, Bf16Linear(child.weight.detach(), child.bias))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Bf16Linear(child.weight.detach().t(), child.bias))
        else:
            _to_bf16_linears(child)


def _as_torch_linears(module: nn.Module) -> None:
    """Replace every input-major `Linear` below `module` by the `nn.Linear` it equals (its
    weight transposed), which the quantiser knows."""
    for name, child in module.named_children():
        if isinstance(child, Linear):
            setattr(module, name, _torch_linear(child))
        else:
            _as_torch_linears(child)


def _torch_linear(layer: Linear) -> nn.Linear:
    torch_layer = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        device=layer.weight.device,
    )
    with torch.no_grad():
        torch_layer.weight.copy_(layer.weight.t())
        if layer.bias is not None:
            torch_layer.bias.copy_(layer.bias)
    return torch_layer
