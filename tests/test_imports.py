"""Import lint, read from the source (AST): data flows one way (text -> thoughts -> activations
-> probes / vectors -> steered generation -> evaluation), backends keep their internals, and no
same-repo import hides behind an `except ImportError`."""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lens_steer.backends.base import ModelBackend

ROOT = Path(__file__).resolve().parents[1]
OURS = ("lens_steer", "probes", "experiments", "benchmarks")
CODE = OURS  # what the rules below are checked on (tests may poke at internals on purpose)
LIBRARY = ("lens_steer", "probes", "experiments")
"""Where backend-only modules are banned: benchmarks may import the raw libraries for their
baselines (what a user would run without lens_steer), but not reach into a backend."""
BACKEND_ONLY = ("nnsight", "transformer_lens", "lens_steer.backends.nnsight",
                "lens_steer.backends.transformer_lens", "lens_steer.backends.hf_common")
"""Modules only lens_steer/backends may import: everything else talks to `ModelBackend`."""
FORBIDDEN = [  # (importer, imported): each an upstream layer that must not see a downstream one
    ("lens_steer", "experiments"), ("lens_steer", "benchmarks"), ("probes", "experiments"),
    *((f"lens_steer.{core}", "probes") for core in (  # probes read activations; only
        "thoughts", "cache", "backends", "generation", "interventions", "steering", "eval",
        "toy", "methods")),                             # orchestration (experiments) runs them
    ("lens_steer.thoughts", "lens_steer.cache"), ("lens_steer.thoughts", "lens_steer.eval"),
    ("lens_steer.thoughts", "lens_steer.steering"), ("lens_steer.thoughts", "lens_steer.backends"),
    ("lens_steer.toy", "lens_steer.eval"), ("lens_steer.toy", "lens_steer.steering"),
    ("lens_steer.toy", "lens_steer.cache"),
    ("lens_steer.cache", "lens_steer.steering"), ("lens_steer.cache", "lens_steer.eval"),
    ("probes", "lens_steer.steering"), ("probes", "lens_steer.eval"),
    ("probes", "lens_steer.backends"), ("probes", "lens_steer.generation"),
    ("lens_steer.backends", "lens_steer.steering"), ("lens_steer.backends", "lens_steer.eval"),
    ("lens_steer.backends", "lens_steer.cache"),
    ("lens_steer.eval", "lens_steer.steering"), ("lens_steer.eval", "lens_steer.cache"),
]


def _files(folders: tuple[str, ...] = CODE) -> Iterator[tuple[str, Path, ast.Module]]:
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(
                ".__init__")
            yield name, path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (imports for annotations only)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imports(tree: ast.Module, runtime_only: bool = True) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import, at any depth (function bodies too)."""
    skip = _type_checking_nodes(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            # `from pkg import module` imports pkg.module when it is one
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names
                        if (ROOT / Path(*f"{node.module}.{a.name}".split("."))).with_suffix(
                            ".py").exists())


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_backend_internals_are_imported_only_by_backends():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {mod}" for name, path, tree in _files(LIBRARY)
                 if not _within(name, "lens_steer.backends")
                 for line, mod in _imports(tree, runtime_only=False)
                 if any(_within(mod, b) for b in BACKEND_ONLY)]
    assert not offenders, offenders


def test_data_flows_one_way():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name} imports {mod}"
                 for name, path, tree in _files() for line, mod in _imports(tree)
                 for src, dst in FORBIDDEN if _within(name, src) and _within(mod, dst)]
    assert not offenders, offenders


def _unit(module: str) -> str:
    """The layer a module belongs to: `lens_steer.<first part>`, `probes`, ..."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "lens_steer" and len(parts) > 1 else parts[0]


def test_no_import_cycles_between_layers():
    """No cycle between lens_steer's subpackages/modules and probes, counting imports inside
    functions (a cycle hidden there is still a cycle). The package root `lens_steer` (a
    re-export of the public API) is left out."""
    graph: dict[str, set[str]] = {}
    for name, _, tree in _files(("lens_steer", "probes")):
        if name == "lens_steer":
            continue
        for _, mod in _imports(tree):
            if mod.split(".")[0] in OURS and mod != "lens_steer":
                a, b = _unit(name), _unit(mod)
                if a != b:
                    graph.setdefault(a, set()).add(b)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def _backend_internal_names() -> set[str]:
    """Attributes the concrete backends define that the `ModelBackend` interface does not."""
    public = {n for n in dir(ModelBackend) if not n.startswith("__")}
    public |= set(ModelBackend.__annotations__)
    names: set[str] = set()
    for _, _, tree in _files(("lens_steer/backends",)):
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if not any("Backend" in ast.unparse(b) for b in cls.bases):
                continue
            for node in ast.walk(cls):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and ast.unparse(node.value) == "self"):
                    names.add(node.attr)
                elif isinstance(node, ast.FunctionDef) and node in cls.body:
                    names.add(node.name)
    return {n for n in names - public if not n.startswith("__")}


def _looks_like_backend(expr: str) -> bool:
    last = expr.rsplit(".", 1)[-1]
    return last in ("model", "backend", "lm") or last.endswith(("_model", "_backend"))


def test_backend_attributes_stay_in_backends():
    """Nothing outside lens_steer/backends reaches a backend's own attributes (`.bridge`,
    `._hf`, the nnsight `.model`, ...): only what `ModelBackend` declares. Private and
    distinctive names count on any object; common ones (`model`, `arch`, ...) on anything named
    like a backend (`model.arch`, `backend.model`, `self.model.model`)."""
    internal = _backend_internal_names()
    assert {"bridge", "_hf", "model"} <= internal  # the rule sees the backends' internals
    distinctive = {n for n in internal if n.startswith("_")} | {"bridge"}
    offenders = []
    for name, path, tree in _files():
        if _within(name, "lens_steer.backends"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                base = ast.unparse(node.value)
                hit = node.attr in internal and base not in ("self", "cls") and (
                    node.attr in distinctive or _looks_like_backend(base))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant)):
                hit = node.args[1].value in internal and _looks_like_backend(
                    ast.unparse(node.args[0]))
            else:
                continue
            if hit:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_no_same_repo_import_guards():
    """An `except ImportError` around one of our own modules hides a broken import."""
    offenders = []
    for _, path, tree in _files(OURS + ("tests",)):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
            if "ImportError" not in caught and "ModuleNotFoundError" not in caught:
                continue
            body = ast.Module(body=node.body, type_ignores=[])
            ours = [m for _, m in _imports(body) if m.split(".")[0] in OURS]
            if ours:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ours}")
    assert not offenders, offenders
