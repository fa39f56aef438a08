"""Per-op propagation rules of ChannelDeps (see graphslim/analyses/channels.py for the model).

One walk in topological order: each rule reads its inputs' labels, unites ids that must go
together, records the sites a pruning must rewrite, and labels its outputs. A rule that meets
something it cannot model blocks the ids involved with a reason; it never guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analyses.channels import (
    ChannelDeps,
    GroupCountSite,
    Label,
    ParamSite,
    ShapeSite,
    SliceSite,
    SplitSite,
    _UnionFind,
)
from graphslim.ir import GraphView, Node, OpKind

_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "view", "reshape", "flatten",
             "squeeze", "unsqueeze"}
_SHAPE_OPS = {"Shape", "size", "getattr", "dim", "numel"}
_ELEMENTWISE = {OpKind.ACTIVATION, OpKind.ELEMENTWISE, OpKind.ADD, OpKind.SUB, OpKind.MUL,
                OpKind.DIV, OpKind.IDENTITY}


@dataclass
class _Operand:
    shape: tuple            # aligned to the op's (virtual) output rank
    label: Label | None     # axes already aligned
    const: tuple | None     # (node, role, param key, param rank) of a sliceable constant


@dataclass
class _Pieces:
    """The tuple output of an fx split/chunk, indexed by a following getitem."""

    labels: list


class Propagation:
    def __init__(self, view: GraphView, shapes: dict, heads: bool):
        self.view, self.shapes, self.heads = view, shapes, heads
        self.uf = _UnionFind()
        self.labels: dict[str, Label | _Pieces | None] = {}
        self.const_of: dict[str, tuple] = {}     # fx get_attr value -> (node, role, key)
        self.const_ids: dict[tuple, np.ndarray] = {}
        self.sites: list = []
        self.blocked: list = []
        self.inexact: list = []
        self.rectangles: list[np.ndarray] = []
        self.inexact_if_varying: list = []

    # --- driver ------------------------------------------------------------------------------
    def run(self) -> ChannelDeps:
        rules = {
            OpKind.CONV: self.conv, OpKind.LINEAR: self.linear,
            OpKind.BATCHNORM: self.channel_norm, OpKind.INSTANCENORM: self.channel_norm,
            OpKind.GROUPNORM: self.group_norm, OpKind.LAYERNORM: self.layer_norm,
            OpKind.CONCAT: self.concat, OpKind.SPLIT: self.split, OpKind.SLICE: self.slice,
            OpKind.POOL_AVG: self.spatial, OpKind.POOL_MAX: self.spatial,
            OpKind.POOL_GLOBAL_AVG: self.spatial, OpKind.POOL_GLOBAL_MAX: self.spatial,
            OpKind.PAD: self.spatial, OpKind.RESIZE: self.spatial,
            OpKind.FLATTEN: self.reshape, OpKind.RESHAPE: self.reshape,
            OpKind.TRANSPOSE: self.transpose, OpKind.REDUCE: self.reduce,
            OpKind.SOFTMAX: self.softmax, OpKind.MATMUL: self.matmul,
            OpKind.SHAPE: self.shape_op, OpKind.CONSTANT: self.constant,
            OpKind.CONV_TRANSPOSE: self.conv_transpose, OpKind.ATTENTION: self.attention,
        }
        for kind in _ELEMENTWISE:
            rules[kind] = self.elementwise
        creates = (OpKind.CONV, OpKind.LINEAR, OpKind.CONV_TRANSPOSE, OpKind.CONSTANT)
        for node in self.view.nodes():
            if node.kind not in creates and node.op not in ("Expand", "expand") and not any(
                    self.labels.get(v) is not None for v in node.inputs):
                for v in node.outputs:
                    self.labels[v] = None
                continue
            rule = rules.get(node.kind)
            if rule is None:
                reason = node.attrs.get("reason", f"{node.kind.value} op {node.op}")
                self.block_inputs(node, f"{node.name}: {reason}")
                continue
            try:
                rule(node)
            except _Unsupported as exc:
                self.block_inputs(node, f"{node.name} ({node.op}): {exc}")
        for v in self.view.outputs:
            lab = self.labels.get(v)
            if isinstance(lab, Label):
                self.block(lab.ids, "model outputs keep their shape")
        self.merge_shared_sites()
        return ChannelDeps(self.uf, self.sites, self.blocked, self.inexact, self.rectangles,
                           self.heads, self.inexact_if_varying)

    def merge_shared_sites(self) -> None:
        """One ParamSite per stored tensor and axis: a weight read by several nodes (a module
        called twice, tied weights) is sliced once, so its readers' ids must go together."""
        first: dict[tuple, ParamSite] = {}
        sites = []
        for site in self.sites:
            if isinstance(site, ParamSite):
                key = (self._storage(site.node, site.role), site.axis)
                if key in first:
                    if first[key].ids.shape != site.ids.shape:
                        self.block(site.ids, f"{site.node}: shared parameter read with "
                                             "different shapes")
                        self.block(first[key].ids, "shared parameter")
                    else:
                        self.uf.unite(first[key].ids, site.ids)
                    continue
                first[key] = site
            sites.append(site)
        self.sites = sites

    def _storage(self, node: str, role: str) -> tuple:
        """What a slice of (node, role) cuts: the stored tensor, or on frontends that give each
        reader of a shared constant its own sliced copy (ONNX), the node's private view of it."""
        key = self.view.node(node).params[role]
        return (key, node, role) if self.view.private_param_copies else (key,)

    # --- helpers -----------------------------------------------------------------------------
    def label(self, value: str) -> Label | None:
        lab = self.labels.get(value)
        if isinstance(lab, _Pieces):
            raise _Unsupported("uses a split's tuple directly")
        return lab

    def shape(self, value: str) -> tuple:
        s = self.shapes.get(value)
        if s is None or not all(isinstance(d, int) for d in s):
            raise _Unsupported(f"shape of '{value}' unknown")
        return tuple(s)

    def block(self, ids, reason: str) -> None:
        self.blocked.append((np.asarray(ids), reason))

    def block_inputs(self, node: Node, reason: str) -> None:
        for v in node.inputs:
            lab = self.labels.get(v)
            labs = lab.labels if isinstance(lab, _Pieces) else [lab]
            for lab in labs:
                if isinstance(lab, Label):
                    self.block(lab.ids, reason)
        for v in node.outputs:
            self.labels[v] = None

    def set_out(self, node: Node, lab: Label | None) -> None:
        self.labels[node.output] = lab

    def data_inputs(self, node: Node) -> list[str]:
        """Inputs that are tensors (fx lists size() values as inputs too)."""
        return [v for v in node.inputs if v in self.shapes or v in self.labels]

    def operands(self, node: Node) -> list[tuple[tuple, Label | None, tuple | None]]:
        """(shape, label, const) per tensor operand in slot order; constants included."""
        ins = [v for v in node.inputs if v in self.shapes]
        const_slots = {int(r[2:]): r for r in node.params if r.startswith("in") and
                       r[2:].isdigit()}
        out, it = [], iter(ins)
        for slot in range(len(ins) + len(const_slots)):
            if slot in const_slots:
                role = const_slots[slot]
                shape, _ = self.view.param_info(node.name, role)
                out.append((tuple(shape), None, (node.name, role, node.params[role])))
            else:
                v = next(it)
                out.append((self.shape(v), self.label(v), self.const_of.get(v)))
        return out

    @staticmethod
    def align(shape: tuple, lab: Label | None, rank: int, const) -> _Operand:
        off = rank - len(shape)
        if off < 0:
            raise _Unsupported("operand of higher rank than the output")
        lab = None if lab is None else Label(tuple(a + off for a in lab.axes), lab.ids)
        const = None if const is None else (*const, len(shape))
        return _Operand((1,) * off + tuple(shape), lab, const)

    # --- the union core: broadcasting operands ----------------------------------------------
    def union(self, node: Node, ops: list[_Operand], skip_axis: int | None = None
              ) -> Label | None:
        """Unite the labels of broadcasting operands; unlabelled operands of full size on a
        labelled axis are sliceable constants (they get ids) or fix that axis (tie)."""
        joint = sorted({a for o in ops if o.label for a in o.label.axes})
        if not joint:
            return None
        rank = len(ops[0].shape)
        sizes = [max(o.shape[a] for o in ops) for a in joint]
        J = None
        for o in ops:
            if o.label is None:
                continue
            for a, n in zip(o.label.axes, o.label.ids.shape):
                if n != sizes[joint.index(a)] and n != 1:
                    raise _Unsupported("labelled axis sizes disagree")
            b = np.broadcast_to(o.label.ids.reshape(
                [o.shape[a] if a in o.label.axes else 1 for a in joint]), sizes)
            if J is None:
                J = np.array(b)
            else:
                self.uf.unite(J, b)
        for o in ops:
            if o.label is not None:
                continue
            real = [a for a in joint if o.shape[a] > 1 and a != skip_axis]
            if not real:
                continue
            if o.const is not None and len(real) == 1:
                self.const_label(o, real[0], joint, sizes, J)
                continue
            for a in real:
                self.uf.tie(J, joint.index(a))
            if len(joint) == 1:
                self.block(J, f"{node.name} ({node.op}) combines the channels with a tensor of "
                              "fixed size")
        assert rank == len(ops[-1].shape)
        return Label(tuple(joint), J)

    def const_label(self, o: _Operand, axis: int, joint: list, sizes: list, J) -> None:
        node, role, _, prank = o.const
        p_axis = axis - (len(o.shape) - prank)
        key = (self._storage(node, role), p_axis)
        ids = self.const_ids.get(key)
        if ids is None:
            ids = self.uf.new(o.shape[axis], f"{node}.{role}")
            self.const_ids[key] = ids
        self.sites.append(ParamSite(node, role, p_axis, ids))
        b = np.broadcast_to(ids.reshape([sizes[i] if a == axis else 1
                                         for i, a in enumerate(joint)]), sizes)
        self.uf.unite(J, b)

    # --- rules: weighted layers ------------------------------------------------------------------
    def conv(self, node: Node) -> None:
        x = node.inputs[0]
        lab = self.label(x)
        w_shape, _ = self.view.param_info(node.name, "weight")
        out_ch, groups = w_shape[0], int(node.attrs.get("groups", 1))
        in_ch = w_shape[1] * groups
        if lab is not None and lab.axes != (1,):
            self.block(lab.ids, f"{node.name}: input label spans axes {lab.axes}")
            lab = None
        out_ids = self.uf.new(out_ch, node.name)
        if groups == 1:
            if lab is not None:
                self.sites.append(ParamSite(node.name, "weight", 1, lab.ids, consumer=True))
        else:
            per_group = out_ids.reshape(groups, out_ch // groups)
            self.uf.tie(per_group, 1)
            if lab is not None:
                self.uf.unite(lab.ids.reshape(groups, in_ch // groups), per_group[:, :1])
            else:
                self.block(out_ids, f"{node.name}: grouped conv whose input cannot shrink")
            self.sites.append(GroupCountSite(node.name, "groups", per_group))
        self.sites.append(ParamSite(node.name, "weight", 0, out_ids))
        if "bias" in node.params:
            self.sites.append(ParamSite(node.name, "bias", 0, out_ids))
        self.set_out(node, Label((1,), out_ids))

    def conv_transpose(self, node: Node) -> None:
        lab = self.label(node.inputs[0])
        w_shape, _ = self.view.param_info(node.name, "weight")
        if int(node.attrs.get("groups", 1)) != 1:
            raise _Unsupported("grouped transposed conv")
        if lab is not None:
            if lab.axes != (1,):
                raise _Unsupported(f"input label spans axes {lab.axes}")
            self.sites.append(ParamSite(node.name, "weight", 0, lab.ids, consumer=True))
        out_ids = self.uf.new(w_shape[1], node.name)
        self.sites.append(ParamSite(node.name, "weight", 1, out_ids))
        if "bias" in node.params:
            self.sites.append(ParamSite(node.name, "bias", 0, out_ids))
        self.set_out(node, Label((1,), out_ids))

    def linear(self, node: Node) -> None:
        x = node.inputs[0]
        lab, rank = self.label(x), len(self.shape(x))
        w_shape, _ = self.view.param_info(node.name, "weight")
        if lab is not None:
            if lab.axes != (rank - 1,):
                self.block(lab.ids, f"{node.name}: input label spans axes {lab.axes}")
            else:
                self.sites.append(ParamSite(node.name, "weight", 1, lab.ids, consumer=True))
        out_ids = self.uf.new(w_shape[0], node.name)
        self.sites.append(ParamSite(node.name, "weight", 0, out_ids))
        if "bias" in node.params:
            self.sites.append(ParamSite(node.name, "bias", 0, out_ids))
        self.set_out(node, Label((len(self.shape(node.output)) - 1,), out_ids))

    def attention(self, node: Node) -> None:
        """A self-attention module (fx nn.MultiheadAttention): q/k/v rows of the packed
        in-projection as ids (3, heads, head_dim). heads=True: a unit is a whole head (its q, k
        and v rows); else head dim j of q, k and v goes from every head (the packed projection
        keeps one width for the three)."""
        ins = self.data_inputs(node)
        if not node.attrs.get("packed") or len(ins) != 1:
            raise _Unsupported("only packed self-attention is modelled")
        x = ins[0]
        lab, rank = self.label(x), len(self.shape(x))
        heads, inner = int(node.attrs["num_heads"]), int(node.attrs["inner_dim"])
        if lab is not None:
            if lab.axes != (rank - 1,):
                raise _Unsupported(f"input label spans axes {lab.axes}")
            self.sites.append(ParamSite(node.name, "in_proj_weight", 1, lab.ids, consumer=True))
        qkv = self.uf.new((3, heads, inner // heads), f"{node.name}.qkv")
        if self.heads:
            self.uf.tie(qkv, 2)
            self.uf.tie(qkv, 0)
        else:  # packed q/k/v keep one width: dim j of q, k and v goes together
            self.uf.unite(qkv[0], qkv[1])
            self.uf.unite(qkv[0], qkv[2])
            self.uf.tie(qkv[0], 0)
        out = self.uf.new(int(node.attrs["out_dim"]), node.name)
        self.sites += [ParamSite(node.name, "in_proj_weight", 0, qkv.ravel()),
                       ParamSite(node.name, "out_proj.weight", 1, qkv[2].ravel(), consumer=True),
                       ParamSite(node.name, "out_proj.weight", 0, out),
                       GroupCountSite(node.name, "num_heads", qkv[2])]
        for role, ids in (("in_proj_bias", qkv.ravel()), ("out_proj.bias", out)):
            if role in node.params:
                self.sites.append(ParamSite(node.name, role, 0, ids))
        self.labels[node.output] = _Pieces([Label((rank - 1,), out), None])

    # --- rules: norms ----------------------------------------------------------------------------
    def channel_norm(self, node: Node) -> None:
        lab = self.label(node.inputs[0])
        if lab is not None and 1 in lab.axes:
            if lab.axes != (1,):
                raise _Unsupported(f"label spans axes {lab.axes}")
            for role in node.params:
                if role in ("scale", "bias", "mean", "var"):
                    self.sites.append(ParamSite(node.name, role, 0, lab.ids))
        self.set_out(node, lab)

    def group_norm(self, node: Node) -> None:
        lab = self.label(node.inputs[0])
        if lab is None or 1 not in lab.axes:
            self.set_out(node, lab)
            return
        if lab.axes != (1,):
            raise _Unsupported(f"label spans axes {lab.axes}")
        groups = int(node.attrs.get("num_groups", 0))
        if groups <= 0 or len(lab.ids) % groups:
            raise _Unsupported("unknown group count")
        per_group = lab.ids.reshape(groups, -1)
        self.uf.tie(per_group, 1)
        self.sites.append(GroupCountSite(node.name, "num_groups", per_group))
        for role in ("scale", "bias"):
            if role in node.params:
                n = self.view.param_info(node.name, role)[0][0]
                self.sites.append(ParamSite(node.name, role, 0,
                                            lab.ids if n == len(lab.ids) else per_group[:, 0]))
        self.set_out(node, lab)

    def layer_norm(self, node: Node) -> None:
        if len(self.data_inputs(node)) > 1:
            raise _Unsupported("functional layer_norm with weights passed as tensors")
        x = node.inputs[0]
        lab, rank = self.label(x), len(self.shape(x))
        if node.attrs.get("channels_first"):
            axes = (1,)
        else:
            k = int(node.attrs.get("normalized_ndim", 0)) or rank - (
                int(node.attrs.get("axis", -1)) % rank)
            axes = tuple(range(rank - k, rank))
        if lab is not None and set(lab.axes) & set(axes):
            if len(lab.axes) != 1 or len(axes) != 1:
                raise _Unsupported("LayerNorm over several labelled axes")
            for role in ("scale", "bias"):
                if role in node.params:
                    self.sites.append(ParamSite(node.name, role, 0, lab.ids))
            self.inexact.append((lab.ids, f"{node.name}: LayerNorm normalizes over the pruned "
                                          "channels (their removal changes its statistics)"))
        self.set_out(node, lab)

    # --- rules: elementwise, concat, split, slice -----------------------------------------------
    def elementwise(self, node: Node) -> None:
        if node.op in ("Expand", "expand"):
            self.expand(node)
            return
        out = node.output
        if out not in self.shapes:
            raise _Unsupported("output is not a tensor")
        rank = len(self.shape(out))
        ops = [self.align(s, lab, rank, c) for s, lab, c in self.operands(node)]
        self.set_out(node, self.union(node, ops))

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
                raise _Unsupported(f"operand label spans axes {o.label.axes}")
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
        axis = int(node.attrs.get("axis", node.attrs.get("dim", 0))) % rank
        sizes = self.split_sizes(node, rank, axis)
        if lab is None or axis not in lab.axes:
            labels = [lab] * len(sizes)
        else:
            if lab.axes != (axis,):
                raise _Unsupported(f"label spans axes {lab.axes}")
            labels = [Label((axis,), p) for p in np.split(lab.ids, np.cumsum(sizes)[:-1])]
            self.sites.append(SplitSite(node.name, axis, tuple(lb.ids for lb in labels)))
        if len(node.outputs) == len(sizes):
            for v, lb in zip(node.outputs, labels):
                self.labels[v] = lb
        else:
            self.labels[node.output] = _Pieces(labels)

    def split_sizes(self, node: Node, rank: int, axis: int) -> list[int]:
        if len(node.outputs) > 1:
            return [self.shape(v)[axis] for v in node.outputs]
        total = self.shape(node.inputs[0])[axis]
        fx_args = node.attrs.get("args", ())
        arg = fx_args[0] if fx_args else None
        if node.attrs.get("fn") == "chunk" and isinstance(arg, int):
            each = -(-total // arg)
            return [min(each, total - i) for i in range(0, total, each)]
        if isinstance(arg, int):
            return [min(arg, total - i) for i in range(0, total, arg)]
        if isinstance(arg, (list, tuple)) and all(isinstance(s, int) for s in arg):
            return list(arg)
        raise _Unsupported("split sizes unknown")

    def slice(self, node: Node) -> None:
        src = node.inputs[0] if node.inputs else None
        lab = self.labels.get(src)
        if isinstance(lab, _Pieces):
            index = node.attrs.get("args", (None,))[0]
            if not isinstance(index, int):
                raise _Unsupported("non-constant index into a split")
            self.set_out(node, lab.labels[index])
            return
        if lab is None or node.output not in self.shapes:
            self.set_out(node, None)
            return
        in_shape, out_shape = self.shape(src), self.shape(node.output)
        if node.op == "Slice" and len(lab.axes) == 1 and self.range_slice(node, lab, in_shape):
            return
        picked = self.scalar_index(node, lab, in_shape)
        if picked is not None:
            self.set_out(node, picked)
            return
        if "args" in node.attrs:
            mapping = _getitem_axes(node.attrs["args"][0], in_shape)
        else:
            mapping = self.onnx_slice_axes(node, in_shape)
        if mapping is None or any(mapping.get(a) is None for a in lab.axes):
            raise _Unsupported("slices or indexes a pruned axis")
        axes = tuple(mapping[a] for a in lab.axes)
        if any(out_shape[b] != in_shape[a] for a, b in zip(lab.axes, axes)):
            raise _Unsupported("slices a pruned axis")
        self.set_out(node, Label(axes, lab.ids))

    def scalar_index(self, node: Node, lab: Label, in_shape: tuple) -> Label | None:
        """x[i] on a labelled axis (q = qkv[0] after a packed in-projection): the axis must keep
        its size, so units are tied along it, and the label drops that axis."""
        if node.op == "Gather" and "in1" in node.params:
            idx = self.view.param(node.name, "in1")
            axis = int(node.attrs.get("axis", 0)) % len(in_shape)
            if idx.ndim != 0:
                return None
            index = int(idx)
        elif node.op == "getitem" and isinstance(node.attrs.get("args", (None,))[0], int):
            axis, index = 0, node.attrs["args"][0]
        else:
            return None
        if axis not in lab.axes or len(lab.axes) < 2:
            return None
        pos = lab.axes.index(axis)
        self.uf.tie(lab.ids, pos)
        axes = tuple(a - (a > axis) for a in lab.axes if a != axis)
        return Label(axes, lab.ids.take(index % in_shape[axis], axis=pos))

    def expand(self, node: Node) -> None:
        """Expand / expand: a broadcast of its data operand; a constant stays a sliceable
        constant (ViT's class token, expanded to the batch, then concatenated)."""
        ops = self.operands(node)
        shape, lab, const = ops[0]
        out = self.shape(node.output)
        if lab is not None:
            o = self.align(shape, lab, len(out), None)
            if any(o.shape[a] != out[a] for a in o.label.axes):
                raise _Unsupported("expands a pruned axis")
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
        siblings = [u for u in self.view.users(node.inputs[0]) if u.op == "Slice"]
        found = {u.name: _slice_ranges(self.view, self.shapes, u, axis, in_shape)
                 for u in siblings}
        _fill_gap(found, siblings, self.shapes, axis, in_shape[axis])
        if found.get(node.name) is None:
            return False
        start, stop, _ = found[node.name]
        self.sites.append(SliceSite(node.name, axis, lab.ids, start, stop))
        self.set_out(node, Label((axis,), lab.ids[start:stop]))
        return True

    def onnx_slice_axes(self, node: Node, in_shape: tuple) -> dict | None:
        """Axis map of an ONNX Slice: identity, with partially sliced axes mapped to None."""
        rank = len(in_shape)
        if node.op == "Gather":
            if "in1" not in node.params:
                return None
            idx = self.view.param(node.name, "in1")
            axis = int(node.attrs.get("axis", 0)) % rank
            shift = idx.ndim - 1
            return {a: (None if a == axis else a if a < axis else a + shift)
                    for a in range(rank)}
        if node.op != "Slice" or not all(f"in{i}" in node.params for i in (1, 2)):
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
                raise _Unsupported("changes the size of a pruned axis")
        self.set_out(node, lab)

    def reshape(self, node: Node) -> None:
        x = self.data_inputs(node)[0]
        lab = self.label(x)
        if lab is None:
            self.set_out(node, None)
            return
        if node.op not in _RESHAPES:
            raise _Unsupported("reshape with literal sizes graphslim does not rewrite")
        in_shape, out_shape = self.shape(x), self.shape(node.output)
        if lab.ids.size == 1:  # a single channel: nothing to prune, and no axis to follow
            self.block(lab.ids, f"{node.name}: reshapes a one-channel tensor")
            self.set_out(node, None)
            return
        out_axes, ids = _reshape_label(lab, in_shape, out_shape)
        out = _squeeze_constant(Label(out_axes, ids), self.uf)
        if node.op in ("Reshape", "view", "reshape"):
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
        perm = _perm(node, rank)
        new_axes = [perm.index(a) for a in lab.axes]
        order = np.argsort(new_axes)
        self.set_out(node, Label(tuple(sorted(new_axes)), np.transpose(lab.ids, order)))

    def reduce(self, node: Node) -> None:
        x = self.data_inputs(node)[0]
        lab, rank = self.label(x), len(self.shape(x))
        if lab is None:
            self.set_out(node, None)
            return
        axes, keep = _reduce_axes(self, node, rank)
        if set(axes) & set(lab.axes):
            raise _Unsupported("reduces over pruned channels")
        if keep:
            self.set_out(node, lab)
        else:
            self.set_out(node, Label(tuple(a - sum(1 for r in axes if r < a) for a in lab.axes),
                                     lab.ids))

    def softmax(self, node: Node) -> None:
        x = self.data_inputs(node)[0]
        lab, rank = self.label(x), len(self.shape(x))
        args, kw = node.attrs.get("args", ()), node.attrs.get("kwargs", {})
        axis = node.attrs.get("axis", node.attrs.get("dim", kw.get("dim",
                                                                    args[0] if args else -1)))
        if lab is not None and (axis is None or int(axis) % rank in lab.axes):
            raise _Unsupported("softmax over pruned channels")
        self.set_out(node, lab)

    def shape_op(self, node: Node) -> None:
        if node.op in _SHAPE_OPS:
            if node.op == "Shape":
                self.shape_feeds_float(node)
            for v in node.outputs:
                self.labels[v] = None
            return
        if node.op == "Gather":
            self.slice(node)
            return
        self.block_inputs(node, f"{node.name}: {node.op} on pruned channels")

    def shape_feeds_float(self, node: Node) -> None:
        """A pruned size read by Shape that flows into float math (sdpa's exported scale
        1/sqrt(head_dim)) changes values, not just shapes: the units that shrink that axis
        are inexact. Reshape targets, the usual reader, are int-only and fine."""
        lab = self.labels.get(node.inputs[0])
        if not isinstance(lab, Label) or not _reaches_float(self.view, node.output):
            return
        rank = len(self.shape(node.inputs[0]))
        picked: set[int] = set()
        for u in self.view.users(node.output):
            if u.op == "Gather" and "in1" in u.params:
                picked |= {int(i) % rank for i in np.ravel(self.view.param(u.name, "in1"))}
            elif u.op == "Slice" and "in1" in u.params and "in2" in u.params:
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

    def matmul(self, node: Node) -> None:
        from graphslim.analyses.channel_matmul import matmul_rule

        matmul_rule(self, node)


class _Unsupported(Exception):
    pass


def _slice_ranges(view: GraphView, shapes: dict, node: Node, axis: int, in_shape: tuple
                  ) -> tuple[int, int, bool] | None:
    """(start, stop, dynamic) of an ONNX Slice on `axis` only with step 1. A bound computed at
    run time (torch.chunk exports `C // 2` from Shape) is read off the measured output size;
    `dynamic` says the bounds cannot be rewritten."""
    rank, n = len(in_shape), in_shape[axis]
    consts = {i: view.param(node.name, f"in{i}").tolist() for i in (1, 2, 3, 4)
              if f"in{i}" in node.params}
    axes = consts.get(3, [axis] if 3 not in consts and len(node.inputs) + len(consts) <= 3
                      else None)
    if axes is None or len(axes) != 1 or int(axes[0]) % rank != axis or \
            consts.get(4, [1])[0] != 1 or (len(node.inputs) + len(consts) > 4 and 4 not in consts):
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


def _reaches_float(view: GraphView, value: str, depth: int = 8) -> bool:
    """Does an integer shape value flow into float arithmetic (Cast to float, Sqrt)?"""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for u in view.users(v):
                if u.op == "Sqrt" or (u.op == "Cast" and u.attrs.get("to") in (1, 10, 11, 16)):
                    return True
                if u.op != "Reshape":
                    nxt.extend(u.outputs)
        frontier = nxt
    return False


def _fill_gap(found: dict, siblings: list, shapes: dict, axis: int, n: int) -> None:
    """A slice with both bounds computed at run time is the one gap its siblings leave
    (the second half of an exported chunk), when its size says so."""
    unknown = [u for u in siblings if found[u.name] is None and u.op == "Slice"]
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
    if len(gaps) == 1 and out is not None and out[axis] == gaps[0][1] - gaps[0][0]:
        found[unknown[0].name] = (*gaps[0], True)


def _perm(node: Node, rank: int) -> list[int]:
    if "perm" in node.attrs:
        return [int(p) % rank for p in node.attrs["perm"]]
    args = node.attrs.get("args")
    if args is None:
        return list(reversed(range(rank)))
    if node.op == "transpose":
        a, b = (int(d) % rank for d in args[:2])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    if not all(isinstance(d, int) for d in dims):
        raise _Unsupported("permutation not constant")
    return [int(d) % rank for d in dims]


def _reduce_axes(p: Propagation, node: Node, rank: int) -> tuple[list[int], bool]:
    if "args" in node.attrs:  # fx: mean(x, dims, keepdim)
        args, kw = node.attrs["args"], node.attrs.get("kwargs", {})
        dims = kw.get("dim", args[0] if args else None)
        keep = bool(kw.get("keepdim", args[1] if len(args) > 1 else False))
    else:
        dims = node.attrs.get("axes")
        if dims is None and "in1" in node.params:
            dims = p.view.param(node.name, "in1").tolist()
        keep = bool(node.attrs.get("keepdims", 1))
    if dims is None:
        return list(range(rank)), keep
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        raise _Unsupported("reduction axes not constant")
    return sorted(int(d) % rank for d in dims), keep


def _getitem_axes(index, in_shape: tuple) -> dict | None:
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


def _reshape_label(lab: Label, in_shape: tuple, out_shape: tuple) -> tuple[tuple, np.ndarray]:
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
        raise _Unsupported("no output axes carry the pruned channels")
    block = [in_shape[a] for a in range(lo, hi)]
    spread = lab.ids.reshape([in_shape[a] if a in lab.axes else 1 for a in range(lo, hi)])
    ids = np.broadcast_to(spread, block).reshape([out_shape[j] for j in range(olo, ohi)])
    return tuple(range(olo, ohi)), np.ascontiguousarray(ids)


def _squeeze_constant(lab: Label, uf: _UnionFind) -> Label:
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
