"""ONNX frontend: load with onnx-graphsurgeon, view, apply edits, export, check, run in ORT.

Loading (onnx_load.py) repairs what ONNX Runtime accepts but the checker refuses, and normalizes
so passes see one form (weights in `Constant` nodes become initializers, negative input dims
become symbolic, small constant subgraphs are folded). Intermediate shapes are dropped at load
and recomputed by shape inference on demand, so an edit can never leave a stale value_info
behind. Dynamic input dims stay dynamic in the emitted model; concrete shapes given by the user
are used only for analysis and verification.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphslim.edits import (
    Bypass,
    Edit,
    FuseActivation,
    QuantizeParam,
    QuantizeValue,
    ReplaceSubgraph,
    ReplaceWithChain,
    ScaleValue,
    SetAttr,
    SetParam,
    SliceParam,
)
from graphslim.errors import InputError, StructureError
from graphslim.frontends import onnx_edits as edit
from graphslim.frontends import onnx_load, onnx_shapes
from graphslim.frontends import onnx_ops as ops
from graphslim.frontends import onnx_quant as quant
from graphslim.frontends.base import Frontend, TensorSpec, saving_to
from graphslim.ir import GraphView, Node, OpKind

log = logging.getLogger(__name__)

# Serialized protobufs are capped at 2 GiB; above this we go through files with external data.
_LARGE_BYTES = 1_800_000_000


def load(src: str | os.PathLike | onnx.ModelProto,
         input_shapes: Mapping[str, Sequence[int]] | None = None) -> OnnxGraph:
    """Read an ONNX model (path or ModelProto) into an editable graph.

    `input_shapes` fixes dynamic input dims for analysis and verification, e.g.
    {"x": (1, 3, 224, 224)}. What ONNX Runtime accepts is accepted: files the checker refuses
    for forms ORT tolerates are repaired first (graphslim.frontends.onnx_load), with a note.
    """
    model, notes = onnx_load.read_model(src)
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise InputError(f"onnx-graphsurgeon cannot import the model: {exc}") from None
    template = onnx.ModelProto()
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                "doc_string"):
        setattr(template, fld, getattr(model, fld))
    template.metadata_props.extend(model.metadata_props)
    g = OnnxGraph(graph, template, input_shapes or {}, normalize=True)
    g.load_notes[:0] = notes
    return g


class OnnxView(GraphView):
    private_param_copies = True
    fused_activations = frozenset({"silu"})

    frontend = "onnx"

    def __init__(self, nodes, inputs, outputs, param_users, constants):
        super().__init__(nodes, inputs, outputs, param_users)
        self._constants = constants

    def _read_param(self, node: Node, role: str) -> np.ndarray:
        arr = np.asarray(self._constants[node.params[role]].values)
        if node.kind is OpKind.LINEAR:
            if role == "weight" and node.attrs.get("layout") == "in_out":
                return arr.T
            if role == "bias":
                return arr.reshape(-1)
        return arr

    def _param_info(self, node: Node, role: str):
        t = self._constants[node.params[role]]
        return tuple(t.shape), ops.np_dtype(t)


class OnnxGraph(Frontend):
    name = "onnx"

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]], normalize: bool = False):
        self.graph = graph
        self.template = template
        self.input_shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
        self.load_notes: list[str] = []
        self._version = 0
        self._cache: dict[str, object] = {}
        if normalize:
            self._normalize()
        self._check_input_shapes()

    # --- loading -------------------------------------------------------------------------------
    def _normalize(self) -> None:
        self.load_notes.extend(onnx_load.normalize(self.graph))

    def _check_input_shapes(self) -> None:
        names = [t.name for t in self.graph.inputs]
        for name, shape in self.input_shapes.items():
            if name not in names:
                raise InputError(f"input shape given for '{name}', but the model's inputs are: "
                                 f"{', '.join(names)}")
            declared = next(t for t in self.graph.inputs if t.name == name).shape
            if declared is None:
                continue
            if len(declared) != len(shape):
                raise InputError(f"input '{name}': shape {list(shape)} has rank {len(shape)}, "
                                 f"the model declares rank {len(declared)} {list(declared)}")
            for d_model, d_user in zip(declared, shape):
                if isinstance(d_model, int) and d_model > 0 and d_model != d_user:
                    raise InputError(f"input '{name}': shape {list(shape)} conflicts with the "
                                     f"model's fixed shape {list(declared)}")

    # --- Frontend API --------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @property
    def opset(self) -> int:
        return next((o.version for o in self.template.opset_import if o.domain in ("", "ai.onnx")),
                    self.graph.opset)

    def require_opset(self, opset: int) -> str | None:
        """Convert the default-domain opset up with onnx.version_converter (the library knows
        every op's adapters; hand-written upgrades would not) and re-import. Lossless: the pass
        that asked is verified against the graph before the conversion."""
        old = self.opset
        if old >= opset:
            return None
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(self.to_proto(), opset)
            onnx.checker.check_model(converted)
        except Exception as exc:
            raise InputError(f"cannot convert the model from opset {old} to {opset} (needed by "
                             f"the pass): {str(exc).strip().splitlines()[0]}") from None
        graph = gs.import_onnx(converted)
        self.graph = graph
        self.template.ir_version = max(self.template.ir_version, converted.ir_version)
        self._normalize()
        self._version += 1
        self._cache.clear()
        note = f"opset {old} converted to {opset} (onnx.version_converter)"
        self.load_notes.append(note)
        return note

    def copy(self) -> OnnxGraph:
        clone = OnnxGraph(self.graph.copy(), self.template, self.input_shapes)
        clone.load_notes = list(self.load_notes)
        return clone

    def view(self) -> OnnxView:
        if "view" not in self._cache:
            self._cache["view"] = self._build_view()
        return self._cache["view"]

    def _build_view(self) -> OnnxView:
        nodes, param_users, constants = [], {}, {}
        for g in self.graph.nodes:
            inputs, params = [], {}
            for slot, t in enumerate(g.inputs):
                if isinstance(t, gs.Constant):
                    role = ops.role(g.op, slot)
                    params[role] = t.name
                    constants[t.name] = t
                    param_users.setdefault(t.name, []).append(g.name)
                elif t.name:
                    inputs.append(t.name)
            # values an If / Loop / Scan body reads from the outer graph are inputs too: a
            # pass that changes them must see that reader (it is opaque, so it blocks)
            inputs += [v for v in ops.outer_reads(g) if v not in inputs]
            kind, attrs = ops.classify(g, params)
            nodes.append(Node(g.name, kind, g.op, tuple(inputs), tuple(t.name for t in g.outputs),
                              params, attrs))
        users = {k: tuple(v) for k, v in param_users.items()}
        return OnnxView(nodes, [t.name for t in self.graph.inputs],
                        [t.name for t in self.graph.outputs], users, constants)

    def apply(self, edits: Sequence[Edit]) -> int:
        by_name = {n.name: n for n in self.graph.nodes}
        touched: set[str] = set()
        kinds = {n.name: n for n in self.view().nodes()}
        computed = edit.computed_reshape_targets(self, edits, by_name)
        ctx = _ApplyContext(self, by_name, kinds, computed)
        for e in edits:
            handler = _HANDLERS.get(type(e))
            if handler is None:
                raise TypeError(f"the ONNX frontend cannot apply {type(e).__name__}")
            if type(e) not in _GRAPH_EDITS and e.node not in by_name:
                raise KeyError(f"edit {type(e).__name__} names unknown node '{e.node}'")
            handler(ctx, e)
            touched.add(e.node)
        if edits:
            self.graph.cleanup().toposort()
            self._version += 1
            self._cache.clear()
        return len(touched)

    def fresh(self, base: str) -> str:
        """A tensor / node name not yet used in the graph."""
        taken = set(self.graph.tensors().keys()) | {n.name for n in self.graph.nodes}
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    # --- export, check, run ----------------------------------------------------------------------
    def distilled_params(self, teacher, data, **options) -> dict:
        from graphslim.frontends.fx_distill import distilled_params
        return distilled_params(self, teacher, data, **options)

    def to_proto(self) -> onnx.ModelProto:
        if "proto" not in self._cache:
            model = gs.export_onnx(self.graph, do_type_check=False)
            for fld in ("ir_version", "producer_name", "producer_version", "domain",
                        "model_version", "doc_string"):
                if self.template.HasField(fld):
                    setattr(model, fld, getattr(self.template, fld))
            del model.metadata_props[:]
            model.metadata_props.extend(self.template.metadata_props)
            quant.declare_domains(model)
            self._cache["proto"] = model
        return self._cache["proto"]

    def nbytes(self) -> int:
        return sum(int(np.prod(t.shape or ())) * np.dtype(ops.np_dtype(t)).itemsize
                   for t in self.graph.tensors().values() if isinstance(t, gs.Constant))

    def is_large(self) -> bool:
        return self.nbytes() > _LARGE_BYTES

    def save(self, path: str | os.PathLike) -> None:
        with saving_to(path) as dest:
            self._save(dest)

    def _save(self, path: str) -> None:
        if self.is_large():
            # save_model moves the tensors out of the proto it is given: hand it the cached
            # export and drop that from the cache (a copy would hold the weights twice more).
            model = self.to_proto()
            self._cache.pop("proto", None)
            onnx.save_model(model, path, save_as_external_data=True,
                            all_tensors_to_one_file=True,
                            location=os.path.basename(path) + ".data")
        else:
            with open(path, "wb") as f:
                f.write(self.model_ref())

    to_onnx = save

    def deployable(self) -> str | bytes:
        return self.model_ref()

    def model_ref(self) -> str | bytes:
        """Serialized bytes (cached: serializing is the dominant cost on big models), or for
        >2 GB models a path to a temporary copy with external data."""
        if "ref" not in self._cache:
            if not self.is_large():
                self._cache["ref"] = self.to_proto().SerializeToString()
            else:
                path = os.path.join(tempfile.mkdtemp(prefix="graphslim_"), "model.onnx")
                self._save(path)
                self._cache["ref"] = path
        return self._cache["ref"]

    def check(self) -> None:
        try:
            onnx.checker.check_model(self.model_ref(), full_check=True)
        except Exception as exc:
            raise StructureError(f"onnx.checker: {str(exc).strip().splitlines()[0]}") from None
        self._session()

    def _session(self, opt_level: str = "basic"):
        """Verification runs at level basic (the graph as written); the deployed form at all
        (QDQ fused into integer kernels, NCHWc: what the user runs, and what judging uses)."""
        key = f"session-{opt_level}"
        if key not in self._cache:
            from graphslim.runtime import make_session
            try:
                self._cache[key] = make_session(self.model_ref(), opt_level=opt_level)
            except Exception as exc:
                raise StructureError(f"ONNX Runtime cannot load the model: {exc}") from None
        return self._cache[key]

    def input_specs(self) -> list[TensorSpec]:
        specs = []
        for t in self.graph.inputs:
            shape = self.input_shapes.get(t.name)
            if shape is None:
                dims = list(t.shape or [])
                for j, d in enumerate(dims):
                    if not (isinstance(d, int) and d > 0):
                        if j != 0:
                            raise InputError(
                                f"input '{t.name}' has dynamic dim {j} ('{d}'): give a concrete "
                                f"shape, e.g. --input-shape {t.name}:1,3,224,224")
                        log.info("input '%s': dynamic batch dim fixed to 1", t.name)
                        dims[j] = 1
                shape = tuple(dims)
            specs.append(TensorSpec(t.name, tuple(shape), np.dtype(ops.np_dtype(t))))
        return specs

    def run(self, feeds: dict[str, np.ndarray], deployed: bool = False
            ) -> dict[str, np.ndarray]:
        sess = self._session("all" if deployed else "basic")
        names = [o.name for o in sess.get_outputs()]
        try:
            return dict(zip(names, sess.run(names, feeds)))
        except Exception as exc:  # ORT's run-time errors (a Reshape that no longer fits, ...)
            raise StructureError("ONNX Runtime fails to run the model: "
                                 f"{str(exc).strip().splitlines()[0][:400]}") from None

    def infer_shapes(self) -> dict[str, tuple]:
        return onnx_shapes.infer_shapes(self)

    def opaque_macs(self, shapes: dict[str, tuple] | None = None) -> dict[str, int]:
        """MACs of Conv / Gemm / MatMul reading DequantizeLinear(int8 constant) (after qdq: not
        LINEAR / CONV in the view), from the quantized weight's shape."""
        shapes = shapes if shapes is not None else self.infer_shapes()
        return onnx_shapes.dequantized_layer_macs(self.graph, shapes)

    def capture(self, feeds: dict, values: list[str], optimized: bool = False) -> dict:
        """One ORT run computing only what the named values need (session cached per set of
        names until the graph changes): a value early in the graph costs only the nodes
        before it (reconstruct captures layer by layer). `optimized`: at ORT's full
        optimization level (the kernels the user deploys, 1.5x faster on a CNN; fetched values
        are graph outputs, which ORT's fusions keep) and with the batch dimension free (one
        run for many samples where the ops allow), else as the graph is, unoptimized (a
        graph being repaired may not survive ORT's rewrites). `feeds` may also hold
        intermediate values: the graph is then cut there and only what follows them runs
        (reconstruct carries the values between its rounds)."""
        from graphslim.runtime import make_session

        inputs = {s.name for s in self.input_specs()}
        cut = {k: v for k, v in feeds.items() if k not in inputs}
        have = {v: feeds[v] for v in values if v in feeds}
        values = [v for v in values if v not in feeds]
        if not values:
            return have
        key = ("capture", tuple(values), optimized, tuple(sorted(cut)))
        if key not in self._cache:
            # one capture session at a time: a caller capturing layer by layer would otherwise
            # hold a session (and a copy of every weight) per layer
            for old in [k for k in self._cache if isinstance(k, tuple) and k[0] == "capture"]:
                del self._cache[old]
            probe = onnx_shapes.probe_for(self.to_proto(), values, any_batch=optimized,
                                          given=cut)
            self._cache[key] = make_session(probe.SerializeToString(),
                                            opt_level="all" if optimized else "off")
        sess = self._cache[key]
        run_feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
        return {**have, **dict(zip(values, sess.run(list(values), run_feeds)))}

@dataclass
class _ApplyContext:
    """What the edit handlers of one apply() share: the graph, its nodes by name, the view's
    nodes (kinds, layouts) as before the edits, computed reshape targets, one namer."""

    m: OnnxGraph
    by_name: dict
    kinds: dict
    computed: dict

    @functools.cached_property
    def namer(self) -> quant.Namer:  # built on first use: it scans every name in the graph
        return quant.Namer(self.m.graph)


def _slice_param(c: _ApplyContext, e: SliceParam) -> None:
    edit.slice_param(c.m, c.by_name[e.node], c.kinds[e.node], e.role, e.axis, e.keep)


def _quantize_param(c: _ApplyContext, e: QuantizeParam) -> None:
    quant.quantize_param(c.m.graph, c.namer, c.by_name[e.node], c.kinds[e.node], e.role,
                         e.values, e.scale, e.zero_point, e.axis)


#: edit type -> how the ONNX frontend applies it (the edit vocabulary, implemented once)
_HANDLERS = {
    FuseActivation: lambda c, e: quant.fuse_activation(c.m.graph, c.namer, c.by_name, e.fn,
                                                       e.nodes),
    QuantizeValue: lambda c, e: quant.quantize_value(c.m.graph, c.namer, e.value, e.scale,
                                                     e.zero_point, e.dtype, e.users),
    ReplaceSubgraph: lambda c, e: edit.replace_subgraph(c.m, [c.by_name[n] for n in e.nodes],
                                                        e.source, e.layers),
    SetParam: lambda c, e: edit.set_param(c.m, c.by_name[e.node], c.kinds[e.node], e.role,
                                          e.value),
    Bypass: lambda c, e: edit.bypass(c.m, c.by_name[e.node], e.keep),
    ReplaceWithChain: lambda c, e: edit.replace_with_chain(c.m, c.by_name[e.node],
                                                           c.kinds[e.node], e.layers),
    SliceParam: _slice_param,
    SetAttr: lambda c, e: edit.set_attr(c.m, c.by_name[e.node], e.name, e.value,
                                        c.computed.get(e.node)),
    QuantizeParam: _quantize_param,
    ScaleValue: lambda c, e: quant.scale_value(c.m.graph, c.namer, e.value, e.scale, e.users),
}
#: edits addressed by values or node chains rather than by one existing node
_GRAPH_EDITS = frozenset({FuseActivation, QuantizeValue, ScaleValue})
