"""ChannelDeps rules for ops that move, cut or join channels without weights: concat, split and
slices (ONNX Slice chunks, fx getitem), reshapes (flatten into linear, head split, channel
shuffle), transposes, reductions, softmax, Shape reads and constants. Mixed into Propagation
(graphslim/analyses/channel_rules.py), whose helpers (label, shape, union, block...) they use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analyses.channel_geometry import (
    fill_gap,
    getitem_axes,
    is_range,
    permutation,
    reaches_float,
    reduce_axes,
    reshape_label,
    slice_ranges,
    squeeze_constant,
)
from graphslim.analyses.channel_types import (
    Label,
    ShapeSite,
    SliceSite,
    SplitSite,
    Unsupported,
)
from graphslim.ir import Node, OpKind


@dataclass
class Pieces:
    """The tuple output of an fx split/chunk, indexed by a following getitem."""

    labels: list


class LayoutRules:
    """Rules without weights (see module doc)."""

    def concat(self, node: Node) -> None:
        rank = len(self.shape(node.output))
        axis = int(node.attrs.get("axis", 0)) % rank
        ops = [self.align(s, lab, rank, c) for s, lab, c in self.operands(node)]
        if not any(o.label and axis in o.label.axes for o in ops):
            self.set_out(node, self.union(node, ops, skip_axis=axis))
            return
        parts = []
        for o in ops:
            if o.label is not None and o.label.axes != (axis,):
                raise Unsupported(f"operand label spans axes {o.label.axes}")
            if o.label is None:
                ids = self.uf.new(o.shape[axis], f"{node.name}.fixed")
                self.block(ids, f"{node.name}: concatenated with a tensor graphslim does "
                                "not slice")
                parts.append(ids)
            else:
                parts.append(o.label.ids)
        self.set_out(node, Label((axis,), np.concatenate(parts)))

    def split(self, node: Node) -> None:
        x = node.inputs[0]
        lab, rank = self.label(x), len(self.shape(x))
        axis = int(node.attrs.get("axis", 0)) % rank
        sizes = self.split_sizes(node, rank, axis)
        if lab is None or axis not in lab.axes:
            labels = [lab] * len(sizes)
        else:
            if lab.axes != (axis,):
                raise Unsupported(f"label spans axes {lab.axes}")
            labels = [Label((axis,), p) for p in np.split(lab.ids, np.cumsum(sizes)[:-1])]
            self.sites.append(SplitSite(node.name, axis, tuple(lb.ids for lb in labels)))
        if len(node.outputs) == len(sizes):
            for v, lb in zip(node.outputs, labels):
                self.labels[v] = lb
        else:
            self.labels[node.output] = Pieces(labels)

    def split_sizes(self, node: Node, rank: int, axis: int) -> list[int]:
        if len(node.outputs) > 1:
            return [self.shape(v)[axis] for v in node.outputs]
        total = self.shape(node.inputs[0])[axis]
        a = node.attrs
        if "chunks" in a:
            each = -(-total // a["chunks"])
            return [min(each, total - i) for i in range(0, total, each)]
        if "split_size" in a:
            return [min(a["split_size"], total - i) for i in range(0, total, a["split_size"])]
        if "sizes" in a:
            return list(a["sizes"])
        raise Unsupported("split sizes unknown")

    def slice(self, node: Node) -> None:
        src = node.inputs[0] if node.inputs else None
        lab = self.labels.get(src)
        if isinstance(lab, Pieces):
            index = node.attrs.get("index")
            if not isinstance(index, int):
                raise Unsupported("non-constant index into a split")
            self.set_out(node, lab.labels[index])
            return
        if lab is None or node.output not in self.shapes:
            self.set_out(node, None)
            return
        in_shape, out_shape = self.shape(src), self.shape(node.output)
        if is_range(node) and len(lab.axes) == 1 and self.range_slice(node, lab, in_shape):
            return
        picked = self.scalar_index(node, lab, in_shape)
        if picked is not None:
            self.set_out(node, picked)
            return
        if node.attrs.get("form") == "index":
            mapping = getitem_axes(node.attrs["index"], in_shape)
        else:
            mapping = self.slice_axes(node, in_shape)
        if mapping is None or any(mapping.get(a) is None for a in lab.axes):
            raise Unsupported("slices or indexes a pruned axis")
        axes = tuple(mapping[a] for a in lab.axes)
        if any(out_shape[b] != in_shape[a] for a, b in zip(lab.axes, axes)):
            raise Unsupported("slices a pruned axis")
        self.set_out(node, Label(axes, lab.ids))

    def scalar_index(self, node: Node, lab: Label, in_shape: tuple) -> Label | None:
        """x[i] on a labelled axis (q = qkv[0] after a packed in-projection): the axis must keep
        its size, so units are tied along it, and the label drops that axis."""
        if node.kind is OpKind.GATHER and "in1" in node.params:
            idx = self.view.param(node.name, "in1")
            axis = int(node.attrs.get("axis", 0)) % len(in_shape)
            if idx.ndim != 0:
                return None
            index = int(idx)
        elif node.attrs.get("form") == "index" and isinstance(node.attrs.get("index"), int):
            axis, index = 0, node.attrs["index"]
        else:
            return None
        if axis not in lab.axes or len(lab.axes) < 2:
            return None
        pos = lab.axes.index(axis)
        self.uf.tie(lab.ids, pos)
        axes = tuple(a - (a > axis) for a in lab.axes if a != axis)
        return Label(axes, lab.ids.take(index % in_shape[axis], axis=pos))

    def expand(self, node: Node) -> None:
        """EXPAND: a broadcast of its data operand; a constant stays a sliceable
        constant (ViT's class token, expanded to the batch, then concatenated)."""
        ops = self.operands(node)
        shape, lab, const = ops[0]
        out = self.shape(node.output)
        if lab is not None:
            o = self.align(shape, lab, len(out), None)
            if any(o.shape[a] != out[a] for a in o.label.axes):
                raise Unsupported("expands a pruned axis")
            self.set_out(node, o.label)
            return
        if const is not None and len(out) == len(shape):
            self.const_of[node.output] = const
        self.set_out(node, None)

    def range_slice(self, node: Node, lab: Label, in_shape: tuple) -> bool:
        """An ONNX Slice taking a contiguous range of the pruned axis (a chunk exported as
        Slices): the range shrinks to the kept ids inside it (SliceSite); bounds computed at
        run time (C // 2) are rewritten as constants, since the pieces need not stay even.
        Tying pieces position by position to keep them even collapsed ShuffleNet's streams
        into one unit (the shuffles chain the ties), so they are not tied."""
        axis = lab.axes[0]
        siblings = [u for u in self.view.users(node.inputs[0]) if is_range(u)]
        found = {u.name: slice_ranges(self.view, self.shapes, u, axis, in_shape)
                 for u in siblings}
        fill_gap(found, siblings, self.shapes, axis, in_shape[axis])
        if found.get(node.name) is None:
            return False
        start, stop, _ = found[node.name]
        self.sites.append(SliceSite(node.name, axis, lab.ids, start, stop))
        self.set_out(node, Label((axis,), lab.ids[start:stop]))
        return True

    def slice_axes(self, node: Node, in_shape: tuple) -> dict | None:
        """Axis map of a range slice or a gather: identity, with partially sliced axes mapped
        to None."""
        rank = len(in_shape)
        if node.kind is OpKind.GATHER:
            if "in1" not in node.params:
                return None
            idx = self.view.param(node.name, "in1")
            axis = int(node.attrs.get("axis", 0)) % rank
            shift = idx.ndim - 1
            return {a: (None if a == axis else a if a < axis else a + shift)
                    for a in range(rank)}
        if not is_range(node) or not all(f"in{i}" in node.params for i in (1, 2)):
            return None
        starts, ends = (self.view.param(node.name, f"in{i}") for i in (1, 2))
        axes = self.view.param(node.name, "in3") if "in3" in node.params else \
            np.arange(len(starts))
        steps = self.view.param(node.name, "in4") if "in4" in node.params else \
            np.ones(len(starts), dtype=np.int64)
        mapping = {a: a for a in range(rank)}
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = int(a) % rank
            full = int(st) == 1 and int(s) in (0, -(2 ** 63)) and int(e) >= in_shape[a]
            if not full:
                mapping[a] = None
        return mapping

    # --- rules: layout ops -----------------------------------------------------------------------
    def spatial(self, node: Node) -> None:
        """Pools, pads, resizes: channel-preserving where the labelled axes keep their size."""
        x = self.data_inputs(node)[0]
        lab = self.label(x)
        if lab is not None:
            i, o = self.shape(x), self.shape(node.output)
            if len(i) != len(o) or any(i[a] != o[a] for a in lab.axes):
                raise Unsupported("changes the size of a pruned axis")
        self.set_out(node, lab)

    def reshape(self, node: Node) -> None:
        x = self.data_inputs(node)[0]
        lab = self.label(x)
        if lab is None:
            self.set_out(node, None)
            return
        if node.attrs.get("form") == "fixed":
            raise Unsupported("reshape with literal sizes graphslim does not rewrite")
        in_shape, out_shape = self.shape(x), self.shape(node.output)
        if lab.ids.size == 1:  # a single channel: nothing to prune, and no axis to follow
            self.block(lab.ids, f"{node.name}: reshapes a one-channel tensor")
            self.set_out(node, None)
            return
        out_axes, ids = reshape_label(lab, in_shape, out_shape)
        out = squeeze_constant(Label(out_axes, ids), self.uf)
        if node.attrs.get("form") == "target":
            self.sites.append(ShapeSite(node.name, out.axes, out.ids))
        if sum(1 for n in out.ids.shape if n > 1) > 1:
            self.rectangles.append(out.ids)
        self.set_out(node, out)

    def transpose(self, node: Node) -> None:
        x = self.data_inputs(node)[0]
        lab, rank = self.label(x), len(self.shape(x))
        if lab is None:
            self.set_out(node, None)
            return
        perm = permutation(node, rank)
        new_axes = [perm.index(a) for a in lab.axes]
        order = np.argsort(new_axes)
        self.set_out(node, Label(tuple(sorted(new_axes)), np.transpose(lab.ids, order)))

    def reduce(self, node: Node) -> None:
        x = self.data_inputs(node)[0]
        lab, rank = self.label(x), len(self.shape(x))
        if lab is None:
            self.set_out(node, None)
            return
        axes, keep = reduce_axes(self.view, node, rank)
        if set(axes) & set(lab.axes):
            raise Unsupported("reduces over pruned channels")
        if keep:
            self.set_out(node, lab)
        else:
            self.set_out(node, Label(tuple(a - sum(1 for r in axes if r < a) for a in lab.axes),
                                     lab.ids))

    def softmax(self, node: Node) -> None:
        x = self.data_inputs(node)[0]
        lab, rank = self.label(x), len(self.shape(x))
        axis = node.attrs.get("axis", -1)
        if lab is not None and (axis is None or int(axis) % rank in lab.axes):
            raise Unsupported("softmax over pruned channels")
        self.set_out(node, lab)

    def shape_op(self, node: Node) -> None:
        if node.attrs.get("form") == "shape":
            self.shape_feeds_float(node)
            for v in node.outputs:
                self.labels[v] = None
            return
        self.block_inputs(node, f"{node.describe()} on pruned channels")

    def shape_feeds_float(self, node: Node) -> None:
        """A pruned size read by Shape that flows into float math (sdpa's exported scale
        1/sqrt(head_dim)) changes values, not just shapes: the units that shrink that axis
        are inexact. Reshape targets, the usual reader, are int-only and fine."""
        lab = self.labels.get(node.inputs[0])
        if not isinstance(lab, Label) or not reaches_float(self.view, node.output):
            return
        rank = len(self.shape(node.inputs[0]))
        picked: set[int] = set()
        for u in self.view.users(node.output):
            if u.kind is OpKind.GATHER and "in1" in u.params:
                picked |= {int(i) % rank for i in np.ravel(self.view.param(u.name, "in1"))}
            elif is_range(u) and "in1" in u.params and "in2" in u.params:
                lo, hi = (int(np.ravel(self.view.param(u.name, r))[0]) for r in ("in1", "in2"))
                picked |= set(range(rank)[slice(lo, hi)])
            else:
                picked = set(range(rank))
                break
        for a in picked & set(lab.axes):
            self.inexact_if_varying.append(
                (lab.ids, lab.axes.index(a), f"{node.name}: the pruned size feeds float math "
                                             "(e.g. an attention scale 1/sqrt(head_dim))"))

    def constant(self, node: Node) -> None:
        if "value" in node.params:
            self.const_of[node.output] = (node.name, "value", node.params["value"])
        self.set_out(node, None)
