"""`cdi-hook doctor [--probe] [--format text|json]`: a node check for hook-only set-ups.

Each finding is one line: a status (ok, warn, fail), what was checked, what was seen and,
when something is wrong, what to do. Exit 0 when nothing fails, 1 otherwise.

What it looks at, in order:
  runtimes   podman, crio, runc, crun, containerd on PATH, with their versions; for Podman
             and CRI-O the hooks dirs they really read, from their own config files (TOML):
               Podman  containers.conf [engine] hooks_dir: /usr/share/containers/containers.conf,
                       /etc/containers/containers.conf, /etc/containers/containers.conf.d/*.conf
                       (sorted; a later file wins), or only $CONTAINERS_CONF when that is set,
                       as containers/common reads them. Unset: /usr/share/containers/oci/hooks.d
                       only (Podman 4.3, see commands/install.py).
               CRI-O   crio.conf [crio.runtime] hooks_dir: /etc/crio/crio.conf, then every file
                       under /etc/crio/crio.conf.d in lexical order (CRI-O walks the drop-in dir
                       and reads each file, pkg/config UpdateFromPath). Unset:
                       /usr/share/containers/oci/hooks.d. CRI-O knows no precreate stage.
             Then cdi-hook's hooks.d files (install.ALL_FILES) in those dirs and in the usual
             places: which mode, both modes at once, the files' and dirs' owners, and whether
             the interpreter in their argv still runs cdi-hook (a removed venv is the classic
             breakage).
  spec dirs  the installed hook's (its entry's CDI_SPEC_DIRS, else /etc/cdi and /var/run/cdi;
             --spec-dir overrides): owned by root and not writable by others, as the hook
             demands; every spec valid; no conflicting device names (the registry's own errors).
  cache      the cache dir (root-only, or the hooks ignore it), whether the compiled cache
             matches the files, whether a `cdi-hook watch` for these spec dirs is running and
             healthy (cache.watched_generation's rules), the systemd unit.
  policy     the hook's policy file: present, root-owned and not writable by others, valid.
  --probe    a throwaway spec (kind cdi-hook.doctor/probe, /dev/null at /dev/cdi-hook-probe,
             naming this doctor as its writer: cdi_hook/probe_spec.py) written into the first
             spec dir the installed hook reads, under a unique name and removed afterwards, also
             on SIGINT or SIGTERM (then the exit status is 128 + the signal); then a Podman container started through the hooks dirs Podman
             reads (its own configuration: no --hooks-dir) and a runc container whose config.json
             carries the installed hook entries must see the node. Both run from a busybox
             rootfs in a temp dir, with their state (Podman --root/--runroot, runc --root) there
             too; everything is removed afterwards.

Every run as root first removes what a killed (SIGKILL) `doctor --probe` left, once its writer
is gone: probe specs in the spec dirs and probe temp dirs, each with a warning.

The checks use the installed hook's settings (the env of its hooks.d entry: spec dirs, cache
dir, policy), not this process's: that is what a container start sees. --config-root DIR
puts DIR in front of every built-in path this command reads (/etc/..., /usr/share/...,
/run/cdi-hook) so the tests never read the host's; paths that come from a setting (an env
variable, a config file, a hooks.d entry, an option) are taken as they are. The probe always
runs the real runtimes: set CONTAINERS_CONF to point Podman at another containers.conf.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

from cdi_hook import cache, probe_spec, state
from cdi_hook.commands import install
from cdi_hook.errors import CdiError, printable
from cdi_hook.hook_entry import CARRIED_SETTINGS, LIVE_HOOK_STAGES, is_cdi_hook_argv
from cdi_hook.live import mountinfo
from cdi_hook.probe_spec import PROBE_KIND
from cdi_hook.registry import Registry
from cdi_hook.trust import file_problem as untrusted_problem
from cdi_hook.settings import (CACHE_DIR_ENV, DEFAULT_CACHE_DIR, DEFAULT_POLICY, DEFAULT_SPEC_DIRS, INSECURE_ENV,
                               POLICY_ENV, SPEC_DIRS_ENV, Settings, from_environ)
from cdi_hook.settings import current as current_settings

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable
    from types import FrameType, ModuleType
    from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
RUNTIMES = ("podman", "crio", "runc", "crun", "containerd", "dockerd")
# The first versions that apply CDI requests themselves, and which requests (issue 24).
NATIVE_CDI = {
    "crio": ((1, 23), "the kubelet's cdi.k8s.io/ annotations (container config) and the CRI's CDI devices, "
                      "from its cdi_spec_dirs; a name it cannot resolve fails the container"),
    "containerd": ((1, 7), "the CRI's CDI devices and the kubelet's cdi.k8s.io/ annotations, when its CRI plugin "
                           "has enable_cdi (default from 2.0)"),
    "dockerd": ((25, 0), "`docker run --device vendor.com/class=name`, when the daemon's cdi feature is on"),
}
PODMAN_CONFS = ("/usr/share/containers/containers.conf", "/etc/containers/containers.conf")
PODMAN_CONF_DIR = "/etc/containers/containers.conf.d"
CRIO_CONF = "/etc/crio/crio.conf"
CRIO_CONF_DIR = "/etc/crio/crio.conf.d"
# Where an install usually lands even when no runtime reads it (a common mistake: Podman 4.3
# does not read /etc/containers/oci/hooks.d unless hooks_dir names it).
USUAL_HOOKS_DIRS = (install.DEFAULT_HOOKS_DIR, "/etc/containers/oci/hooks.d")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PROBE_PATH = "/dev/cdi-hook-probe"
PROBE_ANNOTATION = "cdi.k8s.io/cdi-hook-doctor"
BUSYBOX = "/bin/busybox"
COMMAND_TIMEOUT_S = 120


class Report:
    def __init__(self) -> None:
        self.findings: list[dict] = []

    def add(self, check: str, status: str, detail: str, fix: str = "") -> None:
        self.findings.append({"check": check, "status": status, "detail": detail, "fix": fix})

    def failed(self) -> bool:
        return any(f["status"] == FAIL for f in self.findings)

    def text(self) -> str:
        lines = []
        for f in self.findings:
            line = f"{f['status']:<4}  {f['check']}: {f['detail']}"
            if f["fix"]:
                line += f"  -> {f['fix']}"
            lines.append(printable(line, limit=2000))
        counts = {s: sum(1 for f in self.findings if f["status"] == s) for s in (OK, WARN, FAIL)}
        lines.append(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
        return "\n".join(lines)


class HookFile:
    """One of cdi-hook's hooks.d files as found on disk."""

    def __init__(self, path: str, definition: dict | None, error: str = ""):
        self.path = path
        self.name = os.path.basename(path)
        self.definition = definition
        self.error = error
        hook = (definition or {}).get("hook") or {}
        self.entry = hook
        self.env = dict(item.split("=", 1) for item in hook.get("env", []) if isinstance(item, str) and "=" in item)
        self.python = hook.get("path", "")

    @property
    def mode(self) -> str:
        return "precreate" if self.name == install.PRECREATE_FILE else "hook"


def under(root: str | None, path: str) -> str:
    """A built-in path, moved under --config-root."""
    return os.path.join(root, path.lstrip("/")) if root else path


def cmd_doctor(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.config_root) if args.config_root else None
    report = Report()
    if os.geteuid() != 0:
        report.add("user", WARN, "not running as root: ownership rules, the cache and the probe are root's",
                   "run `cdi-hook doctor` as root")
    runtimes = check_runtimes(report)
    views = runtime_hooks_dirs(report, root, runtimes)
    files = check_hook_files(report, root, views, args.hooks_dir or [])
    check_native_cdi(report, runtimes, views, files)
    primary = primary_files(views, files)
    entry_env = hook_settings(report, primary)
    hook = installed_settings(report, root, entry_env)
    spec_dirs, hook_spec_dirs = spec_dirs_of(report, root, args.spec_dir, hook, installed=entry_env is not None)
    remove_stale_probes(report, [*hook_spec_dirs, *spec_dirs])
    check_spec_dirs(report, spec_dirs, hook)
    check_cache(report, root, spec_dirs, hook)
    check_policy(report, root, hook)
    interrupted = 0
    if args.probe:
        try:
            probe(report, runtimes, views, primary, hook_spec_dirs)
        except Interrupted as stop:
            interrupted = stop.signum
            report.add("probe", FAIL, f"interrupted by {signal.Signals(stop.signum).name}: its spec and temp dir "
                       "removed")
    if getattr(args, "format", "text") == "json":
        print(json.dumps(report.findings, indent=2))
    else:
        print(report.text())
    return 128 + interrupted if interrupted else 1 if report.failed() else 0


# ---------------------------------------------------------------------------------------
# Runtimes and the hooks dirs they read


def check_runtimes(report: Report) -> dict[str, str]:
    """name -> path for the runtimes on PATH."""
    found = {}
    for name in RUNTIMES:
        path = shutil.which(name)
        if path is None:
            continue
        found[name] = path
        report.add(f"runtime {name}", OK, f"{_version(path)} ({path})" +
                   ("; containerd 1.6 runs no hooks.d files: use the runc wrapper (docs/operators/containerd-docker.md)"
                    if name == "containerd" else ""))
    if not {"podman", "crio", "runc"} & set(found):
        report.add("runtimes", WARN, "none of podman, crio, runc found on PATH", "install a runtime that runs OCI hooks")
    return found


def _version_numbers(text: str) -> tuple[int, ...] | None:
    import re

    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def check_native_cdi(report: Report, runtimes: dict, views: dict, files: dict[str, HookFile],
                     versions: dict[str, str] | None = None) -> None:
    """Runtimes that apply CDI requests themselves: which requests; and a warning when
    cdi-hook's files sit where CRI-O runs them, so the kubelet's requests are applied twice.
    versions: name -> `--version` line (tests); asked of each runtime otherwise."""
    for name, (first, what) in NATIVE_CDI.items():
        if name not in runtimes:
            continue
        line = (versions or {}).get(name) or _version(runtimes[name])
        numbers = _version_numbers(line)
        if numbers is None or numbers < first:
            continue
        report.add(f"{name} native CDI", OK, f"{line}: applies {what}")
        if name != "crio" or "crio" not in views:
            continue
        ours = _effective(views["crio"][0], files)
        live = sorted(f.path for f in ours.values() if f.mode == "hook")
        if live:
            report.add("crio native CDI", WARN,
                       f"cdi-hook's hooks ({', '.join(live)}) run in CRI-O, which applies the kubelet's requests "
                       "itself: those devices are applied twice (nodes and mounts are seen once, the spec's own "
                       "hooks run twice)",
                       "leave the kubelet's requests to CRI-O: `cdi-hook uninstall --hooks-dir DIR` for CRI-O's "
                       "hooks dir, unless you need cdi-hook's policy, exclusive devices or attach/verify there "
                       "(docs/operators/crio.md)")


def _version(path: str) -> str:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"version unknown ({error})"
    lines = [line.strip() for line in (done.stdout or done.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "version unknown"


def _toml_files(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if os.path.isfile(p)]


def _walk_sorted(directory: str, suffix: str = "") -> list[str]:
    """Files under directory in lexical order, depth first (Go's filepath.Walk)."""
    found: list[str] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            found += _walk_sorted(path, suffix)
        elif name.endswith(suffix):
            found.append(path)
    return found


def _hooks_dir_setting(report: Report, check: str, files: list[str],
                       table: tuple[str, ...]) -> tuple[list[str] | None, str | None]:
    """(hooks_dir, the file that set it) from the last file setting it, or (None, None)."""
    import tomllib

    value, source = None, None
    for path in files:
        try:
            with open(path, "rb") as f:
                data: Any = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as error:
            report.add(check, FAIL, f"cannot read {path}: {error}; the runtime refuses to start with it",
                       f"fix the TOML in {path}")
            continue
        for key in table:
            data = data.get(key) if isinstance(data, dict) else None
        if isinstance(data, dict) and "hooks_dir" in data:
            setting = data["hooks_dir"]
            if not isinstance(setting, list) or not all(isinstance(d, str) for d in setting):
                report.add(check, FAIL, f"{path}: hooks_dir is not a list of strings", "write hooks_dir = [\"DIR\"]")
                continue
            value, source = setting, path
    return value, source


def runtime_hooks_dirs(report: Report, root: str | None, runtimes: dict) -> dict[str, tuple[list[str], str | None]]:
    """runtime -> (hooks dirs it reads, in order, later wins; where that came from)."""
    views = {}
    if "podman" in runtimes:
        conf = os.environ.get("CONTAINERS_CONF")
        files = [conf] if conf else _toml_files([under(root, p) for p in PODMAN_CONFS]) + \
            _walk_sorted(under(root, PODMAN_CONF_DIR), ".conf")
        if conf and not os.path.isfile(conf):
            report.add("podman config", FAIL, f"CONTAINERS_CONF names {conf}, which does not exist: Podman refuses "
                       "to start", "unset CONTAINERS_CONF or create the file")
        dirs, source = _hooks_dir_setting(report, "podman config", files, ("engine",))
        if dirs is None:
            dirs, source = [under(root, install.DEFAULT_HOOKS_DIR)], "Podman's default (no hooks_dir in " + \
                (", ".join(files) or "any containers.conf") + ")"
        views["podman"] = (dirs, source)
    crio_files = _toml_files([under(root, CRIO_CONF)]) + _walk_sorted(under(root, CRIO_CONF_DIR))
    if "crio" in runtimes or crio_files:
        dirs, source = _hooks_dir_setting(report, "crio config", crio_files, ("crio", "runtime"))
        if dirs is None:
            dirs, source = [under(root, install.DEFAULT_HOOKS_DIR)], "CRI-O's default (no hooks_dir in " + \
                (", ".join(crio_files) or "any crio.conf") + ")"
        views["crio"] = (dirs, source)
    for name, (dirs, source) in views.items():
        report.add(f"{name} hooks_dir", OK, f"{', '.join(dirs) or 'none'} (from {source})")
    return views


# ---------------------------------------------------------------------------------------
# cdi-hook's hooks.d files


def read_hook_file(path: str) -> HookFile | None:
    """cdi-hook's file at path; None when there is none (or it is someone else's)."""
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "rb") as f:
            definition = json.loads(f.read(1 << 20))
        args = definition["hook"]["args"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return HookFile(path, None, f"unreadable: {error}")
    if not is_cdi_hook_argv(args):
        return None
    return HookFile(path, definition)


def _effective(dirs: list[str], files: dict[str, HookFile]) -> dict[str, HookFile]:
    """The files a runtime runs from these dirs: a later dir's file replaces an earlier one's
    of the same name (oci-hooks(5))."""
    chosen = {}
    for directory in dirs:
        for name in install.ALL_FILES:
            found = files.get(os.path.join(os.path.abspath(directory), name))
            if found is not None:
                chosen[name] = found
    return chosen


def check_hook_files(report: Report, root: str | None, views: dict, extra_dirs: list[str]) -> dict[str, HookFile]:
    searched = []
    for directory in [d for dirs, _ in views.values() for d in dirs] + \
            [under(root, d) for d in USUAL_HOOKS_DIRS] + extra_dirs:
        directory = os.path.abspath(directory)
        if directory not in searched:
            searched.append(directory)
    files: dict[str, HookFile] = {}
    for directory in searched:
        for name in install.ALL_FILES:
            found = read_hook_file(os.path.join(directory, name))
            if found is not None:
                files[found.path] = found
    read_by = {path: [name for name, (dirs, _) in views.items() if path in
                      {f.path for f in _effective(dirs, files).values()}] for path in files}
    for name, (dirs, _) in views.items():
        _check_runtime_view(report, name, dirs, files)
    checked_pythons: dict[str, tuple[str, str]] = {}
    for path, found in files.items():
        _check_one_file(report, found, read_by[path], views, checked_pythons)
    if not files and not views:  # with a runtime's view, its finding above says it
        report.add("hooks.d", WARN, f"no cdi-hook hooks.d file in {', '.join(searched)}",
                   "cdi-hook install --podman, --crio or --hooks-dir DIR (the dir your runtime reads)")
    return files


def _check_runtime_view(report: Report, runtime: str, dirs: list[str], files: dict[str, HookFile]) -> None:
    check = f"{runtime} hooks"
    chosen = _effective(dirs, files)
    where = ", ".join(dirs) or "no dir"
    install_hint = f"cdi-hook install --hooks-dir {dirs[-1]}" if dirs else f"set hooks_dir for {runtime}"
    if not chosen:
        elsewhere = sorted({os.path.dirname(p) for p in files})
        detail = f"{runtime} reads hooks from {where}; no cdi-hook file there: its containers get no CDI device"
        if elsewhere:
            detail += f"; cdi-hook's files are in {', '.join(elsewhere)}, which {runtime} does not read"
        report.add(check, FAIL, detail, install_hint + (f" (and cdi-hook uninstall --hooks-dir {elsewhere[0]})"
                                                        if elsewhere else ""))
        return
    has_precreate = install.PRECREATE_FILE in chosen
    live = [stage for stage, name in install.HOOK_FILES.items() if name in chosen]
    if has_precreate and live:
        report.add(check, WARN, f"both modes installed ({', '.join(sorted(chosen))}): every device is injected "
                   "twice, by the precreate filter and by the live hook",
                   f"cdi-hook install --hooks-dir {os.path.dirname(chosen[install.PRECREATE_FILE].path)} --mode "
                   "precreate|hook (installing one mode removes the other's files)")
        return
    if has_precreate:
        if runtime == "crio":
            report.add(check, FAIL, f"only the precreate filter in {where}: CRI-O runs no precreate hooks",
                       "cdi-hook install --crio (live hook mode)")
        else:
            report.add(check, OK, f"mode precreate: {chosen[install.PRECREATE_FILE].path}")
        return
    missing = [stage for stage in LIVE_HOOK_STAGES if stage not in live]
    if missing:
        report.add(check, WARN, f"mode hook, incomplete: no file for {', '.join(missing)} (spec hooks of that stage "
                   "do not run; poststop also returns network devices)", install_hint + " --mode hook")
        return
    report.add(check, OK, "mode hook: " + ", ".join(chosen[install.HOOK_FILES[s]].path for s in LIVE_HOOK_STAGES))


def _check_one_file(report: Report, found: HookFile, read_by: list[str], views: dict, checked: dict) -> None:
    check = f"hooks.d {found.path}"
    if found.definition is None:
        report.add(check, FAIL, found.error, f"cdi-hook install again into {os.path.dirname(found.path)}")
        return
    for what, path in (("file", found.path), ("dir", os.path.dirname(found.path))):
        try:
            problem = untrusted_problem(os.stat(path))
        except OSError as error:
            problem = f"not readable: {error.strerror}"
        if problem:
            report.add(check, FAIL, f"the hooks.d {what} {path} is {problem}: whoever can write it runs code as "
                       "root in every container start", f"chown root:root {path} && chmod go-w {path}")
    if views and not read_by:
        report.add(check, WARN, f"read by none of {', '.join(views)} as configured",
                   f"cdi-hook uninstall --hooks-dir {os.path.dirname(found.path)}, or add that dir to hooks_dir")
    if found.env.get(INSECURE_ENV):
        report.add(check, WARN, f"its entry sets {INSECURE_ENV}: specs any user can write are accepted",
                   "remove it from the entry (cdi-hook install again without it)")
    python = found.python
    if python not in checked:
        checked[python] = _interpreter_problem(found)
    status, detail = checked[python]
    if status == FAIL:
        report.add(check, FAIL, detail, f"reinstall cdi-hook into {python}, or run `cdi-hook install` again with "
                   "the interpreter that has it (install writes the running interpreter's path)")
    elif status == WARN:
        report.add(check, WARN, detail, "run `cdi-hook install` again with the cdi-hook you mean to use")
    else:
        report.add(check, OK, f"{detail}; read by {', '.join(read_by) or 'no configured runtime'}")


def _interpreter_problem(found: HookFile) -> tuple[str, str]:
    """(status, detail) for the interpreter in a hooks.d entry, run as the runtime runs it."""
    from cdi_hook import __version__

    python = found.python
    if not os.path.isabs(python) or not os.path.isfile(python) or not os.access(python, os.X_OK):
        return FAIL, f"interpreter {python} is missing or not executable: every container asking for a " \
                     "device fails to start"
    if found.entry.get("args", [None])[0] != python:
        return FAIL, f"args[0] is not the interpreter {python}: a venv would be missed"
    try:
        done = subprocess.run([python, "-I", "-c", "import cdi_hook; print(cdi_hook.__version__)"],
                              capture_output=True, text=True, cwd="/", env=found.env, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return FAIL, f"{python} does not run: {error}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return FAIL, f"{python} -I cannot import cdi_hook ({last})"
    version = done.stdout.strip()
    if version != __version__:
        return WARN, f"{python} runs cdi-hook {version}, this doctor is {__version__}"
    return OK, f"{python} runs cdi-hook {version}"


def primary_files(views: dict, files: dict[str, HookFile]) -> dict[str, HookFile]:
    """The files whose entries stand for "the installed hook": Podman's, else CRI-O's,
    else every file found, by name."""
    for name in ("podman", "crio"):
        if name in views:
            chosen = _effective(views[name][0], files)
            if chosen:
                return chosen
    return {f.name: f for f in files.values() if f.definition is not None}


def _entry_file(primary: dict[str, HookFile]) -> HookFile | None:
    return primary.get(install.HOOK_FILES["createRuntime"]) or primary.get(install.PRECREATE_FILE)


def hook_settings(report: Report, primary: dict[str, HookFile]) -> dict[str, str] | None:
    """The env the installed hook runs with (None: no hook found, use this process's env)."""
    entry = _entry_file(primary)
    if entry is None:
        return None
    names = (*CARRIED_SETTINGS, SPEC_DIRS_ENV, INSECURE_ENV)
    settings = {k: v for k, v in entry.env.items() if k in names}
    differing = [f.path for f in primary.values()
                 if {k: v for k, v in f.env.items() if k in names} != settings]
    if differing:
        report.add("hook settings", WARN, f"{', '.join(differing)} carry other settings than {entry.path}",
                   "install again: all files of one install carry the same settings")
    return settings


# ---------------------------------------------------------------------------------------
# Spec dirs, cache, watcher, policy: under the hook's settings


def installed_settings(report: Report, root: str | None, entry_env: dict[str, str] | None) -> Settings:
    """The settings the installed hook runs with: its entry's env (this process's settings
    when no hook was found), with the cache dir under --config-root unless the env names one.
    Handed to what the checks call, so they see what the hook sees; os.environ is not touched.
    A bad value is a finding, and the checks go on with that variable's default."""
    values = dict(entry_env) if entry_env is not None else dict(current_settings().environ)
    if root and not values.get(CACHE_DIR_ENV):
        values[CACHE_DIR_ENV] = under(root, DEFAULT_CACHE_DIR)
    try:
        return from_environ(values)
    except CdiError as error:
        report.add("hook settings", FAIL, f"{error}: every container asking for a device fails",
                   "install again with a valid value (or without it)")
    return from_environ({name: value for name, value in values.items() if _valid_setting(name, value)})


def _valid_setting(name: str, value: str) -> bool:
    try:
        from_environ({name: value})
    except CdiError:
        return False
    return True


def _split(value: str) -> list[str]:
    return [d for d in value.split(":") if d]


def spec_dirs_of(report: Report, root: str | None, option: list[str] | None, hook: Settings,
                 installed: bool) -> tuple[list[str], list[str]]:
    """(the dirs to check, the dirs the installed hook itself reads: the probe's)."""
    if installed:
        named = hook.spec_dirs is not None
        hook_dirs = list(hook.spec_dirs) if named else list(DEFAULT_SPEC_DIRS)
        source = "the installed hook's CDI_SPEC_DIRS" if named else "the hook's defaults"
        checked = hook_dirs if named else [under(root, d) for d in DEFAULT_SPEC_DIRS]
    elif hook.spec_dirs is not None:
        hook_dirs = checked = list(hook.spec_dirs)
        source = "$CDI_SPEC_DIRS (no installed hook found)"
    else:
        hook_dirs = list(DEFAULT_SPEC_DIRS)
        checked = [under(root, d) for d in DEFAULT_SPEC_DIRS]
        source = "the defaults (no installed hook found)"
    if option:
        checked, source = list(option), "--spec-dir"
    report.add("spec dirs", OK, f"{', '.join(checked) or 'none'} (from {source})")
    return checked, hook_dirs


def check_spec_dirs(report: Report, spec_dirs: list[str], hook: Settings) -> None:
    insecure = hook.insecure_specs
    for spec_dir in spec_dirs:
        check = f"spec dir {spec_dir}"
        try:
            st = os.stat(spec_dir)
        except FileNotFoundError:
            report.add(check, OK, "absent (read as empty)")
            continue
        except OSError as error:
            report.add(check, FAIL, f"cannot read it: {error.strerror}", f"fix the permissions of {spec_dir}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            report.add(check, FAIL, "not a directory", f"remove {spec_dir} or make it a directory")
            continue
        problem = untrusted_problem(st)
        if problem:
            status = WARN if insecure else FAIL
            consequence = f"accepted only because the hook's entry sets {INSECURE_ENV}=1" if insecure else \
                "the hook refuses every spec in it"
            report.add(check, status, f"{problem}: {consequence}", f"chown root:root {spec_dir} && chmod go-w "
                       f"{spec_dir}")
        else:
            report.add(check, OK, "root-owned, writable by root only")
    registry = Registry.load(spec_dirs, settings=hook)
    for path, lines in registry.errors.items():
        if path in spec_dirs:
            continue  # the dir's own refusal is reported above
        refused = any(": refused: " in line for line in lines)
        fix = f"chown root:root {path} && chmod go-w {path}" if refused else \
            f"fix or remove {path} (cdi-hook validate {path})"
        for line in lines:
            report.add(f"spec {path}", FAIL, line.removeprefix(f"{path}: "), fix)
    report.add("specs", OK if not registry.errors else FAIL,
               f"{len(registry.specs)} valid spec file(s), {len(registry.devices)} device(s) available, "
               f"{len(registry.conflicts)} conflicting name(s)",
               "" if not registry.errors else "cdi-hook validate")


def check_cache(report: Report, root: str | None, spec_dirs: list[str], hook: Settings) -> None:
    from cdi_hook import registry as registry_module

    directory = cache.cache_dir(hook)
    if directory is None:
        report.add("cache dir", WARN, f"{CACHE_DIR_ENV} is a relative path: the hooks keep no cache",
                   f"set {CACHE_DIR_ENV} to an absolute path (or unset it) and install again")
        return
    dirs = cache.spec_dir_tuple(spec_dirs)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        report.add("cache dir", OK, f"{directory} not created yet: the first container start creates it")
        st = None
    if st is not None:
        problem = state.private_dir_problem(st, owner=0)  # the hooks' own rule
        if problem:
            report.add("cache dir", WARN, f"{directory} is not a root-only directory ({problem}): the hooks ignore "
                       "it (every start parses the specs)", f"chown root:root {directory} && chmod 0700 {directory}")
        else:
            report.add("cache dir", OK, f"{directory} (mode {stat.S_IMODE(st.st_mode):04o}, root's)")
            _check_compiled(report, dirs, registry_module, hook)
    _check_watcher(report, root, dirs, directory, hook)


def _check_compiled(report: Report, dirs: tuple, registry_module: ModuleType, hook: Settings) -> None:
    key = cache._key(dirs, registry_module, hook)  # the hook's own key: the same file the hook reads
    path = cache.cache_path(key, hook)
    if not os.path.lexists(path):
        report.add("compiled cache", OK, "none for these spec dirs yet: the next container start builds it")
        return
    generation = cache.watched_generation(dirs, settings=hook)
    if generation is not None and cache.lookup(path, key, None, [], generation) is not None:
        report.add("compiled cache", OK, f"{path} is current (vouched for by the watcher)")
    elif cache.lookup(path, key, cache.snapshot(dirs), []) is not None:
        report.add("compiled cache", OK, f"{path} is current (matches every spec file)")
    else:
        report.add("compiled cache", OK, f"{path} is out of date: the next container start rebuilds it")


def _watcher_problem(path: str, dirs: tuple) -> str:
    """Why the watcher's generation file at path is not trusted (cache.watched_generation's rules)."""
    import fcntl
    import marshal
    import time

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return "no watcher runs for these spec dirs"
    except OSError as error:
        return f"its generation file {path} cannot be opened: {error.strerror}"
    try:
        st = os.fstat(fd)
        if not state.is_private_file(st):
            return f"its generation file {path} is not a root-only regular file"
        age = time.time_ns() - st.st_mtime_ns
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            return f"nobody holds the lock on {path}: the watcher is gone"
        if age > cache.HEARTBEAT_TIMEOUT_NS:
            return f"its heartbeat is {age // 1_000_000_000} s old: the watcher is stuck or stopped"
        data = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    try:
        watched, generation = marshal.loads(data[8:])
    except Exception:
        return f"{path} holds no generation"
    if watched != dirs:
        return f"it watches {', '.join(watched)}, not these spec dirs"
    if not any(generation):
        return "it cannot vouch for the files now (a change being compiled, or a symlinked spec file)"
    return "not trusted"


# Where the Debian package puts cdi-hook-watch.service (Debian 12's debhelper: /lib; 13: /usr/lib).
PACKAGE_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")


def _check_watcher(report: Report, root: str | None, dirs: tuple, directory: str, hook: Settings) -> None:
    unit = os.path.join(under(root, install.SYSTEMD_DIR), install.WATCH_UNIT)
    unit_ours = os.path.lexists(unit) and install._is_our_unit(unit)
    path = cache.generation_path(dirs, hook)
    assert path is not None  # check_cache found the cache dir
    if cache.watched_generation(dirs, settings=hook) is not None:
        report.add("watcher", OK, "cdi-hook watch runs for these spec dirs and is healthy: starts skip the "
                   "per-file checks")
    else:
        problem = _watcher_problem(path, dirs)
        others = []
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            other = os.path.join(directory, name)
            if name.startswith("watch-") and name.endswith(".generation") and other != path:
                others.append(other)
        expected = unit_ours or os.path.lexists(path)
        detail = problem + ("" if expected else " (optional: without it every start checks each spec file)")
        if others:
            detail += f"; other watchers' files: {', '.join(others)} (a watcher of other spec dirs helps no hook)"
        fix = f"systemctl enable --now {install.WATCH_UNIT}; journalctl -u {install.WATCH_UNIT}" if expected else \
            ("start cdi-hook watch with the hooks' CDI_SPEC_DIRS" if others else "")
        report.add("watcher", WARN if expected or others else OK, detail, fix)
    if not os.path.lexists(unit):
        # The Debian package's unit, installed but not enabled, is checked the same way:
        # /etc/systemd/system (install --watch) overrides it when both are there.
        packaged = [path for path in (os.path.join(under(root, d), install.WATCH_UNIT) for d in PACKAGE_UNIT_DIRS)
                    if os.path.isfile(path)]
        if packaged:
            _check_unit(report, packaged[0], dirs, directory)
            return
        report.add("watcher unit", OK, f"{unit} not installed (cdi-hook install --watch writes it)")
        return
    if not unit_ours:
        report.add("watcher unit", OK, f"{unit} was not written by cdi-hook: not checked")
        return
    _check_unit(report, unit, dirs, directory)


def _check_unit(report: Report, unit: str, dirs: tuple, directory: str) -> None:
    with open(unit) as f:
        lines = f.read().splitlines()
    env = dict(line.removeprefix("Environment=").split("=", 1) for line in lines
               if line.startswith("Environment=") and "=" in line.removeprefix("Environment="))
    exec_start = next((line.removeprefix("ExecStart=").split() for line in lines if line.startswith("ExecStart=")), [])
    problems = []
    if not exec_start or not os.path.isfile(exec_start[0]) or not os.access(exec_start[0], os.X_OK):
        problems.append(f"its interpreter {exec_start[0] if exec_start else '(none)'} is missing")
    unit_dirs = tuple(_split(env[SPEC_DIRS_ENV])) if SPEC_DIRS_ENV in env else DEFAULT_SPEC_DIRS
    if unit_dirs != tuple(dirs):
        problems.append(f"it watches {', '.join(unit_dirs)}, the hooks read {', '.join(dirs)}")
    if (env.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR) != directory:
        problems.append(f"its cache dir is {env.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR}, the hooks' is "
                        f"{directory}")
    if problems:
        report.add("watcher unit", WARN, f"{unit}: {'; '.join(problems)}",
                   "cdi-hook install --watch again with the hooks' settings, then systemctl daemon-reload")
    else:
        report.add("watcher unit", OK, f"{unit} (same interpreter, spec dirs and cache dir as the hooks)")


def check_policy(report: Report, root: str | None, hook: Settings) -> None:
    from cdi_hook import policy

    explicit = hook.policy_explicit
    path = hook.policy if explicit else under(root, DEFAULT_POLICY)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if explicit:
            report.add("policy", FAIL, f"{path} is named by {POLICY_ENV} but does not exist: every "
                       "container asking for a device fails", f"create {path} or drop {POLICY_ENV}")
        else:
            report.add("policy", OK, f"no {path}: the built-in default (the kubelet's and the administrator's "
                       "requests honoured, pod authors' refused)")
        return
    except OSError as error:
        report.add("policy", FAIL, f"{path}: {error.strerror}", f"fix the permissions of {path}")
        return
    problem = untrusted_problem(st)
    if problem:
        report.add("policy", FAIL, f"{path} is {problem}: the hook refuses it, and with it every container "
                   "asking for a device", f"chown root:root {path} && chmod go-w {path}")
        return
    try:
        checked = policy.read(path)
    except CdiError as error:
        report.add("policy", FAIL, str(error), f"fix {path} (cdi-hook policy check {path})")
        return
    report.add("policy", OK, f"{path}: valid, {len(checked.rules)} rule(s), {len(checked.exclusive)} exclusive "
               "pattern(s)")


# ---------------------------------------------------------------------------------------
# --probe


class Interrupted(BaseException):
    """SIGINT or SIGTERM during the probe: raised in the main thread, so that every `finally`
    (the runtimes' clean-up, the spec's and temp dir's removal) runs. A BaseException: no
    `except Exception` on the way may take it for an error and carry on."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


class Made:
    """What the probe put on the node, so far: removed by remove(), in any case."""

    def __init__(self) -> None:
        self.top: str | None = None  # the temp dir
        self.spec_path: str | None = None
        self.created_dir: str | None = None  # a spec dir the probe had to make

    def remove(self) -> None:
        if self.spec_path:
            try:
                os.unlink(self.spec_path)
            except FileNotFoundError:
                pass
        if self.created_dir:
            try:
                os.rmdir(self.created_dir)
            except OSError:
                pass
        if self.top:
            _remove_tree(self.top)


def probe(report: Report, runtimes: dict, views: dict, primary: dict[str, HookFile], hook_spec_dirs: list[str]) -> None:
    """Raises Interrupted after removing everything when SIGINT or SIGTERM comes meanwhile."""
    if os.geteuid() != 0:
        report.add("probe", FAIL, "needs root (it runs containers and writes a spec)", "run as root")
        return
    if not os.path.isfile(BUSYBOX):
        report.add("probe", FAIL, f"needs a static busybox at {BUSYBOX} for the test container's rootfs",
                   "install busybox-static")
        return
    made = Made()
    previous = {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS}
    try:
        _probe(report, runtimes, views, primary, hook_spec_dirs, made)
    finally:
        # A second signal must not cut the removal short: noted, and raised once it is done.
        late: list[int] = []
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: late.append(signum))
        try:
            made.remove()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if late:
            raise Interrupted(late[0])


def _probe(report: Report, runtimes: dict, views: dict, primary: dict[str, HookFile], hook_spec_dirs: list[str],
           made: Made) -> None:
    token = os.urandom(6).hex()
    device = f"{PROBE_KIND}=p{token}"
    writer = probe_spec.writer_identity()
    made.top = top = tempfile.mkdtemp(prefix=probe_spec.TEMP_PREFIX)
    with open(os.path.join(top, probe_spec.WRITER_FILE), "w") as f:
        f.write(writer)
    spec_dir = next((d for d in hook_spec_dirs if os.path.isdir(d)), None)
    if spec_dir is None:
        if not hook_spec_dirs:
            report.add("probe", FAIL, "the installed hook reads no spec dir", "set CDI_SPEC_DIRS and install again")
            return
        spec_dir = made.created_dir = hook_spec_dirs[0]
        os.makedirs(spec_dir, 0o755)
    spec_path = made.spec_path = os.path.join(spec_dir, f"{probe_spec.SPEC_PREFIX}{token}.json")
    # 0.6.0: the first version with annotations, which name the writer.
    spec = {"cdiVersion": "0.6.0", "kind": PROBE_KIND, "annotations": {probe_spec.WRITER_ANNOTATION: writer},
            "devices": [{"name": f"p{token}", "containerEdits": {
                "deviceNodes": [{"path": PROBE_PATH, "hostPath": "/dev/null"}]}}]}
    state.write_atomic(spec_path, json.dumps(spec).encode(), 0o644, owner=(0, 0))
    report.add("probe spec", OK, f"wrote {spec_path} ({device}: /dev/null at {PROBE_PATH}); removed afterwards"
               + (f", with the dir {made.created_dir} it created" if made.created_dir else ""))
    if "podman" in runtimes:
        _probe_podman(report, runtimes, views, device, top)
    if "runc" in runtimes:
        _probe_runc(report, runtimes["runc"], primary, device, top)
    if not {"podman", "runc"} & set(runtimes):
        report.add("probe", WARN, "neither podman nor runc on PATH: nothing to start a container with")


def remove_stale_probes(report: Report, spec_dirs: Iterable[str]) -> None:
    """Remove what a killed `doctor --probe` left (its writer gone): probe specs in the spec
    dirs, probe temp dirs (root's) in the temp dir. One warning for each."""
    from cdi_hook.registry import load_spec_file

    if os.geteuid() != 0:
        return
    for directory in dict.fromkeys(spec_dirs):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not (name.startswith(probe_spec.SPEC_PREFIX) and name.endswith(".json")):
                continue
            path = os.path.join(directory, name)
            spec = load_spec_file(path).spec
            if spec is None or not probe_spec.stale(spec):
                continue  # not a probe spec, or one whose doctor still runs
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            report.add("probe leftover", WARN, f"removed {path}, the probe spec of a doctor --probe that was killed "
                       f"({probe_spec.writer_of(spec) or 'no writer named'})")
    top = tempfile.gettempdir()
    try:
        names = sorted(os.listdir(top))
    except OSError:
        return
    for name in names:
        path = os.path.join(top, name)
        if name.startswith(probe_spec.TEMP_PREFIX) and _stale_probe_dir(path):
            _remove_tree(path)
            report.add("probe leftover", WARN, f"removed {path}, the temp dir of a doctor --probe that was killed")


def _stale_probe_dir(path: str) -> bool:
    """A probe's temp dir (root's own folder, not a symlink, with a writer file) whose writer is gone."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            return False
        fd = os.open(os.path.join(path, probe_spec.WRITER_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        writer = os.read(fd, 4096).decode(errors="replace")
    finally:
        os.close(fd)
    return not probe_spec.writer_alive(writer)


def _rootfs(path: str) -> str:
    """A busybox rootfs: /bin/busybox and /bin/sh, and the dirs runtimes mount on."""
    os.makedirs(os.path.join(path, "bin"))
    shutil.copy2(BUSYBOX, os.path.join(path, "bin", "busybox"))
    os.symlink("busybox", os.path.join(path, "bin", "sh"))
    for name in ("dev", "proc", "sys", "etc", "tmp"):
        os.mkdir(os.path.join(path, name))
    with open(os.path.join(path, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/:/bin/sh\n")
    return path


def _tail(done: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _probe_podman(report: Report, runtimes: dict, views: dict, device: str, top: str) -> None:
    # Podman's own hooks dirs (no --hooks-dir): the point is whether it runs cdi-hook as configured.
    base = [runtimes["podman"], "--root", os.path.join(top, "podman"), "--runroot", os.path.join(top, "podman-run"),
            "--storage-driver", "vfs"]
    argv = base + ["run", "--rm", "--network", "none", "--ulimit", "nofile=20000:20000", "--ulimit",
                   "nproc=1000:1000", "--annotation", f"{PROBE_ANNOTATION}={device}"]
    if "runc" in runtimes:  # crun refuses hybrid cgroup hosts; runc is what the tests prove
        argv += ["--runtime", "runc"]
    argv += ["--rootfs", _rootfs(os.path.join(top, "podman-rootfs")), "/bin/sh", "-c", f"test -c {PROBE_PATH}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        report.add("probe podman", FAIL, f"podman did not finish within {COMMAND_TIMEOUT_S} s", "podman ps -a")
        return
    finally:
        subprocess.run(base + ["rm", "--all", "--force"], capture_output=True, timeout=COMMAND_TIMEOUT_S)
    dirs = ", ".join(views.get("podman", ([], ""))[0])
    if done.returncode == 0:
        report.add("probe podman", OK, f"a Podman container got {PROBE_PATH} through the hooks in {dirs}")
    elif done.returncode == 1 and not done.stderr.strip():
        report.add("probe podman", FAIL, f"the container started but has no {PROBE_PATH}: Podman did not run "
                   f"cdi-hook from its hooks dirs ({dirs}), or the hook ran with other spec dirs",
                   "see the podman hooks findings above; cdi-hook install --hooks-dir DIR for a dir Podman reads")
    else:
        report.add("probe podman", FAIL, f"podman run failed (exit {done.returncode}): {_tail(done)}",
                   "see the hooks.d findings above; CDI_HOOK_LOG has the hook's side")


def _probe_runc(report: Report, runc: str, primary: dict[str, HookFile], device: str, top: str) -> None:
    entry_file = _entry_file(primary)
    if entry_file is None:
        report.add("probe runc", FAIL, "no installed cdi-hook entry to put into a runc container's config",
                   "cdi-hook install first")
        return
    bundle = os.path.join(top, "runc-bundle")
    os.makedirs(bundle)
    _rootfs(os.path.join(bundle, "rootfs"))
    subprocess.run([runc, "spec", "--bundle", bundle], check=True, capture_output=True)
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/sh", "-c", f"test -c {PROBE_PATH}"]
    config["annotations"] = {PROBE_ANNOTATION: device}
    if entry_file.mode == "precreate":
        # What Podman does with a precreate hook: the config through the entry, its output used.
        how = f"the precreate entry of {entry_file.path}"
        try:
            edited = subprocess.run(entry_file.entry["args"], executable=entry_file.python, env=entry_file.env,
                                    input=json.dumps(config), capture_output=True, text=True, cwd="/",
                                    timeout=entry_file.entry.get("timeout", 60))
        except (OSError, subprocess.TimeoutExpired) as error:
            report.add("probe runc", FAIL, f"{how} did not run: {error}", "see the hooks.d findings above")
            return
        if edited.returncode != 0:
            report.add("probe runc", FAIL, f"{how} failed: {_tail(edited)}", "see the findings above")
            return
        config = json.loads(edited.stdout)
    else:
        how = "the entries of " + ", ".join(primary[install.HOOK_FILES[s]].path for s in LIVE_HOOK_STAGES
                                            if install.HOOK_FILES[s] in primary)
        config["hooks"] = {stage: [primary[install.HOOK_FILES[stage]].entry] for stage in LIVE_HOOK_STAGES
                           if install.HOOK_FILES[stage] in primary}
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    state = os.path.join(top, "runc-state")
    cid = "cdi-hook-doctor-" + device.rsplit("=", 1)[1]
    try:
        done = subprocess.run([runc, "--root", state, "run", "--bundle", bundle, cid], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        report.add("probe runc", FAIL, f"runc did not finish within {COMMAND_TIMEOUT_S} s")
        return
    finally:
        subprocess.run([runc, "--root", state, "delete", "--force", cid], capture_output=True)
    if done.returncode == 0:
        report.add("probe runc", OK, f"a runc container got {PROBE_PATH} through {how}")
    elif done.returncode == 1 and not done.stderr.strip():
        report.add("probe runc", FAIL, f"the container started through {how} but has no {PROBE_PATH}",
                   "see the spec dir findings above; CDI_HOOK_LOG has the hook's side")
    else:
        report.add("probe runc", FAIL, f"runc run through {how} failed (exit {done.returncode}): {_tail(done)}",
                   "see the hooks.d findings above")


def _remove_tree(top: str) -> None:
    """The probe's temp dir, after unmounting anything a runtime left mounted under it."""
    try:
        targets = [mount.mount_point for mount in mountinfo.read()]
    except OSError:
        targets = []
    for target in sorted((t for t in targets if t.startswith(top + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
    shutil.rmtree(top, ignore_errors=True)
    if os.path.exists(top):
        print(f"cdi-hook doctor: could not remove {top}", file=sys.stderr)
