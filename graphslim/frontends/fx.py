"""torch.fx frontend: trace the user's module, view it, apply edits inside its own hierarchy.

The traced GraphModule is only a view: it holds the very same leaf modules as the user's module, so
an edit that changes a module in place (a new weight) shows in both, and an edit that swaps a module
(BN -> Identity) is made in both hierarchies. The result is the user's own model, still trainable
and saveable. torch is imported here only, so ONNX-only users never need it.

Tracing: `torch.fx.symbolic_trace`; where that fails inside a submodule, the submodule becomes an
opaque leaf and tracing is retried (the report says which modules were made leaves).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np

from graphslim.edits import Bypass, Edit, Layer, ReplaceWithChain, SetParam
from graphslim.errors import InputError, StructureError
from graphslim.frontends.base import Frontend, TensorSpec
from graphslim.ir import GraphView, Node, OpKind

try:
    import torch
    from torch import fx, nn
    from torch.fx.passes.shape_prop import ShapeProp
except ImportError as _exc:  # pragma: no cover - exercised only without torch
    raise ImportError("the torch frontend needs torch: pip install 'graphslim[torch]'") from _exc

log = logging.getLogger(__name__)

_MODULE_KINDS: list[tuple[type, OpKind]] = [
    (nn.modules.conv._ConvTransposeNd, OpKind.CONV_TRANSPOSE),
    (nn.modules.conv._ConvNd, OpKind.CONV),
    (nn.Linear, OpKind.LINEAR),
    (nn.modules.batchnorm._BatchNorm, OpKind.BATCHNORM),
    (nn.LayerNorm, OpKind.LAYERNORM), (nn.GroupNorm, OpKind.GROUPNORM),
    (nn.modules.instancenorm._InstanceNorm, OpKind.INSTANCENORM),
    (nn.MultiheadAttention, OpKind.ATTENTION),
    (nn.modules.pooling._AvgPoolNd, OpKind.POOL_AVG),
    (nn.modules.pooling._MaxPoolNd, OpKind.POOL_MAX),
    (nn.modules.pooling._AdaptiveAvgPoolNd, OpKind.POOL_AVG),
    (nn.modules.pooling._AdaptiveMaxPoolNd, OpKind.POOL_MAX),
    (nn.Flatten, OpKind.FLATTEN), (nn.Softmax, OpKind.SOFTMAX),
    (nn.Identity, OpKind.IDENTITY), (nn.modules.dropout._DropoutNd, OpKind.IDENTITY),
    (nn.ReLU, OpKind.ACTIVATION), (nn.ReLU6, OpKind.ACTIVATION), (nn.SiLU, OpKind.ACTIVATION),
    (nn.GELU, OpKind.ACTIVATION), (nn.Hardswish, OpKind.ACTIVATION),
    (nn.Hardsigmoid, OpKind.ACTIVATION), (nn.Sigmoid, OpKind.ACTIVATION),
    (nn.Tanh, OpKind.ACTIVATION), (nn.LeakyReLU, OpKind.ACTIVATION), (nn.ELU, OpKind.ACTIVATION),
    (nn.Mish, OpKind.ACTIVATION), (nn.PReLU, OpKind.ACTIVATION), (nn.Hardtanh, OpKind.ACTIVATION),
]
_LEAF_TYPES = tuple(t for t, _ in _MODULE_KINDS)
_FUNCTION_KINDS = {
    "add": OpKind.ADD, "iadd": OpKind.ADD, "sub": OpKind.SUB, "mul": OpKind.MUL,
    "imul": OpKind.MUL, "truediv": OpKind.DIV, "div": OpKind.DIV, "cat": OpKind.CONCAT,
    "concat": OpKind.CONCAT, "flatten": OpKind.FLATTEN, "reshape": OpKind.RESHAPE,
    "view": OpKind.RESHAPE, "permute": OpKind.TRANSPOSE, "transpose": OpKind.TRANSPOSE,
    "relu": OpKind.ACTIVATION, "relu6": OpKind.ACTIVATION, "silu": OpKind.ACTIVATION,
    "gelu": OpKind.ACTIVATION, "hardswish": OpKind.ACTIVATION, "hardsigmoid": OpKind.ACTIVATION,
    "sigmoid": OpKind.ACTIVATION, "tanh": OpKind.ACTIVATION, "softmax": OpKind.SOFTMAX,
    "adaptive_avg_pool2d": OpKind.POOL_GLOBAL_AVG, "avg_pool2d": OpKind.POOL_AVG,
    "max_pool2d": OpKind.POOL_MAX, "dropout": OpKind.IDENTITY, "contiguous": OpKind.IDENTITY,
    "matmul": OpKind.MATMUL, "bmm": OpKind.MATMUL, "layer_norm": OpKind.LAYERNORM,
    "mean": OpKind.REDUCE, "chunk": OpKind.SPLIT, "split": OpKind.SPLIT,
    "getitem": OpKind.SLICE, "size": OpKind.SHAPE, "getattr": OpKind.SHAPE, "pad": OpKind.PAD,
    "interpolate": OpKind.RESIZE, "linear": OpKind.MATMUL, "einsum": OpKind.MATMUL,
}
_ROLE_ATTRS = {
    OpKind.BATCHNORM: {"scale": "weight", "bias": "bias", "mean": "running_mean",
                       "var": "running_var"},
    OpKind.LAYERNORM: {"scale": "weight", "bias": "bias"},
    OpKind.GROUPNORM: {"scale": "weight", "bias": "bias"},
}


class _LeafTracer(fx.Tracer):
    """symbolic_trace's tracer, plus user-chosen leaves, remembering which submodule failed."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed: str | None = None

    def is_leaf_module(self, m, qualname):
        """Leaves: user-given and failed modules, the module types graphslim models, and torch.nn
        modules without children. torch.nn containers (TransformerEncoderLayer, ...) are traced
        into, so the layers inside them are visible to passes."""
        if qualname in self.leaves or isinstance(m, _LEAF_TYPES):
            return True
        return super().is_leaf_module(m, qualname) and not any(True for _ in m.children())

    def call_module(self, m, forward, args, kwargs):
        qual = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None and qual:
                self.failed = qual
            raise


def _trace(module: nn.Module, leaves: set[str]) -> fx.GraphModule:
    leaves = set(leaves)
    for _ in range(200):
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(module)
        except Exception as exc:
            if tracer.failed is None or tracer.failed in leaves:
                raise InputError(f"torch.fx cannot trace {type(module).__name__}: "
                                 f"{type(exc).__name__}: {exc}") from None
            log.warning("fx: tracing failed inside '%s' (%s); treating it as an opaque leaf",
                        tracer.failed, exc)
            leaves.add(tracer.failed)
            continue
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        gm.meta["graphslim_leaves"] = sorted(leaves)
        return gm
    raise InputError(f"torch.fx cannot trace {type(module).__name__}: too many failing submodules")


def trace(module: nn.Module, example_inputs, leaf_modules: Sequence[str] = ()) -> FxGraph:
    """View a torch module as a graph. `example_inputs`: a tensor or tuple of tensors."""
    if not isinstance(module, nn.Module):
        raise InputError(f"trace() needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return FxGraph(module, tuple(example_inputs), leaves=set(leaf_modules))


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


class _eval_mode:
    """Temporarily put a module in eval mode (verification must not update BN statistics)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.flags = {m: m.training for m in self.module.modules()}
        self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags.items():
            m.training = flag


class _ShapeAndFlopProp(ShapeProp):
    """ShapeProp that also counts, with torch's flop counter, the MACs of opaque nodes. The math
    SDPA kernel is forced there because the flop counter does not count CPU flash attention."""

    def __init__(self, gm: fx.GraphModule, opaque: set[str]):
        super().__init__(gm)
        self.opaque = opaque
        self.macs: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        if n.name not in self.opaque:
            return super().run_node(n)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.macs[n.name] = counter.get_total_flops() // 2
        return result


class FxView(GraphView):
    frontend = "fx"

    def __init__(self, nodes, inputs, outputs, param_users, tensors):
        super().__init__(nodes, inputs, outputs, param_users)
        self._tensors = tensors

    def _read_param(self, node: Node, role: str) -> np.ndarray:
        return self._tensors[node.params[role]].detach().cpu().float().numpy()

    def _param_info(self, node: Node, role: str):
        t = self._tensors[node.params[role]]
        return tuple(t.shape), np.dtype(str(t.dtype).replace("torch.", ""))


class FxGraph(Frontend):
    name = "fx"

    def __init__(self, module: nn.Module, example_inputs: tuple, leaves: set[str] = frozenset()):
        self.module = module
        self.example_inputs = example_inputs
        self.gm = _trace(module, set(leaves))
        self.traced_with = "torch.fx.symbolic_trace"
        if self.gm.meta["graphslim_leaves"]:
            self.traced_with += f" (opaque leaves: {', '.join(self.gm.meta['graphslim_leaves'])})"
        self._version = 0
        self._cache: dict[str, object] = {}

    @property
    def version(self) -> int:
        return self._version

    def copy(self) -> FxGraph:
        return FxGraph(copy.deepcopy(self.module), self.example_inputs,
                       set(self.gm.meta["graphslim_leaves"]))

    # --- view ------------------------------------------------------------------------------------
    def view(self) -> FxView:
        if "view" not in self._cache:
            self._cache["view"] = self._build_view()
        return self._cache["view"]

    def _build_view(self) -> FxView:
        nodes, inputs, outputs = [], [], []
        tensors: dict[str, torch.Tensor] = {}
        users_by_id: dict[int, list[str]] = {}
        keys_by_id: dict[int, list[str]] = {}
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                inputs.append(n.name)
                continue
            if n.op == "output":
                outputs.extend(_output_names(n))
                continue
            kind, attrs, params = self._classify(n)
            for _role, (key, tensor) in params.items():
                tensors[key] = tensor
                users_by_id.setdefault(id(tensor), []).append(n.name)
                keys_by_id.setdefault(id(tensor), []).append(key)
            nodes.append(Node(n.name, kind, _op_name(n), tuple(a.name for a in n.all_input_nodes),
                              (n.name,), {r: k for r, (k, _) in params.items()}, attrs))
        param_users = {}
        for tid, keys in keys_by_id.items():
            for key in keys:
                param_users[key] = tuple(dict.fromkeys(users_by_id[tid]))
        return FxView(nodes, inputs, outputs, param_users, tensors)

    def _classify(self, n: fx.Node) -> tuple[OpKind, dict, dict]:
        if n.op == "get_attr":
            return OpKind.CONSTANT, {}, {"value": (n.target, _get_attr(self.gm, n.target))}
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            kind = next((k for t, k in _MODULE_KINDS if isinstance(mod, t)), OpKind.OPAQUE)
            roles = _ROLE_ATTRS.get(kind)
            params = {}
            leaf_params = [*mod.named_parameters(), *mod.named_buffers()]
            for attr, t in leaf_params:
                if t is None or not t.is_floating_point():
                    continue
                role = attr if roles is None else next((r for r, a in roles.items() if a == attr),
                                                       None)
                if role is not None:
                    params[role] = (f"{n.target}.{attr}", t)
            attrs = _module_attrs(mod, kind)
            if kind is OpKind.OPAQUE:
                attrs["reason"] = f"module type {type(mod).__name__} is not modelled by graphslim"
            attrs["target"] = n.target
            return kind, attrs, params
        name = getattr(n.target, "__name__", str(n.target))
        kind = _FUNCTION_KINDS.get(name, OpKind.OPAQUE)
        attrs = {"fn": name, **_function_attrs(n, kind)}
        if kind is OpKind.OPAQUE:
            attrs["reason"] = f"function {name} is not modelled by graphslim"
        return kind, attrs, {}

    # --- edits -----------------------------------------------------------------------------------
    def apply(self, edits: Sequence[Edit]) -> int:
        nodes = {n.name: n for n in self.gm.graph.nodes}
        kinds = {n.name: n for n in self.view().nodes()}
        touched: set[str] = set()
        retrace = False
        for e in edits:
            if e.node not in nodes:
                raise KeyError(f"edit {type(e).__name__} names unknown node '{e.node}'")
            n = nodes[e.node]
            calls = [m for m in self.gm.graph.nodes
                     if m.op == "call_module" and m.target == n.target]
            if n.op != "call_module" or len(calls) != 1:
                raise ValueError(f"node '{e.node}' is not a module called exactly once; the fx "
                                 "frontend edits modules")
            if isinstance(e, SetParam):
                self._set_param(n, kinds[e.node], e.role, e.value)
            elif isinstance(e, Bypass):
                self._bypass(n)
            elif isinstance(e, ReplaceWithChain):
                self._replace_with_chain(n, e.layers)
                retrace = True
            else:
                raise TypeError(f"the fx frontend cannot apply {type(e).__name__}")
            touched.add(e.node)
        if edits:
            self.gm.graph.lint()
            self.gm.recompile()
            if retrace:  # swapped-in Sequentials are traced through, so the view sees the chain
                self.gm = _trace(self.module, set(self.gm.meta["graphslim_leaves"]))
            self._version += 1
            self._cache.clear()
        return len(touched)

    def _replace_with_chain(self, n: fx.Node, layers: Sequence[Layer]) -> None:
        old = self.gm.get_submodule(n.target)
        if not isinstance(old, (nn.Linear, nn.modules.conv._ConvNd)) or \
                isinstance(old, nn.modules.conv._ConvTransposeNd):
            raise ValueError(f"node '{n.name}' ({type(old).__name__}) cannot be replaced by a "
                             "layer chain")
        ref = old.weight
        chain = nn.Sequential(*(_make_layer(layer, old) for layer in layers)).to(
            dtype=ref.dtype, device=ref.device)
        chain.requires_grad_(ref.requires_grad)
        _set_submodule(self.module, n.target, chain)
        _set_submodule(self.gm, n.target, chain)

    def _set_param(self, n: fx.Node, node: Node, role: str, value: np.ndarray) -> None:
        mod = self.gm.get_submodule(n.target)
        attr = _ROLE_ATTRS.get(node.kind, {}).get(role, role)
        old = getattr(mod, attr, None)
        ref = old if isinstance(old, torch.Tensor) else mod.weight
        new = torch.as_tensor(np.ascontiguousarray(value)).to(dtype=ref.dtype, device=ref.device)
        if attr in mod._buffers:
            setattr(mod, attr, new)
        else:
            grad = old.requires_grad if isinstance(old, nn.Parameter) else ref.requires_grad
            setattr(mod, attr, nn.Parameter(new, requires_grad=grad))

    def _bypass(self, n: fx.Node) -> None:
        if len(n.all_input_nodes) != 1:
            raise ValueError(f"node '{n.name}' does not have exactly one input")
        _set_submodule(self.module, n.target, nn.Identity())
        _set_submodule(self.gm, n.target, nn.Identity())
        n.replace_all_uses_with(n.all_input_nodes[0])
        self.gm.graph.erase_node(n)

    # --- run, check, export ----------------------------------------------------------------------
    def input_specs(self) -> list[TensorSpec]:
        names = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        return [TensorSpec(name, tuple(t.shape), np.dtype(str(t.dtype).replace("torch.", "")))
                for name, t in zip(names, self.example_inputs)]

    def _forward(self, fn, feeds: dict[str, np.ndarray] | None):
        args = self.example_inputs if feeds is None else tuple(
            torch.as_tensor(feeds[s.name]) for s in self.input_specs())
        with torch.no_grad(), _eval_mode(self.module):
            return _flatten(fn(*args))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._forward(self.module, feeds)
        return {f"output{i}": t.detach().cpu().numpy() for i, t in enumerate(outs)}

    def capture(self, feeds: dict[str, np.ndarray], values: list[str]) -> dict[str, np.ndarray]:
        wanted, got = set(values), {}

        class _Recorder(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name in wanted and isinstance(out, torch.Tensor):
                    got[n.name] = out.detach().cpu().numpy()
                return out

        args = [torch.as_tensor(feeds[s.name]) for s in self.input_specs()]
        with torch.no_grad(), _eval_mode(self.module):
            _Recorder(self.gm).run(*args)
        return got

    def check(self) -> None:
        try:
            self.gm.graph.lint()
            ref = self._forward(self.module, None)
            got = self._forward(self.gm, None)
        except Exception as exc:
            raise StructureError(f"fx graph fails lint or forward: {type(exc).__name__}: {exc}") \
                from None
        if len(ref) != len(got) or any(
                not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ref, got)):
            raise StructureError("the traced graph and the module's own forward disagree")

    def infer_shapes(self) -> dict[str, tuple]:
        opaque = {n.name for n in self.view().nodes() if n.kind is OpKind.OPAQUE}
        prop = _ShapeAndFlopProp(self.gm, opaque)
        with torch.no_grad(), _eval_mode(self.module):
            prop.propagate(*self.example_inputs)
        self._cache["opaque_macs"] = prop.macs
        shapes = {}
        for n in self.gm.graph.nodes:
            meta = n.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                shapes[n.name] = tuple(int(d) for d in meta.shape)
        return shapes

    def opaque_macs(self) -> dict[str, int]:
        """MACs of nodes graphslim does not model (e.g. swin's fx-wrapped window attention),
        counted by torch's FlopCounterMode while shapes propagate."""
        if "opaque_macs" not in self._cache:
            self.infer_shapes()
        return self._cache["opaque_macs"]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in [*self.module.parameters(), *self.module.buffers()])

    def save(self, path: str) -> None:
        """Pickle the whole module: after structural edits its shapes differ from the class's."""
        torch.save(self.module, path)

    def to_onnx(self, path: str, opset: int = 17) -> None:
        names = [s.name for s in self.input_specs()]
        with _eval_mode(self.module):
            torch.onnx.export(self.module, self.example_inputs, path, input_names=names,
                              opset_version=opset, dynamo=False)


def _function_attrs(n: fx.Node, kind: OpKind) -> dict:
    """Literal arguments that matter to passes (concat axis, flatten start)."""
    if kind is OpKind.CONCAT:
        return {"axis": n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)}
    if kind is OpKind.FLATTEN:
        return {"axis": n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)}
    if kind is OpKind.MATMUL and isinstance(n.args[0], str):
        return {"equation": n.args[0]}
    return {}


def _make_layer(layer: Layer, like: nn.Module) -> nn.Module:
    """An nn.Conv*/nn.Linear holding `layer`'s weights (padding mode inherited from `like`)."""
    w = torch.as_tensor(np.ascontiguousarray(layer.weight), dtype=torch.float32)
    b = None if layer.bias is None else torch.as_tensor(np.ascontiguousarray(layer.bias),
                                                        dtype=torch.float32)
    if layer.kind is OpKind.LINEAR:
        mod = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        nd = w.ndim - 2
        pads = tuple(layer.pads or (0,) * 2 * nd)
        if pads[:nd] != pads[nd:]:
            raise ValueError(f"asymmetric padding {pads} cannot be expressed by nn.Conv{nd}d")
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        mode = getattr(like, "padding_mode", "zeros") if any(pads) else "zeros"
        mod = cls(w.shape[1] * layer.groups, w.shape[0], tuple(w.shape[2:]),
                  stride=tuple(layer.strides or (1,) * nd), padding=pads[:nd],
                  dilation=tuple(layer.dilations or (1,) * nd), groups=layer.groups,
                  bias=b is not None, padding_mode=mode)
    with torch.no_grad():
        mod.weight.copy_(w)
        if b is not None:
            mod.bias.copy_(b)
    return mod


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _output_names(n: fx.Node) -> list[str]:
    names: list[str] = []
    fx.node.map_arg(n.args, lambda a: names.append(a.name))
    return names


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


def _op_name(n: fx.Node) -> str:
    if n.op == "call_module":
        return type(n.graph.owning_module.get_submodule(n.target)).__name__
    if n.op == "get_attr":
        return "get_attr"
    return getattr(n.target, "__name__", str(n.target))


def _pair(v, nd: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _module_attrs(mod: nn.Module, kind: OpKind) -> dict:
    if kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE):
        nd = len(mod.kernel_size)
        if isinstance(mod.padding, str):
            pads = (0,) * 2 * nd if mod.padding == "valid" else None
        else:
            pads = tuple(mod.padding) * 2
        attrs = {"groups": mod.groups, "kernel_shape": tuple(mod.kernel_size),
                 "strides": tuple(mod.stride), "dilations": tuple(mod.dilation), "pads": pads,
                 "auto_pad": "NOTSET" if pads is not None else "SAME_UPPER",
                 "padding_mode": getattr(mod, "padding_mode", "zeros")}
        if kind is OpKind.CONV_TRANSPOSE:
            attrs["output_padding"] = tuple(mod.output_padding)
        return attrs
    if kind is OpKind.BATCHNORM:
        training = mod.training or not mod.track_running_stats or mod.running_mean is None
        return {"eps": float(mod.eps), "training": bool(training)}
    if kind in (OpKind.POOL_AVG, OpKind.POOL_MAX) and not hasattr(mod, "kernel_size"):
        return {"adaptive": True, "output_size": mod.output_size}
    if kind is OpKind.POOL_AVG:
        nd = 2
        return {"kernel_shape": _pair(mod.kernel_size, nd), "strides": _pair(mod.stride, nd),
                "pads": _pair(mod.padding, nd) * 2,
                "count_include_pad": int(getattr(mod, "count_include_pad", True)),
                "divisor_override": getattr(mod, "divisor_override", None)}
    if kind is OpKind.ATTENTION:
        return {"embed_dim": mod.embed_dim, "num_heads": mod.num_heads,
                "kdim": mod.kdim, "vdim": mod.vdim, "batch_first": mod.batch_first}
    if kind is OpKind.ACTIVATION:
        return {"fn": type(mod).__name__}
    return {}


__all__ = ["FxGraph", "trace"]
