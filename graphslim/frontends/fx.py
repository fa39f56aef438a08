"""torch.fx frontend: trace the user's module, view it, apply edits inside its own hierarchy.

The traced GraphModule is only a view: it holds the very same leaf modules as the user's module, so
an edit that changes a module in place (a new weight) shows in both, and an edit that swaps a module
(BN -> Identity) is made in both hierarchies. The result is the user's own model, still trainable
and saveable. torch is imported here only, so ONNX-only users never need it.

Tracing: `torch.fx.symbolic_trace`; where that fails inside a submodule, the submodule becomes an
opaque leaf and tracing is retried (the report says which modules were made leaves).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence

import numpy as np

from graphslim.edits import Edit
from graphslim.errors import InputError, StructureError
from graphslim.frontends.base import Frontend, TensorSpec, saving_to
from graphslim.ir import GraphView, Node, OpKind

try:
    import torch
    from torch import fx, nn
    from torch.fx.passes.shape_prop import ShapeProp

    from graphslim.frontends import fx_edits, fx_quant, fx_trace
    from graphslim.frontends import fx_ops as ops
except ImportError as _exc:  # pragma: no cover - exercised only without torch
    raise ImportError("the torch frontend needs torch: pip install 'graphslim-engine[torch]' "
                      "(or '.[torch]' from a checkout)") from _exc

log = logging.getLogger(__name__)


def trace(module: nn.Module, example_inputs, leaf_modules: Sequence[str] = ()) -> FxGraph:
    """View a torch module as a graph. `example_inputs`: a tensor or tuple of tensors."""
    if not isinstance(module, nn.Module):
        raise InputError(f"trace() needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return FxGraph(module, tuple(example_inputs), leaves=set(leaf_modules))


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


class _Captured(Exception):
    """Stops a capture run once it has every value it was asked for."""


class FxGraph(Frontend):
    name = "fx"
    has_gradients = True

    def __init__(self, module: nn.Module, example_inputs: tuple, leaves: set[str] = frozenset()):
        self.module = module
        self.example_inputs = example_inputs
        self.gm = fx_trace.trace_module(module, set(leaves), len(example_inputs))
        self.traced_with = "torch.fx.symbolic_trace"
        if self.gm.meta["graphslim_leaves"]:
            self.traced_with += f" (opaque leaves: {', '.join(self.gm.meta['graphslim_leaves'])})"
        self._version = 0
        self._cache: dict[str, object] = {}

    @property
    def version(self) -> int:
        return self._version

    def distilled_params(self, teacher, data, **options) -> dict:
        from graphslim.frontends.fx_distill import distilled_params
        return distilled_params(self, teacher, data, **options)

    def weights_changed(self) -> None:
        """The module's weights were changed outside apply() (trained): cached views and
        analyses of the old ones are dropped."""
        self._version += 1
        self._cache.clear()

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
        """Apply edits through the one edit -> handler table of fx_edits (the ONNX frontend
        has its own, for the same vocabulary)."""
        ctx = fx_edits.EditContext(self, {n.name: n for n in self.gm.graph.nodes},
                                   {n.name: n for n in self.view().nodes()})
        touched: set[str] = set()
        for e in edits:
            handler = fx_edits.HANDLERS.get(type(e))
            if handler is None:
                raise TypeError(f"the fx frontend cannot apply {type(e).__name__}")
            if type(e) not in fx_edits.GRAPH_EDITS and e.node not in ctx.nodes:
                raise KeyError(f"edit {type(e).__name__} names unknown node '{e.node}'")
            handler(ctx, e)
            touched.add(e.node)
        if edits:
            fx_edits.sync_modules(self, ctx.structural)
            self.gm.graph.lint()
            self.gm.recompile()
            if ctx.retrace:  # swapped-in Sequentials are traced through: the view sees the chain
                leaves = set(self.gm.meta["graphslim_leaves"])
                self.gm = fx_trace.trace_module(self.module, leaves, len(self.example_inputs))
            self._version += 1
            self._cache.clear()
        return len(touched)

    def fresh(self, base: str) -> str:
        """A submodule name not yet used in the traced module (the one fresh-name mechanism of
        this frontend, as `OnnxGraph.fresh` is of the other)."""
        base = base.replace(".", "_")
        taken = dict(self.gm.named_modules())
        name, k = base, 1
        while name in taken or hasattr(self.gm, name):
            name, k = f"{base}_{k}", k + 1
        return name

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

    def run(self, feeds: dict[str, np.ndarray], deployed: bool = False
            ) -> dict[str, np.ndarray]:
        try:  # eager torch is the deployed form of the user's module
            outs = self._forward(self.module, feeds)
        except Exception as exc:  # a shape mismatch inside the user's forward
            raise StructureError(f"the module's forward fails: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0][:400]}") from None
        return {f"output{i}": t.detach().cpu().numpy() for i, t in enumerate(outs)}

    def capture(self, feeds: dict[str, np.ndarray], values: list[str],
                optimized: bool = False) -> dict[str, np.ndarray]:
        """Runs the graph node by node until every named value is seen (the nodes after them
        are not run). `feeds` may also hold intermediate values (node names): the graph is cut
        there, and only the nodes the named values need from them on are run."""
        specs = [s.name for s in self.input_specs()]
        given = {k: v for k, v in feeds.items() if k not in specs}
        got = {v: feeds[v] for v in values if v in feeds}
        wanted = set(values) - set(got)
        if not wanted:
            return got
        by_name = {n.name: n for n in self.gm.graph.nodes}
        needed, stack = set(), list(wanted)
        while stack:  # the nodes the wanted values depend on, stopping at the given ones
            name = stack.pop()
            if name in needed or name in given or name not in by_name:
                continue
            needed.add(name)
            stack.extend(a.name for a in by_name[name].all_input_nodes)

        class _Recorder(fx.Interpreter):
            def run_node(self, n):
                if n.name in given:
                    out = torch.as_tensor(given[n.name])
                elif n.name in needed or n.op == "placeholder":
                    out = super().run_node(n)
                else:
                    return None
                if n.name in wanted and isinstance(out, torch.Tensor):
                    got[n.name] = out.detach().cpu().numpy()
                    if len(got) == len(set(values)):
                        raise _Captured
                return out

        # an input the cut makes unneeded still takes a placeholder's place
        args = [torch.as_tensor(feeds[s]) if s in feeds else torch.zeros(0) for s in specs]
        with torch.no_grad(), _eval_mode(self.module), contextlib.suppress(_Captured):
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
