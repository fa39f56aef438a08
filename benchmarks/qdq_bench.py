"""qdq measurements beyond the harness table (benchmarks/run.py has speed and fidelity against
ORT's quantizer): calibration memory, and the fold-bn,prune-channels,qdq composition.

    python -m graphslim.benchmarks.qdq_bench memory [--samples 256]  (-> results/qdq_memory.md)
    python -m graphslim.benchmarks.qdq_bench compose                 (-> results/qdq_compose.md)
    python -m graphslim.benchmarks.qdq_bench minilm                  (-> results/qdq_minilm.md)

memory: peak resident memory added while calibrating resnet50 on N samples (sampled every 5 ms
from /proc/self/statm), against the bytes of one forward pass' activations (every float value
of one sample, what calibration captures per batch). compose: MACs, file size and ORT latency
(1 thread, interleaved with the fp32 original) of resnet50 after fold-bn, prune-channels 0.5 and
qdq, each stage against the original. minilm: all-MiniLM-L6-v2 as a sentence encoder
(benchmarks/minilm.py) with its linear layers int8, with and without smooth-quant, calibrated
on the 16 calibration sentences and judged on the 16 evaluation sentences (embedding cosine),
timed on the 32 sentences (ORT CPU, 1 thread, round-robin with the float file).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    def __init__(self):
        self.peak, self._stop = _rss(), False

    def __enter__(self):
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def _resnet50(tmp: str) -> str:
    import torch
    import torchvision

    from graphslim.benchmarks.assets import export_onnx

    torch.manual_seed(0)
    return export_onnx(torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224),
                       os.path.join(tmp, "resnet50.onnx"))


def memory(samples: int) -> str:
    import graphslim
    from graphslim.analyses import AnalysisManager
    from graphslim.analyses.calibration import calibration_of

    with tempfile.TemporaryDirectory() as tmp:
        model = graphslim.load(_resnet50(tmp))
        x = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
        am = AnalysisManager(model, {"x": x})
        base = _rss()
        t = time.perf_counter()
        with _Peak() as peak:
            calib = am.get(calibration_of(samples))
        seconds = time.perf_counter() - t
        forward = calib.peak_batch_bytes
    added = peak.peak - base
    return (f"| model | samples | one forward's activations | peak RSS added | ratio | time |\n"
            f"|---|---|---|---|---|---|\n| resnet50 | {calib.samples} | {forward / 2**20:.1f} MiB "
            f"| {added / 2**20:.1f} MiB | {added / forward:.2f}x | {seconds:.1f} s |\n\n"
            f"(baseline: RSS after loading the model and the data, {x.nbytes / 2**20:.0f} MiB, "
            "before the first capture session exists, so the peak includes that session and "
            "its arena; histograms: 8192 bins x int64 per value)\n")


def compose() -> str:
    import graphslim
    from graphslim.runtime import compare, make_session, session_runner

    rows = ["| pipeline | MACs | file | ORT 1-thread latency | speedup vs fp32 | cosine |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        src = _resnet50(tmp)
        model = graphslim.load(src)
        x = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
        base = make_session(src, threads=1)
        feeds = {"x": x[:1]}
        ref = base.run(None, feeds)[0]
        macs = {}
        for text in ("fold-bn", "fold-bn,prune-channels{ratio=0.5}",
                     "fold-bn,prune-channels{ratio=0.5},qdq"):
            result = graphslim.optimize(model, text, data={"x": x}, verify="end")
            path = os.path.join(tmp, "out.onnx")
            result.model.save(path)
            float_macs = result.report.records[1].after.macs if len(result.report.records) > 2 \
                else result.report.final.macs
            macs[text] = float_macs
            sess = make_session(path, threads=1)
            la, lb = compare(session_runner(base, feeds), session_runner(sess, feeds),
                             repeats=30)
            got = sess.run(None, feeds)[0]
            cos = float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got))
            rows.append(f"| {text} | {float_macs / 1e9:.2f} G | "
                        f"{os.path.getsize(path) / 2**20:.1f} MiB | {lb} | "
                        f"{la.median / lb.median:.2f}x | {cos:.4f} |")
        rows.insert(2, f"| fp32 original | {result.report.original.macs / 1e9:.2f} G | "
                       f"{os.path.getsize(src) / 2**20:.1f} MiB | (baseline) | 1.00x | 1 |")
    return "\n".join(rows) + "\n\n(qdq keeps MACs; its row shows the pruned float MACs, now run " \
        "as int8 kernels)\n"


def minilm_int8() -> str:
    import graphslim
    from graphslim.benchmarks import minilm
    from graphslim.runtime import cpu_info, int8_kernels, time_many

    info = cpu_info()
    rows = [f"CPU: {info['model']} ({', '.join(info['isa'])}), {info['cores']} cores.", "",
            "| pipeline | int8 MatMuls | cosine mean | cosine min | ms (32 sentences) | "
            "speedup | s |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        src = minilm.sentence_encoder(os.path.join(tmp, "minilm.onnx"))
        calib, ev = minilm.tokens(minilm.CALIBRATION), minilm.tokens(minilm.SENTENCES)
        both = minilm.tokens(minilm.SENTENCES + minilm.CALIBRATION)
        model = graphslim.load(src, input_shapes={k: v.shape for k, v in ev.items()})
        ref = model.run(ev)["embedding"]
        paths, cells = [src], []
        for text in ("qdq{ops=linear}", "smooth-quant,qdq{ops=linear}",
                     "smooth-quant{alpha=0.7},qdq{ops=linear}",
                     "smooth-quant,qdq{ops=linear;matmul}"):
            started = time.perf_counter()
            result = graphslim.optimize(model, text, data=calib, verify="end")
            secs = time.perf_counter() - started
            cos = np.sum(ref * result.model.run(ev)["embedding"], axis=1)
            paths.append(os.path.join(tmp, f"q{len(paths)}.onnx"))
            result.model.save(paths[-1])
            cells.append((text, int8_kernels(result.model.model_ref())["matmul"], cos, secs))
        times = time_many(paths, both, threads=1)
        rows.append(f"| float | 0/48 | 1 | 1 | {times[0].median * 1e3:.1f} | 1.00x | - |")
        for (text, (k, of), cos, secs), t in zip(cells, times[1:]):
            rows.append(f"| `{text}` | {k}/{of} | {cos.mean():.4f} | {cos.min():.4f} | "
                        f"{t.median * 1e3:.1f} | {times[0].median / t.median:.2f}x | "
                        f"{secs:.0f} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("what", choices=("memory", "compose", "minilm"))
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args(argv)
    text = {"memory": lambda: memory(args.samples), "compose": compose,
            "minilm": minilm_int8}[args.what]()
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"qdq_{args.what}.md")
    with open(path, "w") as f:
        f.write(f"# qdq {args.what}\n\n`python -m graphslim.benchmarks.qdq_bench {args.what}`"
                f"\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
