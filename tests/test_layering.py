"""The import graph of `nemotron_jax`: no cycles, kernels/ a leaf, config.py over leaves only.

Every `import` in every module counts, function-level (lazy) ones included: a lazy import hides a
cycle from the interpreter, not from a reader. Importing `nemotron_jax.a.b` also runs the package
`nemotron_jax.a` first, so that edge is added too (except from inside that package, and except
for the root package, whose `__init__` only re-exports). Failures name each offending import as
file:line.
"""

from __future__ import annotations

import ast
import functools
import graphlib
import itertools
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).resolve().parent.parent / "nemotron_jax"
ROOT = "nemotron_jax"

# What kernels/ may use from outside itself: the shared error types, activation sharding, the config.
KERNELS_MAY_IMPORT = (f"{ROOT}.errors", f"{ROOT}.sharding", f"{ROOT}.config")

# The layers, top to bottom (docs/architecture.md); a module may import its own layer or any below.
LAYERS: tuple[tuple[str, ...], ...] = (
    (ROOT, f"{ROOT}.__main__", f"{ROOT}.cli"),
    (f"{ROOT}.pipeline",),
    (f"{ROOT}.recipes",),
    (f"{ROOT}.serve", f"{ROOT}.puzzle", f"{ROOT}.rl", f"{ROOT}.eval", f"{ROOT}.aot"),
    (f"{ROOT}.train",),
    (f"{ROOT}.data",),
    (f"{ROOT}.api", f"{ROOT}.tokenizer"),
    (f"{ROOT}.engine",),
    (f"{ROOT}.sampling", f"{ROOT}.plan", f"{ROOT}.convert.hf", f"{ROOT}.convert.hf_files", f"{ROOT}.checkpoint",
     f"{ROOT}.presets", f"{ROOT}.lora", f"{ROOT}.quantize"),
    (f"{ROOT}.model",),
    (f"{ROOT}.kernels", f"{ROOT}.config", f"{ROOT}.convert", f"{ROOT}.convert.hf_config", f"{ROOT}.sharding",
     f"{ROOT}.typed_yaml", f"{ROOT}.fileio", f"{ROOT}.distributed", f"{ROOT}.rewards", f"{ROOT}.errors"),
)


class Edge(NamedTuple):
    src: str
    dst: str
    where: str  # file:line of the import statement

    def __str__(self) -> str:
        return f"{self.where}: {self.src} -> {self.dst}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The nemotron_jax modules one import statement names (before adding parent packages)."""
    mods = _modules()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: climb from this module's package
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:  # `import nemotron_jax.x.Y` style: the nearest module
            name = name.rpartition(".")[0]
        if name.split(".")[0] == ROOT:
            out.append(name)
    return out


@functools.cache
def _edges() -> tuple[Edge, ...]:
    edges: set[Edge] = set()
    for module, path in _modules().items():
        is_package = path.name == "__init__.py"
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(module, is_package, node):
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # the target and the packages above it
                    dst = ".".join(parts[:i])
                    inside = module == dst or module.startswith(dst + ".")
                    if dst != module and (dst == target or not inside):
                        edges.add(Edge(module, dst, f"{rel}:{node.lineno}"))
                if target == ROOT and module != ROOT:
                    edges.add(Edge(module, ROOT, f"{rel}:{node.lineno}"))
    return tuple(sorted(edges))


def _deps() -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {m: set() for m in _modules()}
    for e in _edges():
        deps[e.src].add(e.dst)
    return deps


def _closure(module: str) -> set[str]:
    deps, seen, todo = _deps(), set(), [module]
    while todo:
        for d in deps[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


def _cycle() -> list[str]:
    """One import cycle (its modules in order, the first repeated last), or [] when there is none."""
    try:
        graphlib.TopologicalSorter(_deps()).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return []


def _layer(module: str) -> int | None:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            hit = module == name or (name != ROOT and module.startswith(name + "."))
            if hit and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def _report(edges: list[Edge]) -> str:
    return "\n  " + "\n  ".join(str(e) for e in edges)


def test_graph_sees_the_known_imports():
    """Guard against a parser that finds nothing (then every rule below would pass vacuously)."""
    edges = set(_edges())
    assert any(e.src == f"{ROOT}.model.transformer" and e.dst == f"{ROOT}.kernels" for e in edges)
    assert any(e.src == f"{ROOT}.model.attention" and e.dst == f"{ROOT}.kernels.reference" for e in edges)
    assert any(e.src == f"{ROOT}.model.attention" and e.dst == f"{ROOT}.kernels" for e in edges)  # package runs
    # function-level imports count: kernels/__init__ picks its kernels lazily
    assert any(e.src == f"{ROOT}.kernels" and e.dst == f"{ROOT}.kernels.flash_attention" for e in edges)


def test_no_import_cycles():
    cycle = _cycle()
    inside = [e for e in _edges() if any(e.src == a and e.dst == b for a, b in itertools.pairwise(cycle))]
    assert not cycle, "an import cycle (function-level imports included):" + _report(inside)


def test_kernels_import_nothing_above_them():
    bad = [e for e in _edges() if e.src.startswith(f"{ROOT}.kernels")
           and not (e.dst == f"{ROOT}.kernels" or e.dst.startswith(f"{ROOT}.kernels."))
           and e.dst not in KERNELS_MAY_IMPORT]
    assert not bad, f"kernels/ must be a leaf (allowed outside it: {KERNELS_MAY_IMPORT}):" + _report(bad)


def test_config_imports_only_leaf_modules():
    """config.py is the model description every layer reads: it may only use leaves, modules that
    import nothing from nemotron_jax but `errors` (and packages whose `__init__` imports nothing)."""
    deps = _deps()
    transparent = {m for m, p in _modules().items() if p.name == "__init__.py" and not deps[m]}
    leaves = {m for m, d in deps.items() if d <= {f"{ROOT}.errors"} | transparent}
    bad = [e for e in _edges() if e.src == f"{ROOT}.config" and e.dst not in leaves]
    assert not bad, "config.py imports a module that is not a leaf:" + _report(bad)


def test_flash_forward_and_backward_share_a_module_not_each_other():
    fwd, bwd, common = (f"{ROOT}.kernels.{n}" for n in ("flash_attention", "flash_backward", "flash_common"))
    assert fwd not in _closure(bwd), "flash_backward reaches flash_attention:" + _report(
        [e for e in _edges() if e.src == bwd])
    assert not {fwd, bwd} & _closure(common), "flash_common must not import the passes"
    assert common in _deps()[fwd] and common in _deps()[bwd]


def test_no_module_imports_a_layer_above_it():
    """The layers of docs/architecture.md, top to bottom: every module is in one, and imports only
    its own layer or those below."""
    unplaced = sorted(m for m in _modules() if _layer(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    up = [e for e in _edges() if _layer(e.dst) < _layer(e.src)]
    assert not up, "imports that point up the layers:" + _report(up)
