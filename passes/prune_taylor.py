"""Taylor importance for prune-channels (kept apart: it needs data, the rest does not).

fx: removing a unit is zeroing its consumer slices (the input columns of every layer that reads
it), so to first order the loss changes by the sum of w * dL/dw over those slices; the score is
that signed sum squared per data chunk and averaged over chunks (Molchanov et al. 2017; the
squared, per-minibatch form of their 2019 paper). ONNX has no gradients: the proxy is, per consumer
slice, ||W[:, c]|| x mean |x_c| over the data (the output change a channel's removal causes to
first order, up to the loss's sensitivity), summed over the unit's consumers; the plan's notes
say which was used and on what data.
"""

from __future__ import annotations

from graphslim.analyses.activations import TaylorSaliency
from graphslim.analyses.channels import ChannelDeps, ParamSite
from graphslim.ir import GraphView, OpKind
from graphslim.passes import prune_math as pm


def taylor_scores(view: GraphView, deps: ChannelDeps, analyses, plan) -> dict[int, float]:
    sal = analyses.get(TaylorSaliency)
    scores: dict[int, float] = {}
    if sal.kind == "taylor":
        plan.notes.append(f"taylor: (sum w * dL/dw)^2, loss {sal.loss}"
                          + (", synthetic inputs" if sal.synthetic else ""))
        chunk_sums: list[dict[int, float]] = []
        for site in deps.sites:
            if not (isinstance(site, ParamSite) and site.consumer):
                continue
            rows = sal.values.get(view.node(site.node).params[site.role])
            for i, r in enumerate(rows if rows is not None else ()):
                if len(chunk_sums) <= i:
                    chunk_sums.append({})
                pm.accumulate(deps.units_of(site.ids), pm.slice_sums(r, site.axis),
                              chunk_sums[i], normalize=False)
        for sums in chunk_sums:  # signed over the consumers, squared per chunk, then averaged
            for u, v in sums.items():
                scores[u] = scores.get(u, 0.0) + v * v / len(chunk_sums)
        return scores
    plan.notes.append("taylor on a frontend without gradients: activation proxy "
                      "||W[:, c]|| x mean |x_c|" + (", synthetic inputs" if sal.synthetic else ""))
    for site in deps.sites:
        if not (isinstance(site, ParamSite) and site.consumer and site.role == "weight"):
            continue
        node = view.node(site.node)
        act = sal.values.get(site.node)
        if node.kind not in (OpKind.CONV, OpKind.LINEAR) or act is None:
            continue
        norms = pm.slice_norms(view.param(site.node, "weight"), site.axis, 2)
        if len(act) == len(norms):
            pm.accumulate(deps.units_of(site.ids), norms * act, scores)
    return scores
