"""Where the values of a compressed graph came from: the reference model and the maps into it.

A pass that recovers accuracy (reconstruct) fits a layer of the compressed graph to what the
original model computed at the same point. The pass manager keeps, for pipelines that ask for
it (`Pass.needs_reference`):

- `reference`: a copy of the model as it was just before the first lossy pass (lossless passes
  before it, fold-bn say, change what value names mean but not the function, so the reference
  is the original model under the names the compressed graph still uses);
- `origins`: for the output value of a weighted layer whose output channels were sliced
  (pruned, reordered), the reference channel of each channel it has now; composed over passes;
- `aliases`: a value of the compressed graph that stands for another reference value: after
  `Bypass(node)` whose input's producer the same plan rewrites (fold-bn folding a BatchNorm
  into the conv before it) the readers of the node's output read that input, which now
  carries what the reference computed at the node's output. A bypass whose consumers were
  rewritten instead (a BatchNorm folded into the conv after it) leaves the input's meaning.
  After `ReplaceWithChain(node)` (factorize, conv-group, conv-separable) the value the chain's
  last layer writes stands for the replaced node's output, under whatever name the frontend
  gave it (ONNX keeps the name, fx names the new nodes).

Both maps are derived from the edits as the engine applies them (the edit vocabulary says what
each edit means), not from any pass's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphslim.edits import Bypass, ReplaceWithChain, SetParam, SliceParam
from graphslim.frontends.base import Frontend
from graphslim.ir import GraphView, OpKind

#: the weight axis that indexes a layer's output channels, canonical layout (graphslim/ir.py)
_OUT_AXIS = {OpKind.CONV: 0, OpKind.LINEAR: 0}


@dataclass
class Provenance:
    reference: Frontend
    origins: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def reference_value(self, value: str) -> str:
        """The reference model's name for what `value` of the compressed graph computes."""
        return self.aliases.get(value, value)

    def channels(self, value: str, count: int) -> np.ndarray:
        """The reference channels of the `count` channels `value` has now."""
        return self.origins.get(value, np.arange(count))

    def applied(self, before: GraphView, after: GraphView, edits: list) -> None:
        """After `edits` were applied: the value a replaced node's readers now read stands
        for that node's output (found through a reader both graphs have)."""
        for e in edits:
            if not isinstance(e, ReplaceWithChain):
                continue
            out = before.node(e.node).output
            for reader in before.users(out):
                try:
                    now = after.node(reader.name)
                except KeyError:
                    continue
                new = now.inputs[reader.inputs.index(out)] if len(now.inputs) == len(
                    reader.inputs) else None
                if new is not None and new != out:
                    self.aliases[new] = self.reference_value(out)
                    if out in self.origins:
                        self.origins[new] = self.origins[out]
                break

    def record(self, view: GraphView, edits: list) -> None:
        """Update the maps for `edits` about to be applied to the graph `view` shows."""
        rewritten = {e.node for e in edits if isinstance(e, SetParam)}
        for e in edits:
            if isinstance(e, SliceParam) and e.role == "weight":
                node = view.node(e.node)
                if _OUT_AXIS.get(node.kind) != e.axis or not node.outputs:
                    continue
                value = node.output
                count = view.param_info(e.node, "weight")[0][e.axis]
                self.origins[value] = self.channels(value, count)[np.asarray(e.keep)]
            elif isinstance(e, Bypass):
                node = view.node(e.node)
                producer = view.producer(node.inputs[0]) if node.inputs else None
                if producer is not None and producer.name in rewritten and node.outputs:
                    src, out = node.inputs[0], node.output
                    self.aliases[src] = self.reference_value(out)
                    if view.is_graph_output(out) and src in self.origins:
                        # the frontend may give the producer the output's name (ONNX keeps
                        # graph output names): both names then map the same channels
                        self.origins[out] = self.origins[src]
