"""Distillation: accuracy recovered and time per epoch, on the CPU (graphslim.distill).

    python -m graphslim.benchmarks.distill_bench [--out benchmarks/results/distill.md]
    python -m graphslim.benchmarks.distill_bench --minilm [--out FILE.md]

The MNIST CNN (trained here on the 4000 training digits of MNIST-5k) pruned to a quarter of its
MACs, then distilled from the original on the training digits without labels, with labels, and
after `reconstruct`; accuracy on the 1000 held-out digits. The same as an ONNX file through
slim-distill's path (lift, distil, lower). Time per epoch over all 5000 digits (timing only:
that run's weights are not judged), at the thread count torch uses here. The CPU and its ISA
flags are in the header.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import numpy as np
import torch

import graphslim
from graphslim.benchmarks import mnist_cnn
from graphslim.runtime import cpu_info


def _pruned(frontend: str, workdir: str, pipeline: str):
    from graphslim.benchmarks.assets import export_onnx

    (xtr, _), _ = mnist_cnn.data()
    if frontend == "fx":
        model = graphslim.trace(mnist_cnn.trained(), mnist_cnn.example())
    else:
        model = graphslim.load(export_onnx(mnist_cnn.trained(), mnist_cnn.example(),
                                           os.path.join(workdir, "cnn.onnx")))
    name = model.input_specs()[0].name
    return model, graphslim.optimize(model, pipeline, data={name: xtr[:128]})


def _accuracy(model) -> float:
    _, (x, y) = mnist_cnn.data()
    if hasattr(model, "module"):
        return mnist_cnn.accuracy(model.module)
    name = model.input_specs()[0].name
    out = np.concatenate([next(iter(model.run({name: x[i:i + 1]}).values()))
                          for i in range(len(x))])
    return float((out.argmax(1) == y).mean())


def rows(workdir: str, epochs: int = 2) -> list[dict]:
    (xtr, ytr), (xte, _) = mnist_cnn.data()
    teacher = mnist_cnn.trained()
    out = []
    for frontend, pipeline, labels in (
            ("fx", "prune-channels{ratio=0.5}", False),
            ("fx", "prune-channels{ratio=0.5}", True),
            ("fx", "prune-channels{ratio=0.5},reconstruct", False),
            ("onnx", "prune-channels{ratio=0.5}", False)):
        original, res = _pruned(frontend, workdir, pipeline)
        before = _accuracy(res.model)
        history: list = []
        t = time.perf_counter()
        student = graphslim.distill(res.model, teacher if frontend == "fx" else original, xtr,
                                    epochs=epochs, labels=ytr if labels else None,
                                    history=history)
        out.append({"frontend": frontend, "pipeline": pipeline, "labels": labels,
                    "macs": res.report.final.macs / res.report.original.macs,
                    "original": _accuracy(original), "before": before,
                    "after": _accuracy(student), "epochs": epochs,
                    "seconds": time.perf_counter() - t,
                    "per_epoch": float(np.mean([h["seconds"] for h in history]))})
        print(_line(out[-1]), flush=True)
    _, res = _pruned("fx", workdir, "prune-channels{ratio=0.5}")
    history = []
    graphslim.distill(res.model, teacher, np.concatenate([xtr, xte]), epochs=1, history=history)
    out.append({"timing": True, "per_epoch": history[0]["seconds"], "samples": 5000})
    print(f"one epoch over 5000 digits: {history[0]['seconds']:.1f} s", flush=True)
    return out


def orientation_rows(workdir: str, epochs: int = 8) -> list[str]:
    """The page-orientation classifier (a third-party ONNX file) pruned at ratio 0.5, then
    slim-distill (the CLI, as a user runs it) on unlabeled inputs: 1000 crops of text pages
    typeset here plus 32 natural photo crops, none of them from the scanned evaluation page.
    Top-1 agreement with the original on 20 rotated crops of that page; ORT CPU latency of
    each file against the original, 1 thread, interleaved in one run; pruning (and
    reconstruct) calibrated on the first 64 of the training inputs, at most 8 epochs."""
    import json

    from graphslim.benchmarks.assets import orientation_case
    from graphslim.runtime import time_many
    from graphslim.tools import slim_distill

    src, name, train, x, _ = orientation_case(pages=1000)
    shape = f"{name}:1,3,224,224"
    paths = {k: os.path.join(workdir, f"o_{k}.npz") for k in ("train", "eval")}
    np.savez(paths["train"], **{name: train})
    np.savez(paths["eval"], **{name: x})
    out = []
    for recover in ("", ",reconstruct"):
        pipeline = f"prune-channels{{ratio=0.5}}{recover}"
        model = graphslim.load(src, input_shapes={name: (1, 3, 224, 224)})
        pruned = graphslim.optimize(model, pipeline, data={name: train[:64]})
        student = os.path.join(workdir, "o_student.onnx")
        pruned.model.save(student)
        distilled, report = os.path.join(workdir, "o_distilled.onnx"), \
            os.path.join(workdir, "o_report.json")
        t = time.perf_counter()
        rc = slim_distill.main([student, "--teacher", src, "--data", paths["train"], "-o",
                                distilled, "--input-shape", shape, "--epochs", str(epochs),
                                "--eval-data", paths["eval"], "--json", report])
        secs = time.perf_counter() - t
        if rc != 0:
            out.append(f"| `{pipeline}` | slim-distill failed (exit {rc}) | | | | |")
            continue
        with open(report) as f:
            rep = json.load(f)
        base, t_pruned, t_dist = time_many([src, student, distilled], {name: x[:1]},
                                           threads=1)
        out.append(f"| `{pipeline}` | {rep['before']['agreement']:.3f} | "
                   f"**{rep['after']['agreement']:.3f}** | {len(rep['epochs'])} ({secs:.0f} s) | "
                   f"{base.median / t_pruned.median:.2f}x | {base.median / t_dist.median:.2f}x |")
        print(out[-1], flush=True)
    return out


def minilm_rows(workdir: str, epochs: int = 4) -> list[str]:
    """all-MiniLM-L6-v2 as an ONNX sentence encoder (benchmarks/minilm.py) with layers 1-3 of
    0-5 dropped by `drop-blocks` (both sublayers of each; of the ten choices of three that keep
    layer 0, these lose the least: embedding cosine 0.82 before training, against 0.51 for
    DistilBERT's every other layer, 1-3-5), then graphslim.distill from the original file run
    in ONNX Runtime, lr 2e-4, on 8000 unlabeled out-of-domain inputs; embedding cosine with
    the original on the 32 held-out everyday sentences."""
    from graphslim.benchmarks import minilm
    from graphslim.runtime import time_many

    src = minilm.sentence_encoder(os.path.join(workdir, "minilm.onnx"))
    ev = minilm.tokens(minilm.SENTENCES + minilm.CALIBRATION)
    train = minilm.tokens(minilm.training_text(8000))
    shapes = {k: v.shape for k, v in ev.items()}
    teacher = graphslim.load(src, input_shapes=shapes)
    ref = teacher.run(ev)["embedding"]
    pipeline = "drop-blocks{blocks=*layer.1/*;*layer.2/*;*layer.3/*}"
    res = graphslim.optimize(teacher, pipeline, data={k: v[:64] for k, v in train.items()})
    history: list = []
    started = time.perf_counter()
    student = graphslim.distill(res.model, teacher, train, epochs=epochs, batch_size=32, lr=2e-4,
                                history=history, progress=False)
    secs = time.perf_counter() - started

    def cosine(model) -> tuple[float, float]:
        c = np.sum(ref * model.run(ev)["embedding"], axis=1)
        return float(c.mean()), float(c.min())

    (b_mean, b_min), (a_mean, a_min) = cosine(res.model), cosine(student)
    paths = [src, os.path.join(workdir, "dropped.onnx"), os.path.join(workdir, "distilled.onnx")]
    res.model.save(paths[1])
    student.save(paths[2])
    base, t_drop, t_dist = time_many(paths, ev, threads=1)
    row = (f"| `{pipeline}` | {res.report.final.macs / res.report.original.macs:.2f}x | "
           f"{b_mean:.3f} (min {b_min:.3f}) | **{a_mean:.3f}** (min {a_min:.3f}) | "
           f"{len(history)} x {np.mean([h['seconds'] for h in history]):.0f} s ({secs:.0f} s) | "
           f"{base.median / t_drop.median:.2f}x | {base.median / t_dist.median:.2f}x |")
    print(row, flush=True)
    return [row]


def _line(r: dict) -> str:
    return (f"| {r['frontend']} | `{r['pipeline']}` | {'yes' if r['labels'] else 'no'} | "
            f"{r['macs']:.2f}x | {r['original']:.3f} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{r['epochs']} | {r['per_epoch']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--minilm", action="store_true",
                    help="only the MiniLM section (about 6 minutes), written to --out alone")
    ap.add_argument("--orientation-only", action="store_true",
                    help="only the orientation classifier's section (printed, not written)")
    args = ap.parse_args(argv)
    cpu = cpu_info()
    if args.minilm:
        return _minilm_main(args, cpu)
    header = [
        "# Distillation: accuracy recovered and time per epoch", "",
        f"Produced by `python -m graphslim.benchmarks.distill_bench --out {args.out}` on "
        f"{datetime.date.today()}, {cpu['model']} ({', '.join(cpu['isa']) or 'no AVX2'}), "
        f"{cpu['cores']} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        "threads. MNIST CNN, students trained on the 4000 training digits (unlabeled unless "
        "'labels'), accuracy on the 1000 held-out digits; onnx: the ONNX file lifted to torch, "
        "distilled from the original file run in ONNX Runtime, lowered back and judged as a "
        "file.", "",
        "| frontend | pipeline | labels | MACs | original | compressed | + distill | epochs "
        "| s / epoch (4000) |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        found = [] if args.orientation_only else rows(workdir, args.epochs)
        timing = found.pop() if found else {"per_epoch": float("nan")}
        footer = ["", f"One epoch over all 5000 digits (timing only): {timing['per_epoch']:.1f} "
                  "s.", "", "## Page-orientation classifier (ONNX file) through slim-distill", "",
                  orientation_rows.__doc__.split("\n\n")[0].replace("\n    ", " ")
                  .split(": ", 1)[1], "",
                  "| pipeline | agreement, compressed | + slim-distill | epochs run | "
                  "speedup, compressed | speedup, distilled |", "|---|---|---|---|---|---|"]
        print("\n".join(footer), flush=True)
        footer += orientation_rows(workdir)
    if args.out and not args.orientation_only:
        with open(args.out, "w") as f:
            f.write("\n".join(header + [_line(r) for r in found] + footer) + "\n")
    return 0


def _minilm_main(args, cpu: dict) -> int:
    lines = [
        "# Distillation of a depth-pruned sentence encoder (all-MiniLM-L6-v2, ONNX)", "",
        f"Produced by `python -m graphslim.benchmarks.distill_bench --minilm --out {args.out}` "
        f"on {datetime.date.today()}, {cpu['model']} ({', '.join(cpu['isa']) or 'no AVX2'}), "
        f"{cpu['cores']} cores, torch {torch.__version__} with {torch.get_num_threads()} threads. "
        + " ".join(minilm_rows.__doc__.split()) + " Speedup: ORT CPU, 1 thread, the 32 "
        "sentences in one run, against the original in the same run.", "",
        "| pipeline | MACs | cosine, dropped | + distill | epochs x s | speedup, dropped | "
        "speedup, distilled |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        lines += minilm_rows(workdir)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
