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

    @property
    def view(self) -> GraphView:
        return self.model.view()

    def get(self, kind: type[Analysis]) -> Any:
        if kind not in self._cache:
            self._cache[kind] = kind.compute(self)
            self.computed[kind.name] += 1
        return self._cache[kind]

    def trial_outputs(self, edits: list, feeds: list[dict]) -> list[dict]:
        """The outputs of a copy of the model with `edits` applied, for each feed: a pass
        weighing options (qdq's sensitivity mode) tries them here, never on the model itself."""
        trial = self.model.copy()
        trial.apply(edits)
        return [trial.run(f) for f in feeds]

    def invalidate(self, preserved: tuple[type[Analysis], ...] = ()) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}


class Shapes(Analysis):
    """Value name -> shape for the concrete input shapes (fx: ShapeProp; ONNX: shape inference)."""

    name = "shapes"

    @classmethod
    def compute(cls, am: AnalysisManager) -> dict[str, tuple]:
        return am.model.infer_shapes()
