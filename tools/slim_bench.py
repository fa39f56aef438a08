"""slim-bench: latency of two ONNX models on ONNX Runtime (interleaved runs) and how closely
their outputs agree.

    slim-bench original.onnx optimized.onnx [--input-shape x:1,3,224,224] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys

from graphslim.fidelity import agreement
from graphslim.runtime import compare, make_session, session_runner
from graphslim.tools._common import (
    EXIT_OK,
    add_input_shape_arg,
    load_model,
    run_tool,
    setup_logging,
)
from graphslim.verify import compare as compare_outputs
from graphslim.verify import make_inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slim-bench", description=__doc__.strip().splitlines()[0])
    p.add_argument("baseline", help="reference ONNX file")
    p.add_argument("candidate", help="ONNX file to compare")
    add_input_shape_arg(p)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (0: all cores)")
    p.add_argument("--opt-level", choices=("off", "basic", "extended", "all"), default="all")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    return run_tool("slim-bench", lambda: _run(args))


def _run(args) -> int:
    base = load_model(args.baseline, args.input_shape)
    cand = load_model(args.candidate, args.input_shape)
    feeds = make_inputs(base.input_specs(), args.seed)
    sessions = [make_session(m.model_ref(), args.provider, args.opt_level, args.threads)
                for m in (base, cand)]
    outs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
            for s in sessions]
    metrics = compare_outputs(outs[0], outs[1])
    la, lb = compare(*(session_runner(s, feeds) for s in sessions), repeats=args.repeats)
    top1 = agreement(outs[0], outs[1])  # None where the first output has no class axis
    print(f"provider {args.provider}, threads {args.threads}, opt level {args.opt_level}")
    print(f"baseline:  {la}\ncandidate: {lb}\nspeedup:   {la.median / lb.median:.3f}x")
    print(f"outputs:   max|diff| {metrics.max_abs:.3e}, rel L2 {metrics.rel_l2:.3e}, "
          f"cosine {metrics.cosine:.6f}, SQNR {metrics.sqnr_db:.1f} dB, "
          "top-1 agreement " + (f"{top1:.3f}" if top1 is not None else "n/a"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
