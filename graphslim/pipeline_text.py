"""The textual pipeline: `fold-bn,prune-channels{ratio=0.3,round-to=8},repeat{max-iter=3}(a,b)`.

Option names are the pass's dataclass fields with '_' written '-'; values are parsed by the field's
declared type (bool: true/false, tuples: items joined by ';'). Printing and parsing round-trip.
"""

from __future__ import annotations

import dataclasses
import typing

from graphslim.errors import PipelineError
from graphslim.pass_base import (  # noqa: F401  (printing, re-exported beside parsing)
    Repeat,
    option_name,
    print_pass,
    print_pipeline,
    registered_passes,
)


class _Parser:
    """Recursive descent over  pipeline := item (',' item)* ;  item := NAME ['{' opts '}']
    ['(' pipeline ')'] ;  opts := KEY '=' VALUE (',' KEY '=' VALUE)*.  Nothing is dropped: any
    text the grammar does not take is an error naming its position (a nested pipeline is only
    for `repeat`; an option given twice is an error)."""

    _STOP = set(",{}()=")

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, msg: str, pos: int | None = None) -> PipelineError:
        pos = self.pos if pos is None else pos
        return PipelineError(f"{msg} at position {pos + 1} of the pipeline\n  {self.text}\n"
                             f"  {' ' * pos}^")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str, what: str) -> None:
        if self.peek() != ch:
            got = repr(self.peek()) if self.peek() else "the end"
            raise self.error(f"expected '{ch}' {what}, found {got}")
        self.pos += 1

    def word(self, what: str) -> tuple[str, int]:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in self._STOP:
            self.pos += 1
        word = self.text[start:self.pos].strip()
        if not word:
            raise self.error(f"expected {what}", start)
        return word, start

    def pipeline(self, end: str = "") -> list[tuple]:
        items = [self.item()]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.item())
        if self.peek() != end:
            raise self.error(f"unexpected {self.peek()!r}" if self.peek() else
                             f"missing '{end}' (unbalanced bracket)")
        return items

    def item(self) -> tuple:
        name, at = self.word("a pass name")
        opts: dict[str, tuple[str, int]] = {}
        if self.peek() == "{":
            self.pos += 1
            while self.peek() != "}":
                key, kpos = self.word("an option name")
                if self.peek() != "=":
                    raise self.error(f"option '{key}' of '{name}' has no '=value'")
                self.pos += 1
                value, _ = self.word(f"a value for option '{key}'")
                if key in opts:
                    raise self.error(f"option '{key}' of '{name}' is given twice", kpos)
                opts[key] = (value, kpos)
                if self.peek() == ",":
                    self.pos += 1
                elif self.peek() != "}":
                    raise self.error(f"expected ',' or '}}' after option '{key}' (unbalanced "
                                     "bracket?)")
            self.pos += 1
        inner = None
        if self.peek() == "(":
            if name != "repeat":
                raise self.error(f"'{name}' takes options in {{...}}, not a nested pipeline in "
                                 "(...); only repeat{...}(...) nests passes")
            self.pos += 1
            inner = self.pipeline(end=")")
            self.pos += 1
        elif name == "repeat":
            raise self.error("repeat needs the passes to repeat: repeat{max-iter=N}(a,b)")
        return name, at, opts, inner


def _convert(pass_name: str, key: str, raw: str, typ):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "") and type(None) in args:
            return None
        return _convert(pass_name, key, raw, non_none[0])
    if origin in (tuple, list):
        item = args[0] if args else str
        return tuple(_convert(pass_name, key, x, item) for x in raw.split(";") if x)
    try:
        if typ is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if typ in (int, float, str):
            return typ(raw)
    except ValueError:
        raise PipelineError(f"pass '{pass_name}': option '{key}' expects {typ.__name__}, "
                            f"got '{raw}'") from None
    return raw


def _build(item: tuple, registry: dict, parser: _Parser):
    name, at, opts, inner = item
    if name == "repeat":
        raw, kpos = opts.pop("max-iter", ("4", at))
        if opts:
            raise parser.error(f"repeat has no option '{next(iter(opts))}'; options: max-iter",
                               next(iter(opts.values()))[1])
        try:
            max_iter = int(raw)
            return Repeat(tuple(_build(i, registry, parser) for i in inner), max_iter=max_iter)
        except ValueError as exc:
            msg = str(exc) if raw.lstrip("-").isdigit() else f"max-iter expects int, got '{raw}'"
            raise parser.error(msg, kpos) from None
    if name not in registry:
        known = ", ".join(sorted(registry)) or (
            "none (no `graphslim.passes` entry points: install the checkout, `pip install -e .`)")
        raise parser.error(f"unknown pass '{name}'; known passes: {known}", at)
    cls = registry[name]
    hints = typing.get_type_hints(cls)
    fields = {option_name(f.name): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, (raw, kpos) in opts.items():
        if key not in fields:
            raise parser.error(f"pass '{name}' has no option '{key}'; options: "
                               f"{', '.join(sorted(fields)) or 'none'}", kpos)
        try:
            kwargs[fields[key]] = _convert(name, key, raw, hints[fields[key]])
        except PipelineError as exc:
            raise parser.error(str(exc), kpos) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise parser.error(f"pass '{name}': {exc}", at) from None


def parse_pipeline(text: str, registry: dict | None = None) -> list:
    """Parse pipeline text into configured pass objects (registry: name -> pass class)."""
    if not isinstance(text, str):
        raise PipelineError(f"a pipeline is text such as 'fold-bn,qdq', not "
                            f"{type(text).__name__}")
    if registry is None:
        registry = registered_passes()
    if not text.strip():
        raise PipelineError("empty pipeline")
    parser = _Parser(text)
    return [_build(item, registry, parser) for item in parser.pipeline()]
