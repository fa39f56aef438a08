"""Tracing for the fx frontend: torch.fx's tracer with user-chosen leaves, falling back to an
opaque leaf where a submodule cannot be traced, and non-tensor defaults of `forward` bound as
constants so Python control flow on them traces."""

from __future__ import annotations

import inspect
import logging

import torch
from torch import fx, nn

from graphslim.errors import InputError
from graphslim.frontends import fx_ops as ops

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


def trace_module(module: nn.Module, leaves: set[str], n_inputs: int | None = None
                 ) -> fx.GraphModule:
    """Trace `module` with `leaves` kept opaque; a submodule inside which tracing fails becomes
    a leaf too, and tracing is retried (the GraphModule's meta lists the leaves)."""
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
