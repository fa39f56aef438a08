"""distill: knowledge distillation as a pipeline step, the original model as the teacher.

The teacher is the model as it was before the pipeline's first lossy pass (the pass manager
keeps it: graphslim/provenance.py, as for reconstruct); the student is the model now. Its
frontend trains a copy on the calibration data (graphslim/frontends/fx_distill.py: soft
targets at `temperature`, the label loss too where the data holds "labels", the best of the
start and each epoch on a held-out tenth; an ONNX model is lifted to torch by onnx2torch and
its trained weights read back per node) and the pass writes the parameters that changed as
SetParam edits, so `prune-channels{ratio=0.5},distill{epochs=2}` runs on an ONNX file with
slim-opt as on a torch module. Without data it trains nothing (distilling noise teaches
nothing) and says so. Lossy: the pass manager reports the error against the original.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphslim import data as data_mod
from graphslim.edits import SetParam
from graphslim.ir import GraphView
from graphslim.pass_manager import Pass, Plan, register_pass
from graphslim.provenance import Provenance


@register_pass
@dataclass(frozen=True)
class Distill(Pass):
    name = "distill"
    lossless = False
    needs_data = True
    needs_reference = True
    summary = "train the compressed model towards the original on the data (no labels needed)"

    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.9
    patience: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch-size and patience must be >= 1")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError("lr and temperature must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], not {self.alpha}")

    def plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        if analyses.data is None:
            plan.notes.append("distill: no data given, nothing trained (give calibration "
                              "data: real inputs, no labels needed)")
            return plan
        prov = analyses.provenance or Provenance(analyses.model.copy())
        data = dict(analyses.data)
        labels = data.pop(data_mod.LABELS, None)
        history: list = []
        try:
            changed = analyses.model.distilled_params(
                prov.reference, data, epochs=self.epochs, batch_size=self.batch_size,
                lr=self.lr, temperature=self.temperature, alpha=self.alpha, labels=labels,
                patience=self.patience, seed=self.seed, history=history, progress=False)
        except ImportError as exc:  # an ONNX-only install: say which extra, not a traceback
            raise ValueError(str(exc)) from None
        plan.edits.extend(SetParam(node, role, value) for (node, role), value in changed.items())
        plan.stats["params_trained"] = len(changed)
        plan.stats["epochs_run"] = len(history)
        for h in history:
            plan.details.append({k: round(v, 6) if isinstance(v, float) else v
                                 for k, v in h.items()})
        if not changed:
            plan.notes.append("distill: no epoch improved on the held-out share of the data; "
                              "the model is as it was")
        return plan
