"""Where trials run: `1` in this process, `N` a local process pool of N (the default for
N > 1), `ray` a Ray cluster started here, `ray:ADDRESS` an existing one (`ray:auto` the one
`ray start` set up on this node). Results come back in the order of the tasks, whatever ran
them, so a search is the same on any workers; a trial's latency is measured by the worker that
builds it (against the original, round-robin, in that worker).

Ray (the `ray` extra) is imported only when asked for. With Ray every task asks for one CPU,
so a cluster of N CPUs runs N trials at once; pass `ray:ADDRESS` to use a cluster started with
`ray start --head` (see the README's "Compress to a budget").

A worker is one CPU: in a pool process or a Ray task, ONNX Runtime runs at one thread
($GRAPHSLIM_THREADS=1, unless the user set it), since its default (every core) made two
workers on two cores contend: slim-sensitivity on PP-OCR's classifier took 39.5 s on a 2-CPU
Ray cluster against 40.7 s in process; at one thread each, 20.3 s against 35.5 s.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphslim.errors import InputError
from graphslim.runtime import THREADS_ENV


@dataclass(frozen=True)
class Workers:
    kind: str  # "local" or "ray"
    count: int = 1  # local processes (1: in this process)
    address: str | None = None  # ray: None starts a local cluster

    def __str__(self) -> str:
        if self.kind == "ray":
            return f"ray:{self.address}" if self.address else "ray"
        return str(self.count)


def parse_workers(spec: str | int | Workers | None) -> Workers:
    """`None` / 1 / "4" / "ray" / "ray:ADDRESS" as a Workers."""
    if isinstance(spec, Workers):
        return spec
    if spec is None:
        return Workers("local", 1)
    text = str(spec).strip()
    if text == "ray" or text.startswith("ray:"):
        return Workers("ray", 0, text[4:] or None)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"workers must be a count >= 1, 'ray' or 'ray:ADDRESS', not '{spec}'")
    return Workers("local", n)


def map_tasks(fn: Callable, tasks: Sequence, workers: Workers | str | int | None = None,
              ray_cpus: int | None = None) -> list:
    """[fn(t) for t in tasks] on the workers, in task order (fn and tasks must pickle)."""
    w = parse_workers(workers)
    tasks = list(tasks)
    if w.kind == "ray":
        return _ray_map(fn, tasks, w.address, ray_cpus)
    if w.count == 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    # spawn: a forked child would share ONNX Runtime's and torch's thread pools with the parent
    with cf.ProcessPoolExecutor(max_workers=w.count, mp_context=mp.get_context("spawn"),
                                initializer=_one_cpu) as ex:
        return list(ex.map(fn, tasks))


def _one_cpu() -> None:
    """In a worker: ONNX Runtime at one thread (graphslim.runtime reads $GRAPHSLIM_THREADS
    per session), unless the user chose a count."""
    os.environ.setdefault(THREADS_ENV, "1")


def _on_one_cpu(fn: Callable, task):
    _one_cpu()
    return fn(task)


def _ray_map(fn: Callable, tasks: list, address: str | None, cpus: int | None) -> list:
    try:
        import ray
    except ImportError:
        raise InputError("workers=ray needs Ray: pip install 'graphslim-engine[ray]' (or pip "
                         "install ray)") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_on_one_cpu)
    return ray.get([remote.remote(fn, t) for t in tasks])
