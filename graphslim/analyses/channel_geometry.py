"""Shape geometry for the layout rules of ChannelDeps (graphslim/analyses/channel_layout.py):
where a Slice cuts an axis, which axes a getitem, transpose or reduction keeps, how a channel
label travels through a reshape. Plain functions over the IR and shapes; no analysis state."""

from __future__ import annotations

import numpy as np

from graphslim.analyses.channel_types import Label, UnionFind, Unsupported
from graphslim.ir import GraphView, Node, OpKind


def slice_ranges(view: GraphView, shapes: dict, node: Node, axis: int, in_shape: tuple
                  ) -> tuple[int, int, bool] | None:
    """(start, stop, dynamic) of an ONNX Slice on `axis` only with step 1. A bound computed at
    run time (torch.chunk exports `C // 2` from Shape) is read off the measured output size;
    `dynamic` says the bounds cannot be rewritten."""
    rank, n = len(in_shape), in_shape[axis]
    consts = {i: view.param(node.name, f"in{i}").tolist() for i in (1, 2, 3, 4)
              if f"in{i}" in node.params}
    dynamic = iter(node.inputs[1:])
    total = len(node.inputs) + len(consts)
    slots = {i: ("const", consts[i]) if i in consts else ("value", next(dynamic, None))
             for i in range(1, total)}
    if 3 in slots:
        kind, axes = slots[3]
        if kind != "const":
            return None
    else:  # no axes input: the first len(starts) axes
        kind, starts = slots[1]
        count = len(starts) if kind == "const" else (shapes.get(starts) or (0,))[0]
        axes = list(range(count))
    if len(axes) != 1 or int(axes[0]) % rank != axis or \
            (4 in slots and slots[4] != ("const", [1])):
        return None
    out = shapes.get(node.output)
    if out is None or not isinstance(out[axis], int):
        return None
    size = out[axis]

    def clamp(v):
        return min(max(v + n if v < 0 else v, 0), n)

    if 1 in consts:
        start = clamp(consts[1][0])
    elif 2 in consts:
        start = clamp(consts[2][0]) - size
    else:
        return None
    return start, start + size, not (1 in consts and 2 in consts)


def reaches_float(view: GraphView, value: str, depth: int = 8) -> bool:
    """Does an integer shape value flow into float arithmetic (Cast to float, Sqrt)?"""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for u in view.users(v):
                if u.attrs.get("fn") == "sqrt" or u.attrs.get("to_float"):
                    return True
                if u.attrs.get("form") != "target":  # a reshape target reads sizes as sizes
                    nxt.extend(u.outputs)
        frontier = nxt
    return False


def fill_gap(found: dict, siblings: list, shapes: dict, axis: int, n: int) -> None:
    """A slice with both bounds computed at run time is the one gap its siblings leave
    (the second half of an exported chunk), when its size says so."""
    unknown = [u for u in siblings if found[u.name] is None and is_range(u)]
    if len(unknown) != 1:
        return
    covered = sorted(r[:2] for r in found.values() if r is not None)
    gaps, at = [], 0
    for a, b in covered:
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if at < n:
        gaps.append((at, n))
    out = shapes.get(unknown[0].output)
    if len(gaps) == 1 and gaps[0] != (0, n) and out is not None and \
            out[axis] == gaps[0][1] - gaps[0][0]:  # (0, n): it does not cut this axis at all
        found[unknown[0].name] = (*gaps[0], True)


def is_range(node: Node) -> bool:
    return node.kind is OpKind.SLICE and node.attrs.get("form") == "range"


def permutation(node: Node, rank: int) -> list[int]:
    if "swap" in node.attrs:
        a, b = (int(d) % rank for d in node.attrs["swap"])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    dims = node.attrs.get("perm")
    if dims is None:
        return list(reversed(range(rank)))
    if not all(isinstance(d, int) for d in dims):
        raise Unsupported("permutation not constant")
    return [int(d) % rank for d in dims]


def reduce_axes(view: GraphView, node: Node, rank: int) -> tuple[list[int], bool]:
    dims = node.attrs.get("axes")
    if dims is None and "in1" in node.params:  # ONNX opset 18: axes as an input
        dims = view.param(node.name, "in1").tolist()
    keep = bool(node.attrs.get("keepdims", False))
    if dims is None:
        return list(range(rank)), keep
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        raise Unsupported("reduction axes not constant")
    return sorted(int(d) % rank for d in dims), keep


def getitem_axes(index, in_shape: tuple) -> dict | None:
    """Input axis -> output axis of x[index] (None where the axis is indexed or sliced)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i == "$node" for i in items):
        return None
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    mapping, a, b = {}, 0, 0
    for item in items:
        if item is Ellipsis:
            for _ in range(len(in_shape) - n_real):
                mapping[a] = b
                a, b = a + 1, b + 1
        elif item is None:
            b += 1
        elif isinstance(item, int):
            mapping[a] = None
            a += 1
        elif isinstance(item, tuple) and item[:1] == ("slice",):
            start, stop, step = item[1:]
            full = start in (None, 0) and step in (None, 1) and (
                stop is None or stop >= in_shape[a])
            mapping[a] = b if full else None
            a, b = a + 1, b + 1
        else:
            return None
    while a < len(in_shape):
        mapping[a] = b
        a, b = a + 1, b + 1
    return mapping


def reshape_label(lab: Label, in_shape: tuple, out_shape: tuple) -> tuple[tuple, np.ndarray]:
    """Carry a label through a reshape: find the smallest input axis range around the label
    whose boundaries (products of leading sizes) also exist in the output, spread the ids over
    that range and reshape them to the matching output axes."""
    in_cp = np.cumprod((1,) + tuple(in_shape)).tolist()
    out_cp = np.cumprod((1,) + tuple(out_shape)).tolist()
    common = set(in_cp) & set(out_cp)
    lo, hi = min(lab.axes), max(lab.axes) + 1
    v_lo = max(v for v in common if v <= in_cp[lo])
    v_hi = min(v for v in common if v >= in_cp[hi])
    lo = max(i for i in range(lo + 1) if in_cp[i] == v_lo)
    hi = min(i for i in range(hi, len(in_cp)) if in_cp[i] == v_hi)
    olo = max(j for j, v in enumerate(out_cp) if v == v_lo)
    ohi = min(j for j, v in enumerate(out_cp) if v == v_hi)
    if olo >= ohi:
        olo = min(j for j, v in enumerate(out_cp) if v == v_lo)
    if olo >= ohi:
        raise Unsupported("no output axes carry the pruned channels")
    block = [in_shape[a] for a in range(lo, hi)]
    spread = lab.ids.reshape([in_shape[a] if a in lab.axes else 1 for a in range(lo, hi)])
    ids = np.broadcast_to(spread, block).reshape([out_shape[j] for j in range(olo, ohi)])
    return tuple(range(olo, ohi)), np.ascontiguousarray(ids)


def squeeze_constant(lab: Label, uf: UnionFind) -> Label:
    """Drop axes along which the ids repeat (size-1 or broadcast) from a label."""
    keep = [i for i in range(lab.ids.ndim)
            if lab.ids.shape[i] > 1 and not np.all(lab.ids == lab.ids.take([0], axis=i))]
    if not keep:
        keep = [int(np.argmax(lab.ids.shape))]
    ids = lab.ids
    for i in reversed(range(ids.ndim)):
        if i not in keep:
            ids = ids.take(0, axis=i)
    return Label(tuple(lab.axes[i] for i in keep), ids)
