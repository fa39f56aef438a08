"""graphslim.distill: a compressed torch student trained towards its original, no labels.

Real data throughout: the MNIST CNN trained in the test session, students trained on the 4000
training digits (unlabeled unless said), judged on the 1000 held-out digits; early stopping is
scored on training digits the student does not train on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphslim
from graphslim.benchmarks import mnist_cnn
from graphslim.verify import compare


def _pruned(pipeline: str = "prune-channels{ratio=0.5}"):
    (xtr, _), _ = mnist_cnn.data()
    g = graphslim.trace(mnist_cnn.trained(), mnist_cnn.example())
    return graphslim.optimize(g, pipeline, data={g.input_specs()[0].name: xtr[:128]})


def test_pruned_to_a_quarter_of_the_macs_within_a_point_without_labels():
    """ratio 0.5 (0.25x MACs) drops to ~0.50 accuracy; two epochs of distillation from the
    original on unlabeled training digits bring it within 1 point of the original (0.974 ->
    0.970 measured); with the labels as well it is no worse (0.5 point of slack)."""
    (xtr, ytr), _ = mnist_cnn.data()
    teacher = mnist_cnn.trained()
    acc0 = mnist_cnn.accuracy(teacher)
    res = _pruned()
    macs = res.report.final.macs / res.report.original.macs
    pruned = mnist_cnn.accuracy(res.model.module)
    history: list = []
    out = graphslim.distill(res, teacher, xtr, epochs=2, history=history)
    assert out is res  # given back in the form it was given
    acc = mnist_cnn.accuracy(res.model.module)
    labelled = _pruned()
    graphslim.distill(labelled.model, teacher, xtr, labels=ytr, epochs=2)
    acc_labels = mnist_cnn.accuracy(labelled.model.module)
    print(f"\nMACs {macs:.2f}x: {acc0:.3f} -> pruned {pruned:.3f} -> distilled {acc:.3f} "
          f"(with labels {acc_labels:.3f}); {history}")
    assert macs <= 0.26
    assert pruned < acc0 - 0.2
    assert acc >= acc0 - 0.01
    assert acc_labels >= acc - 0.005
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    # the graphslim model's cached view follows the trained weights
    view = res.model.view()
    node = next(n for n in view.nodes() if view.has_param(n.name, "weight"))
    first = dict(res.model.module.named_parameters())
    assert any(np.array_equal(view.param(node.name, "weight"), p.detach().numpy())
               for p in first.values())


def test_a_seeded_run_repeats_and_early_stopping_keeps_the_best_epoch():
    """Same seed, same weights; scored by a metric (the start included), training stops after
    `patience` epochs without improvement and gives back the best epoch's weights; scored by
    the held-out loss, a student already equal to its teacher comes back unchanged."""
    (xtr, _), _ = mnist_cnn.data()
    teacher = mnist_cnn.trained()
    a, b = _pruned().model.module, _pruned().model.module
    graphslim.distill(a, teacher, xtr[:256], epochs=1, seed=3)
    graphslim.distill(b, teacher, xtr[:256], epochs=1, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    scores = iter([0.5, 0.9, 0.6, 0.1, 0.0])
    states = []

    def metric(module):
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scores)

    history: list = []
    c = _pruned().model.module
    graphslim.distill(c, teacher, xtr[:256], epochs=4, metric=metric, patience=2,
                      history=history)
    assert [h["metric"] for h in history] == [0.9, 0.6, 0.1]
    for k, v in c.state_dict().items():
        assert torch.equal(v, states[1][k]), k  # after the first epoch
    same = mnist_cnn.trained()
    start = {k: v.clone() for k, v in same.state_dict().items()}
    history = []
    graphslim.distill(same, teacher, xtr[:256], epochs=2, history=history)
    assert all(h["val_loss"] > 0 for h in history)
    for k, v in same.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_hints_through_adaptation_layers_that_are_dropped_after():
    """A hint at the pruned second conv block ('5': its ReLU, 16 of 32 channels left) is
    matched to the teacher's through a 1x1 adaptation conv; afterwards the student has no
    extra parameters or hooks, and the hint run is as accurate as the plain one (1 point)."""
    (xtr, _), _ = mnist_cnn.data()
    teacher = mnist_cnn.trained()
    res = _pruned()
    student = res.model.module
    before = sum(p.numel() for p in student.parameters())
    graphslim.distill(student, teacher, xtr, epochs=2, hints=["5"])
    assert sum(p.numel() for p in student.parameters()) == before
    assert not any(m._forward_hooks for m in student.modules())
    assert mnist_cnn.accuracy(student) >= mnist_cnn.accuracy(teacher) - 0.01
    with pytest.raises(ValueError, match="no such submodule"):
        graphslim.distill(student, teacher, xtr[:64], hints=["nope"])


def test_onnx_teacher_and_a_feature_map_output(tmp_path):
    """The teacher as an ONNX file run in ONNX Runtime; the student's output a feature map
    (the CNN's first two blocks, the first block's channels pruned): relative MSE, and the
    relative L2 error to the teacher on held-out digits falls by half or more."""
    from graphslim.benchmarks.assets import export_onnx

    (xtr, _), (xte, _) = mnist_cnn.data()
    trunk = torch.nn.Sequential(*list(mnist_cnn.trained())[:6]).eval()
    teacher = graphslim.load(export_onnx(trunk, mnist_cnn.example(), tmp_path / "trunk.onnx"))
    g = graphslim.trace(torch.nn.Sequential(*list(mnist_cnn.trained())[:6]), mnist_cnn.example())
    name = g.input_specs()[0].name
    res = graphslim.optimize(g, "prune-channels{ratio=0.5}", data={name: xtr[:128]})
    assert res.report.records[0].stats["units_removed"] >= 8

    def error():
        with torch.no_grad():
            out = res.model.module.eval()(torch.from_numpy(xte[:200])).numpy()
            ref = trunk(torch.from_numpy(xte[:200])).numpy()
        return compare({"y": ref}, {"y": out}).rel_l2

    before = error()
    graphslim.distill(res, teacher, xtr[:2000], epochs=1)
    after = error()
    print(f"\nfeature map rel L2 to the teacher: {before:.3f} -> {after:.3f}")
    assert after < before / 2


def test_quantization_aware_distillation_of_the_fake_quantized_model():
    """fx qdq gives a fake-quantized module that trains (straight-through); two epochs of
    distillation bring it within a point of the original, still fake-quantized."""
    (xtr, _), _ = mnist_cnn.data()
    teacher = mnist_cnn.trained()
    res = _pruned("prune-channels{ratio=0.5},qdq")
    graphslim.distill(res, teacher, xtr, epochs=2)
    assert mnist_cnn.accuracy(res.model.module) >= mnist_cnn.accuracy(teacher) - 0.01
    assert any(type(m).__name__ == "FakeQuantize" for m in res.model.module.modules())


def test_bad_arguments_are_named():
    (xtr, _), _ = mnist_cnn.data()
    teacher = mnist_cnn.trained()
    with pytest.raises(ValueError, match="alpha"):
        graphslim.distill(mnist_cnn.build(), teacher, xtr[:8], alpha=2.0)
    with pytest.raises(ValueError, match="labels for"):
        graphslim.distill(mnist_cnn.build(), teacher, xtr[:8], labels=np.zeros(3))
    with pytest.raises(TypeError, match="must be a torch module or a graphslim model"):
        graphslim.distill(object(), teacher, xtr[:8])


def test_too_few_samples_to_hold_out_keeps_the_last_epoch():
    """4 samples: none can be held out (a tenth rounds to 0), so there is nothing to choose
    by and the trained weights are kept, not discarded for the start's."""
    (xtr, _), _ = mnist_cnn.data()
    student = mnist_cnn.build()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    history: list = []
    graphslim.distill(student, mnist_cnn.trained(), xtr[:4], epochs=2, history=history)
    assert len(history) == 2 and "val_loss" not in history[0]
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())


def test_a_normalised_embedding_output_is_regressed_not_read_as_class_scores():
    """A sentence encoder's output is [batch, dim] with unit rows: the loss is the relative
    MSE (~2 x (1 - cosine)), which is 0 only when the student matches; a class-score output of
    the same shape gets the softened KL, which a student off by a constant also zeroes."""
    from graphslim.frontends.fx_distill import _output_loss, _relative_mse

    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    s = torch.nn.functional.normalize(t + 0.3 * torch.randn(8, 16, generator=g), dim=1)
    loss = _output_loss([s], [t], 4.0, 0.9, None)
    assert torch.allclose(loss, _relative_mse(s, t))
    cos = (s * t).sum(1).mean()
    assert abs(loss.item() - 2 * (1 - cos.item())) < 0.1
    scores = 5 * t  # rows of norm 5: scores; a constant shift leaves their softmax alone
    assert _output_loss([scores + 1.0], [scores], 4.0, 0.9, None).item() < 1e-6
