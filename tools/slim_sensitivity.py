"""slim-sensitivity: how much each channel group, layer rank or int8 layer costs in accuracy.

    slim-sensitivity model.onnx --eval-data E.npz [--calib-data C.npz] \\
        [--kinds prune,factorize,qdq] [--levels 0.25,0.5,0.75] \\
        [--metric agreement|cosine|accuracy] [--prefix fold-bn] [--workers N|ray|ray:ADDRESS] \\
        [--timing] [--threads 1] [--cache DIR] [--json R.json] [--plot S.png] \\
        [--input-shape x:1,3,224,224]

prune: each prunable channel group alone at each ratio (coupled layers as their group);
factorize: each conv / linear alone at rank fraction 1 - level; qdq: every layer int8, then
each kept float in turn (needs --calib-data). Judged on --eval-data; prints one row per group
(the metric's drop at each level). Exit 0 ok, 2 bad usage or input.
"""

from __future__ import annotations

import sys

import graphslim
from graphslim.tools._common import (
    EXIT_OK,
    add_input_shape_arg,
    check_output,
    parse_input_shapes,
    run_tool,
    setup_logging,
)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="slim-sensitivity",
                                description=__doc__.strip().splitlines()[0])
    p.add_argument("input", help="the ONNX file")
    p.add_argument("--eval-data", required=True, metavar="FILE.npz")
    p.add_argument("--calib-data", metavar="FILE.npz")
    p.add_argument("--kinds", default="prune", help="comma-separated: prune, factorize, qdq")
    p.add_argument("--levels", default="0.25,0.5,0.75")
    p.add_argument("--metric", default="agreement", choices=("agreement", "cosine", "accuracy"))
    p.add_argument("--prefix", default="fold-bn",
                   help="passes before each point (default fold-bn; '' for none)")
    p.add_argument("--workers", default="1", help="N local processes, ray, or ray:ADDRESS")
    p.add_argument("--timing", action="store_true", help="also time each point")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", metavar="DIR", help="keep the points here (untimed only)")
    add_input_shape_arg(p)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _run(args) -> int:
    from graphslim.budget import sensitivity

    try:
        levels = tuple(float(v) for v in args.levels.split(","))
    except ValueError:
        raise graphslim.InputError(f"--levels must be numbers, not '{args.levels}'") from None
    if not all(0 < v < 1 for v in levels):
        raise graphslim.InputError("--levels must lie in (0, 1)")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    for extra, what in ((args.json, "--json file"), (args.plot, "--plot file")):
        if extra:
            check_output(extra, (args.input, args.eval_data, args.calib_data), what)
    try:
        sens = sensitivity(args.input, args.eval_data, args.calib_data, kinds=kinds,
                           levels=levels, metric=args.metric, workers=args.workers,
                           cache=args.cache, timing=args.timing, threads=args.threads,
                           prefix=args.prefix,
                           input_shapes=parse_input_shapes(args.input_shape))
    except ValueError as exc:
        raise graphslim.InputError(str(exc)) from None
    print(f"{args.metric} of the original on the evaluation data: {sens.value_before:.4f}")
    for kind in kinds:
        if kind in sens.curves:
            print(f"\n{sens.table(kind)}")
    for text, err in sens.failed:
        print(f"failed: {text}: {err}", file=sys.stderr)
    if args.json:
        sens.save(args.json)
    if args.plot:
        sens.plot(args.plot, kinds[0])
    return EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_tool("slim-sensitivity", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
