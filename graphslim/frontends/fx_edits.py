"""The edit vocabulary on the fx frontend: one edit -> handler table (`HANDLERS`), each handler
changing the user's own module hierarchy (new weights in place, swapped submodules in both the
user's module and the traced view). Structural edits (SliceParam, SetAttr) slice the user's
parameters in place, keep each module's size attributes (in_channels, num_features, ...) true to
its weights, and rewrite literal graph arguments (reshape sizes, split sizes).

A rewrite of a graph argument cannot reach the user's Python `forward`; after one, the model
becomes the traced GraphModule (same leaf modules and parameters, still trainable, state_dict
and pickle work), and the frontend logs that it did.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from graphslim.edits import (
    Bypass,
    Layer,
    QuantizeParam,
    QuantizeValue,
    ReplaceSubgraph,
    ReplaceWithChain,
    ScaleValue,
    SetAttr,
    SetParam,
    SliceParam,
)
from graphslim.frontends import fx_ops as ops
from graphslim.frontends import fx_quant
from graphslim.frontends.fx_modules import SlimMultiheadAttention
from graphslim.ir import Node

log = logging.getLogger(__name__)


@dataclass
class EditContext:
    """What the handlers of one `apply` share: the frontend, its fx nodes and IR nodes by name
    (as they were before the batch), and what the batch needs afterwards."""

    m: object  # the FxGraph
    nodes: dict[str, fx.Node]
    kinds: dict[str, Node]
    retrace: bool = False  # a Sequential was swapped in: trace again so the view sees it
    structural: list[fx.Node] = field(default_factory=list)  # size attributes to re-sync


def _module_called_once(c: EditContext, name: str) -> fx.Node:
    n = c.nodes[name]
    calls = [m for m in c.m.gm.graph.nodes if m.op == "call_module" and m.target == n.target]
    if n.op != "call_module" or len(calls) != 1:
        raise ValueError(f"node '{name}' is not a module called exactly once; the fx frontend "
                         "edits modules")
    return n


def _quantize_value(c: EditContext, e: QuantizeValue) -> None:
    fx_quant.quantize_value(c.m, e.value, e.scale, e.zero_point, e.dtype, e.users)
    become_graph_module(c.m, "fake-quantize nodes inserted")


def _scale_value(c: EditContext, e: ScaleValue) -> None:
    fx_quant.scale_value(c.m, e.value, e.scale, e.users)
    become_graph_module(c.m, "per-channel scales inserted")


def _structural(c: EditContext, e: SliceParam | SetAttr) -> None:
    apply_structural(c.m, c.nodes[e.node], c.kinds[e.node], e)
    c.structural.append(c.nodes[e.node])


def _replace_with_chain(c: EditContext, e: ReplaceWithChain) -> None:
    replace_with_chain(c.m, _module_called_once(c, e.node), e.layers)
    c.retrace = True


def _replace_subgraph(c: EditContext, e: ReplaceSubgraph) -> None:
    replace_subgraph(c.m, c.nodes, e)
    c.retrace = True


HANDLERS = {
    QuantizeValue: _quantize_value,
    ScaleValue: _scale_value,
    QuantizeParam: lambda c, e: fx_quant.quantize_param(c.m, c.nodes[e.node], c.kinds[e.node],
                                                        e.role, e.scale, e.axis, e.values),
    SliceParam: _structural,
    SetAttr: _structural,
    SetParam: lambda c, e: set_param(c.m, _module_called_once(c, e.node), c.kinds[e.node],
                                     e.role, e.value),
    Bypass: lambda c, e: bypass(c.m, _module_called_once(c, e.node)) if e.keep is None else
    bypass_to(c.m, c.nodes[e.node], e.keep),
    ReplaceWithChain: _replace_with_chain,
    ReplaceSubgraph: _replace_subgraph,
}
#: edits addressed by a value rather than by one existing node
GRAPH_EDITS = frozenset({QuantizeValue, ScaleValue})


def replace_with_chain(m, n: fx.Node, layers: Sequence[Layer]) -> None:
    old = m.gm.get_submodule(n.target)
    if not isinstance(old, (nn.Linear, nn.modules.conv._ConvNd)) or \
            isinstance(old, nn.modules.conv._ConvTransposeNd):
        raise ValueError(f"node '{n.name}' ({type(old).__name__}) cannot be replaced by a "
                         "layer chain")
    ref = old.weight
    chain = nn.Sequential(*(ops.make_layer(layer, old) for layer in layers)).to(
        dtype=ref.dtype, device=ref.device)
    chain.requires_grad_(ref.requires_grad)
    _swap_module(m, n.target, chain)


def replace_subgraph(m, nodes: dict[str, fx.Node], e: ReplaceSubgraph) -> None:
    """A new module (the layers in an nn.Sequential) called on `source` in place of the chain;
    the chain and what only it used (get_attr weights, shape reads) are removed."""
    chain = [nodes[name] for name in e.nodes]
    if e.source not in nodes:
        raise ValueError(f"node '{e.node}': unknown source value '{e.source}'")
    ref = next((p for p in m.gm.parameters()), None)
    mod = nn.Sequential(*(ops.make_layer(layer, None) for layer in e.layers))
    if ref is not None:
        mod = mod.to(dtype=ref.dtype, device=ref.device)
    target = m.fresh(f"{chain[0].name}_sub")
    m.gm.add_submodule(target, mod)
    with m.gm.graph.inserting_before(chain[-1]):
        new = m.gm.graph.call_module(target, (nodes[e.source],))
    chain[-1].replace_all_uses_with(new)
    m.gm.graph.eliminate_dead_code()
    become_graph_module(m, f"'{e.node}' and the nodes after it")


def set_param(m, n: fx.Node, node: Node, role: str, value: np.ndarray) -> None:
    attr = ops.ROLE_ATTRS.get(node.kind, {}).get(role, role)
    sub, _, attr = attr.rpartition(".")  # out_proj.weight of an attention module
    mod = m.gm.get_submodule(f"{n.target}.{sub}" if sub else n.target)
    old = getattr(mod, attr, None)
    ref = old if isinstance(old, torch.Tensor) else mod.weight
    new = torch.as_tensor(np.ascontiguousarray(value)).to(dtype=ref.dtype, device=ref.device)
    if attr in mod._buffers:
        setattr(mod, attr, new)
    else:
        grad = old.requires_grad if isinstance(old, nn.Parameter) else ref.requires_grad
        setattr(mod, attr, nn.Parameter(new, requires_grad=grad))


def bypass(m, n: fx.Node) -> None:
    if len(n.all_input_nodes) != 1:
        raise ValueError(f"node '{n.name}' does not have exactly one input")
    _swap_module(m, n.target, nn.Identity())
    n.replace_all_uses_with(n.all_input_nodes[0])
    m.gm.graph.erase_node(n)


def bypass_to(m, n: fx.Node, keep: str) -> None:
    """Readers of n read its input `keep`; the nodes and submodules only n used are removed
    (the model becomes the traced GraphModule: the user's forward adds the branch in Python)."""
    src = [a for a in n.all_input_nodes if a.name == keep]  # fx values are named by node
    if not src:
        raise ValueError(f"node '{n.name}' does not read '{keep}'")
    become_graph_module(m, f"residual branch of '{n.name}' dropped")
    n.replace_all_uses_with(src[0])
    m.gm.graph.erase_node(n)
    m.gm.graph.eliminate_dead_code()
    m.gm.delete_all_unused_submodules()
    for user in src[0].users:  # an in-place op (ReLU(inplace=True)) that read the add's fresh
        if user.op == "call_module":  # sum now writes a tensor others read: autograd refuses
            mod = m.gm.get_submodule(user.target)
            if getattr(mod, "inplace", False):
                mod.inplace = False
        elif user.kwargs.get("inplace"):
            user.kwargs = {**user.kwargs, "inplace": False}


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
