"""ChannelDeps rule for a matmul of two activations (attention's q @ k^T and attn @ v).

A [..., M, K] @ B [..., K, N] is seen on virtual axes (batch..., M, N, K): A has size 1 on N and
B size 1 on M, so the broadcasting union of channels.py applies unchanged. Batch axes unite (head
h of q goes with head h of k), K unites A's and B's contraction channels (head dims of q and k).
K does not reach the output: where a label covers batch axes and K, the output's batch axes are
labelled only if units are whole along K (`heads=True`: tie along K, so whole heads go), else the
label is tied along the batch axes (the same head dims go from every head) and the output's batch
axes stay fixed.
"""

from __future__ import annotations

from graphslim.analyses.channel_types import Label, Operand, Unsupported
from graphslim.ir import Node


def _virtual(shape: tuple, lab: Label | None, out_rank: int, left: bool) -> Operand:
    r = len(shape)
    if r < 2:
        raise Unsupported("matmul of a vector")
    batch = (1,) * (out_rank - r) + tuple(shape[:-2])
    m, k, n = (shape[-2], shape[-1], 1) if left else (1, shape[-2], shape[-1])
    vshape = (*batch, m, n, k)
    if lab is None:
        return Operand(vshape, None, None)
    k_axis, own = (r - 1, r - 2) if left else (r - 2, r - 1)
    if k_axis in lab.axes and own in lab.axes:
        raise Unsupported("one operand's label covers both its contraction and output axes")

    def move(a: int) -> int:
        if a == k_axis:
            return out_rank
        if a == own:
            return out_rank - 2 if left else out_rank - 1
        return a + out_rank - r

    axes = [move(a) for a in lab.axes]
    order = sorted(range(len(axes)), key=axes.__getitem__)
    return Operand(vshape, Label(tuple(sorted(axes)), lab.ids.transpose(order)), None)


def matmul_rule(p, node: Node) -> None:
    if node.attrs.get("form") in ("einsum", "linear") or "equation" in node.attrs:
        raise Unsupported("einsum / functional linear on pruned channels")
    operands = p.operands(node)
    if len(operands) != 2:
        raise Unsupported("matmul with other than two operands")
    out_rank = len(p.shape(node.output))
    (sa, la, _), (sb, lb, _) = operands
    ops = [_virtual(sa, la, out_rank, True), _virtual(sb, lb, out_rank, False)]
    joint = p.union(node, ops)
    if joint is None:
        p.set_out(node, None)
        return
    k = out_rank
    axes, ids = list(joint.axes), joint.ids
    if k not in axes:
        p.set_out(node, Label(tuple(axes), ids))
        return
    batch = [a for a in axes if a < out_rank - 2]
    rest = [a for a in axes if a >= out_rank - 2 and a != k]
    if rest:
        raise Unsupported("contraction channels and output channels in one label")
    if batch and p.heads:
        p.uf.tie(ids, axes.index(k))
        p.set_out(node, Label(tuple(batch), ids.take(0, axis=axes.index(k))))
        return
    for b in batch:
        p.uf.tie(ids, axes.index(b))
    p.set_out(node, None)
