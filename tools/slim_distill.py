"""slim-distill: fine-tune a compressed ONNX file towards its original on unlabeled data.

    slim-distill student.onnx --teacher original.onnx --data unlabeled.npz -o out.onnx
                 [--epochs 2] [--batch-size 32] [--lr 1e-3] [--temperature 4] [--alpha 0.9]
                 [--labels KEY] [--freeze-bn auto|yes|no] [--eval-data eval.npz] [--seed 0]
                 [--json R]

The student is lifted to torch (onnx2torch), trained by knowledge distillation from the teacher
(run in ONNX Runtime), and written back as ONNX with the student's input and output names,
checked against the trained module. --data: an .npz with one array per input name, samples
first (no labels needed; --labels KEY names an array of class labels in it to add the label
loss). --eval-data: held-out inputs on which the student's agreement with the teacher (cosine,
rel L2, top-1 agreement) is reported before and after; without it the report says there was
none. Neither input file is ever overwritten. Needs the onnx-distill extra.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import numpy as np

import graphslim
from graphslim.tools._common import (
    EXIT_OK,
    add_input_shape_arg,
    check_output,
    load_model,
    parse_input_shapes,
    run_tool,
    setup_logging,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slim-distill", description=__doc__.strip().splitlines()[0])
    p.add_argument("student", help="the compressed ONNX file (never overwritten)")
    p.add_argument("--teacher", required=True, help="the original ONNX file")
    p.add_argument("--data", required=True, metavar="FILE.npz", help="unlabeled training inputs")
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    add_input_shape_arg(p)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9,
                   help="weight of the teacher's loss against the label loss (with --labels)")
    p.add_argument("--labels", metavar="KEY", help="array of class labels in --data")
    p.add_argument("--freeze-bn", choices=("auto", "yes", "no"), default="auto",
                   help="keep BatchNorm statistics (auto: with fewer than 1000 samples)")
    p.add_argument("--eval-data", metavar="FILE.npz", help="held-out inputs to judge on")
    p.add_argument("--patience", type=int, default=2,
                   help="stop after this many epochs without a better held-out loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_tool("slim-distill", lambda: _run(args))


def _npz(path: str, what: str) -> dict:
    try:
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise graphslim.InputError(f"cannot read {what} '{path}': {exc}") from None


def _run(args) -> int:
    from graphslim.data import validate
    from graphslim.fidelity import agreement
    from graphslim.verify import compare

    try:  # torch (onnx2torch is asked for when the student is lifted)
        importlib.import_module("graphslim.frontends.fx_distill")
    except ImportError as exc:
        raise graphslim.InputError(str(exc)) from None
    check_output(args.output, (args.student, args.teacher, args.data))
    student = load_model(args.student, args.input_shape)
    teacher = graphslim.load(args.teacher, input_shapes=parse_input_shapes(args.input_shape))
    data = _npz(args.data, "--data")
    labels = None
    if args.labels:
        if args.labels not in data:
            raise graphslim.InputError(f"--labels {args.labels}: no such array in {args.data} "
                                       f"(it has {sorted(data)})")
        labels = data.pop(args.labels)
    validate(data, student.input_specs())
    evaluation = _npz(args.eval_data, "--eval-data") if args.eval_data else None
    if evaluation is not None:
        validate(evaluation, student.input_specs())

    def judge(model) -> dict | None:
        if evaluation is None:
            return None
        ref, out = _outputs(teacher, evaluation), _outputs(model, evaluation)
        err = compare(ref, dict(zip(ref, out.values())))
        row = {"cosine": err.cosine, "rel_l2": err.rel_l2}
        agree = agreement(ref, dict(zip(ref, out.values())))
        if agree is not None:
            row["agreement"] = agree
        return row

    before = judge(student)
    history: list = []
    trained = graphslim.distill(student, teacher, data, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr,
                                temperature=args.temperature, alpha=args.alpha, labels=labels,
                                freeze_bn={"auto": None, "yes": True, "no": False}[args.freeze_bn],
                                patience=args.patience, seed=args.seed, history=history)
    after = judge(trained)
    trained.save(args.output)
    report = {"output": args.output, "epochs": history, "before": before, "after": after,
              "eval": "none given: nothing was judged" if evaluation is None else
              f"{len(next(iter(evaluation.values())))} held-out samples"}
    for h in history:
        print(f"epoch {h['epoch']}: loss {h['loss']:.4g} ({h['seconds']:.1f} s)")
    if evaluation is None:
        print("no --eval-data: the result was not judged on held-out data")
    else:
        print(f"against the teacher on --eval-data: before {_fmt(before)}, after {_fmt(after)}")
    print(f"wrote {args.output}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return EXIT_OK


def _fmt(row: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items())


def _outputs(model, data: dict) -> dict:
    """The model's outputs on every sample, one sample per run (files often fix batch 1)."""
    n = len(next(iter(data.values())))
    runs = [model.run({k: v[i:i + 1] for k, v in data.items()}) for i in range(n)]
    return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}


if __name__ == "__main__":
    sys.exit(main())

