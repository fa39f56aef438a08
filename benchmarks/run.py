"""The benchmark harness: models x variants (graphslim pipelines, peer tools) x runtimes.

    python -m graphslim.benchmarks.run                 # the default matrix -> benchmarks/RESULTS.md
    python -m graphslim.benchmarks.run --quick         # the small matrix (under 2 minutes)
    python -m graphslim.benchmarks.run --models resnet18 --pipelines 'prune-channels{ratio=0.5}' \\
        --runtimes ort-cpu-1 --out /tmp/bench

Matrix from benchmarks/matrix.toml ([default] / [quick]); command-line lists override it. Per
cell: params, MACs, file size, latency median and IQR interleaved with the baseline in the same
process (speedup = baseline / variant), session memory, fidelity against the baseline on the
same inputs (cosine, SQNR, top-1 agreement), accuracy where the data is real, and the tool's own
time. Each cell is cached under the output folder keyed by its inputs and a hash of the code, so
a rerun (or an interrupted run, resumed) measures only what changed. A bad cell (unknown model,
pass or peer, a tool that fails) is a row with its message, never the end of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
import tomllib

from graphslim.benchmarks import harness_output as output
from graphslim.benchmarks.harness_models import BenchModel, prepare
from graphslim.benchmarks.harness_peers import Skip, run_peer

HERE = os.path.dirname(os.path.abspath(__file__))
CELL_SECONDS = 3.0  # timing budget per cell: at least 5 interleaved pairs, at most `repeats`


def code_hash() -> str:
    """The cache key of a cell's code: every source file of the engine, the passes and the
    harness, wherever they are installed (a checkout or a wheel)."""
    import graphslim
    import graphslim.passes

    h = hashlib.sha1()
    folders = sorted({*graphslim.__path__, *graphslim.passes.__path__, HERE})
    for top in folders:
        for dirpath, _, files in sorted(os.walk(top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:12]


class Cache:
    def __init__(self, folder: str, enabled: bool):
        self.folder, self.enabled = os.path.join(folder, "cache"), enabled
        os.makedirs(self.folder, exist_ok=True)

    def path(self, key: dict) -> str:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(self.folder, f"{digest}.json")

    def get(self, key: dict) -> dict | None:
        p = self.path(key)
        if self.enabled and os.path.exists(p):
            with open(p) as f:
                return json.load(f)
        return None

    def put(self, key: dict, row: dict) -> None:
        with open(self.path(key), "w") as f:
            json.dump(row, f, default=float)


# --- variants -------------------------------------------------------------------------------
def make_variant(bm: BenchModel, variant: str, kind: str, workdir: str) -> dict:
    """The variant's ONNX file (+ torch module for the torch runtime) and its tool time."""
    out = os.path.join(workdir, f"{bm.name}.{hashlib.sha1(variant.encode()).hexdigest()[:8]}"
                                ".onnx")
    if kind == "peer":
        seconds, module = run_peer(variant, bm, out)
        return {"path": out, "seconds": seconds, "module": module}
    import graphslim

    pipeline = graphslim.parse_pipeline(variant)
    model = graphslim.load(bm.onnx_path, input_shapes={bm.input_name: bm.input_shape})
    t = time.perf_counter()
    data = {bm.input_name: bm.calib_x[:32]}  # calibration: the samples ORT's quantizer gets
    result = graphslim.PassManager(pipeline, verify="end").run(
        model, data=data, eval_data={bm.input_name: bm.eval_x})
    seconds = time.perf_counter() - t
    result.model.save(out)
    module = None
    if bm.module is not None:
        traced = graphslim.trace(bm.module, bm.example)
        fx_result = graphslim.PassManager(pipeline, verify="off").run(
            traced, data={traced.view().inputs[0]: bm.calib_x[:32]})
        module = fx_result.model.module
    return {"path": out, "seconds": seconds, "module": module}


# --- measurements ---------------------------------------------------------------------------
def _outputs(path: str, bm: BenchModel, n: int) -> np.ndarray:
    from graphslim.runtime import make_session

    sess = make_session(path, opt_level="all", threads=0)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: bm.eval_x[i:i + 1]})[0]
                           for i in range(min(n, len(bm.eval_x)))])


def fidelity(bm: BenchModel, base: dict, path: str) -> dict:
    n = len(bm.eval_x) if bm.eval_y is not None else 8
    if "outputs" not in base:  # the baseline's outputs, once per model
        base["outputs"] = _outputs(base["path"], bm, n)
    from graphslim.fidelity import agreement
    from graphslim.verify import compare

    ref, got = base["outputs"], _outputs(path, bm, n)
    err = compare({"y": ref}, {"y": got})
    agree = agreement({"y": ref.reshape(len(ref), -1)}, {"y": got.reshape(len(got), -1)}) \
        if bm.classes else None
    row = {"cosine": err.cosine, "sqnr_db": err.sqnr_db,
           "top1_agree": agree if agree is not None else float("nan")}
    if bm.eval_y is not None:
        row["accuracy"] = float(np.mean(got.reshape(len(got), -1).argmax(1) == bm.eval_y[:n]))
        row["accuracy_base"] = float(np.mean(ref.reshape(len(ref), -1).argmax(1)
                                             == bm.eval_y[:n]))
    return row


def size_and_cost(bm: BenchModel, path: str) -> dict:
    import graphslim
    from graphslim.analyses.cost import compute_cost

    row = {"file_mb": os.path.getsize(path) / 1e6}
    try:
        m = graphslim.load(path, input_shapes={bm.input_name: bm.input_shape})
        view = m.view()
        hidden = [n.op for n in view.nodes() if n.kind.value == "opaque" and (
            "Conv" in n.op or "MatMul" in n.op or "Gemm" in n.op)]
        if hidden:  # fused / quantized kernels: their MACs are the baseline's, not zero
            row["cost_note"] = f"cost model does not read {hidden[0]}"
            return row
        cost = compute_cost(view, m.infer_shapes())
        row.update(params=cost.params, macs=cost.macs)
    except Exception as exc:
        row["cost_note"] = f"cost not modelled: {type(exc).__name__}"
    return row


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def latency(runtime: str, bm: BenchModel, base: dict, var: dict, repeats: int) -> dict:
    from graphslim.runtime import available_providers, compare, make_session, session_runner

    feeds = {bm.input_name: bm.eval_x[:1]}
    if runtime == "torch":
        if base.get("module") is None or var.get("module") is None:
            raise Skip("no torch module for this variant")
        import torch

        x = torch.as_tensor(bm.eval_x[:1])
        with torch.no_grad():
            la, lb = compare(lambda: base["module"](x), lambda: var["module"].eval()(x),
                             warmup=2, repeats=repeats, max_time=CELL_SECONDS)
        return _lat_row(la, lb, float("nan"))
    provider, threads = {"ort-cpu-1": ("cpu", 1), "ort-cpu-all": ("cpu", 0),
                         "ort-cuda": ("cuda", 0)}.get(runtime, (None, None))
    if provider is None:
        raise Skip(f"unknown runtime '{runtime}'")
    if provider == "cuda" and "CUDAExecutionProvider" not in available_providers():
        raise Skip("no CUDA execution provider on this machine")
    sessions = base.setdefault("sessions", {})  # the baseline's, once per model and runtime
    if runtime not in sessions:
        sessions[runtime] = make_session(base["path"], provider=provider, opt_level="all",
                                         threads=threads)
    sa = sessions[runtime]
    before = _rss_mb()
    sb = make_session(var["path"], provider=provider, opt_level="all", threads=threads)
    session_runner(sb, feeds)()
    mem = _rss_mb() - before
    la, lb = compare(session_runner(sa, feeds), session_runner(sb, feeds), warmup=2,
                     repeats=repeats, max_time=CELL_SECONDS)
    return _lat_row(la, lb, mem)


def _lat_row(la, lb, mem: float) -> dict:
    return {"base_ms": la.median * 1e3, "ms": lb.median * 1e3, "iqr_ms": lb.iqr * 1e3,
            "speedup": la.median / lb.median, "session_mb": mem}


# --- the run ----------------------------------------------------------------------------------
def load_matrix(args) -> dict:
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    matrix = dict(cfg["quick" if args.quick else "default"])
    for key in ("models", "pipelines", "peers", "runtimes"):
        value = getattr(args, key)
        if value is not None:
            matrix[key] = [v for v in value.split("|") if v] if key == "pipelines" else \
                [v for v in value.split(",") if v]
    if args.repeats:
        matrix["repeats"] = args.repeats
    return matrix


def run(matrix: dict, out: str, use_cache: bool = True, progress: bool = True) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    workdir = os.path.join(out, "files")
    os.makedirs(workdir, exist_ok=True)
    cache, code = Cache(out, use_cache), code_hash()
    variants = [(v, "pipeline") for v in matrix.get("pipelines", [])] + \
        [(v, "peer") for v in matrix.get("peers", [])]
    cells = [(m, v, k, r) for m in matrix["models"] for v, k in variants
             for r in matrix["runtimes"]]
    bar = _progress(len(cells), progress)
    rows: list[dict] = []
    for model_name in matrix["models"]:
        mine = [c for c in cells if c[0] == model_name]
        keys = {c: {"cell": c, "repeats": matrix["repeats"], "code": code} for c in mine}
        cached = {c: cache.get(k) for c, k in keys.items()}
        if all(v is not None for v in cached.values()):
            rows.extend(cached.values())
            bar(len(mine))
            continue
        try:
            bm = prepare(model_name, workdir)
        except Exception as exc:  # UnknownModel, a missing asset package
            for c in mine:
                rows.append(_row(c, status=f"skipped: {exc}"))
            print(f"[bench] {model_name}: skipped ({exc})", file=sys.stderr)
            bar(len(mine))
            continue
        base = {"path": bm.onnx_path, "module": bm.module}
        made: dict[str, dict | Exception] = {}
        for c in mine:
            if cached[c] is not None:
                rows.append(cached[c])
                bar(1)
                continue
            row = _measure_cell(c, bm, base, made, workdir, matrix["repeats"])
            if not row["status"].startswith("failed"):
                cache.put(keys[c], row)  # failures are retried on the next run
            rows.append(row)
            bar(1)
    return rows


def _measure_cell(c, bm, base, made, workdir, repeats) -> dict:
    _, variant, kind, runtime = c
    if variant not in made:
        try:
            made[variant] = make_variant(bm, variant, kind, workdir)
            made[variant]["static"] = {**size_and_cost(bm, made[variant]["path"]),
                                       **fidelity(bm, base, made[variant]["path"])}
        except Exception as exc:  # a failing tool or bad pipeline is this cell's message
            made[variant] = exc
    var = made[variant]
    if isinstance(var, Exception):
        prefix = "skipped" if isinstance(var, Skip) else "failed"
        return _row(c, status=f"{prefix}: {type(var).__name__}: {str(var)[:200]}")
    row = _row(c, status="ok", tool_s=var["seconds"], **var["static"])
    try:
        row.update(latency(runtime, bm, base, var, repeats))
    except Skip as exc:
        row["status"] = f"skipped: {exc}"
    except Exception as exc:
        row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return row


def _row(c, **kw) -> dict:
    return {"model": c[0], "variant": c[1], "kind": c[2], "runtime": c[3], **kw}


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if not enabled or tqdm is None:
        return lambda n: None
    bar = tqdm(total=total, unit="cell", file=sys.stderr)
    return bar.update


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="slim-benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(HERE, "matrix.toml"))
    p.add_argument("--quick", action="store_true", help="the small matrix of the config")
    p.add_argument("--models", help="comma-separated, overrides the config")
    p.add_argument("--pipelines", help="'|'-separated pipelines, overrides the config")
    p.add_argument("--peers", help="comma-separated, overrides the config ('' for none)")
    p.add_argument("--runtimes", help="comma-separated, overrides the config")
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", default=os.path.join("out", "benchmarks"),
                   help="results folder (tables, CSV/JSON, plots, cache)")
    p.add_argument("--results-md", help="also write the markdown here (benchmarks/RESULTS.md)")
    p.add_argument("--no-cache", action="store_true", help="measure every cell again")
    args = p.parse_args(argv)
    matrix = load_matrix(args)
    t = time.perf_counter()
    rows = run(matrix, args.out, use_cache=not args.no_cache)
    command = "slim-benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    from graphslim.runtime import cpu_description

    machine = (f"{cpu_description()}, {platform.machine()}, {os.cpu_count()} cores, "
               f"{platform.platform()}")
    md = output.write_all(rows, args.out, command, machine, time.perf_counter() - t)
    if args.results_md:  # the committed copy: markdown plus its plots beside it
        folder = os.path.dirname(os.path.abspath(args.results_md))
        for png in ("latency_vs_fidelity.png", "speedup_vs_macs.png"):
            if os.path.exists(os.path.join(args.out, png)):
                shutil.copy(os.path.join(args.out, png), os.path.join(folder, f"results_{png}"))
                md += f"\n![{png[:-4]}](results_{png})\n"
        with open(args.results_md, "w") as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
