"""Argument helpers shared by the command-line tools. Exit codes: 0 ok, 1 verification failed,
2 bad usage or input, 3 internal error (a bug: reported in one line; -v shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import graphslim
from graphslim.errors import GraphslimError, InputError, PassError, VerificationError
from graphslim.frontends.base import saving_to

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


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


def check_output(path: str, inputs: tuple[str, ...] = (), what: str = "output") -> None:
    """Refuse, before any work, an output that is one of the inputs (compared by inode, so a
    symlink or hard link to the input is caught) or that cannot be written (missing folder, a
    folder, read-only; the same checks as every frontend's save): the tool would otherwise fail
    after all the work, or overwrite its input."""
    for src in inputs:
        if src and os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise InputError(f"{what} '{path}' is the input '{src}' (same file); refusing to "
                             "overwrite it")
    existed = os.path.exists(path)
    with saving_to(path) as dest:  # a real open: os.access says yes to root on read-only files
        with open(dest, "ab"):
            pass
    if not existed:
        os.unlink(path)


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
    except Exception as exc:  # a bug in graphslim: one line, the traceback with -v
        logging.getLogger(prog).debug("internal error", exc_info=True)
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (a bug in graphslim; "
              "-v shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
