"""The layout shows the flow, and imports run one way: no cycles, counting imports inside
functions (the lazy ones on the hot path are imports too).

    request (+ attribution) -> registry (+ cache) -> plan, policy -> config_editor | live -> commands -> cli
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cdi_hook"

# Each module may import only modules of a lower layer (or of its own layer, as long as
# the graph stays acyclic). Modules not listed sit in the layer of their package.
LAYERS = [
    {"cdi_hook", "cdi_hook.errors", "cdi_hook.spec", "cdi_hook.files", "cdi_hook.hook_entry", "cdi_hook.log",
     "cdi_hook.jsonio", "cdi_hook.inotify"},
    {"cdi_hook.spec.*", "cdi_hook.oci", "cdi_hook.request", "cdi_hook.attribution",
     "cdi_hook.kubelet", "cdi_hook.kubelet.*", "cdi_hook.containers", "cdi_hook.attachments"},
    {"cdi_hook.registry"},
    {"cdi_hook.cache"},
    {"cdi_hook.hostdev", "cdi_hook.plan", "cdi_hook.policy"},
    {"cdi_hook.config_editor", "cdi_hook.live", "cdi_hook.live.*"},
    {"cdi_hook.commands", "cdi_hook.commands.*"},
    {"cdi_hook.cli", "cdi_hook.__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every cdi_hook module `name` imports, wherever the import statement is."""
    found = set()
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cdi_hook"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cdi_hook"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if name in layer or any(p.endswith(".*") and name.startswith(p[:-1]) for p in layer):
            return rank
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py: place it")


def test_every_import_goes_down_or_sideways():
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name, targets in GRAPH.items() for target in targets if layer_of(target) > layer_of(name)]
    assert upward == []


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_checker_sees_lazy_imports():
    # commands/hook.py imports plan and the live injector inside its function only.
    assert {"cdi_hook.plan", "cdi_hook.live.inject"} <= GRAPH["cdi_hook.commands.hook"]


def test_no_module_shadows_the_standard_library():
    import sys

    shadowing = [name for name in MODULES if name.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    assert shadowing == []


def strings_in_code(name: str) -> list[str]:
    """The str and bytes literals of a module (f-string parts too), docstrings left out."""
    tree = ast.parse(MODULES[name].read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value if isinstance(node.value, str) else node.value.decode("latin-1") for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)) and id(node) not in docstrings]


def test_only_live_mountinfo_reads_mountinfo():
    # Its escapes and non-UTF-8 names are easy to get wrong: it was once parsed six ways,
    # one of which (unicode_escape) never matched a non-ASCII mount point.
    readers = [name for name in MODULES if any("mountinfo" in s for s in strings_in_code(name))]
    assert readers == ["cdi_hook.live.mountinfo"]


def test_namespace_flags_are_defined_once():
    # setns(2)'s CLONE_* flags live beside the setns wrapper; a second copy could drift.
    homes = sorted({name for name in MODULES for node in ast.walk(ast.parse(MODULES[name].read_text()))
                    if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name) and target.id.startswith("CLONE_")})
    assert homes == ["cdi_hook.live.syscalls"]
