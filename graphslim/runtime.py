"""Emit and run: ONNX Runtime sessions (CPU, CUDA where present) and latency measurement.

Latency is reported as median and interquartile range over repeated runs after warm-up; two models
are compared by interleaving their runs in one process so that a noisy, shared machine slows both
alike and the ratio holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

_LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_providers() -> list[str]:
    """Short names ('cpu', 'cuda') of the execution providers this onnxruntime build offers."""
    have = set(ort.get_available_providers())
    return [k for k, v in _PROVIDERS.items() if v in have]


#: ONNX Runtime's thread count for sessions not given one (0 or unset: every core)
THREADS_ENV = "GRAPHSLIM_THREADS"


def make_session(model: str | bytes, provider: str = "cpu", opt_level: str = "all",
                 threads: int | None = None, optimized_model_path: str | None = None,
                 ) -> ort.InferenceSession:
    """An InferenceSession on `provider` ('cpu' or 'cuda'); threads=0 lets ORT use every core,
    None takes $GRAPHSLIM_THREADS, else 0 (`make test` sets 1: its two pytest workers would
    otherwise each start a thread per core and slow every test 2-5x on 2 cores).

    `optimized_model_path` saves ORT's optimized graph (what actually runs) for inspection.
    """
    if opt_level not in _LEVELS:
        raise ValueError(f"opt_level must be one of {sorted(_LEVELS)}, not '{opt_level}'")
    if provider not in _PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(_PROVIDERS)}, not '{provider}'")
    if provider not in available_providers():
        raise RuntimeError(f"execution provider '{provider}' is not available in this "
                           f"onnxruntime build (available: {available_providers()})")
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS[opt_level]
    if threads is None:
        threads = int(os.environ.get(THREADS_ENV, "0") or 0)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    providers = [_PROVIDERS[provider]]
    if provider != "cpu":
        providers.append(_PROVIDERS["cpu"])
    return ort.InferenceSession(model, sess_options=so, providers=providers)


@dataclass(frozen=True)
class Latency:
    """Seconds per call: median and interquartile range over `samples` timed calls."""

    median: float
    iqr: float
    samples: int

    def __str__(self) -> str:
        if self.median < 1e-3:
            return f"{self.median * 1e6:.1f} us (IQR {self.iqr * 1e6:.1f})"
        return f"{self.median * 1e3:.2f} ms (IQR {self.iqr * 1e3:.2f})"


def _stats(times: list[float]) -> Latency:
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return Latency(float(med), float(q3 - q1), len(times))


def measure(fn: Callable[[], object], warmup: int = 3, repeats: int = 20,
            min_time: float = 0.0) -> Latency:
    """Time `fn()`: `warmup` untimed calls, then at least `repeats` calls (and `min_time` s)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _stats(times)


def compare(fn_a: Callable[[], object], fn_b: Callable[[], object], warmup: int = 3,
            repeats: int = 20, max_time: float | None = None,
            min_repeats: int = 5) -> tuple[Latency, Latency]:
    """Interleaved A/B timing: a, b, a, b, ... so both see the same machine load. With
    `max_time` (seconds), stop after that much timing once `min_repeats` pairs are in."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    for i in range(repeats):
        if max_time is not None and i >= min_repeats and time.perf_counter() - start > max_time:
            break
        order = ((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else ((fn_b, tb), (fn_a, ta))
        for fn, acc in order:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return _stats(ta), _stats(tb)


def time_many(models: list, feeds: dict[str, np.ndarray], provider: str = "cpu",
              threads: int | None = 1, max_time: float = 3.0, min_rounds: int = 5,
              max_rounds: int = 200) -> list[Latency]:
    """Latency of several ONNX models on the same feeds, timed round-robin (one call of each
    per round, the order rotated each round) so all see the same machine load.

    Each model is timed on two sessions, created in mirrored order (A B C, then C B A), its
    calls pooled: one ORT CPU session of a model runs 1-3% faster or slower than another of
    the same file (memory placement; measured here on identical copies, with the arena,
    memory patterns and prepacking on or off), and the earlier created tend to be slower, so
    one session each would make the first model look slower than itself. Two mirrored
    sessions halve that offset's variance and cancel the drift with creation order."""
    n = len(models)
    order = [*range(n), *reversed(range(n))]
    runs = [(i, session_runner(make_session(models[i], provider, "all", threads), feeds))
            for i in order]
    for _, run in runs:
        for _ in range(3):
            run()
    times: list[list[float]] = [[] for _ in range(n)]
    max_time *= timing_scale()
    start = time.perf_counter()
    for r in range(max_rounds):
        if r >= min_rounds and time.perf_counter() - start > max_time:
            break
        k = r % len(runs)
        for i, run in [*runs[k:], *runs[:k]]:
            t0 = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - t0)
    return [_stats(t) for t in times]


def session_runner(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]
                   ) -> Callable[[], object]:
    """A zero-argument callable running `sess` on fixed feeds, for measure()/compare()."""
    names = [o.name for o in sess.get_outputs()]
    return lambda: sess.run(names, feeds)


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def cpu_info() -> dict:
    """{"model": the CPU's model name, "isa": the flags that decide ORT's kernels (AVX2,
    AVX-512, VNNI, AMX), "cores": logical cores}: every published timing names them, since
    int8 and channel-block speed differ by ISA (FIELD-NOTES "Machines differ")."""
    import os
    import platform

    model, have = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not have:
                    have = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in have],
            "cores": os.cpu_count()}


def cpu_description() -> str:
    info = cpu_info()
    return f"{info['model']} ({', '.join(info['isa']) or 'no AVX2'})"


def timing_scale() -> float:
    """GRAPHSLIM_TIME_BUDGET scales every timing budget (default 1; `make test` uses 0.2: the
    test suite checks the measuring machinery, not the machine, and must fit CI's minutes)."""
    import os

    try:
        return max(0.01, float(os.environ.get("GRAPHSLIM_TIME_BUDGET", "1")))
    except ValueError:
        return 1.0


def time_models(model_a: str | bytes, model_b: str | bytes, feeds: dict[str, np.ndarray],
                provider: str = "cpu", threads: int | None = 1, max_time: float = 4.0,
                repeats: int = 200) -> tuple[Latency, Latency]:
    """Interleaved latency of two ONNX models on the same feeds (ORT, opt level ALL): at least
    5 and up to `repeats` pairs within `max_time` seconds of timing."""
    return tuple(time_many([model_a, model_b], feeds, provider, threads, max_time,
                           max_rounds=repeats))


def int8_weights_saturate() -> bool:
    """Does ORT's x86 u8 x s8 integer kernel saturate here? Without VNNI (avx512_vnni /
    avx_vnni) the products go through vpmaddubsw, whose int16 pair sums saturate with full
    8-bit weights: ORT's docs advise reduce_range (7-bit weights) there. Measured on this AVX2
    machine, the int8 demo CNN: 8-bit weights SQNR 8.8 dB, 7-bit 31.7 dB (deployed, ORT ALL)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    isa = set(cpu_info()["isa"])
    return not ({"avx512_vnni", "avx_vnni"} & isa)


def cpu_channel_block() -> int:
    """Channel block of ONNX Runtime's NCHWc CPU kernels on this machine (MLAS: 16 floats with
    AVX-512, else 8): convs whose channel counts are multiples of it stay in the blocked layout
    (FIELD-NOTES: off-multiple counts made pruned models slower than the original)."""
    return 16 if "avx512f" in cpu_info()["isa"] else 8



_CONV_OPS = {"Conv": False, "FusedConv": False, "NhwcFusedConv": False, "QLinearConv": True,
             "ConvInteger": True, "NhwcQLinearConv": True}
_MATMUL_OPS = {"MatMul": False, "Gemm": False, "FusedMatMul": False, "FusedGemm": False,
               "QGemm": True, "QLinearMatMul": True, "MatMulInteger": True,
               "MatMulIntegerToFloat": True, "DynamicQuantizeMatMul": True}


def int8_kernels(model: str | bytes, provider: str = "cpu") -> dict[str, tuple[int, int]]:
    """How many Conv and MatMul/Gemm nodes ONNX Runtime runs as integer kernels, read from the
    graph it actually executes (its optimized graph at level ALL): {"conv": (int8, total),
    "matmul": (int8, total)}."""
    import os
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="graphslim_ort_") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(model, provider, "all", threads=1, optimized_model_path=path)
        ops = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
    out = {}
    for key, table in (("conv", _CONV_OPS), ("matmul", _MATMUL_OPS)):
        hits = [table[o] for o in ops if o in table]
        out[key] = (sum(hits), len(hits))
    return out
