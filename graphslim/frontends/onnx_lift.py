"""Lift an ONNX graph into a trainable torch module, and lower the trained module back to ONNX.

The lift is onnx2torch's (a maintained converter of ~150 ONNX ops into torch.fx GraphModules
whose initializers become parameters); writing our own on the two frontends was weighed and not
done: graphslim's frontends view and edit graphs, they do not translate between them, and a
second ONNX-op-to-torch table would duplicate onnx2torch's. Measured on the real files the tests
install (after prune-channels): the page-orientation classifier, the PP-OCR angle classifier
and YOLOv8n lift in 0.1-0.2 s and match ONNX Runtime to 3e-8, 2e-7 and 1.2e-4 (YOLO's box
coordinates are in pixels) on random inputs, at batch 1 and 4. Both directions are checked
here rather than trusted: the lifted module against ONNX Runtime on the original file, the
lowered file against the module it came from, on seeded inputs; a mismatch is an error that
names the file's op where the converter has none.

Lowering is torch.onnx.export (the TorchScript exporter, as fx's to_onnx) with the original's
input and output names, its input shapes and its opset (at least 13, for QDQ), so the file
drops in where the original was.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from torch import nn

from graphslim.errors import InputError, StructureError
from graphslim.verify import Tolerance, compare, make_inputs

#: lifted vs ONNX Runtime: the converter reorders float sums (YOLOv8n: 1.2e-4 on pixel-sized
#: outputs), so relative L2 rather than elementwise closeness
_LIFT_REL_L2 = 1e-4


def lift(model) -> nn.Module:
    """A graphslim ONNX model as a torch module (eval mode), checked against ONNX Runtime."""
    try:
        from onnx2torch import convert
    except ImportError as exc:
        raise InputError("lifting an ONNX model to torch needs onnx2torch: pip install "
                         "'graphslim-engine[onnx-distill]'") from exc
    try:
        module = convert(model.to_proto()).eval()
    except NotImplementedError as exc:  # onnx2torch names the op and its version
        raise StructureError(f"cannot lift the ONNX graph to torch: {exc}") from None
    feeds = make_inputs(model.input_specs())
    ref = model.run(feeds)
    got = _forward(module, feeds)
    err = compare(ref, dict(zip(ref, got)), Tolerance())
    if not err.rel_l2 <= _LIFT_REL_L2:
        raise StructureError(f"the lifted torch module disagrees with ONNX Runtime on the "
                             f"original (rel L2 {err.rel_l2:.3g}): an op onnx2torch converts "
                             "differently")
    return module


def lower(module: nn.Module, like):
    """The trained module as a graphslim ONNX model with `like`'s inputs, outputs and opset,
    checked against the module on seeded inputs."""
    import graphslim

    specs = like.input_specs()
    feeds = make_inputs(specs)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in specs)
    outputs = list(like.view().outputs)
    module = module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lowered.onnx")
        torch.onnx.export(module, args, path, input_names=[s.name for s in specs],
                          output_names=outputs, opset_version=max(13, like.opset),
                          dynamo=False)
        out = graphslim.load(path)
    ref = _forward(module, feeds)
    got = out.run(feeds)
    err = compare(dict(zip(got, ref)), got, Tolerance())
    if err.max_excess > 0 or err.nonfinite:
        raise StructureError(f"the exported ONNX file disagrees with the trained module "
                             f"(rel L2 {err.rel_l2:.3g})")
    return out


def _forward(module: nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(v) for v in feeds.values()])
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [o.numpy() for o in outs]
