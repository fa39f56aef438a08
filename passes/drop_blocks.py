"""drop-blocks: depth pruning, whole residual blocks / transformer sublayers become the identity.

A block is an ADD y = s + f(s) whose one input s is the skip and whose other input is computed
from s by nodes that nothing else reads: the branch f (it may also read values from before s,
such as an attention mask). Dropping it makes
y = s: readers of y read s and the branch goes (Bypass with `keep`). Blocks whose skip goes
through a projection (a stage's first block, downsampling) have no such identity input and
are kept, as are blocks whose branch holds another block (only the inner ones are candidates)
and adds whose inputs differ in shape (a broadcast: a bias or a mask, not a residual join).

Which: `blocks=` names (the ADD nodes, as the report lists them), or `ratio` of the model's
residual blocks (ADDs of two activations of one shape: resnet50 has 16, 12 of them droppable;
DistilBERT's "half the layers" counts them all), taken from the candidates ranked by a cheap
importance (DistilBERT drops every other layer; here measured): the relative
L2 change of the model's outputs when that block alone is dropped, on up to `samples`
calibration samples; the least important go. Lossy: the pass manager reports the error;
follow it with `reconstruct` or distillation (graphslim.distill, slim-distill).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from graphslim import data as data_mod
from graphslim.analyses.activations import data_or_synthetic
from graphslim.edits import Bypass
from graphslim.ir import GraphView, OpKind
from graphslim.pass_manager import Pass, Plan, register_pass


@dataclass(frozen=True)
class Block:
    add: str                 # the ADD node
    skip: str                # the value it keeps
    branch: tuple[str, ...]  # the nodes that go with it


def residual_blocks(view: GraphView, shapes: dict) -> tuple[list[Block], list[tuple], int]:
    """(candidate blocks, [(ADD node, why it is not one)], number of residual joins: ADDs of
    two activations of one shape, the candidates and the blocks with a projection alike)."""
    found, rejected, joins = [], [], 0
    for node in view.nodes():
        if node.kind is not OpKind.ADD or len(node.inputs) != 2 or node.params:
            continue
        a, b = (shapes.get(v) for v in node.inputs)
        if a is None or a != b:
            continue  # a broadcast (bias, mask): not a residual join
        joins += 1
        block, why = None, "neither input is an identity skip of a branch computed from it"
        for i in (0, 1):
            skip, other = node.inputs[i], node.inputs[1 - i]
            branch = _branch(view, skip, other, node.name)
            if branch is None:
                continue
            block = Block(node.name, skip, tuple(sorted(branch)))
            break
        if block is None:
            rejected.append((node.name, why))
        else:
            found.append(block)
    adds = {b.add for b in found}
    inner = [b for b in found if not adds & set(b.branch)]
    rejected += [(b.add, "its branch holds another block (the inner ones are candidates)")
                 for b in found if b not in inner]
    return inner, rejected, joins


def _branch(view: GraphView, skip: str, other: str, add: str) -> set[str] | None:
    """The nodes between `skip` and `other` (descendants of the one, ancestors of the other),
    read only by each other and `add`; None where `other` is not computed from `skip`. Nodes
    upstream of `other` that do not descend from `skip` (an attention mask made from another
    input) are side inputs: they stay (and go in the cleanup if nothing else reads them)."""
    below: set[str] = set()
    stack = [skip]
    while stack:
        for user in view.users(stack.pop()):
            if user.name not in below and user.name != add:
                below.add(user.name)
                stack.extend(user.outputs)
    producer = view.producer(other)
    if producer is None or producer.name not in below:
        return None
    branch: set[str] = set()
    stack = [producer]
    while stack:
        n = stack.pop()
        if n.name in branch or n.name not in below:
            continue
        branch.add(n.name)
        stack.extend(p for p in map(view.producer, n.inputs) if p is not None)
    for name in branch:
        for value in view.node(name).outputs:
            if view.is_graph_output(value):
                return None
            if any(u.name not in branch and u.name != add for u in view.users(value)):
                return None
    return branch


@register_pass
@dataclass(frozen=True)
class DropBlocks(Pass):
    name = "drop-blocks"
    lossless = False
    needs_data = True
    summary = "remove whole residual blocks (depth pruning), ranked on calibration data"

    ratio: float = 0.0
    blocks: tuple[str, ...] = ()
    samples: int = 16

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), not {self.ratio}")
        if bool(self.ratio) == bool(self.blocks):
            raise ValueError("give one of ratio=F (fraction of the droppable blocks) and "
                             "blocks=NAME|NAME (their ADD nodes)")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, not {self.samples}")

    def plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        found, rejected, joins = residual_blocks(view, analyses.model.infer_shapes())
        for name, why in rejected:
            plan.skip(name, why)
        if self.blocks:
            chosen = self._named(found, plan)
        else:
            chosen = self._least_important(found, joins, analyses, plan)
        for b in chosen:
            plan.edits.append(Bypass(b.add, keep=b.skip))
            plan.details.append({"block": b.add, "skip": b.skip, "nodes": len(b.branch)})
        plan.stats["blocks_found"] = len(found)
        plan.stats["blocks_dropped"] = len(chosen)
        return plan

    def _named(self, found: list[Block], plan: Plan) -> list[Block]:
        chosen = [b for b in found if any(fnmatch.fnmatchcase(b.add, p) for p in self.blocks)]
        for pat in self.blocks:
            if not any(fnmatch.fnmatchcase(b.add, pat) for b in found):
                raise ValueError(f"drop-blocks: '{pat}' names no droppable block (candidates: "
                                 f"{', '.join(b.add for b in found) or 'none'})")
        return chosen

    def _least_important(self, found: list[Block], joins: int, analyses, plan: Plan
                         ) -> list[Block]:
        count = min(len(found), int(round(self.ratio * joins)))
        if not count:
            plan.notes.append(f"{len(found)} droppable of {joins} residual blocks; ratio "
                              f"{self.ratio} drops none")
            return []
        source, synthetic = data_or_synthetic(analyses, "drop-blocks ranking")
        feeds = _first_samples(source, analyses.model.input_specs(), self.samples)
        ref = [analyses.model.run(f) for f in feeds]
        scores = {}
        for b in found:
            trial = analyses.trial_model([Bypass(b.add, keep=b.skip)])
            scores[b.add] = _relative_change(ref, [trial.run(f) for f in feeds])
        ranked = sorted(found, key=lambda b: (scores[b.add], b.add))
        plan.notes.append(
            f"ranked {len(found)} blocks by the output change each makes when dropped alone, on "
            f"{sum(data_mod.feed_size(f) for f in feeds)} " + ("SYNTHETIC samples" if synthetic else
                                                  "calibration samples"))
        for b in ranked:
            plan.details.append({"block": b.add, "change": scores[b.add]})
        return ranked[:count]


def _first_samples(source, specs, count: int) -> list[dict]:
    feeds, total = [], 0
    for f in data_mod.batches(source, specs):
        feeds.append(f)
        total += data_mod.feed_size(f)
        if total >= count:
            break
    return feeds


def _relative_change(ref: list[dict], got: list[dict]) -> float:
    num = sum(float(np.sum((np.asarray(g[k], np.float64) - np.asarray(r[k], np.float64)) ** 2))
              for r, g in zip(ref, got) for k in r)
    den = sum(float(np.sum(np.asarray(r[k], np.float64) ** 2)) for r in ref for k in r)
    return float(np.sqrt(num / max(den, 1e-30)))



