"""Lift an ONNX graph into a trainable torch module, and lower the trained module back to ONNX.

The lift is onnx2torch's (a maintained converter of ~150 ONNX ops into torch.fx GraphModules
whose initializers become parameters); writing our own on the two frontends was weighed and not
done: graphslim's frontends view and edit graphs, they do not translate between them, and a
second ONNX-op-to-torch table would duplicate onnx2torch's. Measured on the real files the tests
install (after prune-channels): the page-orientation classifier, the PP-OCR angle classifier
and YOLOv8n lift in 0.1-0.2 s and match ONNX Runtime to 3e-8, 2e-7 and 1.2e-4 (YOLO's box
coordinates are in pixels) on random inputs, at batch 1 and 4. Both directions are checked
here rather than trusted: the lifted module against ONNX Runtime on the original file, the
lowered file against the module it came from, on seeded inputs; a mismatch is an error that
names the file's op where the converter has none.

onnx2torch keeps a file's other initializers as buffers, so a MatMul's constant weight and the
bias Add after it would not train (a transformer's every linear layer, exported from torch, is
such a pair): the lift makes those two kinds of constant parameters, where one node alone reads
them. Its registry lacks the opset-16 versions of GreaterOrEqual / LessOrEqual (the same ops
with bfloat16 added; all-MiniLM-L6-v2's export has one): they are registered here with its
own comparison module. Its Flatten with an axis past 1 flattens a 2-D input to 1-D and fails
(MiniLM's mask path flattens [batch, tokens] at axis 2): those modules are replaced by one
that follows the ONNX definition. It reads an empty trailing input name (an omitted optional
input, as torch writes Clip's missing max) as a tensor and fails; those names are dropped from
the copy it converts, which ONNX defines as the same node.

Lowering writes the trained weights back into the lifted file's own nodes (SetParam per Conv,
Gemm, BatchNormalization, LayerNormalization: onnx2torch names each module after its node; per
node input for the constants made parameters), so
the result is the same graph with new weights: names, opset, shapes and any quantization
nodes unchanged. Re-exporting with torch.onnx.export was tried first and dropped: onnx2torch's
export hooks break on this torch depending on what was imported before (its Shape module asks
symbolic_helper for an attribute the compatibility module lacks), and the export renames
every node.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from graphslim.errors import InputError, StructureError
from graphslim.verify import Tolerance, compare, make_inputs

#: lifted vs ONNX Runtime: the converter reorders float sums (YOLOv8n: 1.2e-4 on pixel-sized
#: outputs), so relative L2 rather than elementwise closeness
_LIFT_REL_L2 = 1e-4


def lift(model) -> nn.Module:
    """A graphslim ONNX model as a torch module (eval mode), checked against ONNX Runtime."""
    try:
        from onnx2torch import convert
        from onnx2torch.node_converters.flatten import OnnxFlatten
    except ImportError as exc:
        raise InputError("lifting an ONNX model to torch needs onnx2torch: pip install "
                         "'graphslim-engine[onnx-distill]'") from exc
    _register_converters()
    try:
        module = convert(_without_empty_trailing_inputs(model.to_proto())).eval()
    except NotImplementedError as exc:  # onnx2torch names the op and its version
        raise StructureError(f"cannot lift the ONNX graph to torch: {exc}") from None
    for name, sub in list(module.named_children()):
        if isinstance(sub, OnnxFlatten):
            setattr(module, name, _Flatten(sub.axis))
    for path, _ in _constant_slots(model, module).values():  # trainable, not buffers
        owner, attr = path.rsplit(".", 1)
        holder, tensor = module.get_submodule(owner), _attr(module, path)
        delattr(holder, attr)
        holder.register_parameter(attr, nn.Parameter(tensor.clone()))
    feeds = make_inputs(model.input_specs())
    ref = model.run(feeds)
    got = _forward(module, feeds)
    err = compare(ref, dict(zip(ref, got)), Tolerance())
    if not err.rel_l2 <= _LIFT_REL_L2:
        raise StructureError(f"the lifted torch module disagrees with ONNX Runtime on the "
                             f"original (rel L2 {err.rel_l2:.3g}): an op onnx2torch converts "
                             "differently")
    return module


def lower(module: nn.Module, like):
    """`like` (the ONNX model that was lifted) with the trained module's weights: the same
    graph, names, opset and shapes, its nodes' parameters set (trained_params)."""
    from graphslim.edits import SetParam

    out = like.copy()
    out.apply([SetParam(n, r, v) for (n, r), v in trained_params(like, module).items()])
    return out


def trained_params(model, module: nn.Module) -> dict:
    """(node, role) -> trained weight, for every parameter of `model` its lifted `module`
    changed: onnx2torch names each module after the node it converts, so a Conv, Gemm,
    BatchNormalization or LayerNormalization node's weights are its module's; a MatMul's
    constant weight and its bias Add's constant are the parameters lift made of them
    (_constant_slots). The model with them set is checked against the module on seeded
    inputs."""
    from graphslim.edits import SetParam
    from graphslim.frontends.fx_ops import ROLE_ATTRS
    from graphslim.ir import OpKind

    modules = dict(module.named_modules())
    view = model.view()
    names = _module_names(model)
    out = {}
    for node in view.nodes():
        sub = modules.get(names.get(node.name, node.name))
        if sub is None or node.kind not in (OpKind.CONV, OpKind.LINEAR, OpKind.BATCHNORM,
                                            OpKind.LAYERNORM):
            continue
        attrs = ROLE_ATTRS.get(node.kind, {"weight": "weight", "bias": "bias"})
        for role in node.params:
            tensor = getattr(sub, attrs.get(role, ""), None)
            if not isinstance(tensor, torch.Tensor):
                continue
            _changed(out, view, node, role, tensor.detach().cpu().numpy())
    for (node_name, role), (path, transposed) in _constant_slots(model, module).items():
        new = _attr(module, path).detach().cpu().numpy()
        _changed(out, view, view.node(node_name), role, new.T if transposed else new)
    check = model.copy()
    check.apply([SetParam(n, r, v) for (n, r), v in out.items()])
    feeds = make_inputs(model.input_specs())
    got = check.run(feeds)
    err = compare(dict(zip(got, _forward(module.eval(), feeds))), got, Tolerance())
    if err.max_excess > 0 or err.nonfinite:
        raise StructureError(f"the trained weights, written back into the ONNX graph, do not "
                             f"reproduce the trained module (rel L2 {err.rel_l2:.3g}): a layer "
                             "onnx2torch converted with other weights")
    return out


def _changed(out: dict, view, node, role: str, new: np.ndarray) -> None:
    old = view.param(node.name, role)
    if new.shape == old.shape and not np.array_equal(new, old):
        out[(node.name, role)] = new.astype(old.dtype)


def _constant_slots(model, module: nn.Module) -> dict[tuple[str, str], tuple[str, bool]]:
    """(node, role) -> (the lifted module's attribute holding that constant, whether it is the
    transpose of the IR's canonical layout), for each LINEAR node's constant weight that
    onnx2torch keeps outside a weight attribute (MatMul) and each constant of an ADD reading a
    LINEAR's output (its bias), where no other node reads the same tensor (a shared one would
    train into two different values). The call's argument k is the node's input k."""
    from collections import Counter

    from graphslim.frontends.onnx_ops import slot
    from graphslim.ir import OpKind

    view = model.view()
    graph = model.to_proto().graph
    protos = {n.name: n for n in graph.node}
    reads = Counter(v for n in graph.node for v in n.input)
    names = _module_names(model)
    calls = {n.target: n for n in module.graph.nodes if n.op == "call_module"}
    linear_out = {v for n in view.nodes() if n.kind is OpKind.LINEAR for v in n.outputs}
    out = {}
    for node in view.nodes():
        proto, call = protos.get(node.name), calls.get(names.get(node.name, ""))
        bias = node.kind is OpKind.ADD and any(v in linear_out for v in node.inputs)
        if proto is None or call is None or not (node.kind is OpKind.LINEAR or bias):
            continue
        if proto.op_type not in ("MatMul", "Add"):  # Gemm: an nn.Linear, trained as such
            continue
        for role in node.params:
            k = slot(proto.op_type, role)
            arg = call.args[k] if k < len(call.args) else None
            if (getattr(arg, "op", None) == "get_attr" and reads[proto.input[k]] == 1
                    and torch.is_floating_point(_attr(module, arg.target))):
                out[(node.name, role)] = (arg.target, node.kind is OpKind.LINEAR and role ==
                                          "weight" and node.attrs.get("layout") == "in_out")
    return out


class _Flatten(nn.Module):
    """ONNX Flatten: [prod(shape[:axis]), prod(shape[axis:])], an empty product being 1."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.ndim if self.axis < 0 else self.axis
        return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _without_empty_trailing_inputs(proto):
    for node in proto.graph.node:
        while node.input and not node.input[-1]:
            node.input.pop()
    return proto


def _attr(module: nn.Module, path: str) -> torch.Tensor:
    owner, attr = path.rsplit(".", 1)
    return getattr(module.get_submodule(owner), attr)


def _register_converters() -> None:
    """GreaterOrEqual-16 / LessOrEqual-16 into onnx2torch's registry (see the module doc)."""
    from onnx2torch.node_converters.comparisons import OnnxCompare
    from onnx2torch.node_converters.registry import (
        _CONVERTER_REGISTRY,
        OperationDescription,
        add_converter,
    )
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def compare(node, _graph):
        return OperationConverterResult(torch_module=OnnxCompare(node.operation_type),
                                        onnx_mapping=onnx_mapping_from_node(node=node))

    for op in ("GreaterOrEqual", "LessOrEqual"):
        if OperationDescription("", op, 16) not in _CONVERTER_REGISTRY:
            add_converter(operation_type=op, version=16)(compare)


def _module_names(model) -> dict[str, str]:
    """ONNX node name -> the name onnx2torch gave its module (domain prefix, '.' as '/', the
    leading '/' stripped, a counter for repeats), from onnx2torch's own graph wrapper."""
    from onnx2torch.onnx_graph import OnnxGraph as ConvertedGraph

    graph = model.to_proto().graph
    return {node.name: name for node, name in zip(graph.node, ConvertedGraph(graph).nodes)}


def _forward(module: nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(v) for v in feeds.values()])
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [o.numpy() for o in outs]
