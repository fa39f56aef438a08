"""A small CNN trained on real MNIST digits inside the tests and the harness (seconds on the
CPU): the way to measure accuracy retention after compression (train, compress, fine-tune
briefly, evaluate)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from graphslim.benchmarks.assets import mnist5k

_DATA = None


def data():
    global _DATA
    if _DATA is None:
        _DATA = mnist5k()
    return _DATA


def build() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                         *block(64, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 49, 128),
                         nn.ReLU(), nn.Linear(128, 10))


def train(model: nn.Module, epochs: int = 3, lr: float = 2e-3, seed: int = 0,
          penalty=None) -> nn.Module:
    """Adam + one-cycle; `penalty`: a function whose value is added to the loss (regularizer)."""
    (x, y), _ = data()
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(xt) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module) -> float:
    _, (x, y) = data()
    with torch.no_grad():
        return float((model.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


_TRAINED = None


def trained() -> nn.Module:
    """The CNN after 3 epochs (trained once per test session; each caller gets a copy)."""
    global _TRAINED
    if _TRAINED is None:
        torch.manual_seed(0)
        _TRAINED = train(build(), epochs=3)
    return copy.deepcopy(_TRAINED)


def example() -> torch.Tensor:
    return torch.from_numpy(data()[1][0][:1])


__all__ = ["build", "train", "accuracy", "trained", "example", "np"]
