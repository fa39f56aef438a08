"""Per-op propagation rules of ChannelDeps (see graphslim/analyses/channels.py for the model):
the driver, the broadcasting union, weighted layers, norms and attention; the weightless layout
ops are in channel_layout.py, activation matmuls in channel_matmul.py.

One walk in topological order: each rule reads its inputs' labels, unites ids that must go
together, records the sites a pruning must rewrite, and labels its outputs. A rule that meets
something it cannot model blocks the ids involved with a reason; it never guesses.
"""

from __future__ import annotations

import numpy as np

from graphslim.analyses.channel_layout import LayoutRules, Pieces
from graphslim.analyses.channel_matmul import matmul_rule
from graphslim.analyses.channel_types import (
    ChannelDeps,
    GroupCountSite,
    Label,
    Operand,
    ParamSite,
    UnionFind,
    Unsupported,
)
from graphslim.ir import GraphView, Node, OpKind

_ELEMENTWISE = {OpKind.ACTIVATION, OpKind.ELEMENTWISE, OpKind.ADD, OpKind.SUB, OpKind.MUL,
                OpKind.DIV, OpKind.IDENTITY}


class Propagation(LayoutRules):
    def __init__(self, view: GraphView, shapes: dict, heads: bool):
        self.view, self.shapes, self.heads = view, shapes, heads
        self.uf = UnionFind()
        self.labels: dict[str, Label | Pieces | None] = {}
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
            OpKind.GATHER: self.slice, OpKind.EXPAND: self.expand,
            OpKind.CONV_TRANSPOSE: self.conv_transpose, OpKind.ATTENTION: self.attention,
        }
        for kind in _ELEMENTWISE:
            rules[kind] = self.elementwise
        creates = (OpKind.CONV, OpKind.LINEAR, OpKind.CONV_TRANSPOSE, OpKind.CONSTANT)
        for node in self.view.nodes():
            if node.kind not in creates and not any(  # nothing prunable or sliceable flows in
                    self.labels.get(v) is not None or v in self.const_of for v in node.inputs):
                for v in node.outputs:
                    self.labels[v] = None
                continue
            rule = rules.get(node.kind)
            if rule is None:
                reason = node.attrs.get("reason", f"{node.kind.value} op {node.describe()}")
                self.block_inputs(node, f"{node.name}: {reason}")
                continue
            try:
                rule(node)
            except Unsupported as exc:
                self.block_inputs(node, f"{node.describe()}: {exc}")
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
        if isinstance(lab, Pieces):
            raise Unsupported("uses a split's tuple directly")
        return lab

    def shape(self, value: str) -> tuple:
        s = self.shapes.get(value)
        if s is None or not all(isinstance(d, int) for d in s):
            raise Unsupported(f"shape of '{value}' unknown")
        return tuple(s)

    def block(self, ids, reason: str) -> None:
        self.blocked.append((np.asarray(ids), reason))

    def block_inputs(self, node: Node, reason: str) -> None:
        for v in node.inputs:
            lab = self.labels.get(v)
            labs = lab.labels if isinstance(lab, Pieces) else [lab]
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
    def align(shape: tuple, lab: Label | None, rank: int, const) -> Operand:
        off = rank - len(shape)
        if off < 0:
            raise Unsupported("operand of higher rank than the output")
        lab = None if lab is None else Label(tuple(a + off for a in lab.axes), lab.ids)
        const = None if const is None else (*const, len(shape))
        return Operand((1,) * off + tuple(shape), lab, const)

    # --- the union core: broadcasting operands ----------------------------------------------
    def union(self, node: Node, ops: list[Operand], skip_axis: int | None = None
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
                    raise Unsupported("labelled axis sizes disagree")
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
                self.block(J, f"{node.describe()} combines the channels with a tensor of "
                              "fixed size")
        assert rank == len(ops[-1].shape)
        return Label(tuple(joint), J)

    def const_label(self, o: Operand, axis: int, joint: list, sizes: list, J) -> None:
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
            raise Unsupported("grouped transposed conv")
        if lab is not None:
            if lab.axes != (1,):
                raise Unsupported(f"input label spans axes {lab.axes}")
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
            raise Unsupported("only packed self-attention is modelled")
        x = ins[0]
        lab, rank = self.label(x), len(self.shape(x))
        heads, inner = int(node.attrs["num_heads"]), int(node.attrs["inner_dim"])
        if lab is not None:
            if lab.axes != (rank - 1,):
                raise Unsupported(f"input label spans axes {lab.axes}")
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
        self.labels[node.output] = Pieces([Label((rank - 1,), out), None])

    # --- rules: norms ----------------------------------------------------------------------------
    def channel_norm(self, node: Node) -> None:
        lab = self.label(node.inputs[0])
        if lab is not None and 1 in lab.axes:
            if lab.axes != (1,):
                raise Unsupported(f"label spans axes {lab.axes}")
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
            raise Unsupported(f"label spans axes {lab.axes}")
        groups = int(node.attrs.get("num_groups", 0))
        if groups <= 0 or len(lab.ids) % groups:
            raise Unsupported("unknown group count")
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
            raise Unsupported("functional layer_norm with weights passed as tensors")
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
                raise Unsupported("LayerNorm over several labelled axes")
            for role in ("scale", "bias"):
                if role in node.params:
                    self.sites.append(ParamSite(node.name, role, 0, lab.ids))
            self.inexact.append((lab.ids, f"{node.name}: LayerNorm normalizes over the pruned "
                                          "channels (their removal changes its statistics)"))
        self.set_out(node, lab)

    # --- rules: elementwise, concat, split, slice -----------------------------------------------
    def elementwise(self, node: Node) -> None:
        out = node.output
        if out not in self.shapes:
            raise Unsupported("output is not a tensor")
        rank = len(self.shape(out))
        ops = [self.align(s, lab, rank, c) for s, lab, c in self.operands(node)]
        self.set_out(node, self.union(node, ops))

    def matmul(self, node: Node) -> None:
        matmul_rule(self, node)
