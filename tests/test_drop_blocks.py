"""drop-blocks: whole residual blocks become the identity (torchvision ResNets, both frontends).

A ResNet built with zero_init_residual=True has every residual branch's last BatchNorm at
gamma 0, so each droppable block adds exactly nothing: dropping them must leave the outputs as
they were (to float rounding), which checks the rewiring and the removal on both frontends.
resnet50 as an ONNX file at ratio 0.25 drops 4 of its 16 blocks (its 4 projection blocks are
not candidates) and loses >= 1.2x of its MACs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import graphslim
from graphslim.benchmarks.assets import natural_photos
from graphslim.verify import compare
from tests.conftest import make_model


def test_blocks_that_add_nothing_are_dropped_without_error(frontend, tmp_path):
    """resnet18 (8 blocks, 3 with a projection), residual branches zeroed: ratio 0.6 drops
    round(0.6 x 8) = 5 blocks, the 5 identity-skip ones, and the outputs are unchanged; the
    projection blocks are skipped with the reason."""
    module = torchvision.models.resnet18(zero_init_residual=True).eval()
    example = torch.randn(1, 3, 64, 64)
    model = make_model(frontend, module, example, tmp_path, "r18")
    name = model.input_specs()[0].name
    calib = {name: natural_photos(4, 64, 64)}
    res = graphslim.optimize(model, "drop-blocks{ratio=0.6}", data=calib)
    rec = res.report.records[0]
    assert rec.stats["blocks_found"] == 5 and rec.stats["blocks_dropped"] == 5
    assert sum("identity skip" in s.reason for s in rec.skipped) == 3
    x = natural_photos(2, 64, 64, seed=1)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    got = np.concatenate([next(iter(res.model.run({name: x[i:i + 1]}).values()))
                          for i in range(len(x))])
    assert compare({"y": ref}, {"y": got}).rel_l2 < 1e-5
    assert res.report.final.macs < 0.75 * res.report.original.macs
    assert res.report.final.params < res.report.original.params  # the branches' weights went
    if frontend == "fx":  # the user's module (now the traced GraphModule) still trains
        out = res.model.module.train()(torch.from_numpy(x))
        out.sum().backward()


def test_resnet50_onnx_ratio_quarter(tmp_path):
    """4 of 16 blocks dropped, the least important on 8 natural photos; >= 1.2x fewer MACs,
    the file checks and runs (the pass manager verified it), every dropped block's nodes gone."""
    module = torchvision.models.resnet50().eval()
    model = make_model("onnx", module, torch.randn(1, 3, 224, 224), tmp_path, "r50")
    name = model.input_specs()[0].name
    res = graphslim.optimize(model, "drop-blocks{ratio=0.25}",
                             data={name: natural_photos(8)})
    rec = res.report.records[0]
    assert rec.stats["blocks_found"] == 12 and rec.stats["blocks_dropped"] == 4
    assert res.report.original.macs / res.report.final.macs >= 1.2
    left = {n.name for n in res.model.view().nodes()}
    dropped = [d["block"] for d in rec.details if "nodes" in d]
    assert len(dropped) == 4 and not left & set(dropped)
    ranked = [d["change"] for d in rec.details if "change" in d]
    assert ranked == sorted(ranked) and len(ranked) == 12


def test_named_blocks_and_bad_options(tmp_path):
    module = torchvision.models.resnet18().eval()
    model = make_model("onnx", module, torch.randn(1, 3, 64, 64), tmp_path, "r18")
    name = model.input_specs()[0].name
    calib = {name: natural_photos(2, 64, 64)}
    res = graphslim.optimize(model, "drop-blocks{blocks=/layer1/layer1.1/Add}", data=calib)
    assert res.report.records[0].stats["blocks_dropped"] == 1
    assert "/layer1/layer1.1/Add" not in {n.name for n in res.model.view().nodes()}
    with pytest.raises(graphslim.GraphslimError, match="names no droppable block"):
        graphslim.optimize(model, "drop-blocks{blocks=/layer2/layer2.0/Add}", data=calib)
    with pytest.raises(graphslim.GraphslimError, match="give one of"):
        graphslim.optimize(model, "drop-blocks", data=calib)
