"""Errors raised by the engine. Each names what failed and why, never a bare stack trace."""

from __future__ import annotations


class GraphslimError(Exception):
    """Base class for every error graphslim raises on purpose."""


class InputError(GraphslimError):
    """Bad input: unreadable or corrupt model, bad shapes, bad options, bad data."""


class PipelineError(GraphslimError):
    """A pipeline text or pass option that cannot be parsed or is out of range."""


class PassError(GraphslimError):
    """A pass failed while planning or applying; names the pass, the node and the passes run
    before it."""

    def __init__(self, pass_name: str, message: str, node: str | None = None,
                 passes_before: tuple[str, ...] = ()):
        self.pass_name = pass_name
        self.node = node
        self.passes_before = passes_before
        where = f" at node '{node}'" if node else ""
        before = ", ".join(passes_before) or "none"
        super().__init__(f"pass '{pass_name}' failed{where}: {message} "
                         f"(passes run before: {before})")


class VerificationError(GraphslimError):
    """A pass produced a graph that fails a structural or numerical check."""

    def __init__(self, pass_name: str, metric: str, value: float | str, tolerance: float | str,
                 detail: str = ""):
        self.pass_name = pass_name
        self.metric = metric
        self.value = value
        self.tolerance = tolerance
        msg = f"verification failed after '{pass_name}': {metric} = {value} (tolerance {tolerance})"
        super().__init__(msg + (f"; {detail}" if detail else ""))


class StructureError(GraphslimError):
    """A graph fails a structural check (onnx.checker, ORT session creation, fx lint/forward)."""
