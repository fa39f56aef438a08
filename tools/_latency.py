"""slim-opt's latency check: time the input and the result on the target runtime, in the same
process, interleaved (these machines are shared and noisy), and refuse a result slower than its
input, naming the pass that slowed it.

A slower verdict is confirmed by a second, longer measurement before anything is refused; the
pass is found by timing the model after each pass against the model before it (kept by the
`KeepModels` instrument while the pipeline ran, serialized ONNX bytes).
"""

from __future__ import annotations

import os

from graphslim.runtime import cpu_info, time_models


class KeepModels:
    """Instrument: the serialized model before the first pass and after each pass."""

    def __init__(self):
        self.models: list[tuple[str, bytes]] = []

    def before_pass(self, p, model) -> None:
        if not self.models:
            self.models.append(("input", _bytes(model)))

    def after_pass(self, p, model, record) -> None:
        if record.nodes_changed:
            self.models.append((record.text, _bytes(model)))


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def _bytes(model) -> bytes | str:
    return model.deployable()  # serialized once per model version (a path for > 2 GB)


def check_speed(args, input_path: str, model, keep: KeepModels | None, feeds: dict, report
          ) -> str | None:
    """Time input vs result; record report.extra["latency"]; return why the result is refused
    (slower beyond tolerance and no --allow-slower), else None."""
    threads = args.threads if args.threads > 0 else None
    after_bytes = _bytes(model)
    baseline = input_path  # the user's own file, as they would run it
    try:
        before, after = time_models(baseline, after_bytes, feeds, args.provider, threads)
    except Exception:  # a file ORT runs only after graphslim's repair on load
        if not keep or not keep.models:
            raise
        baseline = keep.models[0][1]
        report.notes.append("latency baseline: the input as repaired on load")
        before, after = time_models(baseline, after_bytes, feeds, args.provider, threads)
    speedup = before.median / after.median
    floor = args.min_speedup
    if speedup < floor:  # confirm on a longer run before calling it slower
        before, after = time_models(baseline, after_bytes, feeds, args.provider, threads,
                                    max_time=8.0, repeats=400)
        speedup = before.median / after.median
    cpu = cpu_info()
    report.extra["latency"] = {
        # significant digits, not decimals: a 0.03 ms model rounded to 4 decimals is off by
        # 0.2%, and its speedup would not be its two times' ratio
        "before_ms": _sig(before.median * 1e3), "after_ms": _sig(after.median * 1e3),
        "before_iqr_ms": _sig(before.iqr * 1e3), "after_iqr_ms": _sig(after.iqr * 1e3),
        "speedup": _sig(speedup), "runtime": f"onnxruntime-{args.provider}",
        "threads": args.threads if args.threads > 0 else os.cpu_count(),
        "cpu": cpu["model"], "isa": cpu["isa"], "pairs": before.samples}
    # slower only beyond the noise too: the result's median exceeds the time the bar allows
    # by more than the two runs' mean interquartile range
    allowed = before.median / floor
    beyond_noise = after.median - allowed > (before.iqr / floor + after.iqr) / 2
    if speedup >= floor or not beyond_noise or args.allow_slower:
        return None
    culprit = _slowest_pass(args, keep, feeds, threads) if keep else None
    where = f"; {culprit}" if culprit else ""
    return (f"the result runs {speedup:.2f}x as fast as the input on "
            f"{report.extra['latency']['runtime']} ({report.extra['latency']['threads']} "
            f"thread(s), {cpu['model']}: {', '.join(cpu['isa']) or 'no AVX2'}){where}")


def _slowest_pass(args, keep: KeepModels, feeds: dict, threads) -> str | None:
    worst = None
    for (_, a), (name, b) in zip(keep.models, keep.models[1:]):
        la, lb = time_models(a, b, feeds, args.provider, threads)
        ratio = la.median / lb.median
        if worst is None or ratio < worst[0]:
            worst = (ratio, name)
    if worst is None or worst[0] >= args.min_speedup:
        return None
    return f"'{worst[1]}' slowed it most ({worst[0]:.2f}x against the model before it)"


def describe_latency(lat: dict) -> str:
    return (f"\nlatency on {lat['runtime']}, {lat['threads']} thread(s), {lat['cpu']} "
            f"({', '.join(lat['isa']) or 'no AVX2'}): {lat['before_ms']:.3f} ms -> "
            f"{lat['after_ms']:.3f} ms ({lat['speedup']:.2f}x, median of {lat['pairs']} "
            "interleaved pairs)")
