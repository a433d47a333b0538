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
    {"cdi_hook", "cdi_hook.errors", "cdi_hook.spec", "cdi_hook.state", "cdi_hook.settings", "cdi_hook.hook_entry",
     "cdi_hook.log", "cdi_hook.jsonio", "cdi_hook.inotify", "cdi_hook.trust"},
    {"cdi_hook.spec.*", "cdi_hook.oci", "cdi_hook.request", "cdi_hook.attribution",
     "cdi_hook.kubelet", "cdi_hook.kubelet.*", "cdi_hook.containers", "cdi_hook.attachments",
     "cdi_hook.probe_spec"},
    {"cdi_hook.registry"},
    {"cdi_hook.cache"},
    {"cdi_hook.hostdev", "cdi_hook.hostscan", "cdi_hook.plan", "cdi_hook.policy"},
    {"cdi_hook.config_editor", "cdi_hook.live", "cdi_hook.live.*", "cdi_hook.record"},
    {"cdi_hook.commands", "cdi_hook.commands.*"},
    {"cdi_hook.cli", "cdi_hook.__main__", "cdi_hook.start"},
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


# The state layer (cdi_hook/state.py) is the one place that renames files into place and
# the one that says what a private folder or file is: one rule, never five near copies.
STATE_LAYER = "cdi_hook.state"
_RENAMES = {"rename", "renames", "replace"}
# Mode bits a private folder check masks with: "nobody else may read or write" (0o077),
# "nobody else may write" (0o022), or the two write bits or'ed together.
_PRIVATE_MASKS = {0o077, 0o022}
_PRIVATE_BITS = {"S_IWGRP", "S_IWOTH"}


def _trees():
    for name, path in MODULES.items():
        if name != STATE_LAYER:
            yield name, ast.parse(path.read_text())


def test_nothing_outside_the_state_layer_renames_files():
    found = []
    for name, tree in _trees():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in _RENAMES and isinstance(node.value, ast.Name)
                    and node.value.id == "os"):
                found.append(f"{name}:{node.lineno}: os.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
                found += [f"{name}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                          if a.name in _RENAMES | {"move"}]
            elif (isinstance(node, ast.Attribute) and node.attr == "move" and isinstance(node.value, ast.Name)
                  and node.value.id == "shutil"):
                found.append(f"{name}:{node.lineno}: shutil.move")
    assert found == [], "use cdi_hook.state (write_atomic, write_atomic_at, rename_into_place)"


def test_files_py_is_gone_into_the_state_layer():
    assert not (PACKAGE / "files.py").exists()
    assert not [name for name, targets in GRAPH.items() if "cdi_hook.files" in targets]


def _is_private_mask(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in _PRIVATE_MASKS
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None) for n in (node.left, node.right)}
        return names == _PRIVATE_BITS
    return False


def test_no_private_folder_check_by_hand():
    """`st_mode & 0o077` (or 0o022, or S_IWGRP | S_IWOTH) is a private folder or file check:
    state.open_private_dir, state.is_private_file or state.private_dir_problem make it. The
    trust of read-only configuration (trust.py, for spec and policy files and every folder
    down to them: others may not write, group only gid 0) is another rule, on single bits,
    and stays where it is."""
    found = [f"{name}:{node.lineno}" for name, tree in _trees() for node in ast.walk(tree)
             if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd)
             and (_is_private_mask(node.left) or _is_private_mask(node.right))]
    found += [f"{name}:{node.lineno}: def {node.name}" for name, tree in _trees() for node in ast.walk(tree)
              if isinstance(node, ast.FunctionDef) and node.name in ("is_private_file", "private_dir_problem",
                                                                     "_root_only", "ensure_private_dir")]
    # cdi_hook.start, the installed entry's first module, must not import os (nor so the
    # state layer): it makes the same two checks by hand, on posix.fstat, and
    # tests/test_start.py holds it to state.is_private_file and private_dir_problem.
    found = [f for f in found if not f.startswith("cdi_hook.start:")]
    assert found == [], "use cdi_hook.state"


def environment_reads(source: str) -> list[str]:
    """Where source reads one environment variable (os.environ[...], os.environ.get(...),
    os.getenv(...), `... in os.environ`) by anything but a string literal that is not a
    CDI_* name: a variable name could hold one (e.g. a loop over CDI_* names)."""
    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ" and \
            isinstance(node.value, ast.Name) and node.value.id in ("os", "posix")

    def allowed(key) -> bool:
        return isinstance(key, ast.Constant) and (
            (isinstance(key.value, str) and not key.value.startswith("CDI_"))
            or (isinstance(key.value, bytes) and not key.value.startswith(b"CDI_")))

    found = []
    for node in ast.walk(ast.parse(source)):
        key = None
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args and (
                (node.func.attr in ("get", "pop", "setdefault") and is_environ(node.func.value))
                or (node.func.attr == "getenv" and isinstance(node.func.value, ast.Name) and node.func.value.id == "os")):
            key = node.args[0]
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            key = node.left
        else:
            continue
        if not allowed(key):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_only_settings_reads_cdi_variables_from_the_environment():
    """Every CDI_* variable is read once, in settings.py; the rest of cdi_hook asks
    settings.current() or is handed a Settings (doctor). Other
    programs' variables (NOTIFY_SOCKET, CONTAINERS_CONF, PATH) are read by their literal name."""
    readers = {name: reads for name, path in MODULES.items() if name != "cdi_hook.settings"
               for reads in [environment_reads(path.read_text())] if reads}
    # The one exception, named: cdi_hook.start (an installed entry's first module) finds the
    # state root from CDI_HOOK_STATE_DIR without importing settings, to leave an idle post
    # stage before anything else is imported; any doubt there goes to cli, which reads
    # settings as everything else does.
    assert [line.split(":")[0] for line in readers.pop("cdi_hook.start", [])] == ["line %d" % _start_state_dir_line()]
    assert readers == {}


def _start_state_dir_line() -> int:
    return next(i for i, line in enumerate(MODULES["cdi_hook.start"].read_text().splitlines(), 1)
                if 'b"CDI_HOOK_STATE_DIR"' in line)


def test_the_environment_checker_sees_reads_by_variable():
    source = ('import os\nNAME = "CDI_HOOK_LOG"\na = os.environ.get(NAME)\nb = os.environ["CDI_X"]\n'
              'c = os.getenv("CDI_Y")\nd = "CDI_Z" in os.environ\ne = os.environ.get("NOTIFY_SOCKET")\n'
              'import posix\nf = posix.environ.get(b"CDI_W")\n')
    assert [line.split(":")[0] for line in environment_reads(source)] == ["line 3", "line 4", "line 5", "line 6",
                                                                         "line 9"]


# The modules that keep cdi-hook's state (records, holds, caches, the watcher's files): what
# they write under the state root or the cache dir goes through the state layer.
STATE_KEEPERS = ["cdi_hook.record", "cdi_hook.attachments", "cdi_hook.cache", "cdi_hook.live.holds",
                 "cdi_hook.live.netdev", "cdi_hook.live.ldmemo", "cdi_hook.commands.watch"]
_WRITE_FLAGS = {"O_CREAT", "O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND"}
_MAKERS = {"mkstemp", "mkdir", "makedirs", "NamedTemporaryFile", "write_text", "write_bytes"}


def test_only_the_state_layer_writes_under_the_state_root():
    found = []
    for name in STATE_KEEPERS:
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.Attribute) and (node.attr in _WRITE_FLAGS or node.attr in _MAKERS):
                found.append(f"{name}:{node.lineno}: {node.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"
                  and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                  and not (isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, int))  # an fd
                  and set(str(node.args[1].value)) & set("wax+")):
                found.append(f"{name}:{node.lineno}: open(..., {node.args[1].value!r})")
    assert found == [], "write through cdi_hook.state (write_atomic*, write_record, new_file_beside, open_lock_at)"


def test_the_state_writer_checker_sees_a_write():
    tree = ast.parse("import os\nos.open('x', os.O_WRONLY | os.O_CREAT)\nopen('y', 'w')\n")
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in _WRITE_FLAGS]
    opens = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert len(hits) == 2 and len(opens) == 1
