"""Analyses: computed on demand, cached, and dropped after any change a pass does not preserve."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

from graphslim.frontends.base import Frontend
from graphslim.ir import GraphView


class Analysis:
    """Subclasses implement `compute(am)`; their class is the cache key."""

    name: ClassVar[str] = "analysis"

    @classmethod
    def compute(cls, am: AnalysisManager) -> Any:
        raise NotImplementedError


class AnalysisManager:
    """Caches analysis results for one model; `data` carries the user's data to analyses."""

    def __init__(self, model: Frontend, data: Any = None):
        self.model = model
        self.data = data
        self._cache: dict[type, Any] = {}
        self.computed: Counter[str] = Counter()
        #: the reference model and the channel / value maps into it (graphslim/provenance.py),
        #: kept by the pass manager for pipelines with a pass that needs_reference, else None
        self.provenance = None

    @property
    def view(self) -> GraphView:
        return self.model.view()

    def get(self, kind: type[Analysis]) -> Any:
        if kind not in self._cache:
            self._cache[kind] = kind.compute(self)
            self.computed[kind.name] += 1
        return self._cache[kind]

    def trial_outputs(self, edits: list, feeds: list[dict], deployed: bool = True
                      ) -> list[dict]:
        """The outputs of a copy of the model with `edits` applied, for each feed: a pass
        weighing options (qdq's sensitivity mode) tries them here, never on the model itself.
        `deployed`: run as the user will (ORT at opt level all: int8 through the integer
        kernels of this CPU), which is the error that matters."""
        trial = self.trial_model(edits)
        return [trial.run(f, deployed=deployed) for f in feeds]

    def trial_model(self, edits: list) -> Frontend:
        """A scratch copy of the model with `edits` applied: a pass that must run the model
        as its own plan takes shape (reconstruct refits layer by layer, each on the inputs the
        layers before it now give) works on this, never on the model itself."""
        trial = self.model.copy()
        trial.apply(edits)
        return trial

    def trial_latencies(self, edit_sets: list[list], feeds: dict, threads: int | None = 1,
                        max_time: float = 3.0) -> list | None:
        """Latency on ONNX Runtime (CPU, opt level ALL) of the model with each edit set applied
        to a copy (an empty set: the model as it is), all timed round-robin in one process so
        they see the same machine load: a pass deciding by speed measures whole models in
        context here. None where the frontend has no deployable ONNX form (fx)."""
        from graphslim.runtime import time_many

        if self.model.deployable() is None:
            return None
        models = [self.trial_model(edits).deployable() for edits in edit_sets]
        return time_many(models, feeds, threads=threads, max_time=max_time)

    def invalidate(self, preserved: tuple[type[Analysis], ...] = ()) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}


class Shapes(Analysis):
    """Value name -> shape for the concrete input shapes (fx: ShapeProp; ONNX: shape inference)."""

    name = "shapes"

    @classmethod
    def compute(cls, am: AnalysisManager) -> dict[str, tuple]:
        return am.model.infer_shapes()
