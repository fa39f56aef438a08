"""Iterative pruning: prune a little, fine-tune, repeat (the schedule of the pruning literature,
e.g. Molchanov et al. 2017: Taylor ranking is first-order and holds for small steps).

    results = prune_iteratively(model, steps=3, target_macs=0.5, finetune=my_train_fn,
                                options="criterion=taylor", data=data)

Each step runs `prune-channels` through the PassManager (so each step is verified and reported)
with the same share of the MACs left removed per step (target_macs ** (1 / steps)), or the same
share of the channels left (ratio), then calls `finetune(model, step)`, which trains the pruned
model in place (on the fx frontend `model.module` is the user's own module, smaller).
"""

from __future__ import annotations

from collections.abc import Callable

from graphslim.frontends.base import Frontend
from graphslim.pass_manager import PassManager, RunResult


def prune_iteratively(model: Frontend, *, steps: int, target_macs: float | None = None,
                      ratio: float | None = None,
                      finetune: Callable[[Frontend, int], None] | None = None,
                      options: str = "", data=None, verify: str = "end") -> list[RunResult]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if (target_macs is None) == (ratio is None):
        raise ValueError("give one of target_macs and ratio")
    if target_macs is not None:
        if not 0 < target_macs < 1:
            raise ValueError(f"target_macs must be in (0, 1), not {target_macs}")
        amount = f"target-macs={target_macs ** (1.0 / steps):.6g}"
    else:
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), not {ratio}")
        amount = f"ratio={1.0 - (1.0 - ratio) ** (1.0 / steps):.6g}"
    text = f"prune-channels{{{amount}{',' + options if options else ''}}}"
    results = []
    for step in range(steps):
        result = PassManager(text, verify=verify).run(model, data=data)
        if finetune is not None:
            finetune(result.model, step)
        model = result.model
        results.append(result)
    return results
