"""prune-channels benchmark: prunability across torchvision, speedup efficiency, engine speed.

    python -m graphslim.benchmarks.prune_bench zoo [--models a,b] [--out FILE]
    python -m graphslim.benchmarks.prune_bench speed [--models a,b] [--out FILE]
    python -m graphslim.benchmarks.prune_bench deps [--out FILE]

(all classifiers on fx + ONNX; speedup efficiency; ChannelDeps against Torch-Pruning.)

zoo: each torchvision classifier (weights=None) on fx and on its ONNX export (BN kept), pruned
with prune-channels{ratio=0.5}: groups, blocked groups with reasons, MACs before/after, ORT CPU
latency before/after (1 thread, ORT_ENABLE_ALL, interleaved, few repeats).
speed: ORT latency speedup / MACs reduction ("speedup efficiency") at ratio 0.5, 1 thread,
interleaved A/B in one process, for the models Torch-Pruning's numbers are quoted on.
deps: ChannelDeps build time vs Torch-Pruning's DependencyGraph.build_dependency on the same
model in the same run (Torch-Pruning is optional; skipped with a message if absent).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch
import torchvision

import graphslim
from graphslim.analyses.channels import build_channel_deps
from graphslim.benchmarks.assets import export_onnx
from graphslim.runtime import compare, make_session, session_runner
from graphslim.verify import make_inputs

SPEED_MODELS = ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "efficientnet_b0",
                "regnet_y_400mf", "densenet121", "convnext_tiny"]


def classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str):
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                  "inception_v3") else {}
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(**kw).eval()
    size = 299 if name == "inception_v3" else 224
    if name.startswith("vit_h") or name.endswith("_384"):
        size = 518 if name.startswith("vit_h") else 384
    return m, torch.randn(1, 3, size, size)


def _model(name: str, frontend: str, tmp: str):
    m, x = build(name)
    if frontend == "fx":
        return graphslim.trace(m, x)
    return graphslim.load(export_onnx(m, x, os.path.join(tmp, f"{name}.onnx")))


def _onnx_bytes(model, tmp: str, tag: str) -> str:
    path = os.path.join(tmp, f"{tag}.onnx")
    if isinstance(model, graphslim.OnnxGraph):
        model.save(path)
    else:
        model.to_onnx(path)
    return path


def _latency(a: str, b: str, feeds: dict, repeats: int) -> tuple[float, float]:
    sa, sb = (make_session(p, opt_level="all", threads=1) for p in (a, b))
    la, lb = compare(session_runner(sa, feeds), session_runner(sb, feeds), repeats=repeats)
    return la.median, lb.median


def prune_row(name: str, frontend: str, ratio: float = 0.5, repeats: int = 5,
              pipeline: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        row = {"model": name, "frontend": frontend}
        try:
            model = _model(name, frontend, tmp)
            deps = build_channel_deps(model.view(), model.infer_shapes())
            blocked = [g for g in deps.groups if not g.prunable]
            reasons = sorted({g.blocked[0].split(": ", 1)[-1] for g in blocked})
            row.update(groups=len(deps.groups), blocked=len(blocked), reasons=reasons)
            text = pipeline or f"prune-channels{{ratio={ratio}}}"
            t = time.perf_counter()
            res = graphslim.PassManager(text, verify="end").run(model)
            row["seconds"] = round(time.perf_counter() - t, 2)
            row["macs"] = (res.report.original.macs, res.report.final.macs)
            a, b = _onnx_bytes(model, tmp, "a"), _onnx_bytes(res.model, tmp, "b")
            feeds = make_inputs(res.model.input_specs())
            timed = repeats and row["macs"][0] < 20e9  # the giants would take the whole run
            row["latency"] = _latency(a, b, feeds, repeats) if timed else None
            row["status"] = "ok" if row["macs"][1] < row["macs"][0] else "no MACs saved"
        except Exception as exc:  # one model's failure is a row, not the end of the run
            row["status"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        gc.collect()
        return row


def _fmt_zoo(rows: list[dict]) -> str:
    out = ["| model | frontend | groups | blocked | MACs before | MACs after | MACs cut | "
           "ORT ms before | ORT ms after | speedup | status / blocked by |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "macs" in r:
            (m0, m1), lat = r["macs"], r.get("latency")
            lat_cells = (f"{lat[0] * 1e3:.1f} | {lat[1] * 1e3:.1f} | {lat[0] / lat[1]:.2f}x"
                         if lat else "- | - | -")
            why = r["status"] if r["status"] != "ok" else "; ".join(r["reasons"])[:120]
            out.append(f"| {r['model']} | {r['frontend']} | {r['groups']} | {r['blocked']} | "
                       f"{m0 / 1e6:.0f}M | {m1 / 1e6:.0f}M | {m0 / max(m1, 1):.2f}x | "
                       f"{lat_cells} | {why} |")
        else:
            out.append(f"| {r['model']} | {r['frontend']} | | | | | | | | | {r['status']} |")
    return "\n".join(out)


def _fmt_speed(rows: list[dict]) -> str:
    out = ["| model | frontend | MACs cut | ORT speedup (1 thread) | efficiency |",
           "|---|---|---|---|---|"]
    for r in rows:
        if "latency" not in r or not r["latency"]:
            out.append(f"| {r['model']} | {r['frontend']} | | | {r['status']} |")
            continue
        cut = r["macs"][0] / r["macs"][1]
        sp = r["latency"][0] / r["latency"][1]
        out.append(f"| {r['model']} | {r['frontend']} | {cut:.2f}x | {sp:.2f}x | "
                   f"{sp / cut:.2f} |")
    return "\n".join(out)


def deps_timing(names=("densenet121", "vit_b_16"), repeats: int = 3) -> list[dict]:
    rows = []
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
        print("torch-pruning not installed: its column is skipped (pip install torch-pruning)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            m, x = build(name)
            row = {"model": name}
            for fe in ("fx", "onnx"):
                model = _model(name, fe, tmp)
                view, shapes = model.view(), model.infer_shapes()
                row[fe] = min(_timed(build_channel_deps, view, shapes) for _ in range(repeats))
            if tp is not None:
                row["torch-pruning"] = min(
                    _timed(tp.DependencyGraph().build_dependency, m, example_inputs=x)
                    for _ in range(repeats))
            rows.append(row)
    return rows


def _timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("zoo", "speed", "deps"))
    p.add_argument("--models", help="comma-separated torchvision names")
    p.add_argument("--frontends", default="fx,onnx")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--skip", default="regnet_y_128gf,vit_h_14",
                   help="models left out (the two largest need more memory than CI has)")
    p.add_argument("--out", help="append the markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fronts = args.frontends.split(",")
    if args.what == "deps":
        rows = deps_timing()
        table = "| model | ChannelDeps fx (s) | ChannelDeps ONNX (s) | Torch-Pruning (s) |\n" \
                "|---|---|---|---|\n" + "\n".join(
                    f"| {r['model']} | {r['fx']:.3f} | {r['onnx']:.3f} | "
                    f"{r.get('torch-pruning', float('nan')):.3f} |" for r in rows)
    else:
        names = args.models.split(",") if args.models else (
            classifiers() if args.what == "zoo" else SPEED_MODELS)
        names = [n for n in names if n not in args.skip.split(",")]
        repeats = args.repeats if args.repeats is not None else (5 if args.what == "zoo" else 30)
        rows = []
        for name in names:
            for fe in fronts:
                row = prune_row(name, fe, repeats=repeats)
                rows.append(row)
                print(name, fe, row.get("macs"), row.get("latency"), row["status"], flush=True)
        table = _fmt_zoo(rows) if args.what == "zoo" else _fmt_speed(rows)
        ok = sum(1 for r in rows if r["status"] == "ok")
        table += f"\n\n{ok} of {len(rows)} runs pruned (MACs down, output shape kept)."
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
