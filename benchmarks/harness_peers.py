"""Peers of the benchmark harness: the tools a user would pick instead, each producing an ONNX
file from the same baseline. All optional: a missing package skips the cell with a message."""

from __future__ import annotations

import importlib.util
import os
import time

from graphslim.benchmarks.harness_models import BenchModel


class Skip(Exception):
    """This cell does not apply or its tool is not installed; the message says why."""


PEERS = ("ort-optimizer", "onnxsim", "ort-quantize-default", "ort-quantize-best",
         "torch-pruning", "nncf")


def run_peer(peer: str, bm: BenchModel, out: str) -> tuple[float, object | None]:
    """Write the peer's version of `bm` to `out`; returns the tool's own seconds and, for a
    torch-side peer, its torch module (timed on the torch runtime)."""
    if peer not in PEERS:
        raise Skip(f"unknown peer '{peer}' (known: {', '.join(PEERS)})")
    t = time.perf_counter()
    module = {"ort-optimizer": _ort_optimizer, "onnxsim": _onnxsim,
              "ort-quantize-default": _quantize_default, "ort-quantize-best": _quantize_best,
              "torch-pruning": _torch_pruning, "nncf": _nncf}[peer](bm, out)
    return time.perf_counter() - t, module


def _need(package: str, hint: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise Skip(f"{package} not installed ({hint})")


def _ort_optimizer(bm: BenchModel, out: str) -> None:
    from graphslim.runtime import make_session

    make_session(bm.onnx_path, opt_level="extended", threads=1, optimized_model_path=out)


def _onnxsim(bm: BenchModel, out: str) -> None:
    _need("onnxsim", "pip install onnxsim")
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(bm.onnx_path))
    if not ok:
        raise Skip("onnxsim could not validate its output")
    onnx.save(model, out)


class _Reader:
    """ORT's CalibrationDataReader over the model's calibration samples, one at a time."""

    def __init__(self, bm: BenchModel, n: int = 32):
        self.items = iter([{bm.input_name: bm.calib_x[i:i + 1]}
                           for i in range(min(n, len(bm.calib_x)))])

    def get_next(self):
        return next(self.items, None)


def _quantize(bm: BenchModel, out: str, best: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out + ".pre.onnx"
    quant_pre_process(bm.onnx_path, pre, skip_symbolic_shape=True)
    kw = {"per_channel": True, "activation_type": QuantType.QUInt8,
          "weight_type": QuantType.QInt8} if best else {}
    quantize_static(pre, out, _Reader(bm), quant_format=QuantFormat.QDQ, **kw)
    os.remove(pre)


def _quantize_default(bm: BenchModel, out: str) -> None:
    _quantize(bm, out, best=False)


def _quantize_best(bm: BenchModel, out: str) -> None:
    _quantize(bm, out, best=True)


def _torch_pruning(bm: BenchModel, out: str):
    _need("torch_pruning", "pip install torch-pruning")
    if bm.module is None:
        raise Skip("Torch-Pruning needs the torch module; this model is an ONNX file")
    import copy

    import torch
    import torch_pruning as tp

    from graphslim.benchmarks.assets import export_onnx

    module = copy.deepcopy(bm.module)
    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(module, bm.example, importance=tp.importance.
                                       MagnitudeImportance(p=1), pruning_ratio=0.5,
                                       ignored_layers=last, round_to=8)
    pruner.step()
    export_onnx(module.eval(), bm.example, out)
    return module


def _nncf(bm: BenchModel, out: str) -> None:
    _need("nncf", "pip install nncf")
    import nncf
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = nncf.Dataset([{bm.input_name: bm.calib_x[i:i + 1]}
                         for i in range(min(32, len(bm.calib_x)))])
    # the same preparation ORT's quantizer gets (BatchNorms fused into the convs): NNCF's ONNX
    # PTQ expects a model exported that way, and quantizes a kept BatchNorm's input instead
    pre = out + ".pre.onnx"
    quant_pre_process(bm.onnx_path, pre, skip_symbolic_shape=True)
    onnx.save(nncf.quantize(onnx.load(pre), data), out)
    os.remove(pre)


__all__ = ["PEERS", "Skip", "run_peer"]
