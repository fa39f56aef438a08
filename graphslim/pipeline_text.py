"""The textual pipeline: `fold-bn,prune-channels{ratio=0.3,round-to=8},repeat{max-iter=3}(a,b)`.

Option names are the pass's dataclass fields with '_' written '-'; values are parsed by the field's
declared type (bool: true/false, tuples: items joined by ';'). Printing and parsing round-trip.
"""

from __future__ import annotations

import dataclasses
import typing

from graphslim.errors import PipelineError


def _kebab(field_name: str) -> str:
    return field_name.replace("_", "-")


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return ";".join(_format_value(x) for x in v)
    return str(v)


def print_pass(p) -> str:
    """`name{opt=value,...}` listing only options that differ from their defaults."""
    from graphslim.pass_manager import Repeat

    if isinstance(p, Repeat):
        inner = ",".join(print_pass(q) for q in p.passes)
        return f"repeat{{max-iter={p.max_iter}}}({inner})"
    opts = []
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if v != default:
            opts.append(f"{_kebab(f.name)}={_format_value(v)}")
    return p.name + (f"{{{','.join(opts)}}}" if opts else "")


def print_pipeline(passes) -> str:
    return ",".join(print_pass(p) for p in passes)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "{(":
            depth += 1
        elif ch in "})":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced bracket in pipeline '{text}'")
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PipelineError(f"unbalanced bracket in pipeline '{text}'")
    parts.append("".join(cur).strip())
    if any(not p for p in parts):
        raise PipelineError(f"empty pass name in pipeline '{text}'")
    return parts


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


def _parse_one(text: str, registry: dict):
    from graphslim.pass_manager import Repeat

    name, _, rest = text.partition("{")
    name = name.strip()
    opts_text, inner = "", ""
    if rest:
        opts_text, _, tail = rest.partition("}")
        tail = tail.strip()
        if tail.startswith("(") and tail.endswith(")"):
            inner = tail[1:-1]
        elif tail:
            raise PipelineError(f"unexpected text after options of '{name}': '{tail}'")
    elif "(" in name:
        name, _, tail = name.partition("(")
        inner = tail.rstrip(")")
        name = name.strip()
    opts: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in opts_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise PipelineError(f"pass '{name}': option '{item}' has no '=value'")
        opts[key.strip()] = value.strip()
    if name == "repeat":
        max_iter = int(opts.pop("max-iter", 4))
        if opts:
            raise PipelineError(f"repeat: unknown options {sorted(opts)}")
        return Repeat(tuple(parse_pipeline(inner, registry)), max_iter=max_iter)
    if name not in registry:
        raise PipelineError(f"unknown pass '{name}'; known passes: {', '.join(sorted(registry))}")
    cls = registry[name]
    hints = typing.get_type_hints(cls)
    fields = {_kebab(f.name): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in opts.items():
        if key not in fields:
            raise PipelineError(f"pass '{name}' has no option '{key}'; options: "
                                f"{', '.join(sorted(fields)) or 'none'}")
        kwargs[fields[key]] = _convert(name, key, raw, hints[fields[key]])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"pass '{name}': {exc}") from None


def parse_pipeline(text: str, registry: dict | None = None) -> list:
    """Parse pipeline text into configured pass objects (registry: name -> pass class)."""
    if registry is None:
        from graphslim.pass_manager import registered_passes
        registry = registered_passes()
    text = text.strip()
    if not text:
        raise PipelineError("empty pipeline")
    return [_parse_one(part, registry) for part in _split_top(text)]
