"""Measure a layer and its replacement in isolation on ONNX Runtime, for passes that choose a
rewrite by measured latency rather than by the cost model (the field notes show MACs mislead:
bandwidth-bound FC layers, thin-conv chains ORT does not merge, batch-size dependent wins).

Works from edit-vocabulary `Layer` specs, so passes stay free of backend imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphslim.edits import Layer
from graphslim.frontends.onnx_edits import layer_nodes
from graphslim.frontends.onnx_quant import Namer
from graphslim.ir import OpKind
from graphslim.runtime import Latency, compare, make_session, measure, session_runner

_OPSET = 17


class _Namer:
    """The little of OnnxGraph that layer_nodes needs: fresh names and the opset."""

    opset = _OPSET

    def __init__(self):
        self.fresh = Namer(gs.Graph())


def _in_context(layers: Sequence[Layer], in_shape: tuple) -> list[Layer]:
    """The chain between two identity depthwise 1x1 convs: ORT keeps those in its blocked
    (NCHWc) layout, so a replacement that leaves the layout pays the reorders around it, as it
    would between the model's other convs (alone, a conv pays them itself and looks slower)."""
    def identity(channels: int) -> Layer:
        return Layer(OpKind.CONV, np.ones((channels, 1, 1, 1), np.float32), None, channels)

    out_channels = layers[-1].weight.shape[0]
    return [identity(in_shape[1]), *layers, identity(out_channels)]


def _graph(layers: Sequence[Layer], in_shape: tuple, tag: str, context: bool = False) -> bytes:
    """The chain as the ONNX frontend would emit it (same node builder)."""
    if context and len(in_shape) == 4:
        layers = _in_context(layers, in_shape)
    m = _Namer()
    src = x = gs.Variable(m.fresh("x"), dtype=np.float32, shape=list(in_shape))
    op = "Gemm" if len(in_shape) == 2 else "MatMul"  # what exporters emit for a linear layer
    nodes = []
    for i, layer in enumerate(layers):
        out = gs.Variable(m.fresh(f"{tag}_y{i}"), dtype=np.float32)
        nodes += layer_nodes(m, op, m.fresh(f"{tag}_l{i}"), layer, src, out, np.float32)
        src = out
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[src], opset=_OPSET)
    return gs.export_onnx(graph).SerializeToString()


def measure_chain(original: Sequence[Layer], replacement: Sequence[Layer], in_shape: tuple,
                  threads: int = 1, repeats: int = 15, context: bool = False
                  ) -> tuple[Latency, Latency]:
    """Interleaved ORT CPU latency (opt level ALL) of `original` vs `replacement` on a random
    input of `in_shape`, at least `repeats` calls each (more for small sites); with `context`,
    each between identity convs (see _in_context)."""
    x = {"x": np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)}
    a = make_session(_graph(original, in_shape, "a", context), threads=threads)
    b = make_session(_graph(replacement, in_shape, "b", context), threads=threads)
    run_a, run_b = session_runner(a, x), session_runner(b, x)
    # small sites (tens of microseconds) need many calls for a stable median: aim for ~0.1 s
    # of timing per side, at least `repeats` and at most 1000 calls
    probe = measure(run_a, warmup=2, repeats=3).median
    repeats = int(min(1000, max(repeats, 0.1 / max(probe, 1e-6))))
    return compare(run_a, run_b, warmup=3, repeats=repeats)


__all__ = ["measure_chain"]
