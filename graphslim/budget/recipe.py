"""Recipes: one compression run described by a TOML file (PaddleSlim's Compressor config, in
the vocabulary of graphslim's search), run by `slim-compress --recipe R.toml`:

    model = "model.onnx"            # paths are relative to the recipe's folder
    output = "model.slim.onnx"
    input_shapes = { x = [1, 3, 224, 224] }   # for dynamic inputs (optional)

    [data]
    calibration = "calib.npz"       # fits: reconstruct, int8
    evaluation = "eval.npz"         # judges: every candidate's metric

    [target]
    latency = 0.5                   # or macs = 0.3, or size = 0.25 (fraction of the original)
    max_drop = 0.02
    metric = "agreement"            # agreement | cosine | accuracy (labels in evaluation)

    [search]                        # what is explored (all optional)
    prefix = "fold-bn"
    levels = [0.25, 0.5, 0.75]
    recover = ["", "reconstruct"]   # each candidate with and without a refit
    int8 = false
    workers = "2"                   # N | "ray" | "ray:ADDRESS"
    threads = 1
    # pipeline = "fold-bn,prune-channels{ratio=0.3},reconstruct"   # fixed: judge it, no search

Unknown keys are errors (a misspelt option must not be silently ignored).
"""

from __future__ import annotations

import os

from graphslim.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI (a dependency there)
    import tomli as tomllib

_TOP = {"model", "output", "input_shapes", "data", "target", "search"}
_SECTIONS = {"data": {"calibration", "evaluation"},
             "target": {"latency", "macs", "size", "max_drop", "metric"},
             "search": {"prefix", "levels", "recover", "int8", "workers", "threads", "pipeline",
                        "cache"}}


def load_recipe(path: str) -> dict:
    """The recipe as slim-compress settings: model, output, calib_data, eval_data, target,
    max_drop, metric, prefix, levels, recover, int8, workers, threads, pipeline, cache,
    input_shapes (paths made absolute)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read recipe '{path}': {exc}") from None
    _check_keys(raw, path)
    here = os.path.dirname(os.path.abspath(path))

    def rel(p):
        return None if p is None else os.path.join(here, os.path.expanduser(str(p)))

    data, target, search = raw.get("data", {}), raw.get("target", {}), raw.get("search", {})
    goals = {k: target[k] for k in ("latency", "macs", "size") if k in target}
    if "model" not in raw or "evaluation" not in data:
        raise InputError(f"recipe '{path}' needs model = ... and [data] evaluation = ...")
    if len(goals) != 1 and "pipeline" not in search:
        raise InputError(f"recipe '{path}': [target] needs exactly one of latency, macs, size")
    out = {"model": rel(raw["model"]), "output": rel(raw.get("output")),
           "calib_data": rel(data.get("calibration")), "eval_data": rel(data["evaluation"]),
           "target": goals or None, "max_drop": float(target.get("max_drop", 0.01)),
           "metric": target.get("metric", "agreement"),
           "input_shapes": {k: tuple(v) for k, v in raw.get("input_shapes", {}).items()}}
    for k in ("prefix", "levels", "recover", "int8", "workers", "threads", "pipeline"):
        if k in search:
            out[k] = tuple(search[k]) if isinstance(search[k], list) else search[k]
    if "cache" in search:
        out["cache"] = rel(search["cache"])
    return out


def _check_keys(raw: dict, path: str) -> None:
    bad = [k for k in raw if k not in _TOP]
    for section, allowed in _SECTIONS.items():
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise InputError(f"recipe '{path}': [{section}] must be a table")
        bad += [f"{section}.{k}" for k in value if k not in allowed]
    if bad:
        raise InputError(f"recipe '{path}': unknown key(s) {', '.join(bad)}")
