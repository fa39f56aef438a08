"""Structure rules of shared/DESIGN.md checked on the source: modules import in one direction
(no cycles, counting imports inside functions too), no private name imported across modules,
and passes/ imports no backend."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir: one namespace)
PACKAGES = {"graphslim": "graphslim", "passes": "graphslim.passes", "tools": "graphslim.tools",
            "benchmarks": "graphslim.benchmarks"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported module, names imported from it)] for every import statement."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mod, out = _module_name(path), []
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    out += [(a.name, []) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    out.append((node.module, [a.name for a in node.names]))
            found[mod] = out
    return found


def _edges(imports) -> dict[str, set[str]]:
    mods = set(imports)
    graph = {m: set() for m in mods}
    for mod, items in imports.items():
        for target, names in items:
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            hits = {f"{target}.{n}" for n in names if f"{target}.{n}" in mods} or (
                {target} if target in mods else set())
            graph[mod] |= hits - {mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _edges(_imports())
    # a package's __init__ importing its own submodules is its public face, not a cycle
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}
    assert _cycles(graph) == []


def _layer(mod: str) -> int:
    """tools and benchmarks (3) > passes (2) > the engine (1); tests are outside."""
    parts = mod.split(".")
    if parts[0] != "graphslim":
        return 0
    return {"passes": 2, "tools": 3, "benchmarks": 3}.get(parts[1] if len(parts) > 1 else "", 1)


def test_imports_flow_one_way():
    """shared/DESIGN.md: tools -> passes -> graphslim; the engine finds passes through the
    `graphslim.passes` entry-point group and never imports them."""
    bad = [(mod, target) for mod, items in _imports().items() for target, _ in items
           if _layer(target) > _layer(mod) and not (mod == "graphslim.passes" or
                                                   target.startswith(mod + "."))]
    assert bad == []


def test_the_detector_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    bad = [(mod, target, n) for mod, items in _imports().items() for target, names in items
           for n in names if n.startswith("_") and n != "__future__" and
           target.split(".")[0] in ("graphslim", "tests")]
    assert bad == []


def test_passes_import_no_backend():
    backends = ("torch", "onnx", "onnx_graphsurgeon", "onnxruntime")
    bad = [(mod, target) for mod, items in _imports().items() if mod.startswith("graphslim.passes")
           for target, _ in items if target.split(".")[0] in backends]
    assert bad == []


def _is_attrs(expr: ast.expr) -> bool:
    """`node.attrs` or a local named attrs (not any dict: a recipe's [target] table is fine)."""
    return (isinstance(expr, ast.Attribute) and expr.attr == "attrs") or \
        (isinstance(expr, ast.Name) and expr.id == "attrs")


def _spelling_reads(path: pathlib.Path) -> list[str]:
    """Places that compare a node's frontend spelling (`x.op == ...`, `x.op in ...`) or read fx
    call arguments / module targets from attrs (`attrs["args"]`, `attrs.get("kwargs")`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "op" for s in sides):
                found.append(f"{path.name}:{node.lineno} compares .op")
            if any(isinstance(s, ast.Attribute) and s.attr in ("value", "name") and
                   isinstance(s.value, ast.Attribute) and s.value.attr == "kind" for s in sides):
                found.append(f"{path.name}:{node.lineno} compares .kind.value/.name (a string)")
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and \
                _is_attrs(node.value):
            key = node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "get" and _is_attrs(node.func.value) and node.args and \
                isinstance(node.args[0], ast.Constant):
            key = node.args[0].value
        if key in ("args", "kwargs", "target"):
            found.append(f"{path.name}:{node.lineno} reads attrs['{key}']")
    return found


def test_passes_and_analyses_read_meaning_not_spelling():
    """shared/DESIGN.md rule 6: outside graphslim/frontends/ nothing compares Node.op or reads
    fx call arguments; passes read OpKind and the typed attributes of graphslim.ir."""
    files = [*(ROOT / "passes").rglob("*.py"), *(ROOT / "graphslim" / "analyses").rglob("*.py"),
             *(p for p in (ROOT / "graphslim").glob("*.py")),
             *(ROOT / "graphslim" / "budget").rglob("*.py")]
    bad = [hit for p in files for hit in _spelling_reads(p)]
    assert bad == []


def test_the_spelling_check_sees_op_compares(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("if node.op == 'Slice' or n.attrs.get('args'):\n    pass\n"
                     "if node.kind.value in ('batchnorm',):\n    pass\n"
                     "if node.kind.name in ('CONV',):\n    pass\n")
    assert len(_spelling_reads(probe)) == 4


def test_no_module_over_about_400_lines():
    """Issue 13: the engine and the passes stay in modules a reader can hold (~400 lines)."""
    long = {str(p.relative_to(ROOT)): n for folder in ("graphslim", "passes")
            for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}
