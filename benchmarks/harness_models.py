"""Model sources of the benchmark harness: each gives a baseline ONNX file (BatchNorm kept), the
torch module where there is one, one feed for latency, and evaluation samples (with labels where
the data is real), and calibration samples disjoint from them (every calibrating variant,
graphslim's and the peers', gets the same ones)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx


class UnknownModel(ValueError):
    pass


@dataclass
class BenchModel:
    name: str
    onnx_path: str
    input_name: str
    input_shape: tuple
    eval_x: np.ndarray              # samples first
    eval_y: np.ndarray | None       # labels where the data is real
    calib_x: np.ndarray             # calibration samples, disjoint from eval_x
    module: object | None = None    # torch module (eval mode)
    example: object | None = None   # torch example input
    classes: bool = True            # the first output is class scores (top-1 agreement means
    #                                 something; a detector's raw head is judged by cosine)


REAL = ("mnist_cnn", "ppocr_cls", "orientation", "yolov8n")


def prepare(name: str, workdir: str) -> BenchModel:
    if name == "mnist_cnn":
        return _mnist(workdir)
    if name in ("ppocr_cls", "orientation", "yolov8n"):
        return _onnx_asset(name)
    return _torchvision(name, workdir)


def _export(module, example, path: str) -> str:
    from graphslim.benchmarks.assets import export_onnx

    if not os.path.exists(path):
        export_onnx(module, example, path)
    return path


def _torchvision(spec: str, workdir: str) -> BenchModel:
    import torch
    import torchvision

    name, _, size = spec.partition("@")
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownModel(f"unknown model '{spec}': not a torchvision classifier, nor one of "
                           f"{', '.join(REAL)}")
    size = int(size) if size else (299 if name == "inception_v3" else 224)
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                  "inception_v3") else {}
    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(**kw).eval()
    example = torch.randn(1, 3, size, size)
    path = _export(module, example, os.path.join(workdir, f"{spec}.onnx"))
    x = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    calib = np.random.default_rng(1).standard_normal((32, 3, size, size)).astype(np.float32)
    return BenchModel(spec, path, "x", (1, 3, size, size), x, None, calib, module, example)


def _mnist(workdir: str) -> BenchModel:
    from graphslim.benchmarks import mnist_cnn

    module = mnist_cnn.trained()
    example = mnist_cnn.example()
    path = _export(module, example, os.path.join(workdir, "mnist_cnn.onnx"))
    (train_x, _), (x, y) = mnist_cnn.data()  # calibrate on training digits, judge on held-out
    return BenchModel("mnist_cnn", path, "x", (1, 1, 28, 28), x, y, train_x[:32], module,
                      example)


def _onnx_asset(name: str) -> BenchModel:
    from graphslim.benchmarks.assets import (
        ORIENTATION,
        PPOCR_CLS,
        YOLOV8N,
        natural_photos,
        rotated_text_pages,
        split_text_lines,
        text_line_crops,
    )
    from graphslim.benchmarks.assets import require as package_file

    if name == "ppocr_cls":
        path = package_file(*PPOCR_CLS)
        (calib, _), (x, y) = split_text_lines(*text_line_crops())
    elif name == "yolov8n":  # a detector: no labels; crops of photos 1-6 calibrate, 7-9 judge
        path = package_file(*YOLOV8N)
        photos = {"height": 320, "width": 320, "mean": (0, 0, 0), "std": (1, 1, 1)}
        calib = natural_photos(32, photos=slice(0, 6), **photos)
        x, y = natural_photos(16, seed=1, photos=slice(6, None), **photos), None
    else:
        path = package_file(*ORIENTATION)
        x, y = rotated_text_pages()
        # natural photos calibrate: crops of the one scanned page overlap each other, so
        # alternate crops as calibration would share pixels with the evaluation crops
        calib = natural_photos(32)
    input_name = onnx.load(path, load_external_data=False).graph.input[0].name
    return BenchModel(name, path, input_name, (1, *x.shape[1:]), x, y, calib,
                      classes=name != "yolov8n")
