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


def distill(student, teacher, data, **options):
    """Train a compressed torch student towards its teacher on unlabeled data (knowledge
    distillation); options and losses: graphslim/frontends/fx_distill.py. Needs the `torch`
    extra."""
    from graphslim.frontends.fx_distill import distill as _distill
    return _distill(student, teacher, data, **options)


def optimize(model, pipeline, *, data=None, eval_data=None, metric=None, inputs=None,
             verify: str = "each", tolerance: Tolerance = Tolerance(),
             max_error: float | None = None, inplace: bool = False,
             instruments=()) -> RunResult:
    """Run a pipeline (text or list of passes) on a model from `load` or `trace`.

    data: calibration / importance data (input name -> array, samples first); eval_data:
    held-out data of the same form the result is judged on (fidelity per lossy pass and for
    the run, `max_error`); metric: a callable taking the model's outputs on the judge data
    (name -> array, samples in the data's order) and returning a number such as accuracy,
    reported for the original, after each pass and for the result. Without eval_data the run
    is judged on `data`, then `inputs`, then synthetic inputs, and the report says which."""
    pm = PassManager(pipeline, verify=verify, tolerance=tolerance, max_error=max_error,
                     instruments=instruments, inplace=inplace)
    return pm.run(model, data=data, inputs=inputs, eval_data=eval_data, metric=metric)


__all__ = ["GraphslimError", "InputError", "PassError", "PipelineError", "StructureError",
           "VerificationError", "OnnxGraph", "load", "trace", "distill", "optimize", "Pass",
           "PassManager", "Plan", "Repeat", "RunResult", "register_pass", "registered_passes",
           "parse_pipeline", "print_pipeline", "Tolerance"]
