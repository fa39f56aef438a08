"""What a pass is, below the pass manager and the pipeline parser: Pass, Plan, Skip, Repeat, the
registry of passes by textual name, and how a configured pass prints as pipeline text (parsing
lives in pipeline_text.py; the pass manager in pass_manager.py imports both)."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from typing import ClassVar

from graphslim.analyses import Analysis, AnalysisManager
from graphslim.edits import Edit
from graphslim.ir import GraphView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skip:
    node: str
    reason: str


@dataclass
class Plan:
    edits: list[Edit] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)
    #: options this run resolved from the machine or from measurement (option field -> value:
    #: `round_to=0` -> the CPU's channel block, `choose=latency` -> the ops kept int8), so the
    #: decided pipeline text reproduces the result elsewhere without measuring again
    decided: dict = field(default_factory=dict)

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append(Skip(node, reason))


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses whose fields are their options."""

    name: ClassVar[str] = "pass"
    lossless: ClassVar[bool] = True
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()
    summary: ClassVar[str] = ""
    #: the ONNX opset the edits need (QuantizeLinear with `axis`: 13); the model is converted
    #: up before planning where it is older
    min_opset: ClassVar[int | None] = None
    #: nothing may run after this pass (qdq: its grids are fixed for the graph it saw)
    final: ClassVar[bool] = False
    #: the pass is only meaningful on real calibration data (qdq): tools refuse to run it
    #: without data unless told to use synthetic inputs
    needs_data: ClassVar[bool] = False
    #: the pass reads `analyses.provenance` (the model before the first lossy pass, and the
    #: channel maps into it): the pass manager keeps one for pipelines that hold such a pass
    needs_reference: ClassVar[bool] = False

    def plan(self, view: GraphView, analyses: AnalysisManager) -> Plan:
        raise NotImplementedError

    def __str__(self) -> str:
        return print_pass(self)


@dataclass(frozen=True)
class Repeat:
    """Run `passes` in order until none of them changes anything, at most `max_iter` rounds."""

    passes: tuple
    max_iter: int = 4
    name: ClassVar[str] = "repeat"

    def __post_init__(self):
        if self.max_iter < 1:
            raise ValueError("repeat: max-iter must be >= 1")

    def __str__(self) -> str:
        return print_pass(self)


_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its textual name."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes named '{cls.name}': {_REGISTRY[cls.name]} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Registered passes, including those installed packages declare under the
    `graphslim.passes` entry-point group (so the engine never imports `passes` itself)."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in metadata.entry_points(group="graphslim.passes"):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not take the engine down
                log.warning("could not load pass plugin %s: %s", ep.value, exc)
    return dict(_REGISTRY)


def option_name(field_name: str) -> str:
    """A dataclass field as a pipeline option: `round_to` is written `round-to`."""
    return field_name.replace("_", "-")


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return ";".join(_format_value(x) for x in v)
    return str(v)


def print_pass(p) -> str:
    """`name{opt=value,...}` listing only options that differ from their defaults."""
    if isinstance(p, Repeat):
        inner = ",".join(print_pass(q) for q in p.passes)
        return f"repeat{{max-iter={p.max_iter}}}({inner})"
    opts = []
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if v != default:
            opts.append(f"{option_name(f.name)}={_format_value(v)}")
    return p.name + (f"{{{','.join(opts)}}}" if opts else "")


def print_pipeline(passes) -> str:
    return ",".join(print_pass(p) for p in passes)


def flatten(pipeline) -> list:
    """The passes of a pipeline in running order, repeat groups expanded once."""
    out = []
    for p in pipeline:
        out.extend(flatten(p.passes) if isinstance(p, Repeat) else [p])
    return out


def ordering_error(pipeline) -> str | None:
    """Why the pipeline breaks a pass's declared ordering (Pass.final: fold-bn, equalize and
    every other rewrite go before qdq), or None."""
    names = [p.name for p in flatten(pipeline)]
    for i, p in enumerate(flatten(pipeline)):
        if p.final and i < len(names) - 1:
            return f"'{p.name}' must be the last pass; '{names[i + 1]}' follows it"
    return None
