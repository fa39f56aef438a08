"""Where the real models shipped inside packages are (shared/ASSETS.md), found without importing
those packages (several import heavy optional dependencies at import time). No torch needed:
ONNX-only benchmarks use it too."""

from __future__ import annotations

import importlib.util
import os


def asset_path(package: str, relpath: str) -> str | None:
    """The file inside the installed package, or None when the package or file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    return path if os.path.exists(path) else None
