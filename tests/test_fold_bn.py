"""fold-bn: fires where folding is exact (both frontends), refuses where it is not, with reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphslim
from tests.conftest import FP32, assert_matches_torch, count_ops, make_model, randomize_bn


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


def _seq(*layers):
    return lambda: nn.Sequential(*layers)


# name -> (factory, input shape, positive BN scales only)
FIRES = {
    "conv": (_seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), (2, 3, 9, 9), False),
    "conv-nobias": (_seq(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 9, 9), False),
    "grouped": (_seq(nn.Conv2d(8, 12, 3, groups=4), nn.BatchNorm2d(12)), (2, 8, 9, 9), False),
    "depthwise": (_seq(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)),
                  (2, 8, 9, 9), False),
    "convtranspose-groups": (_seq(nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4),
                                  nn.BatchNorm2d(12)), (2, 8, 5, 5), False),
    "linear-bn1d": (_seq(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16)), (4, 3, 4, 4),
                    False),
    "conv-avgpool-bn": (_seq(nn.Conv2d(3, 8, 3), nn.AvgPool2d(2), nn.BatchNorm2d(8)),
                        (2, 3, 10, 10), False),
    "conv-maxpool-bn": (_seq(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.BatchNorm2d(8)),
                        (2, 3, 10, 10), True),
    "concat-bn": (Concat, (2, 3, 8, 8), False),
    "bn-conv": (_seq(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)), (2, 3, 9, 9), False),
    "bn-grouped-conv": (_seq(nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, groups=2)), (2, 8, 9, 9),
                        False),
    "bn-linear": (_seq(nn.Flatten(), nn.BatchNorm1d(48), nn.Linear(48, 10)), (4, 3, 4, 4), False),
    "bn-flatten-linear": (_seq(nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(100, 10)),
                          (3, 4, 5, 5), False),
    "bn-conv-bn": (_seq(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 9, 9),
                   False),
}


@pytest.mark.parametrize("case", sorted(FIRES))
def test_fold_bn_fires(case, frontend, tmp_path):
    factory, shape, positive = FIRES[case]
    torch.manual_seed(0)
    module = randomize_bn(factory(), negative_scales=not positive).eval()
    x = torch.randn(*shape)
    model = make_model(frontend, module, x, tmp_path)
    assert count_ops(model, "BatchNorm") >= 1
    result = graphslim.optimize(model, "fold-bn", tolerance=FP32)
    assert count_ops(result.model, "BatchNorm") == 0, result.report.table()
    assert result.report.skipped() == []
    assert_matches_torch(result.model, module, x, FP32)


def test_fold_bn_reflect_padding_commutes():
    """Reflect padding pads with BN'd values, so folding into the conv stays exact (fx only:
    the ONNX export puts reflect padding in a separate Pad op)."""
    module = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(
        3, 8, 3, padding=1, padding_mode="reflect"))).eval()
    x = torch.randn(2, 3, 9, 9)
    result = graphslim.optimize(graphslim.trace(module, x), "fold-bn")
    assert count_ops(result.model, "BatchNorm") == 0
    assert_matches_torch(result.model, module, x)


def test_fx_result_is_users_module_and_trainable():
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 9, 9)
    result = graphslim.optimize(graphslim.trace(module, x), "fold-bn")
    out_module = result.model.module
    assert type(out_module) is nn.Sequential and isinstance(out_module[1], nn.Identity)
    assert isinstance(module[1], nn.BatchNorm2d), "the caller's module must not be mutated"
    out_module.train()
    loss = out_module(x).square().mean()
    loss.backward()
    assert out_module[0].weight.grad is not None and out_module[0].bias.grad is not None
    reloaded = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.ReLU())
    reloaded.load_state_dict(out_module.state_dict())


# --- must not fire ------------------------------------------------------------------------------

def _unchanged(result, model, reason_part):
    left = result.report.skipped()
    assert result.report.records[0].edits == 0
    assert count_ops(result.model, "BatchNorm") == count_ops(model, "BatchNorm")
    assert left and all(reason_part in s.reason for s in left), [s.reason for s in left]


def test_no_fold_after_nonlinearity(frontend, tmp_path):
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8),
                                        nn.ReLU())).eval()
    x = torch.randn(2, 3, 9, 9)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "fold-bn")
    _unchanged(result, model, "nonlinearity")


class MultiUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


def test_no_fold_multi_user_output(frontend, tmp_path):
    module = randomize_bn(MultiUser()).eval()
    x = torch.randn(2, 3, 9, 9)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "fold-bn")
    _unchanged(result, model, "users")
    assert_matches_torch(result.model, module, x)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn1(self.conv(x))) + torch.relu(self.bn2(self.conv(2 * x)))


def test_no_fold_shared_weight_unless_copy(frontend, tmp_path):
    module = randomize_bn(SharedConv()).eval()
    x = torch.randn(2, 3, 9, 9)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "fold-bn")
    _unchanged(result, model, "shared" if frontend == "onnx" else "several sites")
    copied = graphslim.optimize(model, "fold-bn{copy-shared=true}")
    if frontend == "onnx":  # two Conv nodes read one initializer: each gets a private copy
        assert count_ops(copied.model, "BatchNorm") == 0
        assert any("private copy" in n for n in copied.report.records[0].notes)
        assert_matches_torch(copied.model, module, x)
    else:  # one module called twice cannot be split by a private copy
        _unchanged(copied, model, "several sites")


def test_no_fold_training_mode_fx():
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).train()
    x = torch.randn(2, 3, 9, 9)
    model = graphslim.trace(module, x)
    result = graphslim.optimize(model, "fold-bn")
    _unchanged(result, model, "training mode")
    assert result.model.module.training, "the module's mode must be left as it was"


def test_no_fold_training_mode_onnx(tmp_path):
    """A BatchNormalization with training_mode=1 uses batch statistics: never folded."""
    path = _bn_graph(tmp_path, training=True)
    model = graphslim.load(path)
    result = graphslim.optimize(model, "fold-bn")
    _unchanged(result, model, "training mode")


def test_no_fold_into_zero_padded_conv(frontend, tmp_path):
    module = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1))).eval()
    x = torch.randn(2, 3, 9, 9)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "fold-bn")
    _unchanged(result, model, "zero-pads")


def test_no_fold_through_maxpool_with_negative_scale(frontend, tmp_path):
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.BatchNorm2d(8),
                                        nn.ReLU())).eval()
    module[2].weight.data[0] = -1.0
    x = torch.randn(2, 3, 10, 10)
    model = make_model(frontend, module, x, tmp_path)
    _unchanged(graphslim.optimize(model, "fold-bn"), model, "max pool")


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(torch.cumsum(x, dim=2)))


def test_unknown_op_left_unchanged_and_reported(frontend, tmp_path):
    module = randomize_bn(Opaque()).eval()
    x = torch.randn(2, 3, 6, 6)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "fold-bn")
    _unchanged(result, model, "not a foldable layer")
    assert "cumsum" in result.report.skipped()[0].reason.lower()


# --- ONNX-only forms: MatMul with a constant weight, Gemm with transB=0 ------------------------

def _bn_graph(tmp_path, producer="MatMul", training=False, trans_b=0):
    rng = np.random.default_rng(0)
    k, n = 6, 5
    w = rng.standard_normal((k, n) if not trans_b else (n, k)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    if producer == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"))
        nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=trans_b)]
    for name, arr in (("scale", rng.random(n) + 0.5), ("bias", rng.standard_normal(n)),
                      ("mean", rng.standard_normal(n)), ("var", rng.random(n) + 0.5)):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
    outs = ["z", "rm", "rv"] if training else ["z"]
    nodes.append(helper.make_node("BatchNormalization", ["y", "scale", "bias", "mean", "var"],
                                  outs, name="bn", training_mode=int(training)))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [4, k])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, n])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    path = str(tmp_path / f"{producer}_{training}.onnx")
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("producer,trans_b", [("MatMul", 0), ("Gemm", 0), ("Gemm", 1)])
def test_fold_bn_into_matmul_and_gemm(producer, trans_b, tmp_path):
    model = graphslim.load(_bn_graph(tmp_path, producer, trans_b=trans_b))
    x = {"x": np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)}
    ref = model.run(x)
    result = graphslim.optimize(model, "fold-bn")
    assert count_ops(result.model, "BatchNorm") == 0
    got = result.model.run(x)
    np.testing.assert_allclose(got["z"], ref["z"], rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(result.model.to_proto(), full_check=True)
