"""slim-opt: run a textual pass pipeline on an ONNX file (ONNX in, ONNX out).

    slim-opt in.onnx -o out.onnx -p 'fold-bn' [--input-shape x:1,3,224,224] [--verify each]
             [--calib-data calib.npz] [--eval-data eval.npz] [--threads 1] [--allow-slower]

--calib-data: an .npz with one array per graph input, keyed by input name, samples first (an
optional "labels" array for loss-based criteria); data-driven passes (qdq calibration, taylor
pruning, data-aware factorization) use it. qdq without it is refused unless
--synthetic-calibration says to calibrate on random inputs anyway.

--eval-data: the same layout, held out from calibration; fidelity (cosine, rel L2, SQNR, top-1
agreement) of every lossy pass and of the result is measured on it. Without it, the last 20% of
--calib-data (at least 10 samples given) are held out for evaluation and not calibrated on;
without either, fidelity is measured on synthetic inputs and the report says so.

Latency: the input and the output are timed on ONNX Runtime (interleaved, opt level ALL, the
--provider and --threads asked); the JSON report's "latency" names the CPU and its ISA flags.
A result slower than its input (below --min-speedup, 0.95) is not written: exit 1, naming the
pass that slowed it, unless --allow-slower. --no-timing skips the measurement (and the check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

import graphslim
from graphslim.pass_base import flatten
from graphslim.report import PrintIRAfter, format_rows
from graphslim.tools._common import (
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY,
    add_input_shape_arg,
    check_output,
    load_model,
    run_tool,
    setup_logging,
)
from graphslim.tools._latency import KeepModels, check_speed, describe_latency
from graphslim.verify import make_inputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slim-opt", description=__doc__.strip().splitlines()[0])
    p.add_argument("input", nargs="?", help="input ONNX file (never overwritten)")
    p.add_argument("-o", "--output", help="output ONNX file")
    p.add_argument("-p", "--pipeline", help="pass pipeline, e.g. 'fold-bn'")
    add_input_shape_arg(p)
    p.add_argument("--verify", choices=("each", "end", "off"), default="each")
    p.add_argument("--max-error", type=float, default=None,
                   help="fail (exit 1) if lossy passes exceed this relative L2 output error")
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    p.add_argument("--calib-data", metavar="FILE.npz",
                   help="calibration / importance data: one array per input name, samples first")
    p.add_argument("--eval-data", metavar="FILE.npz",
                   help="evaluation data, disjoint from calibration (default: the last 20%% "
                        "of --calib-data, held out)")
    p.add_argument("--synthetic-calibration", action="store_true",
                   help="let qdq calibrate on random inputs when no --calib-data is given")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="runtime the input and output are timed on")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (0: all cores)")
    p.add_argument("--no-timing", action="store_true",
                   help="do not time the input and output (nor refuse a slower result)")
    p.add_argument("--allow-slower", action="store_true",
                   help="write the result even where it runs slower than the input")
    p.add_argument("--min-speedup", type=float, default=0.95, metavar="F",
                   help="a result below F x the input's speed counts as slower (default "
                        "0.95: 5%% for timing noise)")
    p.add_argument("--print-ir-after", metavar="NAME|all", help="print the IR after a pass")
    p.add_argument("--stats", action="store_true", help="print each pass's statistics")
    p.add_argument("--pass-times", action="store_true", help="print time per pass")
    p.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--list-passes", action="store_true", help="list the passes and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def list_passes() -> str:
    rows = [("pass", "lossless", "summary")]
    for name, cls in sorted(graphslim.registered_passes().items()):
        rows.append((name, "yes" if cls.lossless else "no", cls.summary))
    return format_rows(rows)


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.list_passes:
        print(list_passes())
        return EXIT_OK
    if not args.input or not args.pipeline or not (args.output or args.dry_run):
        print("slim-opt: error: need INPUT, -p PIPELINE and -o OUTPUT (or --dry-run)",
              file=sys.stderr)
        return EXIT_USAGE
    return run_tool("slim-opt", lambda: _run(args))


def _npz(path: str, model, what: str) -> dict:
    from graphslim.data import read_npz

    return read_npz(path, model.input_specs(), what)


def _data(args, model, pipeline) -> tuple[dict | None, dict | None, list[str]]:
    """(calibration, evaluation, notes): evaluation held out of calibration by default."""
    from graphslim.fidelity import held_out

    hungry = [p.name for p in flatten(pipeline) if p.needs_data]
    if hungry and not args.calib_data and not args.synthetic_calibration:
        raise graphslim.InputError(
            f"{', '.join(hungry)} needs calibration data: --calib-data FILE.npz (real inputs, "
            "one array per input name, samples first); --synthetic-calibration calibrates on "
            "random inputs anyway (their ranges are not those of real data)")
    calib = _npz(args.calib_data, model, "calibration") if args.calib_data else None
    notes = []
    if args.eval_data:
        return calib, _npz(args.eval_data, model, "evaluation"), notes
    if calib is None:
        return None, None, notes
    calib, held = held_out(calib, model.input_specs())
    if held is not None:
        n_held = next(len(v) for k, v in held.items() if np.asarray(v).ndim)
        notes.append(f"evaluation: the last {n_held} samples of --calib-data, held out (not "
                     "calibrated on); --eval-data gives others")
    return calib, held, notes


def _decide_by_latency(pipeline: list, text: str, threads: int) -> list:
    """On the command line qdq decides int8 or float by measurement (choose=latency at the
    --threads asked) unless the pipeline text says `choose=` itself."""
    if "choose=" in text:
        return pipeline
    return [dataclasses.replace(p, choose="latency", threads=threads)
            if p.name == "qdq" else p
            for p in pipeline]


def _run(args) -> int:
    pipeline = graphslim.parse_pipeline(args.pipeline)
    if not args.dry_run:
        pipeline = _decide_by_latency(pipeline, args.pipeline, args.threads)
    sources = (args.input, args.calib_data, args.eval_data)
    if args.output and not args.dry_run:
        check_output(args.output, sources)
    if args.json:
        check_output(args.json, (*sources, args.output), "--json file")
    timing = not (args.no_timing or args.dry_run)
    if timing:
        from graphslim.runtime import available_providers

        if args.provider not in available_providers():
            raise graphslim.InputError(
                f"--provider {args.provider}: not available in this onnxruntime build "
                f"(available: {', '.join(available_providers())}); --no-timing skips timing")
    model = load_model(args.input, args.input_shape)
    keep = KeepModels() if timing else None
    instruments = [PrintIRAfter(args.print_ir_after)] if args.print_ir_after else []
    pm = graphslim.PassManager(pipeline, verify=args.verify, max_error=args.max_error,
                               seed=args.seed, instruments=[*instruments, *filter(None, [keep])],
                               inplace=True)
    data, eval_data, notes = _data(args, model, pipeline)
    feeds = make_inputs(model.input_specs(), args.seed)
    result = pm.run(model, data=data, eval_data=eval_data, dry_run=args.dry_run)
    report = result.report
    report.notes[:0] = notes
    slower = None
    if timing:
        slower = check_speed(args, args.input, result.model, keep, feeds, report)
    print(report.table())
    if timing:
        print(describe_latency(report.extra["latency"]))
    if args.stats:
        for r in report.records:
            print(f"stats {r.text}: {json.dumps(r.stats)}")
    if args.pass_times:
        for r in report.records:
            print(f"time {r.text}: {r.seconds * 1e3:.1f} ms")
        print(f"time total: {report.seconds * 1e3:.1f} ms")
    report.extra["written"] = not args.dry_run and slower is None
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if slower is not None:
        print(f"slim-opt: {slower}; not written (--allow-slower writes it anyway)",
              file=sys.stderr)
        return EXIT_VERIFY
    if not args.dry_run:
        result.model.save(args.output)
        print(f"wrote {args.output}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
