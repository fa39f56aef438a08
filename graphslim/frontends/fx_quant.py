"""QuantizeValue / QuantizeParam / ScaleValue on the fx frontend: fake quantization that trains
and exports, and the per-channel scales smooth-quant moves in front of it.

Activations: a `FakeQuantize` module is called on the value (torch.fake_quantize_per_tensor_
affine: straight-through gradient inside the grid, zero outside), so the model becomes the traced
GraphModule (a node is added to the graph; logged). Weights: a `FakeQuantizeWeight`
parametrization of the module's own tensor (per channel), so the float weight keeps training and
the forward sees its quantized value. `torch.onnx.export(..., dynamo=False, opset >= 13)` writes
both as QuantizeLinear / DequantizeLinear (FIELD-NOTES), the graph the ONNX `qdq` pass emits.
Biases stay float on fx: int32 at s_x * s_w is below float32 resolution for any real bias.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from graphslim.frontends import fx_ops as ops

_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


class FakeQuantize(nn.Module):
    """Per-tensor affine fake quantization with a fixed, calibrated grid."""

    def __init__(self, scale: float, zero_point: int, dtype: str = "uint8"):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int32))
        self.quant_min, self.quant_max = _RANGES[dtype]

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point,
                                                     self.quant_min, self.quant_max)


class FakeQuantizeWeight(nn.Module):
    """Parametrization: the weight as its per-channel int8 grid sees it (symmetric)."""

    def __init__(self, scale: np.ndarray, axis: int, qmax: int):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float32)))
        self.register_buffer("zero_point", torch.zeros(len(self.scale), dtype=torch.int32))
        self.axis, self.qmax = axis, qmax

    def forward(self, w):
        return torch.fake_quantize_per_channel_affine(w, self.scale.to(w.dtype), self.zero_point,
                                                      self.axis, -self.qmax - 1, self.qmax)


def quantize_value(m, value: str, scale: float, zero_point: int, dtype: str,
                   users: tuple[str, ...]) -> None:
    graph = m.gm.graph
    src = next((n for n in graph.nodes if n.name == value), None)
    if src is None:
        raise ValueError(f"QuantizeValue: no fx node produces '{value}'")
    readers = [u for u in list(src.users) if not users or u.name in users]
    if not readers:
        return
    name = m.fresh(f"fq_{value}")
    m.gm.add_submodule(name, FakeQuantize(scale, zero_point, dtype))
    with graph.inserting_after(src):
        fq = graph.call_module(name, (src,))
    for u in readers:
        u.replace_input_with(src, fq)


def scale_value(m, value: str, scale: np.ndarray, users: tuple[str, ...]) -> None:
    """ScaleValue: the readers read value * scale (a buffer of the traced module, so it moves
    with .to() and is saved with the state dict; exported as a Mul by a constant)."""
    graph = m.gm.graph
    src = next((n for n in graph.nodes if n.name == value), None)
    if src is None:
        raise ValueError(f"ScaleValue: no fx node produces '{value}'")
    readers = [u for u in list(src.users) if not users or u.name in users]
    if not readers:
        return
    name = m.fresh(f"smooth_{value}")
    m.gm.register_buffer(name, torch.as_tensor(np.asarray(scale, np.float32).reshape(-1)))
    with graph.inserting_after(src):
        factor = graph.get_attr(name)
    with graph.inserting_after(factor):
        scaled = graph.call_function(operator.mul, (src, factor))
    for u in readers:
        u.replace_input_with(src, scaled)


def quantize_param(m, n: fx.Node, node, role: str, scale: np.ndarray, axis: int | None,
                   values: np.ndarray) -> None:
    if role == "bias":
        return
    if n.op != "call_module":
        raise ValueError(f"node '{n.name}': the fx frontend quantizes module weights only")
    attr = ops.ROLE_ATTRS.get(node.kind, {}).get(role, role)
    mod = m.gm.get_submodule(n.target)
    if parametrize.is_parametrized(mod, attr):
        raise ValueError(f"node '{n.name}': '{role}' is already quantized")
    qmax = max(int(np.abs(np.asarray(values)).max()), 1)  # symmetric grids: a channel's max
    scale = np.asarray(scale, np.float32).reshape(-1)
    if scale.size == 1:
        scale = np.repeat(scale, getattr(mod, attr).shape[0])
    parametrize.register_parametrization(mod, attr, FakeQuantizeWeight(scale, axis or 0, qmax))


def parametrized_tensors(mod: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(attr, effective tensor) of a module's parametrized attributes (fake-quantized weights:
    what the forward uses), so views read the weights the model computes with."""
    if not parametrize.is_parametrized(mod):
        return []
    return [(attr, getattr(mod, attr)) for attr in mod.parametrizations]
