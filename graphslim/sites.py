"""Measure a layer and its replacement in isolation on ONNX Runtime, for passes that choose a
rewrite by measured latency rather than by the cost model (the field notes show MACs mislead:
bandwidth-bound FC layers, thin-conv chains ORT does not merge, batch-size dependent wins).

Works from edit-vocabulary `Layer` specs, so passes stay free of backend imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphslim.edits import Layer
from graphslim.ir import OpKind
from graphslim.runtime import Latency, compare, make_session, session_runner


def _graph(layers: Sequence[Layer], in_shape: tuple, tag: str) -> bytes:
    nodes, inits, src = [], [], "x"
    for i, layer in enumerate(layers):
        w, out = f"{tag}_w{i}", f"{tag}_y{i}"
        inputs = [src, w]
        if layer.kind is OpKind.CONV:
            nd = layer.weight.ndim - 2
            inits.append(numpy_helper.from_array(layer.weight.astype(np.float32), w))
            if layer.bias is not None:
                inits.append(numpy_helper.from_array(layer.bias.astype(np.float32), f"{w}_b"))
                inputs.append(f"{w}_b")
            nodes.append(helper.make_node(
                "Conv", inputs, [out], group=layer.groups,
                strides=list(layer.strides or [1] * nd), pads=list(layer.pads or [0] * 2 * nd),
                dilations=list(layer.dilations or [1] * nd)))
        else:
            inits.append(numpy_helper.from_array(layer.weight.T.astype(np.float32), w))
            nodes.append(helper.make_node("MatMul", inputs, [out if layer.bias is None
                                                             else f"{out}_mm"]))
            if layer.bias is not None:
                inits.append(numpy_helper.from_array(layer.bias.astype(np.float32), f"{w}_b"))
                nodes.append(helper.make_node("Add", [f"{out}_mm", f"{w}_b"], [out]))
        src = out
    graph = helper.make_graph(
        nodes, tag, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(src, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def measure_chain(original: Sequence[Layer], replacement: Sequence[Layer], in_shape: tuple,
                  threads: int = 1, repeats: int = 15) -> tuple[Latency, Latency]:
    """Interleaved ORT CPU latency (opt level ALL) of `original` vs `replacement` on a random
    input of `in_shape`."""
    x = {"x": np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)}
    a = make_session(_graph(original, in_shape, "a"), threads=threads)
    b = make_session(_graph(replacement, in_shape, "b"), threads=threads)
    return compare(session_runner(a, x), session_runner(b, x), warmup=3, repeats=repeats)


__all__ = ["measure_chain"]
