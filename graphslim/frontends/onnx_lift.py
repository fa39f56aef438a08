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

Lowering writes the trained weights back into the lifted file's own nodes (SetParam per Conv,
Gemm, BatchNormalization, LayerNormalization: onnx2torch names each module after its node), so
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
    except ImportError as exc:
        raise InputError("lifting an ONNX model to torch needs onnx2torch: pip install "
                         "'graphslim-engine[onnx-distill]'") from exc
    try:
        module = convert(model.to_proto()).eval()
    except NotImplementedError as exc:  # onnx2torch names the op and its version
        raise StructureError(f"cannot lift the ONNX graph to torch: {exc}") from None
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
    BatchNormalization or LayerNormalization node's weights are its module's (weights it kept
    as buffers, such as a MatMul's constant, do not train). The model with them set is checked
    against the module on seeded inputs."""
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
            new = tensor.detach().cpu().numpy()
            old = view.param(node.name, role)
            if new.shape == old.shape and not np.array_equal(new, old):
                out[(node.name, role)] = new.astype(old.dtype)
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
