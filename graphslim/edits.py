"""The edit vocabulary: what a plan may ask a frontend to do.

Each frontend implements every edit once (graphslim/frontends/*).  Arrays are in the canonical
layout of graphslim.ir; the frontend converts to its own storage layout and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class SetParam:
    """Give `node` a new value for parameter `role` (creating it, e.g. a bias, if absent).

    If the stored tensor is shared with other nodes, only `node` gets the new value: the frontend
    writes a private copy and the shared original stays as it was for the others.
    """

    node: str
    role: str
    value: np.ndarray


@dataclass(frozen=True)
class Bypass:
    """Remove a one-input, one-output node: whoever read its output reads its input instead."""

    node: str


Edit = SetParam | Bypass
