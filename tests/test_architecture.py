"""The package's import graph: rooms import one way, no private names across rooms, methods stay behind their API.

A *room* is a subpackage (``vpeft.methods``, ``vpeft.report`` ...) or a top-level module (``vpeft.api``,
``vpeft.hub`` ...) of ``src/vpeft``. Every import counts, at module level or inside a function. Each rule
collects every violation and fails once with all of them. Run it after moving code between rooms.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vpeft"

#: files that may import vpeft itself (``import vpeft`` / ``from vpeft import X``): the package's front door,
#: and the command line, which is a user of the public API
MAY_IMPORT_PACKAGE = {"vpeft/__init__.py", "vpeft/cli.py"}

#: files that may import vpeft modules inside functions: the command line defers every subcommand's imports
#: so that ``vpeft --help`` and the small subcommands start without torch-heavy rooms they do not use
MAY_DEFER_VPEFT_IMPORTS = {"vpeft/cli.py"}

#: modules of vpeft.methods that other rooms may import: the registry and lifecycle (base), the shared
#: helpers (targets, state); a method's own module is private to the methods room
PUBLIC_METHOD_MODULES = {"vpeft.methods", "vpeft.methods.base", "vpeft.methods.targets", "vpeft.methods.state"}

#: method modules a room may import beyond those: the peft bridge converts LoRA and DoRA layers
METHOD_MODULES_ALLOWED = {"interop": {"vpeft.methods.lora", "vpeft.methods.dora"}}


@dataclass(frozen=True)
class Import:
    file: str  # relative to src/, e.g. vpeft/api.py
    line: int
    module: str  # the imported module, resolved: vpeft.methods.lora
    names: tuple[str, ...]  # the names a `from` import takes (empty for `import x`)
    deferred: bool  # inside a function
    statement: str  # "import vpeft" / "from vpeft import X" / other


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> frozenset[str]:
    return frozenset(_module_name(p) for p in PACKAGE.rglob("*.py"))


def room(module: str) -> str:
    """``vpeft.methods.lora`` -> ``vpeft.methods``; ``vpeft.api`` -> ``vpeft.api``; ``vpeft`` -> ``vpeft``."""
    return ".".join(module.split(".")[:2])


def _room_of_file(file: str) -> str:
    return room(_module_name(SRC / file))


class _Collector(ast.NodeVisitor):
    def __init__(self, file: str, module: str, is_package: bool):
        self.file, self.module, self.is_package = file, module, is_package
        self.depth = 0
        self.imports: list[Import] = []
        self.aliases: dict[str, str] = {}  # local name -> vpeft module (for attribute access to private names)
        self.attributes: list[tuple[int, str, str]] = []  # line, module, private attribute

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "vpeft" or alias.name.startswith("vpeft."):
                kind = "import vpeft" if alias.name == "vpeft" else "other"
                self.imports.append(Import(self.file, node.lineno, alias.name, (), self.depth > 0, kind))
                if alias.asname:
                    self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        if base != "vpeft" and not base.startswith("vpeft."):
            return
        names = tuple(a.name for a in node.names)
        kind = "from vpeft import X" if base == "vpeft" else "other"
        submodules = [n for n in names if f"{base}.{n}" in _modules()]
        for name in submodules:  # `from vpeft.methods import lora` imports the module vpeft.methods.lora
            self.imports.append(Import(self.file, node.lineno, f"{base}.{name}", (), self.depth > 0, kind))
        rest = tuple(n for n in names if n not in submodules)
        if rest or not submodules:
            self.imports.append(Import(self.file, node.lineno, base, rest, self.depth > 0, kind))
        for alias in node.names:
            if f"{base}.{alias.name}" in _modules():
                self.aliases[alias.asname or alias.name] = f"{base}.{alias.name}"

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and _private(node.attr):
            self.attributes.append((node.lineno, self.aliases[node.value.id], node.attr))
        self.generic_visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def _parsed() -> tuple[list[Import], list[tuple[str, int, str, str]]]:
    imports, attributes = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        file = path.relative_to(SRC).as_posix()
        collector = _Collector(file, _module_name(path), path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=file))
        imports += collector.imports
        attributes += [(file, line, module, attr) for line, module, attr in collector.attributes]
    return imports, attributes


def _where(file: str, line: int) -> str:
    return f"src/{file}:{line}"


# ---------------------------------------------------------------- the rules: each returns (file, message) pairs


def _room_edges(skip_files: set[str]) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in _parsed()[0]:
        source, target = _room_of_file(imp.file), room(imp.module)
        # the package root only re-exports (importing it is rule package_imports); a room importing itself is fine
        if imp.file in skip_files or source == target or "vpeft" in (source, target):
            continue
        edges[(source, target)].append(imp)
    return edges


def _cycles(edges: dict[tuple[str, str], list[Import]]) -> list[list[str]]:
    """The strongly connected groups of nodes, each as shortest cycles through each of its nodes (no two alike)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles: list[list[str]] = []
    for group in sorted(groups, key=min):
        for start in sorted(group):
            previous: dict[str, str | None] = {start: None}
            queue, found = deque([start]), None
            while queue and found is None:
                v = queue.popleft()
                for w in sorted(graph[v] & group):
                    if w == start:
                        found = v
                        break
                    if w not in previous:
                        previous[w] = v
                        queue.append(w)
            path, node = [], found
            while node is not None:
                path.append(node)
                node = previous[node]
            cycle = [*reversed(path), start]
            if not any(set(pairwise(cycle)) == set(pairwise(c)) for c in cycles):
                cycles.append(cycle)
    return cycles


def _cycle_report(edges: dict[tuple[str, str], list[Import]]) -> list[tuple[str, str]]:
    out = []
    for cycle in _cycles(edges):
        lines = [" -> ".join(cycle)]
        files: set[str] = set()
        for a, b in pairwise(cycle):
            files |= {i.file for i in edges[(a, b)]}
            lines.append(f"    {a} -> {b}: " + ", ".join(_where(i.file, i.line) for i in edges[(a, b)]))
        out.append((",".join(sorted(files)), "\n".join(lines)))
    return out


def check_cycles(skip_files: set[str]) -> list[tuple[str, str]]:
    """No circle between rooms."""
    return _cycle_report(_room_edges(skip_files))


def check_module_cycles(skip_files: set[str]) -> list[tuple[str, str]]:
    """No circle between the modules of one room (a package's ``__init__`` only re-exports: edges to it skipped)."""
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in _parsed()[0]:
        source = _module_name(SRC / imp.file)
        if imp.file in skip_files or room(source) != room(imp.module) or imp.module == room(imp.module):
            continue
        if source != imp.module and source != room(source):
            edges[(source, imp.module)].append(imp)
    return _cycle_report(edges)


def check_private_names(skip_files: set[str]) -> list[tuple[str, str]]:
    imports, attributes = _parsed()
    out = []
    for imp in imports:
        if imp.file in skip_files or _room_of_file(imp.file) == room(imp.module):
            continue
        for name in [*imp.names, *imp.module.split(".")]:
            if _private(name):
                out.append((imp.file, f"{_where(imp.file, imp.line)}: imports {imp.module}.{name}"))
    for file, line, module, attr in attributes:
        if file not in skip_files and _room_of_file(file) != room(module):
            out.append((file, f"{_where(file, line)}: uses {module}.{attr}"))
    return out


def check_method_modules(skip_files: set[str]) -> list[tuple[str, str]]:
    out = []
    for imp in _parsed()[0]:
        source = _room_of_file(imp.file)
        if imp.file in skip_files or source == "vpeft.methods" or not imp.module.startswith("vpeft.methods."):
            continue
        allowed = PUBLIC_METHOD_MODULES | METHOD_MODULES_ALLOWED.get(source.removeprefix("vpeft."), set())
        if imp.module not in allowed:
            out.append((imp.file, f"{_where(imp.file, imp.line)}: imports {imp.module} (a method's own module)"))
    return out


def check_package_imports(skip_files: set[str]) -> list[tuple[str, str]]:
    return [
        (imp.file, f"{_where(imp.file, imp.line)}: {imp.statement} (import from the module that defines it)")
        for imp in _parsed()[0]
        if imp.file not in skip_files | MAY_IMPORT_PACKAGE and imp.statement != "other"
    ]


def check_deferred_imports(skip_files: set[str]) -> list[tuple[str, str]]:
    return [
        (imp.file, f"{_where(imp.file, imp.line)}: imports {imp.module} inside a function")
        for imp in _parsed()[0]
        if imp.deferred and imp.file not in skip_files | MAY_DEFER_VPEFT_IMPORTS
    ]


RULES = {
    "cycles": check_cycles,
    "module_cycles": check_module_cycles,
    "private_names": check_private_names,
    "method_modules": check_method_modules,
    "package_imports": check_package_imports,
    "deferred_imports": check_deferred_imports,
}


def _report(rule: str, violations: list[tuple[str, str]]) -> str:
    return f"{len(violations)} violation(s) of rule '{rule}':\n" + "\n".join(m for _, m in violations)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_holds_on_every_file(rule: str) -> None:
    """Every rule holds on every file of the package; the message lists every violation at once."""
    violations = RULES[rule](set())
    assert not violations, _report(rule, violations)


def test_analysis_sees_imports() -> None:
    """The collector finds module-level, deferred, relative and `from package import module` imports."""
    imports = _parsed()[0]
    assert any(i.file == "vpeft/__init__.py" and i.module == "vpeft.api" for i in imports)
    assert any(i.deferred and i.file == "vpeft/cli.py" for i in imports)
    assert room("vpeft.methods.lora") == "vpeft.methods" and room("vpeft.api") == "vpeft.api"
    assert _cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c", "a"]]


# ---------------------------------------------------------------- one backward pass outside the methods


class _BackwardCalls(ast.NodeVisitor):
    """The innermost function around each ``.backward(`` call."""

    def __init__(self, file: str):
        self.file, self.stack, self.found = file, [], set()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(f"src/{self.file}:{node.lineno} {node.name}")
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and node.func.attr == "backward":
            self.found.add(self.stack[-1] if self.stack else f"src/{self.file} (module level)")
        self.generic_visit(node)


def _functions_calling_backward() -> list[str]:
    found: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        file = path.relative_to(SRC).as_posix()
        if file.startswith("vpeft/methods/"):
            continue  # a method's own data stage differentiates (GPS, SPT: autograd.grad), it never trains
        visitor = _BackwardCalls(file)
        visitor.visit(ast.parse(path.read_text()))
        found |= visitor.found
    return sorted(found)


def test_one_backward_outside_methods() -> None:
    """``.backward(`` is called in exactly one function outside the methods: the trainer's step."""
    functions = _functions_calling_backward()
    assert len(functions) == 1, f"`.backward(` in {len(functions)} functions:\n" + "\n".join(functions)


def test_every_module_imports() -> None:
    """Every module of the package imports (a module moved between rooms leaves no stale import behind)."""
    import importlib
    import pkgutil

    import vpeft

    failed = []
    for info in pkgutil.walk_packages(vpeft.__path__, "vpeft."):
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            failed.append(f"{info.name}: {exc}")
    assert not failed, "\n".join(failed)
