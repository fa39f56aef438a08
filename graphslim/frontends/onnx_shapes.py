"""Shapes of an ONNX graph's values for its concrete input shapes (the ONNX frontend's
infer_shapes): ONNX shape inference on a light copy of the model, then ORT for the rest."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


def infer_shapes(m) -> dict[str, tuple]:
    """Value name -> shape for the concrete input shapes: ONNX shape inference (with data
    propagation), then one ORT run for what it could not derive."""
    model = _light_proto(m)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in tt.shape.dim)
    for t in m.graph.tensors().values():
        if isinstance(t, gs.Constant):
            shapes[t.name] = tuple(t.shape)
    unknown = [v for n in m.graph.nodes for v in (o.name for o in n.outputs)
               if v and not _concrete(shapes.get(v))]
    if unknown:
        shapes.update(_measure_shapes(m, unknown))
    return shapes


def _light_proto(m) -> onnx.ModelProto:
    """The model with concrete input shapes and its big float weights turned into typed graph
    inputs: shape inference needs their shapes, not their bytes (serializing the weights
    dominated its cost). Small and integer constants stay: data propagation reads them."""
    full = m.to_proto()
    model = onnx.ModelProto()
    if full.graph.ByteSize() < (1 << 20):
        model.CopyFrom(full)
    else:
        _copy_without_graph(full, model)
    for inp, spec in zip(model.graph.input, m.input_specs()):
        del inp.type.tensor_type.shape.dim[:]
        for d in spec.shape:
            inp.type.tensor_type.shape.dim.add().dim_value = d
    return model


def _measure_shapes(m, names: list[str]) -> dict[str, tuple]:
    """Shapes ONNX shape inference could not derive (data-dependent reshapes, custom ops),
    read off one ORT run on the seeded inputs with those values exposed as outputs."""
    from graphslim.verify import make_inputs

    try:
        got = m.capture(make_inputs(m.input_specs()), names)
    except Exception as exc:  # shapes stay unknown; cost counts those nodes as 0
        log.warning("could not measure %d unknown shapes with ORT: %s", len(names), exc)
        return {}
    log.info("%d shapes measured with ORT where shape inference had none", len(names))
    return {v: tuple(int(d) for d in np.shape(a)) for v, a in got.items()}


def _copy_without_graph(full: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Copy `full` into `model`, big float initializers becoming graph inputs of the same type."""
    graph = onnx.GraphProto()
    graph.node.extend(full.graph.node)
    graph.input.extend(full.graph.input)
    graph.output.extend(full.graph.output)
    for init in full.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16) and size > 64:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                                  list(init.dims)))
        else:
            graph.initializer.append(init)
    for fld in ("ir_version", "producer_name", "domain", "model_version"):
        setattr(model, fld, getattr(full, fld))
    model.opset_import.extend(full.opset_import)
    model.functions.extend(full.functions)
    model.graph.CopyFrom(graph)
    model.ir_version = max(model.ir_version, 4)


def _concrete(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def dequantized_layer_macs(graph: gs.Graph, shapes: dict[str, tuple]) -> dict[str, int]:
    """node name -> MACs of each Conv / ConvTranspose / Gemm / MatMul whose weight input is a
    DequantizeLinear of a constant (the QDQ form ORT fuses into integer kernels)."""
    macs = {}
    for n in graph.nodes:
        if n.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(n.inputs) < 2:
            continue
        w = n.inputs[1]
        dq = w.inputs[0] if isinstance(w, gs.Variable) and w.inputs else None
        if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
            continue
        wshape = tuple(dq.inputs[0].shape)
        x, out = shapes.get(n.inputs[0].name), shapes.get(n.outputs[0].name)
        if n.op == "ConvTranspose":
            ref, inner = x, int(np.prod(wshape[1:]))
        elif n.op == "Conv":
            ref, inner = out, int(np.prod(wshape[1:]))
        else:  # MatMul x @ W (K, N); Gemm with transB: W (N, K)
            ref, inner = out, wshape[1] if n.op == "Gemm" and n.attrs.get("transB", 0) \
                else wshape[0]
        if _concrete(ref):
            macs[n.name] = int(np.prod(ref)) * int(inner)
    return macs


def probe_for(proto: onnx.ModelProto, values: list[str], any_batch: bool = False,
              given: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of the model whose outputs are `values`, without the nodes none of them needs
    (ONNX Runtime runs every node of a graph, fetched or not). Graphs with control flow keep
    every node: a subgraph may read any outer value. `any_batch`: the inputs' first dimension
    is left free and the recorded intermediate shapes dropped, so a file exported with a
    batch of 1 runs a batch of many where its ops allow (a Reshape to a fixed batch does not:
    ORT then fails on the first run and the caller falls back to the file's batch).
    `given`: intermediate values the caller already has (name -> an example array): the graph
    is cut there, they become its inputs and the nodes before them are not run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    g = probe.graph
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=v) for v in values)
    if any_batch:
        del g.value_info[:]
        for i in g.input:
            dims = i.type.tensor_type.shape.dim
            if len(dims) > 0:
                dims[0].Clear()
                dims[0].dim_param = "batch"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in g.node for a in n.attribute):
        if given:
            raise ValueError("cannot cut a graph with control flow")
        return probe
    given = given or {}
    needed, keep = set(values), []
    for n in reversed(g.node):
        if any(o in needed and o not in given for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    if given:
        inputs = [i for i in g.input if i.name in needed and i.name not in given]
        del g.input[:]
        g.input.extend(inputs)
        for name, arr in given.items():
            if name in needed:
                g.input.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(arr).dtype),
                    ["batch", *(None,) * (np.ndim(arr) - 1)]))
    used = needed | {o for n in keep for o in n.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return probe
