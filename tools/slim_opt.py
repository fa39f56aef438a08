"""slim-opt: run a textual pass pipeline on an ONNX file (ONNX in, ONNX out).

    slim-opt in.onnx -o out.onnx -p 'fold-bn' [--input-shape x:1,3,224,224] [--verify each]
             [--calib-data calib.npz]

--calib-data: an .npz with one array per graph input, keyed by input name, samples first (an
optional "labels" array for loss-based criteria); data-driven passes (taylor pruning, data-aware
factorization) use it; without it they use synthetic inputs and say so.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import graphslim
from graphslim.report import PrintIRAfter, format_rows
from graphslim.tools._common import (
    EXIT_OK,
    EXIT_USAGE,
    add_input_shape_arg,
    check_output,
    load_model,
    run_tool,
    setup_logging,
)


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
    p.add_argument("--print-ir-after", metavar="NAME|all", help="print the IR after a pass")
    p.add_argument("--stats", action="store_true", help="print each pass's statistics")
    p.add_argument("--timing", action="store_true", help="print time per pass")
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


def _calib_data(path: str, model) -> dict:
    from graphslim.data import validate

    try:
        with np.load(path) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise graphslim.InputError(f"cannot read calibration data '{path}': {exc}") from None
    validate(data, model.input_specs())
    return data


def _run(args) -> int:
    pipeline = graphslim.parse_pipeline(args.pipeline)
    sources = (args.input, args.calib_data)
    if args.output and not args.dry_run:
        check_output(args.output, sources)
    if args.json:
        check_output(args.json, (*sources, args.output), "--json file")
    model = load_model(args.input, args.input_shape)
    instruments = [PrintIRAfter(args.print_ir_after)] if args.print_ir_after else []
    pm = graphslim.PassManager(pipeline, verify=args.verify, max_error=args.max_error,
                               seed=args.seed, instruments=instruments, inplace=True)
    data = _calib_data(args.calib_data, model) if args.calib_data else None
    result = pm.run(model, data=data, dry_run=args.dry_run)
    report = result.report
    print(report.table())
    if args.stats:
        for r in report.records:
            print(f"stats {r.text}: {json.dumps(r.stats)}")
    if args.timing:
        for r in report.records:
            print(f"time {r.text}: {r.seconds * 1e3:.1f} ms")
        print(f"time total: {report.seconds * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if not args.dry_run:
        result.model.save(args.output)
        print(f"wrote {args.output}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
