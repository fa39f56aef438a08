"""slim-compress: search compression pipelines for an ONNX file to a budget on this machine.

    slim-compress model.onnx -o out.onnx --calib-data C.npz --eval-data E.npz \\
        --target latency=0.5|macs=0.3|size=0.25 --max-drop 0.01 \\
        [--metric agreement|cosine|accuracy] [--workers N|ray|ray:ADDRESS] [--int8] \\
        [--no-reconstruct] [--prefix fold-bn] [--levels 0.25,0.5,0.75] [--threads 1] \\
        [--cache DIR] [--json R.json] [--plot front.png] [--input-shape x:1,3,224,224]
    slim-compress --recipe recipe.toml [flags above override the recipe]

Measures every prunable channel group's sensitivity on the evaluation data, builds candidate
pipelines (per-group ratios allocated to the target, with and without a reconstruct refit,
int8 where asked, uniform ratios for reference), runs each as a trial on the workers
(graphslim/budget/), keeps the Pareto front of (measured cost, metric), and writes the best
pipeline meeting the target and the drop. The chosen model is built again here and its latency
measured against the input alone (not while other trials ran). Exit 0: written; 1: no
candidate meets both (the front is printed, nothing written); 2: bad usage or input. The input
is never overwritten. JSON: "chosen" (the pipeline text), "front", "trials", "latency".
"""

from __future__ import annotations

import argparse
import json
import sys

import graphslim
from graphslim.tools._common import (
    EXIT_OK,
    EXIT_VERIFY,
    add_input_shape_arg,
    check_output,
    parse_input_shapes,
    run_tool,
    setup_logging,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slim-compress",
                                description=__doc__.strip().splitlines()[0])
    p.add_argument("input", nargs="?", help="the ONNX file (never overwritten)")
    p.add_argument("-o", "--output")
    p.add_argument("--recipe", metavar="R.toml", help="the run as a TOML recipe")
    p.add_argument("--calib-data", metavar="FILE.npz")
    p.add_argument("--eval-data", metavar="FILE.npz")
    p.add_argument("--target", metavar="KIND=F", help="latency=F, macs=F or size=F")
    p.add_argument("--max-drop", type=float)
    p.add_argument("--metric", choices=("agreement", "cosine", "accuracy"))
    p.add_argument("--workers", help="N local processes, ray, or ray:ADDRESS (default 1)")
    p.add_argument("--int8", action="store_true", default=None,
                   help="also try int8 (qdq{choose=latency}: only where faster here)")
    p.add_argument("--no-reconstruct", action="store_true",
                   help="no candidates with a reconstruct refit")
    p.add_argument("--prefix", help="passes before the pruning (default fold-bn)")
    p.add_argument("--levels", help="ratios each group is measured at (default 0.25,0.5,0.75)")
    p.add_argument("--threads", type=int, help="ORT threads latency is measured at (default 1)")
    p.add_argument("--pipeline", help="judge this pipeline instead of searching")
    p.add_argument("--cache", metavar="DIR", help="keep sensitivity points here")
    add_input_shape_arg(p)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png", help="the Pareto front as a plot")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def settings(args) -> dict:
    """The recipe (if any) with the command line's flags over it."""
    from graphslim.budget.recipe import load_recipe
    from graphslim.budget.search import parse_target

    s = load_recipe(args.recipe) if args.recipe else {}
    flags = {"model": args.input, "output": args.output, "calib_data": args.calib_data,
             "eval_data": args.eval_data, "max_drop": args.max_drop, "metric": args.metric,
             "workers": args.workers, "int8": args.int8, "prefix": args.prefix,
             "threads": args.threads, "pipeline": args.pipeline, "cache": args.cache,
             "target": parse_target(args.target) if args.target else None,
             "levels": tuple(float(v) for v in args.levels.split(",")) if args.levels else None}
    s.update({k: v for k, v in flags.items() if v is not None})
    if args.input_shape:
        s["input_shapes"] = parse_input_shapes(args.input_shape)
    if args.no_reconstruct:
        s["recover"] = ("",)
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "output", "eval_data")
               if not s.get(k)]
    if missing:
        raise graphslim.InputError(f"need {', '.join(missing).replace('--model', 'INPUT')} "
                                   "(or a --recipe that gives them)")
    if not s.get("target") and not s.get("pipeline"):
        raise graphslim.InputError("need --target latency=F|macs=F|size=F (or --pipeline)")
    return s


def _run(args) -> int:
    from graphslim.budget.search import compress, finish

    s = settings(args)
    sources = (s["model"], s.get("calib_data"), s["eval_data"])
    check_output(s["output"], sources)
    for extra, what in ((args.json, "--json file"), (args.plot, "--plot file")):
        if extra:
            check_output(extra, (*sources, s["output"]), what)
    res = compress(s["model"], s["eval_data"], s.get("calib_data"), target=s.get("target"),
                   **{k: s[k] for k in ("max_drop", "metric", "workers", "prefix", "levels",
                                        "recover", "int8", "threads", "cache", "pipeline",
                                        "input_shapes") if k in s})
    print(res.table())
    out = res.as_dict()
    if res.chosen is not None:
        out["latency"] = finish(res, s["model"], s["output"], s.get("calib_data"),
                                s.get("input_shapes"), s.get("threads", 1))
        lat = out["latency"]
        print(f"\nchosen: {res.chosen['decided']}\n{res.metric} {res.chosen['value']:.4f} "
              f"(original {res.value_before:.4f}); latency {lat['before_ms']:.3f} -> "
              f"{lat['after_ms']:.3f} ms ({lat['ratio']:.3f} of the original, measured alone "
              f"on {lat['cpu']}, {lat['threads']} thread(s)); written to {s['output']}")
    else:
        print(f"\nno candidate meets {res.target} with a drop <= {res.max_drop}: nothing "
              "written", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    if args.plot:
        res.plot(args.plot)
    return EXIT_OK if res.chosen is not None else EXIT_VERIFY


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_tool("slim-compress", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
