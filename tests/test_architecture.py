"""The shape of the code base: no import cycles, no oversized core modules, folders that say what they hold."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cfx", "cfx_cli", "cfx_plugins")
MAX_CORE_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """cfx modules that ``path`` imports anywhere (top level or inside functions): lazy imports count too,
    since a cycle through a function-level import is still a cycle in the design."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            # `from P import m` depends on the submodule P.m when there is one, else on P itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_cfx_modules():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 100  # the scan sees the real graph
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_core_module_is_oversized():
    big = {str(p.relative_to(REPO)): n for p in (REPO / "cfx_cli").rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_CORE_LINES}
    assert not big, f"split these modules (over {MAX_CORE_LINES} lines): {big}"


def test_the_plugin_folders_say_what_they_hold():
    """Built-ins are grouped by kind; every entry point names a module in its kind's folder."""
    import tomllib

    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["cfx"]
    kinds = {"explainers", "classifiers", "metrics", "regions"}
    for name, target in eps.items():
        parts = target.split(".")
        assert parts[0] == "cfx_plugins" and parts[1] in kinds, (name, target)
        assert target in _modules(), (name, target)


# Third-party libraries that must stay out of `cfx --help` and `import cfx_cli.cli`: the only reason to import
# inside a function. A cfx module that imports one at its top (directly or through its own top-level imports)
# is heavy too; every other cfx module is light and is imported at the top of the module that uses it.
HEAVY_LIBRARIES = frozenset({"torch", "torchvision", "numpy", "PIL", "diffusers", "transformers", "httpx",
                             "onnxruntime", "ray", "scipy", "sklearn", "captum", "safetensors", "accelerate"})
# Function-level imports of light modules that stay lazy on purpose (each has a comment at the import):
LAZY_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("cfx.api", "cfx_cli.cli_support"),  # it imports typer and click: `import cfx` loads no CLI framework
})


def _resolve(node: ast.Import | ast.ImportFrom, name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = node.module or ""
    if node.level:
        base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _top_level_imports(stmts: list[ast.stmt]):
    """Import statements that run when the module is imported (not inside functions or `if TYPE_CHECKING:`)."""
    for stmt in stmts:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            yield stmt
        elif isinstance(stmt, ast.If) and not _is_type_checking(stmt.test):
            yield from _top_level_imports(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level_imports(stmt.body + [s for h in stmt.handlers for s in h.body]
                                          + stmt.orelse + stmt.finalbody)


def _with_parents(target: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _heavy_modules(modules: dict[str, Path]) -> set[str]:
    direct: dict[str, set[str]] = {}
    heavy: set[str] = set()
    for name, path in modules.items():
        deps = set(_with_parents(name)[:-1])
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            for target in _resolve(node, name, path, modules):
                if target.split(".")[0] in HEAVY_LIBRARIES:
                    heavy.add(name)
                deps.update(t for t in _with_parents(target) if t in modules and t != name)
        direct[name] = deps
    changed = True
    while changed:  # transitive closure: importing a module that imports a heavy one is heavy
        changed = False
        for name, deps in direct.items():
            if name not in heavy and deps & heavy:
                heavy.add(name)
                changed = True
    return heavy


def _lazy_light_imports(modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    heavy = _heavy_modules(modules)
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                for target in _resolve(node, name, path, modules):
                    chain = [t for t in _with_parents(target) if t in modules]
                    if chain and not set(chain) & heavy and (name, target) not in LAZY_ALLOWED:
                        found.append((name, target, node.lineno))
    return sorted(set(found))


def test_lazy_imports_are_only_for_heavy_modules():
    """Imports of cfx's own light modules sit at the top of the module (the founders' rule); only modules that
    pull in torch/numpy/... at import time may be imported inside a function."""
    modules = _modules()
    heavy = _heavy_modules(modules)
    assert "cfx_cli.diffusion.gaussian" in heavy and "cfx_cli.errors" not in heavy  # the scan sees both kinds
    lazy = _lazy_light_imports(modules)
    assert not lazy, "import these light modules at the top: " + "; ".join(f"{m}:{ln} imports {t}"
                                                                          for m, t, ln in lazy)


def test_lazy_import_check_catches_a_light_module(tmp_path):
    """The scan flags a function-level import of a light module and lets a heavy one (numpy at its top, or through
    a module that imports it at its top) stay lazy."""
    sources = {"light": "X = 1\n", "heavy": "import numpy\n", "via": "from heavy import numpy\n",
               "user": "def f():\n    import heavy\n    from via import numpy\n    from light import X\n"
                       "    return X\n"}
    modules = {}
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text)
        modules[name] = tmp_path / f"{name}.py"
    assert _heavy_modules(modules) == {"heavy", "via"}
    assert _lazy_light_imports(modules) == [("user", "light", 4)]
    modules = _modules()
    heavy = _heavy_modules(modules)
    assert "cfx_cli.images" in heavy  # numpy at its top
    assert "cfx_cli.whitebox" in heavy  # imports cfx_cli.images at its top
