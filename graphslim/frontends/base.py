"""What every frontend offers the pass manager, verifier, runtime and tools."""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphslim.edits import Edit
from graphslim.errors import InputError
from graphslim.ir import GraphView


@dataclass(frozen=True)
class TensorSpec:
    """A graph input with every dimension concrete (dynamic dims fixed by the user or to 1)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@contextlib.contextmanager
def saving_to(path):
    """The path as a string, with a missing folder, a folder in its place or an OS error while
    writing raised as InputError naming the path (not a traceback)."""
    dest = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if dest is None:
        raise InputError(f"save needs a file path, got {type(path).__name__}")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise InputError(f"cannot save to '{dest}': directory '{parent}' does not exist")
    if os.path.isdir(dest):
        raise InputError(f"cannot save to '{dest}': it is a directory")
    try:
        yield dest
    except OSError as exc:
        raise InputError(f"cannot save to '{dest}': {exc.strerror or exc}") from None


class Frontend(abc.ABC):
    """A model being optimized. `view()` is read-only; `apply()` is the only way to change it."""

    name: str = "?"
    #: what loading repaired or normalized (ONNX), shown in the report's notes
    load_notes: tuple[str, ...] | list[str] = ()
    #: capability: weight_gradient_products works (torch autograd; taylor saliency uses it)
    has_gradients: bool = False

    def opaque_macs(self, shapes: dict[str, tuple] | None = None) -> dict[str, int]:
        """MACs of nodes the op tables do not model, counted where the frontend can (fx:
        torch's flop counter; ONNX: layers whose weight comes through a DequantizeLinear);
        the cost analysis adds them."""
        return {}

    def deployable(self) -> str | bytes | None:
        """What ONNX Runtime runs for this model (serialized ONNX bytes, or a path for >2 GB
        models), for timing in the deployment runtime; None where the frontend's model is not
        what gets deployed as is (fx: eager torch with fake-quantize modules)."""
        return None

    def weight_gradient_products(self, feeds: list[dict], labels=None) -> tuple[dict, str]:
        """w * dL/dw per parameter over the feeds, and the loss used (only where
        has_gradients)."""
        raise NotImplementedError(f"the {self.name} frontend has no gradients")

    def distilled_params(self, teacher: Frontend, data, **options) -> dict:
        """Train a copy of this model towards `teacher` on `data` (knowledge distillation,
        graphslim/frontends/fx_distill.py; `options` as graphslim.distill's) and return the
        parameters that changed: (node, role) -> array in the canonical layout, for SetParam.
        Needs torch (and onnx2torch for an ONNX model); graphslim/frontends/fx_distill.py."""
        raise NotImplementedError(f"the {self.name} frontend cannot be trained")

    @abc.abstractmethod
    def view(self) -> GraphView: ...

    @abc.abstractmethod
    def apply(self, edits: Sequence[Edit]) -> int:
        """Apply edits in order; returns how many nodes were changed or removed."""

    @abc.abstractmethod
    def copy(self) -> Frontend: ...

    @abc.abstractmethod
    def check(self) -> None:
        """Structural verification; raises VerificationError naming what is wrong."""

    @abc.abstractmethod
    def input_specs(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray], deployed: bool = False
            ) -> dict[str, np.ndarray]:
        """Execute on numpy inputs; outputs keyed by output name, in output order.
        `deployed`: as the user will run it (ONNX: ORT at opt level all, QDQ fused into
        integer kernels, whose rounding differs from the graph as written); judging on the
        user's data uses it, structural verification does not."""

    @abc.abstractmethod
    def capture(self, feeds: dict[str, np.ndarray], values: list[str],
                optimized: bool = False) -> dict[str, np.ndarray]:
        """Run once and return the named intermediate values (activation statistics).
        `optimized`: the frontend may run its deployed, optimized form (same values to
        rounding); the default runs the graph as it is."""

    @abc.abstractmethod
    def infer_shapes(self) -> dict[str, tuple]:
        """Value name -> shape (ints; None where unknown) for the concrete input shapes."""

    @abc.abstractmethod
    def save(self, path: str) -> None:
        """Write the model in its native form (ONNX file, or torch state for fx)."""

    @abc.abstractmethod
    def to_onnx(self, path: str) -> None: ...

    def require_opset(self, opset: int) -> str | None:
        """Make the model express ONNX opset `opset` or newer (a pass that emits ops of that
        opset asks first); returns a note when something was converted. Frontends that export
        at a chosen opset have nothing to do."""
        return None

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """Bumped by every apply() that changes something; used to cache sessions and views."""
