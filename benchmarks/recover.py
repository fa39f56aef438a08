"""Accuracy recovery: compressed, then `reconstruct`, then distillation, on real trained models.

    python -m graphslim.benchmarks.recover [--out benchmarks/results/recover.md] [--cases a,b]
                                           [--no-distill]

Per real model and pipeline: the metric on held-out real data for the original, the compressed
model, the compressed model after `reconstruct` (the same pipeline with `,reconstruct`
appended), and distilled from the original (graphslim.distill, no labels, on the case's
unlabeled training inputs: after compression alone at lr 1e-3, and after reconstruct at lr 1e-4,
as it starts close), with seconds per epoch; top-1 agreement with the original (output cosine
for the detector), MACs, ORT CPU latency of the recovered model against the original in the same
run (1 thread, interleaved), and reconstruct's own time. Calibration and evaluation data are
disjoint in every row: MNIST training digits / held-out digits; natural photos / rotated scanned
pages (the orientation classifier); the even text lines of the page / the odd ones (PP-OCR
classifier); photos 1-6 / photos 7-9 of benchmarks.assets.PHOTOS (YOLOv8n); documentation
windows and vocabulary words / 32 everyday sentences (all-MiniLM-L6-v2, embedding cosine); the
distillation
inputs come from the calibration side (the orientation classifier's add 1000 typeset text
pages). The CPU and its ISA flags are in the header: latency depends on them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

import graphslim
from graphslim.fidelity import agreement
from graphslim.runtime import cpu_info, time_models
from graphslim.verify import compare


@dataclass
class Case:
    name: str
    model: object          # graphslim model (ONNX)
    input: str             # the input name, where the arrays below are one array each
    calib: np.ndarray      # (or input name -> array, for a model of several inputs: MiniLM)
    evaluation: np.ndarray
    labels: np.ndarray | None
    pipelines: tuple[str, ...]
    calib_note: str
    train: np.ndarray | None = None  # unlabeled distillation inputs (default: calib)
    train_note: str = ""
    epochs: int = 4
    lrs: tuple[float, float] = (1e-3, 1e-4)  # distillation after compression, after reconstruct


def _mnist(workdir: str) -> Case:
    from graphslim.benchmarks import mnist_cnn
    from graphslim.benchmarks.assets import export_onnx

    (xtr, _), (xte, yte) = mnist_cnn.data()
    path = export_onnx(mnist_cnn.trained(), mnist_cnn.example(), os.path.join(workdir, "m.onnx"))
    return Case("mnist_cnn", graphslim.load(path), "x", xtr[:128], xte, yte,
                ("prune-channels{target-macs=0.5}", "prune-channels{ratio=0.5}",
                 "prune-channels{ratio=0.5,criterion=recon}",
                 "factorize{method=tucker2,rank=0.25}", "conv-separable"),
                "128 training digits (shuffled, all classes)", xtr, f"{len(xtr)} training digits")


def _orientation(_: str) -> Case:
    from graphslim.benchmarks.assets import natural_photos, orientation_case

    src, name, train, x, y = orientation_case(pages=1000)  # 1000 typeset pages + 32 photos
    model = graphslim.load(src, input_shapes={name: (1, 3, 224, 224)})
    return Case("orientation (PP-LCNet)", model, name, natural_photos(32), x, y,
                ("prune-channels{ratio=0.3}", "prune-channels{ratio=0.3,criterion=recon}",
                 "prune-channels{ratio=0.5}"),
                "32 natural photo crops", train, "1000 typeset pages + the 32 photo crops",
                epochs=8)


def _ppocr(_: str) -> Case:
    from graphslim.benchmarks.assets import PPOCR_CLS, require, split_text_lines, text_line_crops

    src = require(*PPOCR_CLS)
    (calib, _), (x, y) = split_text_lines(*text_line_crops())
    return Case("ppocr_cls", graphslim.load(src, input_shapes={"x": (1, 3, 48, 192)}), "x", calib,
                x, y, ("prune-channels{ratio=0.3}", "prune-channels{ratio=0.3,criterion=taylor}",
                       "prune-channels{ratio=0.3,criterion=recon}"),
                f"{len(calib)} crops of the page's even text lines (eval: odd lines)", epochs=8)


def _yolo(_: str) -> Case:
    from graphslim.benchmarks.assets import YOLOV8N, natural_photos, require

    src = require(*YOLOV8N)
    photos = {"height": 320, "width": 320, "mean": (0, 0, 0), "std": (1, 1, 1)}
    return Case("yolov8n", graphslim.load(src, input_shapes={"images": (1, 3, 320, 320)}),
                "images", natural_photos(32, photos=slice(0, 6), **photos),
                natural_photos(16, seed=1, photos=slice(6, None), **photos), None,
                ("prune-channels{ratio=0.3}",), "32 crops of photos 1-6",
                natural_photos(128, seed=2, photos=slice(0, 6), **photos),
                "128 crops of photos 1-6")


def _minilm(workdir: str) -> Case:
    from graphslim.benchmarks import minilm

    src = minilm.sentence_encoder(os.path.join(workdir, "minilm.onnx"))
    ev = minilm.tokens(minilm.SENTENCES + minilm.CALIBRATION)
    model = graphslim.load(src, input_shapes={k: (1, minilm.SEQ) for k in ev})
    return Case("all-MiniLM-L6-v2", model, "", minilm.tokens(minilm.training_text(256)), ev,
                None, ("factorize{method=svd,target-macs=0.55,layers=linear,data-aware=true}",
                       "drop-blocks{blocks=*layer.1/*;*layer.2/*;*layer.3/*}"),
                "256 out-of-domain inputs (minilm.training_text)",
                minilm.tokens(minilm.training_text(8000)),
                "8000 out-of-domain inputs (lr 2e-4, 1e-4: BERT's fine-tuning rates)",
                lrs=(2e-4, 1e-4))


CASES = {"mnist": _mnist, "orientation": _orientation, "ppocr": _ppocr, "yolov8n": _yolo,
         "minilm": _minilm}


def _feeds(case: Case, x) -> dict[str, np.ndarray]:
    return x if isinstance(x, dict) else {case.input: x}


def _outputs(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    return np.concatenate([next(iter(model.run({k: v[i:i + 1] for k, v in feeds.items()})
                                     .values())) for i in range(n)])


def _judge(ref: np.ndarray, out: np.ndarray, labels) -> dict:
    row = {"cosine": compare({"y": ref}, {"y": out}).cosine}
    if labels is not None:
        row["agree"] = agreement({"y": ref}, {"y": out})
        row["acc"] = float((out.argmax(1) == labels).mean())
    return row


def _distilled(model, case: Case, lr: float) -> tuple[object, float, int]:
    """(model distilled from the case's original on its training inputs, seconds per epoch,
    epochs run)."""
    history: list = []
    train = case.calib if case.train is None else case.train
    out = graphslim.distill(model, case.model, _feeds(case, train), epochs=case.epochs,
                            batch_size=32, lr=lr, history=history, progress=False)
    return out, float(np.mean([h["seconds"] for h in history])), len(history)


def run_case(case: Case, distill: bool = True) -> list[dict]:
    evaluation = _feeds(case, case.evaluation)
    ref = _outputs(case.model, evaluation)
    base = _judge(ref, ref, case.labels)
    rows = []
    data = _feeds(case, case.calib)
    for pipe in case.pipelines:
        compressed = graphslim.optimize(case.model, pipe, data=data)
        t = time.perf_counter()
        recovered = graphslim.optimize(case.model, pipe + ",reconstruct", data=data)
        seconds = time.perf_counter() - t - compressed.report.seconds
        rec = recovered.report.records[-1]
        feeds = {k: v[:1] for k, v in evaluation.items()}
        before, after = time_models(case.model.deployable(), recovered.model.deployable(), feeds,
                                    threads=1, max_time=3.0)
        rows.append({
            "model": case.name, "pipeline": pipe, "calib": case.calib_note,
            "eval": len(ref),
            "macs": recovered.report.final.macs / recovered.report.original.macs,
            "speedup": before.median / after.median, "original": base,
            "compressed": _judge(ref, _outputs(compressed.model, evaluation), case.labels),
            "recovered": _judge(ref, _outputs(recovered.model, evaluation), case.labels),
            "refit": rec.stats.get("refit", 0), "layers": rec.stats.get("refit", 0) + len(
                rec.skipped), "seconds": seconds})
        if distill:
            for key, start, lr in (("distilled", compressed.model, case.lrs[0]),
                                   ("both", recovered.model, case.lrs[1])):
                out, per_epoch, epochs = _distilled(start, case, lr)
                rows[-1][key] = _judge(ref, _outputs(out, evaluation), case.labels)
                rows[-1][key + "_epochs"] = f"{epochs} x {per_epoch:.1f} s"
            rows[-1]["train"] = case.train_note or case.calib_note
        print(_line(rows[-1]), flush=True)
    return rows


def _metric(row: dict, key: str) -> str:
    m = row[key]
    if "acc" in m:
        return f"{m['acc']:.3f}" if key == "original" else f"{m['acc']:.3f} / {m['agree']:.2f}"
    return f"{m['cosine']:.4f}"


def _line(r: dict) -> str:
    distilled = (f" {_metric(r, 'distilled')} ({r['distilled_epochs']}) | {_metric(r, 'both')} "
                 f"({r['both_epochs']}) | {r['train']} |" if "distilled" in r else " | | |")
    return (f"| {r['model']} | `{r['pipeline']}` | {r['macs']:.2f}x | {r['speedup']:.2f}x | "
            f"{_metric(r, 'original')} | {_metric(r, 'compressed')} | {_metric(r, 'recovered')} "
            f"| {r['refit']}/{r['layers']} | {r['seconds']:.1f} | {r['calib']} / {r['eval']} |"
            + distilled)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {','.join(CASES)}")
    ap.add_argument("--no-distill", action="store_true", help="leave out the distillation columns")
    args = ap.parse_args(argv)
    cpu = cpu_info()
    header = [
        "# Accuracy recovery: `reconstruct`, then distillation", "",
        f"Produced by `python -m graphslim.benchmarks.recover --out {args.out}` on "
        f"{datetime.date.today()}, {cpu['model']} ({', '.join(cpu['isa']) or 'no AVX2'}), "
        f"{cpu['cores']} cores. Metric: top-1 accuracy on held-out real data / top-1 agreement "
        "with the original (classifiers), output cosine with the original over all evaluation "
        "samples (YOLOv8n, raw head output; all-MiniLM-L6-v2, its unit sentence embeddings). "
        "speedup: ORT CPU, 1 thread, the recovered model "
        "against the original, "
        "interleaved in one process (the compressed model has the same architecture). "
        "refit: layers refit / layers considered. s: reconstruct's own seconds. + distill: "
        "graphslim.distill from the original, no labels, on the training inputs named in the "
        "last column (disjoint from evaluation), lr 1e-3 after compression, 1e-4 after "
        "reconstruct; epochs run x seconds per epoch (the best of the start and every epoch on "
        "a held-out tenth is kept). Calibration and evaluation data disjoint.", "",
        "| model | pipeline | MACs | speedup | original | compressed | + reconstruct | refit "
        "| s | calibration / eval samples | + distill | + reconstruct + distill | distillation "
        "inputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for key in args.cases.split(","):
            try:
                case = CASES[key](workdir)
            except Exception as exc:  # an asset package not installed
                print(f"{key}: skipped ({type(exc).__name__}: {exc})")
                continue
            rows.extend(run_case(case, distill=not args.no_distill))
    footer = ["", f"Total {time.perf_counter() - started:.0f} s."]
    print(footer[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(header + [_line(r) for r in rows] + footer) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
