"""graphslim: graph-level model compression for torch.fx and ONNX.

    import graphslim
    model = graphslim.load("model.onnx", input_shapes={"x": (1, 3, 224, 224)})
    result = graphslim.optimize(model, "fold-bn")
    result.model.save("out.onnx"); print(result.report.table())

torch users: `graphslim.trace(module, example_inputs)` gives the same kind of model; the result's
`.module` is the user's own module, edited.
"""

from __future__ import annotations

from graphslim.errors import (
    GraphslimError,
    InputError,
    PassError,
    PipelineError,
    StructureError,
    VerificationError,
)
from graphslim.frontends.onnx import OnnxGraph, load
from graphslim.pass_manager import (
    Pass,
    PassManager,
    Plan,
    Repeat,
    RunResult,
    register_pass,
    registered_passes,
)
from graphslim.pipeline_text import parse_pipeline, print_pipeline
from graphslim.verify import Tolerance

__version__ = "0.1.0"


def trace(module, example_inputs, leaf_modules=()):
    """View a torch nn.Module as a graph (torch.fx). Needs the `torch` extra."""
    from graphslim.frontends.fx import trace as _trace
    return _trace(module, example_inputs, leaf_modules)


def optimize(model, pipeline, *, data=None, inputs=None, verify: str = "each",
             tolerance: Tolerance = Tolerance(), max_error: float | None = None,
             inplace: bool = False, instruments=()) -> RunResult:
    """Run a pipeline (text or list of passes) on a model from `load` or `trace`."""
    pm = PassManager(pipeline, verify=verify, tolerance=tolerance, max_error=max_error,
                     instruments=instruments, inplace=inplace)
    return pm.run(model, data=data, inputs=inputs)


__all__ = ["GraphslimError", "InputError", "PassError", "PipelineError", "StructureError",
           "VerificationError", "OnnxGraph", "load", "trace", "optimize", "Pass", "PassManager",
           "Plan", "Repeat", "RunResult", "register_pass", "registered_passes", "parse_pipeline",
           "print_pipeline", "Tolerance"]
