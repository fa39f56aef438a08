"""Per-group ratios of prune-channels (`ratios=NODE-PATTERN:RATIO;...`): parsing, matching to
channel groups, and writing an allocation back as text. A group is named by the first node that
creates its channels (ChannelGroup.spaces[0]), escaped so the pattern matches that node alone;
a pattern matches a group when it matches any node creating the group's channels."""

from __future__ import annotations

import fnmatch
import glob

from graphslim.analyses.channels import ChannelGroup
from graphslim.pass_base import Plan


def parse_ratios(entries) -> list[tuple[str, float]]:
    """`ratios` entries `NODE-PATTERN:RATIO` as (pattern, ratio); ValueError naming a bad one."""
    out = []
    for e in entries:
        pattern, sep, value = str(e).rpartition(":")
        try:
            r = float(value)
        except ValueError:
            r = -1.0
        if not sep or not pattern or not 0 <= r < 1:
            raise ValueError(f"ratios entry '{e}' must be NODE-PATTERN:RATIO with the ratio in "
                             "[0, 1)")
        out.append((pattern, r))
    return out


def group_ratios(groups: list[ChannelGroup], entries, plan: Plan) -> dict[int, float]:
    """Group index -> ratio from `ratios` (first pattern matching one of the nodes creating
    the group's channels); a pattern matching no candidate group is noted."""
    pairs = parse_ratios(entries)
    out: dict[int, float] = {}
    used = set()
    for g in groups:
        for k, (pattern, r) in enumerate(pairs):
            if any(fnmatch.fnmatchcase(s, pattern) for s in g.spaces):
                out[g.index] = r
                used.add(k)
                break
    for k, (pattern, _) in enumerate(pairs):
        if k not in used:
            plan.notes.append(f"ratios: '{pattern}' matches no prunable group")
    return out


def ratio_entries(groups: list[ChannelGroup], per_group: dict[int, float]) -> tuple[str, ...]:
    """The `ratios` option that prunes as `per_group` does: each group by the first node that
    creates its channels, written as an exact pattern."""
    out = []
    for g in groups:
        r = per_group.get(g.index, 0.0)
        if r:
            name = g.spaces[0]
            if any(c in name for c in ",;{}()=\n"):
                raise ValueError(f"prune-channels: node '{name}' cannot be written into "
                                 "pipeline text (it holds one of , ; { } ( ) =)")
            out.append(f"{glob.escape(name)}:{round(r, 4):g}")
    return tuple(out)
