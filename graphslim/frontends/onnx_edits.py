"""The edit vocabulary applied to an onnx-graphsurgeon graph (the ONNX frontend's half of
graphslim/edits.py). Each function takes the OnnxGraph being edited as `m`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphslim.edits import Layer, SetAttr
from graphslim.frontends import onnx_ops as ops
from graphslim.ir import Node, OpKind


def set_param(m, g: gs.Node, node: Node, role: str, value: np.ndarray) -> None:
    if g.op == "MatMul" and role == "bias":  # MatMul has no bias input: add one after it
        w = g.inputs[1]
        _add_bias_after(m, g, np.asarray(value).astype(np.asarray(w.values).dtype))
        return
    slot = ops.slot(g.op, role)
    old = g.inputs[slot] if slot < len(g.inputs) else None
    ref = old if isinstance(old, gs.Constant) else g.inputs[1] if len(g.inputs) > 1 else None
    dtype = np.asarray(ref.values).dtype if isinstance(ref, gs.Constant) else np.float32
    arr = np.asarray(value)
    if node.kind is OpKind.LINEAR and role == "weight" and node.attrs.get("layout") == "in_out":
        arr = arr.T
    if node.kind is OpKind.LINEAR and role == "bias" and isinstance(old, gs.Constant):
        arr = arr.reshape(old.shape)
    arr = np.ascontiguousarray(arr.astype(dtype, copy=False))
    if isinstance(old, gs.Constant):
        shared = len(old.outputs) > 1
        g.inputs[slot] = gs.Constant(m.fresh(old.name) if shared else old.name, arr)
        return
    if old is not None and old.name:
        raise ValueError(f"node '{g.name}': parameter '{role}' is a computed tensor, not a "
                         "constant; it cannot be replaced")
    while len(g.inputs) < slot:
        g.inputs.append(gs.Variable.empty())
    const = gs.Constant(m.fresh(f"{g.name}.{role}"), arr)
    if slot < len(g.inputs):
        g.inputs[slot] = const
    else:
        g.inputs.append(const)


def replace_with_chain(m, g: gs.Node, node: Node, layers: Sequence[Layer]) -> None:
    if node.kind not in (OpKind.CONV, OpKind.LINEAR) or not layers:
        raise ValueError(f"node '{g.name}' ({g.op}) cannot be replaced by a layer chain")
    dtype = np.asarray(g.inputs[1].values).dtype
    src, dst = g.inputs[0], g.outputs[0]
    new_nodes = []
    for i, layer in enumerate(layers):
        out = dst if i == len(layers) - 1 else gs.Variable(
            m.fresh(f"{dst.name}_lr{i}"), dtype=dst.dtype)
        name = m.fresh(f"{g.name}_lr{i}")
        new_nodes.extend(layer_nodes(m, g.op, name, layer, src, out, dtype))
        src = out
    g.inputs.clear()
    g.outputs.clear()
    m.graph.nodes.extend(new_nodes)


def layer_nodes(m, op: str, name: str, layer: Layer, src, out, dtype) -> list[gs.Node]:
    def const(role, arr):
        return gs.Constant(m.fresh(f"{name}.{role}"), np.ascontiguousarray(
            np.asarray(arr).astype(dtype)))

    if layer.form:
        return form_nodes(m, name, layer, src, out, const)
    if layer.kind is OpKind.CONV:
        nd = layer.weight.ndim - 2
        attrs = {"group": layer.groups, "kernel_shape": list(layer.weight.shape[2:]),
                 "strides": list(layer.strides or [1] * nd),
                 "pads": list(layer.pads or [0] * 2 * nd),
                 "dilations": list(layer.dilations or [1] * nd)}
        inputs = [src, const("weight", layer.weight)]
        if layer.bias is not None:
            inputs.append(const("bias", layer.bias))
        return [gs.Node("Conv", name, attrs, inputs, [out])]
    if op == "Gemm":
        inputs = [src, const("weight", layer.weight)]
        if layer.bias is not None:
            inputs.append(const("bias", layer.bias))
        return [gs.Node("Gemm", name, {"transB": 1}, inputs, [out])]
    if layer.bias is None:  # MatMul: x @ W with W stored (in, out)
        return [gs.Node("MatMul", name, {}, [src, const("weight", layer.weight.T)], [out])]
    mid = gs.Variable(m.fresh(f"{out.name}_nobias"), dtype=out.dtype)
    return [gs.Node("MatMul", name, {}, [src, const("weight", layer.weight.T)], [mid]),
            gs.Node("Add", m.fresh(f"{name}_bias"), {}, [mid, const("bias", layer.bias)],
                    [out])]


def replace_subgraph(m, nodes: Sequence[gs.Node], source: str, layers: Sequence[Layer]) -> None:
    src = next((t for g in nodes for t in g.inputs if t.name == source), None)
    if src is None:
        raise ValueError(f"node '{nodes[0].name}': value '{source}' is not an input of the "
                         "nodes to replace")
    dst = nodes[-1].outputs[0]
    dtype = ops.np_dtype(dst) if dst.dtype is not None else np.dtype(np.float32)
    new_nodes = []
    for i, layer in enumerate(layers):
        out = dst if i == len(layers) - 1 else gs.Variable(
            m.fresh(f"{dst.name}_sub{i}"), dtype=dst.dtype)
        new_nodes.extend(layer_nodes(m, "Gemm", m.fresh(f"{nodes[0].name}_sub{i}"), layer, src,
                                     out, dtype))
        src = out
    for g in nodes:
        g.inputs.clear()
        g.outputs.clear()
    m.graph.nodes.extend(new_nodes)


def form_nodes(m, name: str, layer: Layer, src, out, const) -> list[gs.Node]:
    """A pointwise layer in another op form (graphslim.edits.Layer.form); reshapes keep the
    batch dynamic (0 = copy) and the pixels run-time (read with Shape)."""
    o, c = layer.weight.shape[:2]
    w2 = layer.weight.reshape(o, c)

    def var(tag):
        return gs.Variable(m.fresh(f"{out.name}_{tag}"), dtype=out.dtype)

    def ints(tag, values):
        return gs.Constant(m.fresh(f"{name}.{tag}"), np.asarray(values, dtype=np.int64))

    if layer.form == "conv":  # (N, C) -> (N, C, 1, 1) -> Conv 1x1 -> (N, O)
        x4, y4 = var("nchw"), var("conv")
        inputs = [x4, const("weight", w2.reshape(o, c, 1, 1))]
        if layer.bias is not None:
            inputs.append(const("bias", layer.bias))
        return [gs.Node("Reshape", m.fresh(f"{name}_to4d"), {}, [src, ints("shape4", [0, c, 1, 1])],
                        [x4]),
                gs.Node("Conv", name, {"kernel_shape": [1, 1]}, inputs, [y4]),
                gs.Node("Flatten", m.fresh(f"{name}_to2d"), {"axis": 1}, [y4], [out])]
    if layer.form == "gemm":  # (N, C, 1, 1) -> (N, C) -> Gemm -> (N, O, 1, 1)
        x2, y2 = var("nc"), var("gemm")
        inputs = [x2, const("weight", w2)]
        if layer.bias is not None:
            inputs.append(const("bias", layer.bias))
        return [gs.Node("Flatten", m.fresh(f"{name}_to2d"), {"axis": 1}, [src], [x2]),
                gs.Node("Gemm", name, {"transB": 1}, inputs, [y2]),
                gs.Node("Reshape", m.fresh(f"{name}_to4d"), {}, [y2, ints("shape4", [0, o, 1, 1])],
                        [out])]
    # "matmul": (N, C, H, W) -> (N, C, HW); W (O, C) @ it -> (N, O, HW) -> (N, O, H, W)
    if m.opset < 10:
        raise ValueError(f"'{name}': the MatMul form needs opset >= 10 (Slice on a shape)")
    x3, y3, shape, pixels, target = (var(t) for t in ("ncl", "mm", "shape", "pixels", "target"))
    shape.dtype = pixels.dtype = target.dtype = np.int64
    nodes = [gs.Node("Reshape", m.fresh(f"{name}_to3d"), {}, [src, ints("shape3", [0, c, -1])],
                     [x3]),
             gs.Node("MatMul", name, {}, [const("weight", w2), x3], [y3])]
    if layer.bias is not None:
        y3b = var("mm_bias")
        nodes.append(gs.Node("Add", m.fresh(f"{name}_bias"), {},
                             [y3, const("bias", layer.bias.reshape(o, 1))], [y3b]))
        y3 = y3b
    nodes += [gs.Node("Shape", m.fresh(f"{name}_shape"), {}, [src], [shape]),
              gs.Node("Slice", m.fresh(f"{name}_pixels"), {},
                      [shape, ints("start", [2]), ints("end", [np.iinfo(np.int64).max])],
                      [pixels]),
              gs.Node("Concat", m.fresh(f"{name}_target"), {"axis": 0},
                      [ints("head", [0, o]), pixels], [target]),
              gs.Node("Reshape", m.fresh(f"{name}_to4d"), {}, [y3, target], [out])]
    return nodes


def _add_bias_after(m, g: gs.Node, bias: np.ndarray) -> None:
    out = g.outputs[0]
    mid = gs.Variable(m.fresh(f"{out.name}_nobias"), dtype=out.dtype)
    g.outputs[0] = mid
    const = gs.Constant(m.fresh(f"{g.name}.bias"), bias)
    m.graph.nodes.append(gs.Node("Add", m.fresh(f"{g.name}_bias"), inputs=[mid, const],
                                    outputs=[out]))


def bypass(m, g: gs.Node, keep: str | None = None) -> None:
    data = [t for t in g.inputs if isinstance(t, gs.Variable) and t.name]
    if keep is not None:  # the nodes only this one fed go with the cleanup after the edits
        data = [t for t in data if t.name == keep]
        if not data:
            raise ValueError(f"node '{g.name}' does not read '{keep}'")
    if len(data) != 1 or not g.outputs:
        raise ValueError(f"node '{g.name}' ({g.op}) does not have exactly one data input")
    src, out = data[0], g.outputs[0]
    for extra in g.outputs[1:]:
        if extra.outputs or extra in m.graph.outputs:
            raise ValueError(f"node '{g.name}': output '{extra.name}' is used; cannot bypass")
    if out not in m.graph.outputs:
        replace_uses(out, src)
    elif src in m.graph.inputs or src in m.graph.outputs or not src.inputs:
        g.op, g.attrs = "Identity", {}
        g.inputs.clear()
        g.inputs.append(src)
        del g.outputs[1:]
        return
    else:
        replace_uses(src, out, skip=g)
        producer = src.inputs[0]
        producer.outputs[producer.outputs.index(src)] = out
    g.inputs.clear()
    g.outputs.clear()


def replace_uses(old: gs.Variable, new: gs.Tensor, skip: gs.Node | None = None) -> None:
    for user in list(old.outputs):
        if user is skip:
            continue
        for j, t in enumerate(user.inputs):
            if t is old:
                user.inputs[j] = new


def slice_param(m, g: gs.Node, node: Node, role: str, axis: int, keep: np.ndarray) -> None:
    """Slice a constant; one shared with other nodes is copied first (ChannelDeps knows:
    OnnxView.private_param_copies)."""
    slot = ops.slot(g.op, role)
    const = g.inputs[slot]
    if not isinstance(const, gs.Constant):
        raise ValueError(f"node '{g.name}': parameter '{role}' is not a constant")
    if len(const.outputs) > 1:  # exporters share identical constants: slice a private copy
        const = gs.Constant(m.fresh(const.name), np.asarray(const.values))
        g.inputs[slot] = const
    arr = np.asarray(const.values)
    if node.kind is OpKind.LINEAR and role == "weight" and node.attrs.get("layout") == "in_out":
        axis = 1 - axis
    if node.kind is OpKind.LINEAR and role == "bias":
        axis = int(np.argmax(arr.shape)) if arr.ndim else 0
    const.values = np.ascontiguousarray(np.take(arr, np.asarray(keep, dtype=np.int64), axis=axis))


def set_attr(m, g: gs.Node, name: str, value, computed: np.ndarray | None = None) -> None:
    if name == "groups" and g.op in ("Conv", "ConvTranspose"):
        g.attrs["group"] = int(value)
    elif name == "num_groups" and g.op == "GroupNormalization":
        g.attrs["num_groups"] = int(value)
    elif name == "slice" and g.op == "Slice":
        _, start, stop = value
        for slot, v in ((1, start), (2, stop)):
            g.inputs[slot] = gs.Constant(m.fresh(f"{g.name}.{'starts' if slot == 1 else 'ends'}"),
                                         np.asarray([v], dtype=np.int64))
    elif name == "shape" and g.op == "Reshape":
        _set_reshape_sizes(m, g, value, computed)
    elif name == "split" and g.op == "Split":
        sizes = np.asarray(value, dtype=np.int64)
        g.attrs.pop("num_outputs", None)
        if m.opset >= 13:
            g.attrs.pop("split", None)
            const = gs.Constant(m.fresh(f"{g.name}.split"), sizes)
            if len(g.inputs) > 1:
                g.inputs[1] = const
            else:
                g.inputs.append(const)
        else:
            g.attrs["split"] = [int(s) for s in sizes]
    else:
        raise ValueError(f"node '{g.name}' ({g.op}) has no settable attribute '{name}'")


def _set_reshape_sizes(m, g: gs.Node, sizes: dict, computed: tuple | None) -> None:
    """Rewrite a Reshape's target sizes on pruned axes; -1 and 0 entries adapt by themselves.
    A computed target (see computed_reshape_targets) has its static parts rewritten,
    and a one-element run-time part giving a channel axis pinned to its new size: it may be
    computed from another tensor's Shape (swin's C // heads from the unpruned input; swin v2's
    C from a pruned one). Channel axes are never the batch, so batch sizes stay dynamic."""
    shape = g.inputs[1]
    if isinstance(shape, gs.Constant):
        target = np.asarray(shape.values).copy()
    elif computed is not None and computed[0] == "static":
        target = np.asarray(computed[1]).copy()
    elif computed is not None:
        _set_concat_sizes(m, shape.inputs[0], computed[1], sizes)
        return
    else:
        return
    old = target.copy()
    for axis, size in sizes.items():
        if target[axis] not in (-1, 0):
            target[axis] = size
    if isinstance(shape, gs.Constant) and np.array_equal(old, target):
        return
    g.inputs[1] = gs.Constant(m.fresh(f"{g.name}.shape"), target.astype(np.int64))


def _set_concat_sizes(m, concat: gs.Node, pieces: list, sizes: dict) -> None:
    offsets = np.cumsum([0] + [len(v) for _, v, _ in pieces])
    for axis, size in sizes.items():
        i = int(np.searchsorted(offsets, axis, side="right")) - 1
        tensor, values, static = pieces[i]
        j = axis - offsets[i]
        if values[j] in (-1, 0) or (static and values[j] == size) or \
                (not static and len(values) != 1):
            continue
        # a one-element run-time size of a channel (never batch) axis is pinned, changed or
        # not: it may be read from another tensor's Shape (swin v2 takes C from its input)
        values = values.copy()
        values[j] = size
        pieces[i] = (tensor, values, static)
        concat.inputs[i] = gs.Constant(m.fresh(f"{concat.name}.size{i}"),
                                       values.astype(np.int64))


def computed_reshape_targets(m, edits, by_name) -> dict[str, tuple]:
    """Reshape targets that are computed, not constants, read with one ORT run before any
    edit: ("static", value) for a target built from constants only (Unsqueeze + Concat of
    Python ints, as torch's exporter writes them without constant folding); ("concat",
    [(piece, value, static)]) for a Concat mixing run-time sizes (from Shape) with
    constants (unflatten's (3, E)). Static parts get rewritten; run-time parts follow the
    pruned tensor by themselves."""
    wanted: dict[str, list] = {}
    for e in edits:
        if not (isinstance(e, SetAttr) and e.name == "shape" and e.node in by_name):
            continue
        target = by_name[e.node].inputs[1]
        if isinstance(target, gs.Constant):
            continue
        if _static(target, m.graph):
            wanted[e.node] = [target]
        elif target.inputs and target.inputs[0].op == "Concat":
            wanted[e.node] = list(target.inputs[0].inputs)
    names = sorted({t.name for ts in wanted.values() for t in ts
                    if not isinstance(t, gs.Constant)})
    if not wanted:
        return {}
    from graphslim.verify import make_inputs

    got = m.capture(make_inputs(m.input_specs()), names) if names else {}

    def value(t):
        return np.asarray(t.values if isinstance(t, gs.Constant) else got[t.name])

    out = {}
    for node, ts in wanted.items():
        if by_name[node].inputs[1] is ts[0] and len(ts) == 1:
            out[node] = ("static", value(ts[0]))
        else:
            out[node] = ("concat", [(t, value(t).reshape(-1),
                                     isinstance(t, gs.Constant) or _static(t, m.graph))
                                    for t in ts])
    return out


def _static(t: gs.Tensor, graph: gs.Graph) -> bool:
    """True if `t` is computed from constants only (no graph input, no Shape op upstream)."""
    inputs = {id(i) for i in graph.inputs}
    stack, seen = [t], set()
    while stack:
        cur = stack.pop()
        if id(cur) in seen or isinstance(cur, gs.Constant):
            continue
        seen.add(id(cur))
        if id(cur) in inputs or not cur.inputs:
            return False
        producer = cur.inputs[0]
        if producer.op in ("Shape", "Size"):
            return False
        stack.extend(producer.inputs)
    return True
