"""Argument helpers shared by the command-line tools. Exit codes: 0 ok, 1 verification failed,
2 bad usage or input."""

from __future__ import annotations

import argparse
import logging
import sys

import graphslim
from graphslim.errors import GraphslimError, InputError, PassError, VerificationError

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2


def add_input_shape_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                        help="concrete shape for a graph input with dynamic dims (repeatable)")


def parse_input_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise InputError(f"bad --input-shape '{item}': expected NAME:D0,D1,... with "
                             "positive integers, e.g. x:1,3,224,224")
        shapes[name] = shape
    return shapes


def load_model(path: str, shape_items: list[str]) -> graphslim.OnnxGraph:
    return graphslim.load(path, input_shapes=parse_input_shapes(shape_items))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def run_tool(prog: str, body) -> int:
    """Call body() and turn graphslim's errors into a message on stderr and an exit code."""
    try:
        return body()
    except VerificationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_VERIFY
    except (InputError, graphslim.PipelineError, PassError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GraphslimError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
