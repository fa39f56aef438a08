"""Structural edits (SliceParam, SetAttr) on the fx frontend: slice the user's own parameters in
place, keep each module's size attributes (in_channels, num_features, ...) true to its weights,
and rewrite literal graph arguments (reshape sizes, split sizes).

A rewrite of a graph argument cannot reach the user's Python `forward`; after one, the model
becomes the traced GraphModule (same leaf modules and parameters, still trainable, state_dict
and pickle work), and the frontend logs that it did.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import fx, nn

from graphslim.edits import SetAttr, SliceParam
from graphslim.frontends import fx_ops as ops
from graphslim.frontends.fx_modules import SlimMultiheadAttention
from graphslim.ir import Node

log = logging.getLogger(__name__)


def apply_structural(m, n: fx.Node, node: Node, e: SliceParam | SetAttr) -> None:
    if n.op == "call_module" and isinstance(m.gm.get_submodule(n.target), nn.MultiheadAttention):
        _swap_module(m, n.target, SlimMultiheadAttention.from_torch(
            m.gm.get_submodule(n.target)))
    if isinstance(e, SliceParam):
        _slice_param(m, n, node, e)
    elif e.name in ("groups", "num_groups", "num_heads") and n.op == "call_module":
        setattr(m.gm.get_submodule(n.target), e.name, int(e.value))
    elif e.name == "shape" and n.op in ("call_method", "call_function"):
        if _set_reshape_sizes(n, e.value):
            become_graph_module(m, f"reshape sizes of '{n.name}'")
    elif e.name == "split" and n.op in ("call_method", "call_function"):
        if _still_even_chunks(n, e.value):
            return
        n.target = "split" if n.op == "call_method" else torch.split
        n.args = (n.args[0], [int(s) for s in e.value], *n.args[2:])
        become_graph_module(m, f"split sizes of '{n.name}'")
    else:
        raise ValueError(f"node '{n.name}' has no settable attribute '{e.name}'")


def _slice_param(m, n: fx.Node, node: Node, e: SliceParam) -> None:
    keep = torch.as_tensor(np.asarray(e.keep, dtype=np.int64))
    if n.op == "call_module":
        attr = ops.ROLE_ATTRS.get(node.kind, {}).get(e.role, e.role)
        sub, _, attr = attr.rpartition(".")  # out_proj.weight of an attention module
        owners = [m.gm.get_submodule(f"{n.target}.{sub}" if sub else n.target)]
    elif n.op == "get_attr":
        path, _, attr = n.target.rpartition(".")
        owners = [root.get_submodule(path) if path else root for root in (m.module, m.gm)]
    else:
        raise ValueError(f"node '{n.name}' holds no parameter")
    old = getattr(owners[0], attr)
    with torch.no_grad():
        data = old.detach().index_select(e.axis, keep.to(old.device)).clone()
    for owner in dict.fromkeys(owners):
        if attr in owner._buffers:
            owner._buffers[attr] = data
        else:
            grad = old.requires_grad if isinstance(old, nn.Parameter) else False
            setattr(owner, attr, nn.Parameter(data, requires_grad=grad))


def sync_modules(m, touched: list[fx.Node]) -> None:
    """Make size attributes describe the (sliced) weights, so repr, re-init and export agree."""
    for n in touched:
        if n.op != "call_module":
            continue
        mod = m.gm.get_submodule(n.target)
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            mod.in_channels, mod.out_channels = mod.weight.shape[0], \
                mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.modules.conv._ConvNd):
            mod.out_channels, mod.in_channels = mod.weight.shape[0], \
                mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, (nn.modules.batchnorm._BatchNorm,
                              nn.modules.instancenorm._InstanceNorm)):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            if ref is not None:
                mod.num_features = ref.shape[0]
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
            mod.num_channels = mod.weight.shape[0]
        elif isinstance(mod, nn.PReLU):
            mod.num_parameters = mod.weight.shape[0]
        elif isinstance(mod, SlimMultiheadAttention):
            mod.sync()


def _set_reshape_sizes(n: fx.Node, sizes: dict) -> bool:
    """Rewrite literal target sizes of a view/reshape on pruned axes; sizes computed from the
    tensor at run time (size() nodes) and -1 follow the pruned size by themselves."""
    args = list(n.args)
    packed = len(args) == 2 and isinstance(args[1], (list, tuple))
    dims = list(args[1]) if packed else args[1:]
    changed = False
    for axis, size in sizes.items():
        if isinstance(dims[axis], int) and dims[axis] != -1 and dims[axis] != size:
            dims[axis] = int(size)
            changed = True
    n.args = (args[0], type(args[1])(dims)) if packed else (args[0], *dims)
    return changed


def _still_even_chunks(n: fx.Node, sizes) -> bool:
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name == "chunk" and len(set(sizes)) == 1 and n.args[1] == len(sizes)


def _swap_module(m, target: str, new: nn.Module) -> None:
    for root in dict.fromkeys((m.module, m.gm)):
        parent_name, _, attr = target.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, new)
    log.info("fx: '%s' became a %s", target, type(new).__name__)


def become_graph_module(m, why: str) -> None:
    if m.module is not m.gm:
        log.info("fx: %s rewritten in the graph; the model is now the traced GraphModule", why)
        m.module = m.gm
