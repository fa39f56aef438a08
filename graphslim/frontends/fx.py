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

from graphslim.edits import (
    Bypass,
    Edit,
    Layer,
    QuantizeParam,
    QuantizeValue,
    ReplaceSubgraph,
    ReplaceWithChain,
    SetAttr,
    SetParam,
    SliceParam,
)
from graphslim.errors import InputError, StructureError
from graphslim.frontends.base import Frontend, TensorSpec, saving_to
from graphslim.ir import GraphView, Node, OpKind

try:
    import torch
    from torch import fx, nn
    from torch.fx.passes.shape_prop import ShapeProp

    from graphslim.frontends import fx_edits, fx_quant
    from graphslim.frontends import fx_ops as ops
except ImportError as _exc:  # pragma: no cover - exercised only without torch
    raise ImportError("the torch frontend needs torch: pip install 'graphslim[torch]'") from _exc

log = logging.getLogger(__name__)


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
        if qualname in self.leaves or isinstance(m, ops.LEAF_TYPES):
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


def _constant_args(module: nn.Module, n_inputs: int) -> dict:
    """forward's parameters past the example inputs whose defaults are not tensors (flags such
    as `embed=False`, scales, modes): bound to their defaults as constants, as a user calling
    module(x) gets them, so Python control flow on them traces."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    bound = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if not isinstance(p.default, torch.Tensor):
            bound[p.name] = p.default
    return bound


def _trace(module: nn.Module, leaves: set[str], n_inputs: int | None = None) -> fx.GraphModule:
    leaves = set(leaves)
    concrete = _constant_args(module, n_inputs) if n_inputs is not None else {}
    if concrete:
        log.info("fx: %s bound to their defaults as constants",
                 ", ".join(f"{k}={v!r}" for k, v in concrete.items()))
    for _ in range(200):
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(module, concrete_args=concrete or None)
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
    has_gradients = True

    def __init__(self, module: nn.Module, example_inputs: tuple, leaves: set[str] = frozenset()):
        self.module = module
        self.example_inputs = example_inputs
        self.gm = _trace(module, set(leaves), len(example_inputs))
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
            args = tuple(a.name for a in n.all_input_nodes)
            nodes.append(Node(n.name, kind, ops.op_name(n), args, (n.name,),
                              {r: k for r, (k, _) in params.items()}, attrs))
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
            kind = next((k for t, k in ops.MODULE_KINDS if isinstance(mod, t)), OpKind.OPAQUE)
            roles = ops.ROLE_ATTRS.get(kind)
            params = {}
            leaf_params = [*mod.named_parameters(), *mod.named_buffers()]
            if isinstance(mod, fx_quant.FakeQuantize):
                kind, roles, leaf_params = OpKind.IDENTITY, {}, []
            leaf_params += fx_quant.parametrized_tensors(mod)
            for attr, t in leaf_params:
                # a parametrized weight's stored original is the same weight: the view holds
                # the effective one (parametrized_tensors), once
                if t is None or not t.is_floating_point() or attr.startswith("parametrizations."):
                    continue
                role = attr if roles is None else next((r for r, a in roles.items() if a == attr),
                                                       None)
                if role is not None:
                    params[role] = (f"{n.target}.{attr}", t)
            attrs = ops.module_attrs(mod, kind)
            if kind is OpKind.OPAQUE:
                attrs["reason"] = f"module type {type(mod).__name__} is not modelled by graphslim"
            attrs["module"] = n.target  # nodes calling one module share its weights
            return kind, attrs, params
        name = getattr(n.target, "__name__", str(n.target))
        kind = ops.FUNCTION_KINDS.get(name, OpKind.OPAQUE)
        attrs = {"fn": name.lower(), **ops.function_attrs(n, kind, name)}
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
            if isinstance(e, QuantizeValue):
                fx_quant.quantize_value(self, e.value, e.scale, e.zero_point, e.dtype, e.users)
                fx_edits.become_graph_module(self, "fake-quantize nodes inserted")
                touched.add(e.node)
                continue
            if e.node not in nodes:
                raise KeyError(f"edit {type(e).__name__} names unknown node '{e.node}'")
            if isinstance(e, ReplaceSubgraph):
                self._replace_subgraph(nodes, e)
                touched.add(e.node)
                retrace = True
                continue
            n = nodes[e.node]
            if isinstance(e, QuantizeParam):
                fx_quant.quantize_param(self, n, kinds[e.node], e.role, e.scale, e.axis,
                                        e.values)
                touched.add(e.node)
                continue
            if isinstance(e, (SliceParam, SetAttr)):
                fx_edits.apply_structural(self, n, kinds[e.node], e)
                touched.add(e.node)
                continue
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
            fx_edits.sync_modules(self, [nodes[e.node] for e in edits
                                         if isinstance(e, (SliceParam, SetAttr))])
            self.gm.graph.lint()
            self.gm.recompile()
            if retrace:  # swapped-in Sequentials are traced through, so the view sees the chain
                self.gm = _trace(self.module, set(self.gm.meta["graphslim_leaves"]),
                                 len(self.example_inputs))
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
        chain = nn.Sequential(*(ops.make_layer(layer, old) for layer in layers)).to(
            dtype=ref.dtype, device=ref.device)
        chain.requires_grad_(ref.requires_grad)
        _set_submodule(self.module, n.target, chain)
        _set_submodule(self.gm, n.target, chain)

    def _replace_subgraph(self, nodes: dict[str, fx.Node], e: ReplaceSubgraph) -> None:
        """A new module (the layers in an nn.Sequential) called on `source` in place of the
        chain; the chain and what only it used (get_attr weights, shape reads) are removed."""
        chain = [nodes[name] for name in e.nodes]
        if e.source not in nodes:
            raise ValueError(f"node '{e.node}': unknown source value '{e.source}'")
        ref = next((p for p in self.gm.parameters()), None)
        mod = nn.Sequential(*(ops.make_layer(layer, None) for layer in e.layers))
        if ref is not None:
            mod = mod.to(dtype=ref.dtype, device=ref.device)
        target, k = f"{chain[0].name}_sub", 1
        while hasattr(self.gm, target):
            target, k = f"{chain[0].name}_sub{k}", k + 1
        self.gm.add_submodule(target, mod)
        with self.gm.graph.inserting_before(chain[-1]):
            new = self.gm.graph.call_module(target, (nodes[e.source],))
        chain[-1].replace_all_uses_with(new)
        self.gm.graph.eliminate_dead_code()
        fx_edits.become_graph_module(self, f"'{e.node}' and the nodes after it")

    def _set_param(self, n: fx.Node, node: Node, role: str, value: np.ndarray) -> None:
        attr = ops.ROLE_ATTRS.get(node.kind, {}).get(role, role)
        sub, _, attr = attr.rpartition(".")  # out_proj.weight of an attention module
        mod = self.gm.get_submodule(f"{n.target}.{sub}" if sub else n.target)
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
        try:
            outs = self._forward(self.module, feeds)
        except Exception as exc:  # a shape mismatch inside the user's forward
            raise StructureError(f"the module's forward fails: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0][:400]}") from None
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

    def opaque_macs(self, shapes: dict[str, tuple] | None = None) -> dict[str, int]:
        """MACs of nodes graphslim does not model (e.g. swin's fx-wrapped window attention),
        counted by torch's FlopCounterMode while shapes propagate."""
        if "opaque_macs" not in self._cache:
            self.infer_shapes()
        return self._cache["opaque_macs"]

    def weight_gradient_products(self, feeds: list[dict], labels=None, chunks: int = 16
                                 ) -> tuple[dict[str, np.ndarray], str]:
        """w * dL/dw for every floating parameter, keyed like the view's parameter keys
        (module path + attribute), one row per chunk of consecutive batches (at most `chunks`,
        fewer for big models so the rows stay under 256 MB),
        so a caller can square per-chunk sums as Molchanov et al. 2019 do (a full-data gradient
        of a trained model is near zero and mostly noise). Loss: cross-entropy against `labels`
        (one per sample) when given, else half the squared norm of the outputs. Eval mode: BN
        statistics are neither used from the batch nor updated."""
        params = dict(self.module.named_parameters())
        nbytes = sum(p.numel() * 4 for p in params.values())
        chunks = max(1, min(chunks, (256 << 20) // max(nbytes, 1)))  # rows held: <= 256 MB
        per_chunk = max(1, -(-len(feeds) // chunks))
        rows: dict[str, list] = {k: [] for k in params}
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        start, kind = 0, "cross-entropy" if labels is not None else "0.5 |output|^2 (no labels)"
        with _eval_mode(self.module), torch.enable_grad():
            for i, feed in enumerate(feeds):
                args = [torch.as_tensor(feed[s.name]) for s in self.input_specs()]
                out = _flatten(self.module(*args))[0]
                if labels is not None:
                    target = torch.as_tensor(np.asarray(labels)[start:start + len(out)])
                    loss = torch.nn.functional.cross_entropy(out, target.long(),
                                                             reduction="sum")
                else:
                    loss = 0.5 * out.pow(2).sum()
                start += len(out)
                got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (k, _), g in zip(params.items(), got):
                    if g is not None:
                        grads[k] += g
                if (i + 1) % per_chunk == 0 or i == len(feeds) - 1:
                    for k, g in grads.items():
                        rows[k].append((params[k].detach() * g).cpu().numpy())
                        g.zero_()
        return {k: np.stack(v) for k, v in rows.items()}, kind

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in [*self.module.parameters(), *self.module.buffers()])

    def save(self, path: str) -> None:
        """Pickle the whole module: after structural edits its shapes differ from the class's."""
        with saving_to(path) as dest:
            torch.save(self.module, dest)

    def to_onnx(self, path: str, opset: int = 17) -> None:
        names = [s.name for s in self.input_specs()]
        with _eval_mode(self.module), saving_to(path) as dest:
            torch.onnx.export(self.module, self.example_inputs, dest, input_names=names,
                              opset_version=opset, dynamo=False)


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


__all__ = ["FxGraph", "trace"]
