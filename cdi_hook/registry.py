"""Spec dirs -> validated specs -> an index of devices by qualified name -> a Selection.

Pure: reads spec files, writes nothing (the compiled cache, cache.py, sits on top of this
module and is the only writer).

Dirs are scanned in order; a later dir has higher priority, so the same device in two
dirs resolves to the later dir's definition. The same device twice at one priority is a
conflict: both files get an error naming the other and the device is unavailable (unless
a higher-priority dir defines it once). A missing dir is fine; subdirectories and other
file names are ignored; one bad file never hides the good ones: its errors are kept per
file for `cdi-hook validate` and for resolve's message.

When running as root, a spec file or dir that a non-root user could write, or could
replace through a folder above it, is refused (trust.py's rule): a spec decides what gets
mounted into every container that asks for its devices, so it must be as trusted as the
runtime itself.
"""

from __future__ import annotations

import os
import time

from collections import namedtuple

from cdi_hook.errors import MAX_LISTED, CdiError, ResolveError, listed
from cdi_hook.probe_spec import PROBE_KIND
from cdi_hook.settings import DEFAULT_SPEC_DIRS, INSECURE_ENV, Settings
from cdi_hook.settings import current as current_settings
from cdi_hook.spec.model import ContainerEdits, Device, Spec
from cdi_hook.spec.names import is_qualified_name, quote
from cdi_hook.spec.rules import shared_count
from cdi_hook.trust import file_problem as untrusted_problem
from cdi_hook.trust import folders_problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping
    from typing import Any

# origin: "vendor.com/class=name" or "vendor.com/class (spec-level)"; edits: ContainerEdits.
EditsPart = namedtuple("EditsPart", ["origin", "spec_path", "edits"])


class Selection(namedtuple("Selection", ["devices", "parts", "shares"], defaults=((),))):
    """Which spec edits a request applies, in order, before anything is decided (plan.build).

    devices: the qualified names requested, in request order, no repeats; parts: for each
    device, its spec's spec-level edits once (the first time that spec is met), then the
    device's own edits; shares: ((device, N), ...) for each device whose spec says N
    containers may hold it at once (spec/rules.py SHARED_ANNOTATION).
    """

    __slots__ = ()

    def each(self, edit_field: str) -> Iterator[tuple[str, Any]]:
        """(origin, item) for every item of one ContainerEdits field ("mounts", ...), in order."""
        for part in self.parts:
            for item in getattr(part.edits, edit_field):
                yield part.origin, item

    def merged(self) -> ContainerEdits:
        """All parts' edits concatenated, as `cdi-hook show` prints them (intelRdt: the last wins)."""
        rdt = None
        for part in self.parts:
            if part.edits.intel_rdt is not None:
                rdt = part.edits.intel_rdt
        return ContainerEdits(
            env=tuple(e for _, e in self.each("env")),
            device_nodes=tuple(n for _, n in self.each("device_nodes")),
            mounts=tuple(m for _, m in self.each("mounts")),
            hooks=tuple(h for _, h in self.each("hooks")),
            additional_gids=tuple(g for _, g in self.each("additional_gids")),
            intel_rdt=rdt,
            net_devices=tuple(d for _, d in self.each("net_devices")),
        )
def insecure_specs_allowed(insecure: bool | None = None, settings: Settings | None = None) -> bool:
    if insecure is not None:
        return insecure
    return (settings or current_settings()).insecure_specs


def _refusal(path: str, what: str, problem: str) -> str:
    return (f"{path}: refused: the spec {what} is {problem}; specs must be writable by root only "
            f"(set {INSECURE_ENV}=1 to skip this check in test set-ups)")


def _folder_refusal(path: str, what: str, found: tuple[str, str]) -> str:
    folder, problem = found
    return (f"{path}: refused: folder {folder} above the spec {what} is {problem}; every folder from / down to "
            f"a spec must be root's and writable by root only (set {INSECURE_ENV}=1 to skip this check in "
            "test set-ups)")


class SpecFileResult:
    """What loading one spec file gave: a valid Spec, or the errors (and the kind if known)."""

    def __init__(self, path: str, spec: Spec | None, errors: list[str], kind: str | None = None,
                 refused: bool = False):
        self.path = path
        self.spec = spec
        self.errors = errors
        self.kind = kind
        self.refused = refused  # not trusted: never read
        self.being_written = False  # fresh and still failing when the settle budget ran out


# A spec file changed within FRESH_NS (cache.FRESH_NS, the cache's settle window) or while
# it was read may be half-written: a vendor tool or an administrator rewriting it in place
# (truncate, then write, as `cat >` does). Such a file that fails to parse (its JSON or
# YAML syntax: a whole document that parses but is invalid was not cut short), or that
# changed while it was read, is read again until it parses or settles, within
# SETTLE_BUDGET_S for a whole load (a container start waits at most about that long); only
# then is it reported broken, as "being written". A broken file that is old fails at once.
FRESH_NS = 2_000_000_000
SETTLE_BUDGET_S = 1.0
_RETRY_PAUSES_S = (0.002, 0.005, 0.01, 0.02)


def settle_deadline() -> float:
    """The monotonic time until which one load may read fresh files again."""
    return time.monotonic() + SETTLE_BUDGET_S


def load_spec_file(path: str, *, require_trusted: bool = False, max_size: int | None = None,
                   check_folders: bool = True, deadline: float | None = None) -> SpecFileResult:
    """Read, parse and validate one file; never raises for a bad file. check_folders=False:
    the caller has checked every folder down to the file (a spec dir's plain files).
    deadline (time.monotonic()): until when a fresh file that fails (or that changed while it
    was read) is read again; None: read once, a fresh broken file is still called "being written"."""
    attempt = 0
    while True:
        result, st, parsed = _load_spec_file_once(path, require_trusted, max_size, check_folders)
        if st is None or result.refused:
            return result
        now_ns = time.time_ns()
        fresh = now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < FRESH_NS
        if result.spec is not None and not fresh:
            return result  # the common case: an old file that parses, one stat and no more
        changed = _changed_since(path, st)
        if not changed and (result.spec is not None or not fresh or parsed):
            # read whole: one consistent version, good, broken and old (at once, as
            # before), or a whole document that is invalid
            return result
        if deadline is None or time.monotonic() >= deadline:
            if result.spec is None:
                result.errors[-1] += (f" (being written: changed within the last {FRESH_NS // 10**9} s or while it "
                                      "was read, it may be half-written; read it again once it settles)")
                result.being_written = True
            return result
        time.sleep(min(_RETRY_PAUSES_S[min(attempt, len(_RETRY_PAUSES_S) - 1)], max(0.0, deadline - time.monotonic())))
        attempt += 1


def _changed_since(path: str, st: os.stat_result) -> bool:
    """Whether the file at path is no longer what st described (another inode, size or mtime)."""
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _load_spec_file_once(path: str, require_trusted: bool, max_size: int | None,
                         check_folders: bool) -> tuple[SpecFileResult, os.stat_result | None, bool]:
    """One read: the result, the file's fstat (None if it was not read) and whether its
    syntax parsed."""
    # Imported here, not above: a start answered by the compiled cache (cache.py) never
    # parses a spec, and parse + validate (with json, re) cost it milliseconds.
    from cdi_hook.spec.parse import build_spec, decode_document, read_spec_bytes
    from cdi_hook.spec.validate import validate_spec

    kind = None
    st = None
    parsed = False
    try:
        if require_trusted and check_folders:
            found = folders_problem(path)
            if found:
                return SpecFileResult(path, None, [_folder_refusal(path, "file", found)], refused=True), None, False
        data, st = read_spec_bytes(path, max_size)
        if require_trusted:
            problem = untrusted_problem(st)
            if problem:
                return SpecFileResult(path, None, [_refusal(path, "file", problem)], refused=True), st, False
        document = decode_document(data, path)
        parsed = True
        if isinstance(document, dict) and isinstance(document.get("kind"), str):
            kind = document["kind"]
        spec = build_spec(document, path)
    except CdiError as error:
        return SpecFileResult(path, None, [str(error)], kind), st, parsed
    problems = validate_spec(spec)
    if problems:
        return SpecFileResult(path, None, [str(p) for p in problems], spec.kind), st, True
    return SpecFileResult(path, spec, [], spec.kind), st, True


class Registry:
    def __init__(self, spec_dirs: tuple[str, ...]):
        self.spec_dirs = spec_dirs
        self.specs: list[Spec] = []  # valid specs, in scan order
        self.devices: dict[str, tuple[Spec, Device]] = {}  # qualified name -> winner
        self.errors: dict[str, list[str]] = {}  # file or dir -> error lines
        self.conflicts: dict[str, tuple[str, ...]] = {}  # unavailable name -> files
        self.invalid_kinds: dict[str, list[str]] = {}  # kind -> invalid spec files
        self.refusals: list[str] = []  # trust refusals (a dir's or a file's), error lines in scan order
        self.being_written: list[str] = []  # broken files that were still changing (load_spec_file)

    @classmethod
    def load(cls, spec_dirs: Iterable[str] | None = None, *, insecure: bool | None = None,
             max_size: int | None = None, settings: Settings | None = None) -> Registry:
        """Scan spec_dirs (default /etc/cdi, /var/run/cdi; later dirs win) and index every valid spec.
        insecure and max_size default to the settings' (this process's unless given: doctor's
        are the installed hook's)."""
        settings = settings or current_settings()
        registry = cls(tuple(DEFAULT_SPEC_DIRS if spec_dirs is None else spec_dirs))
        require_trusted = os.geteuid() == 0 and not insecure_specs_allowed(insecure, settings)
        max_size = settings.max_spec_size if max_size is None else max_size
        deadline = settle_deadline()  # one budget for every fresh file of this load
        for spec_dir in registry.spec_dirs:
            registry._load_dir(spec_dir, require_trusted, max_size, deadline)
        return registry

    def _load_dir(self, spec_dir: str, require_trusted: bool, max_size: int | None, deadline: float) -> None:
        from cdi_hook.spec.parse import is_spec_file_name

        try:
            dir_stat = os.stat(spec_dir)
            with os.scandir(spec_dir) as entries:
                found = [(e.name, e.is_symlink()) for e in entries if is_spec_file_name(e.name) and not e.is_dir()]
        except FileNotFoundError:
            return
        except NotADirectoryError:
            self.errors[spec_dir] = [f"{spec_dir}: spec dir is not a directory"]
            return
        except OSError as error:
            self.errors[spec_dir] = [f"{spec_dir}: cannot read spec dir: {error.strerror}"]
            return
        if require_trusted:
            problem = untrusted_problem(dir_stat)
            refusal = _refusal(spec_dir, "dir", problem) if problem else None
            above = None if refusal else folders_problem(spec_dir)
            if above:
                refusal = _folder_refusal(spec_dir, "dir", above)
            if refusal:
                self.errors[spec_dir] = [refusal]
                self.refusals.append(refusal)
                return
        # name -> every (spec, device) defining it in this dir (one priority level)
        level: dict[str, list[tuple[Spec, Device]]] = {}
        for name, is_link in sorted(found):
            # A plain file's folders are the spec dir's, checked above; a symlink leads
            # through folders of its own.
            result = load_spec_file(os.path.join(spec_dir, name), require_trusted=require_trusted,
                                    max_size=max_size, check_folders=is_link, deadline=deadline)
            if result.spec is None:
                self.errors[result.path] = result.errors
                if result.being_written:
                    self.being_written.append(result.path)
                if result.refused:
                    self.refusals.extend(result.errors)
                if result.kind:
                    self.invalid_kinds.setdefault(result.kind, []).append(result.path)
                continue
            spec = result.spec
            self.specs.append(spec)
            for device in spec.devices:
                level.setdefault(spec.qualified_name(device), []).append((spec, device))
        for qualified, definitions in level.items():
            if len(definitions) == 1:
                self.devices[qualified] = definitions[0]
                self.conflicts.pop(qualified, None)
                continue
            paths = tuple(spec.path for spec, _ in definitions)
            for path in paths:
                others = ", ".join(p for p in paths if p != path)
                self.errors.setdefault(path, []).append(
                    f"{path}: device {qualified} is also defined in {others} at the same priority; "
                    "the device is unavailable until one definition is removed")
            self.conflicts[qualified] = paths
            self.devices.pop(qualified, None)

    def select(self, names: Iterable[str]) -> Selection:
        """The Selection for the requested qualified names (request order, repeats once).

        Spec-level edits come once per spec, the first time one of its devices is met, then
        the device's own. Any unknown name fails the whole request: ResolveError lists them all.
        """
        wanted = list(dict.fromkeys(names))
        missing = [name for name in wanted if name not in self.devices]
        if missing:
            raise ResolveError(self._unresolved_message(missing))
        return select(wanted, self.devices)

    def _unresolved_message(self, missing: list[str]) -> str:
        """One line, of bounded length: a few names and details, then how many more."""
        details = []
        for name in missing[:MAX_LISTED]:
            if not is_qualified_name(name):
                details.append(f"{quote(name)} is not a qualified name (vendor.com/class=name)")
            elif name in self.conflicts:
                details.append(f"{name} is defined twice at the same priority ({listed(self.conflicts[name])})")
            else:
                kind = name.split("=", 1)[0]
                if kind in self.invalid_kinds:
                    written = [p for p in self.invalid_kinds[kind] if p in self.being_written]
                    state = "being written, still unreadable after a second" if written else "invalid"
                    details.append(f"{name}: a spec for {kind} is {state} ({listed(self.invalid_kinds[kind])})")
        message = (f"unresolvable CDI device{'s' if len(missing) > 1 else ''}: "
                   f"{listed(quote(n) if not is_qualified_name(n) else n for n in missing)} "
                   f"(spec dirs searched: {listed(self.spec_dirs) or 'none'})")
        if details:
            message += "; " + "; ".join(details)
        if self.refusals:
            # The device may be in a spec refused unread: say where, so the line names the folder.
            more = f" (and {len(self.refusals) - 1} more)" if len(self.refusals) > 1 else ""
            message += f"; {self.refusals[0]}{more}"
        if self.errors:
            message += f"; {len(self.errors)} spec file(s) or dir(s) have errors: run `cdi-hook validate`"
        return message

    def all_errors(self) -> list[str]:
        """Every error line, in scan order (dirs in priority order, files by name)."""
        return [line for lines in self.errors.values() for line in lines]


def select(wanted: list[str], devices: Mapping[str, tuple[Spec, Device]]) -> Selection:
    """The Selection for known, distinct names; devices maps each to its (Spec, Device).
    A device of `cdi-hook doctor --probe` resolves only while the doctor that wrote it lives."""
    parts: list[EditsPart] = []
    shares: list[tuple[str, int]] = []
    specs_met: set[str] = set()
    for name in wanted:
        spec, device = devices[name]
        if device.annotations:
            count = shared_count(device.annotations)
            if count is not None:
                shares.append((name, count))
        if spec.kind == PROBE_KIND:
            _check_probe(name, spec)
        if spec.path not in specs_met:
            specs_met.add(spec.path)
            if not spec.container_edits.is_empty():
                parts.append(EditsPart(f"{spec.kind} (spec-level)", spec.path, spec.container_edits))
        parts.append(EditsPart(name, spec.path, device.container_edits))
    return Selection(tuple(wanted), tuple(parts), tuple(shares))


def _check_probe(name: str, spec: Spec) -> None:
    from cdi_hook import probe_spec

    if probe_spec.stale(spec):
        raise ResolveError(f"{name} is the probe of a `cdi-hook doctor --probe` that is gone "
                           f"({probe_spec.writer_of(spec) or 'no writer named'}); the next `cdi-hook doctor` "
                           f"removes {spec.path}")
