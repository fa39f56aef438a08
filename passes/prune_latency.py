"""prune-channels{target-latency=F}: per-group ratios chosen on measured latency and measured
sensitivity (NetAdapt, Yang et al. 2018, and HALP, Shen et al. 2022, in a simpler form).

1. Tables, measured in context. For every prunable group g and level r in LEVELS, a trial copy
   of the model with only g pruned at r (the pass's criterion picks the units) is built. Its
   latency on ONNX Runtime CPU at the pass's `threads` is timed interleaved with the model as
   it is (a pair per level), so each saving is measured against a baseline under the same load;
   its outputs on calibration samples give the group's loss, the squared relative L2 error of
   all outputs (error energies of small independent perturbations add, so losses sum).
   Savings and losses are made monotone in r (timing noise can invert two close levels); the
   midpoints between levels are interpolated, so the greedy has finer steps than were timed.
2. Allocation (graphslim/budget/allocate.py): savings are taken as additive over groups (a
   multiple-choice knapsack); the greedy takes the group step of least loss per millisecond
   saved until the predicted latency meets the goal.
3. Check: the allocation is built and timed against the model. Savings are not additive (a
   conv between two pruned groups saves 1 - (1-r1)(1-r2), not r1 + r2, and fixed per-op costs
   do not shrink), so while the measured latency misses the target the predicted saving asked
   for is scaled by the share of it that was measured (a secant step) and the greedy runs
   again, then the goal is bisected between one that met the target and one that missed it
   (at most MAX_ROUNDS measurements; it stops early once the secant asks for more than the
   whole model and a further miss lowers the measured latency by less than SLACK/2, or the
   greedy repeats an allocation already timed).
4. Against uniform: one ratio for every group is found by measurement the same way (regula
   falsi, at most UNIFORM_ROUNDS), and of the two the one of least output error on the
   calibration samples, each measured as a whole model, is kept (a note says which). The
   summed per-group losses are a first-order guess: on PP-OCR's text-angle classifier the
   greedy alone kept 0.58 top-1 agreement where uniform at the same latency kept 0.69.
   A target neither meets is an error that names what was measured, never a silently slower
   model.

The pass records the chosen ratios in the decided pipeline (`ratios=...`), so the same result
comes back on another machine without measuring; the tables land in the plan's details.
fx models are timed through their ONNX export (what ORT would run).
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from graphslim import data as data_mod
from graphslim.budget.allocate import greedy, monotone, with_midpoints
from graphslim.pass_base import Plan
from graphslim.runtime import cpu_description, time_many
from graphslim.verify import compare, make_inputs

log = logging.getLogger(__name__)

LEVELS = (0.25, 0.5, 0.75, 0.875)
MAX_ROUNDS = 8
UNIFORM_ROUNDS = 5
SLACK = 0.02  # a measured latency this far under the target is close enough
_SAMPLES = 32
_CHUNK_TIME = 0.6  # seconds of timing per group, its levels' share (x GRAPHSLIM_TIME_BUDGET)


def allocate(p, analyses, groups, edits_for, plan: Plan) -> dict[int, float]:
    """Group index -> ratio meeting `p.target_latency` (p: the PruneChannels pass; edits_for:
    ratios by group index -> the pruning edits)."""
    feeds, synthetic = _feeds(analyses)
    timing_feed = make_inputs(analyses.model.input_specs(), 0)  # the model's own input shape
    threads = p.threads or None
    with tempfile.TemporaryDirectory(prefix="graphslim_lat_") as tmp:
        refs = _Refs(analyses, tmp)
        base_ref = refs.of([])
        base_out = _outputs(analyses.model, feeds)
        table = _tables(groups, edits_for, analyses, refs, base_ref, base_out, feeds,
                        timing_feed, threads)
        if not table:
            raise ValueError("target-latency: no prunable group can lose channels at the "
                             f"levels {LEVELS} (round-to / min-channels keep them whole)")
        base_ms = float(np.median([t["base_ms"] for t in table.values()]))
        best, measured, rounds = _search(p.target_latency, table, base_ms, edits_for, refs,
                                         base_ref, timing_feed, threads, plan)
        uniform, u_measured, u_rounds = _uniform(p.target_latency, [g.index for g in groups],
                                                 edits_for, refs, base_ref, timing_feed,
                                                 threads, plan)
        measured, rounds = min(measured, u_measured), rounds + u_rounds
        best = _pick(best, uniform, edits_for, analyses, base_out, feeds, plan)
    where = f"ONNX Runtime CPU, {p.threads or 'all'} thread(s), {cpu_description()}"
    plan.details.append({"latency_table": {t["name"]: {
        "levels": t["levels"], "saved_ms": t["saved"], "loss": t["loss"],
        "measured": t["measured"]}
        for t in table.values()}, "base_ms": round(base_ms, 4), "where": where,
        "data": "synthetic" if synthetic else "calibration"})
    if best is None:
        raise ValueError(f"target-latency={p.target_latency} is not met: the closest allocation "
                         f"measured {measured:.3f} of the original latency on {where} (levels up "
                         f"to {max(LEVELS)} per group; a lower target needs other passes too; "
                         f"measured per round: {', '.join(rounds)})")
    if synthetic:
        plan.notes.append("target-latency: sensitivity measured on SYNTHETIC inputs (give "
                          "calibration data)")
    return best


def _search(target, table, base_ms, edits_for, refs, base_ref, timing_feed, threads, plan):
    """(the allocation of least predicted loss measured to meet `target`, or None; the lowest
    fraction measured). The greedy's goal moves by a secant step, and once one goal has
    met the target and one has missed it, it is bisected between them, so the result lands
    within SLACK under the target rather than wherever the first correction threw it."""
    goal, ok, fail, closest, rounds = target, None, None, float("inf"), []
    most, tried, last_miss, halved = greedy(table, float("inf")), [], float("inf"), False
    for round_ in range(MAX_ROUNDS):
        per_group = greedy(table, base_ms * (1 - goal))
        if per_group in tried:
            break  # the goal moved but the greedy's answer did not: the same measurement
        tried.append(per_group)
        t_base, t_got = time_many([base_ref, refs.of(edits_for(per_group))], timing_feed,
                                  threads=threads, max_time=2.0)
        measured = t_got.median / t_base.median
        closest = min(closest, measured)
        rounds.append(f"goal {goal:.3f} -> {measured:.3f}")
        plan.notes.append(f"target-latency={target}: round {round_ + 1}, goal {goal:.3f}, "
                          f"measured {measured:.3f} of the original ({t_got.median * 1e3:.3f} "
                          f"vs {t_base.median * 1e3:.3f} ms)")
        if measured <= target:
            ok = (goal, per_group)
            if target - measured <= SLACK:
                break
        else:
            fail = goal
            if per_group == most or (halved and last_miss - measured < SLACK / 2):
                # the greedy takes everything with a measured saving, or the secant asked
                # for more than the whole model and taking more did not lower the latency (on
                # a small net the savings timed one group at a time can sum past the whole
                # model, so the greedy never reaches `most`)
                break
            last_miss = measured
        if ok is not None and fail is not None:
            goal = (ok[0] + fail) / 2
        else:  # scale the predicted saving by how much of it was measured (a secant step),
            # at most halving the goal at once (savings flatten out as groups run out)
            step = 1 - (1 - target) * (1 - goal) / max(1 - measured, 1e-3)
            halved = ok is None and step <= goal / 2
            step = max(step, goal / 2) if ok is None else min(step, 0.99)
            if abs(step - goal) < 1e-3:
                break
            goal = step
        if ok is not None and fail is not None and fail - ok[0] < 1e-3:
            break
    return (ok[1] if ok else None), closest, rounds


def _uniform(target, indices, edits_for, refs, base_ref, timing_feed, threads, plan):
    """(the one ratio for every group measured to meet `target`, as an allocation, or None;
    the lowest fraction measured; the rounds). Regula falsi on the measured latency between
    ratio 0 (the model, 1.0) and the top level, at most UNIFORM_ROUNDS measurements."""
    def measure(r):
        t_base, t_got = time_many([base_ref, refs.of(edits_for({i: r for i in indices}))],
                                  timing_feed, threads=threads, max_time=2.0)
        lat = t_got.median / t_base.median
        rounds.append(f"uniform {r:.3f} -> {lat:.3f}")
        plan.notes.append(f"target-latency={target}: uniform ratio {r:.3f}, measured "
                          f"{lat:.3f} of the original")
        return lat

    rounds = []
    lo, hi = (0.0, 1.0), (max(LEVELS), measure(max(LEVELS)))
    closest = hi[1]
    if hi[1] > target:
        return None, closest, rounds
    for _ in range(UNIFORM_ROUNDS - 1):
        if target - hi[1] <= SLACK:
            break
        # the ratio where the line through the bracket crosses the target, kept off its ends
        r = lo[0] + (hi[0] - lo[0]) * (lo[1] - target) / max(lo[1] - hi[1], 1e-6)
        r = min(max(r, lo[0] + 0.1 * (hi[0] - lo[0])), hi[0] - 0.1 * (hi[0] - lo[0]))
        lat = measure(r)
        closest = min(closest, lat)
        if lat <= target:
            hi = (r, lat)  # meets it with less cut than any ratio before
        else:
            lo = (r, lat)
    return {i: hi[0] for i in indices}, closest, rounds


def _pick(best, uniform, edits_for, analyses, base_out, feeds, plan):
    """Of the greedy's allocation and the uniform ratio, both measured to meet the target, the
    one of least output error on the calibration samples, the whole model measured at once:
    the greedy's per-group losses are summed as if independent, and where they are not (many
    groups cut deep together) the uniform cut is the better one."""
    found = {k: v for k, v in (("allocation", best), ("uniform", uniform)) if v is not None}
    if len(found) < 2:
        for keep in found:
            plan.notes.append(f"target-latency: only the {keep} met the target: kept {keep}")
        return next(iter(found.values()), None)
    loss = {k: _loss(base_out, _outputs(analyses.trial_model(edits_for(v)), feeds))
            for k, v in found.items()}
    keep = min(loss, key=loss.get)
    plan.notes.append(f"target-latency: output error (squared rel. L2, calibration samples) of "
                      f"the allocation {loss['allocation']:.4g}, of uniform ratio "
                      f"{next(iter(uniform.values())):.3f} {loss['uniform']:.4g}: kept {keep}")
    return found[keep]


class _Refs:
    """ONNX models ORT can time for trial copies (fx: exported to files in `tmp`)."""

    def __init__(self, analyses, tmp: str):
        self.analyses, self.tmp, self.count = analyses, tmp, 0

    def of(self, edits, trial=None):
        trial = trial if trial is not None else self.analyses.trial_model(edits)
        ref = trial.deployable()
        if ref is None:
            self.count += 1
            ref = os.path.join(self.tmp, f"trial{self.count}.onnx")
            trial.to_onnx(ref)
        return ref


def _tables(groups, edits_for, analyses, refs, base_ref, base_out, feeds, timing_feed,
            threads) -> dict:
    """Group index -> {"levels", "saved" (ms), "loss", "base_ms", "name"}."""
    table = {}
    for g in groups:
        levels, models, losses, seen = [], [], [], set()
        for r in LEVELS:
            edits = edits_for({g.index: r})
            key = tuple((getattr(e, "node", ""), len(getattr(e, "keep", ()))) for e in edits)
            if not edits or key in seen:  # rounding left this level as the one below
                continue
            seen.add(key)
            trial = analyses.trial_model(edits)
            losses.append(_loss(base_out, _outputs(trial, feeds)))
            models.append(refs.of(edits, trial))
            levels.append(r)
        if not levels:
            continue
        # each level against the model in a pair of its own: a round-robin of many models
        # runs them cache-cold (weights evicted by the others), which overstates the saving
        # of fewer bytes next to what the model gains when it is called on its own
        pairs = [time_many([base_ref, m], timing_feed, threads=threads,
                           max_time=_CHUNK_TIME / len(models)) for m in models]
        base = float(np.median([b.median for b, _ in pairs])) * 1e3
        saved = monotone([max(0.0, (b.median - t.median) * 1e3) for b, t in pairs])
        table[g.index] = {"name": g.spaces[0], "base_ms": base, "measured": levels,
                          **with_midpoints(levels, saved, monotone(losses))}
    return table


def _feeds(analyses) -> tuple[list[dict], bool]:
    from graphslim.analyses.activations import data_or_synthetic

    source, synthetic = data_or_synthetic(analyses, "target-latency sensitivities")
    specs = analyses.model.input_specs()
    source = {k: np.asarray(v)[:_SAMPLES] for k, v in source.items()}
    return list(data_mod.batches(source, specs)), synthetic


def _outputs(model, feeds) -> dict:
    return {f"{i}:{k}": v for i, f in enumerate(feeds)
            for k, v in model.run(f, deployed=True).items()}


def _loss(ref: dict, got: dict) -> float:
    return float(compare(ref, got).rel_l2 ** 2)
