"""`cdi-hook install` / `uninstall`: the oci-hooks(5) 1.0.0 files for Podman and CRI-O.

Where the files go:
  --podman, --crio   /usr/share/containers/oci/hooks.d. That is the one directory Podman 4.3
                     reads when containers.conf sets no hooks_dir (verified with
                     `podman --log-level=debug run`: "reading hooks from
                     /usr/share/containers/oci/hooks.d"; /etc/containers/oci/hooks.d is NOT
                     read unless hooks_dir lists it), and CRI-O's default hooks_dir too.
  --hooks-dir DIR    any directory (containers.conf hooks_dir, crio.conf hooks_dir,
                     podman --hooks-dir).

Two modes, one at a time (installing one removes the other's files):
  precreate  cdi-hook-precreate.json, stage "precreate" (a Podman extension stage: the hook
             gets the proposed config.json on stdin and prints the config to use). Applies
             every CDI edit, env and additionalGids included. Default for --podman.
  hook       one file per stage, since a hooks.d file has one fixed argv and the OCI state
             does not say which stage runs (prestart and createRuntime both see "creating"):
               createRuntime  injects the devices (runtime namespace, container created),
                              runs the specs' prestart and createRuntime hooks, then
                              their createContainer hooks in the container's namespaces
                              before the runtime pivots (live/containerhooks.py); no
                              prestart file, so the injection happens once, not twice
               poststart      runs the specs' poststart hooks
               poststop       runs the specs' poststop hooks, returns network devices
             No createContainer / startContainer file: cdi-hook is not a hook the runtime
             should run inside the container. A spec's startContainer hooks (inside the
             container, after pivot_root) cannot be run from here: such a spec is refused
             at createRuntime; use precreate. Default for --crio and --hooks-dir.

Every file matches only containers with an annotation key matching ^cdi\\.k8s\\.io/ and
runs the installed interpreter isolated (-I: no PYTHON* variables, no user site, no cwd on
sys.path; argv[0] is its full path too) with an explicit environment: PATH, plus CDI_SPEC_DIRS
and cdi-hook's other settings (hook_entry.CARRIED_SETTINGS) that are set while installing.

--watch also writes the systemd unit of `cdi-hook watch` (cdi-hook-watch.service, into
/etc/systemd/system or --systemd-dir) with the same interpreter and environment as the hooks,
so the watcher keeps exactly the cache the hooks read; deploy/systemd/ holds the same unit
for /opt/cdi-hook. `uninstall --watch` removes it. Neither runs systemctl.

Where /etc/logrotate.d exists (logrotate installed), install also writes its configuration
for the hook's log (deploy/logrotate/cdi-hook, with the configured $CDI_HOOK_LOG), and
uninstall removes it; --logrotate-dir DIR writes it elsewhere, --no-logrotate not at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cdi_hook.errors import CdiError
from cdi_hook.state import write_atomic
from cdi_hook.hook_entry import (HOOK_PATH_ENV, LIVE_HOOK_STAGES, carried_settings, interpreter, is_cdi_hook_argv,
                                 live_hook_entry, precreate_entry)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable
    from typing import TextIO

DEFAULT_HOOKS_DIR = "/usr/share/containers/oci/hooks.d"
PODMAN_HOOKS_DIR = DEFAULT_HOOKS_DIR
CRIO_HOOKS_DIR = DEFAULT_HOOKS_DIR

PRECREATE_FILE = "cdi-hook-precreate.json"
HOOK_FILES = {stage: f"cdi-hook-{stage}.json" for stage in LIVE_HOOK_STAGES}
ALL_FILES = (PRECREATE_FILE, *HOOK_FILES.values())
REQUEST_ANNOTATION_KEY = r"^cdi\.k8s\.io/"
SYSTEMD_DIR = "/etc/systemd/system"
WATCH_UNIT = "cdi-hook-watch.service"
UNIT_MARK = "# written by cdi-hook install --watch"
LOGROTATE_DIR = "/etc/logrotate.d"
LOGROTATE_FILE = "cdi-hook"
LOGROTATE_MARK = "# written by cdi-hook install"
# The first line of the Debian package's logrotate file (debian/rules writes it): a conffile
# that dpkg owns, which install and uninstall leave alone.
PACKAGE_LOGROTATE_MARK = "# installed by the cdi-hook package (cdi-hook install and uninstall leave it alone)"
DEFAULT_LOG_PATH = "/var/log/cdi-hook.log"  # the path deploy/logrotate/cdi-hook names


def _definition(hook: dict, stages: list[str]) -> dict:
    return {
        "version": "1.0.0",
        "hook": hook,
        "when": {"annotations": {REQUEST_ANNOTATION_KEY: ".*"}},
        "stages": stages,
    }


def hook_definitions(mode: str, python: str, spec_dirs: list[str] | None) -> dict[str, dict]:
    """file name -> oci-hooks 1.0.0 definition, for one mode."""
    if mode == "precreate":
        return {PRECREATE_FILE: _definition(precreate_entry(python, spec_dirs), ["precreate"])}
    if mode == "hook":
        return {HOOK_FILES[stage]: _definition(live_hook_entry(stage, python, spec_dirs), [stage])
                for stage in LIVE_HOOK_STAGES}
    raise CdiError(f"unknown install mode {mode!r}; use precreate or hook")


def render(definition: dict) -> bytes:
    return (json.dumps(definition, indent=2) + "\n").encode()


def hooks_dir_of(args: argparse.Namespace) -> str:
    if getattr(args, "hooks_dir", None):
        return os.path.abspath(args.hooks_dir)
    return PODMAN_HOOKS_DIR if getattr(args, "podman", False) else CRIO_HOOKS_DIR


def default_mode(args: argparse.Namespace) -> str:
    # Podman: precreate can also apply env and additionalGids, which a live hook cannot.
    return "precreate" if getattr(args, "podman", False) else "hook"


def is_ours(path: str) -> bool:
    """Whether path is a hooks.d file that cdi-hook wrote (so uninstall may remove it)."""
    try:
        with open(path, "rb") as f:
            definition = json.loads(f.read(1 << 20))
        args = definition["hook"]["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return is_cdi_hook_argv(args)


def _spec_dirs_from_env() -> list[str] | None:
    from cdi_hook import settings

    return list(settings.current().spec_dirs or ()) or None


def _check_interpreter(python: str) -> None:
    """oci-hooks requires hook.path to exist; and the isolated interpreter must find us."""
    if not os.path.isfile(python) or not os.access(python, os.X_OK):
        raise CdiError(f"interpreter {python} is not an executable file")
    probe = subprocess.run([python, "-I", "-c", "import cdi_hook"], capture_output=True,
                           cwd="/", stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        raise CdiError(f"{python} -I cannot import cdi_hook; install cdi-hook into that interpreter first")


def install(hooks_dir: str, mode: str, *, python: str | None = None, spec_dirs: list[str] | None = None,
            dry_run: bool = False, out: TextIO | None = None) -> list[str]:
    """Write the mode's files into hooks_dir, remove the other mode's; returns what it wrote."""
    out = out or sys.stdout
    python = os.path.abspath(python or interpreter())
    _check_interpreter(python)
    definitions = hook_definitions(mode, python, spec_dirs)
    stale = [name for name in ALL_FILES if name not in definitions]
    for name in definitions:
        target = os.path.join(hooks_dir, name)
        if os.path.lexists(target) and not is_ours(target):
            raise CdiError(f"{target} exists and was not written by cdi-hook; refusing to replace it")
    written = []
    if not dry_run:
        try:
            os.makedirs(hooks_dir, mode=0o755, exist_ok=True)
        except OSError as error:
            raise CdiError(f"cannot create hooks dir {hooks_dir}: {error.strerror}") from None
    for name, definition in definitions.items():
        target = os.path.join(hooks_dir, name)
        data = render(definition)
        if dry_run:
            print(f"would write {target}:", file=out)
        else:
            try:
                write_atomic(target, data, 0o644)
            except OSError as error:
                raise CdiError(f"cannot write {target}: {error.strerror}") from None
            print(f"wrote {target}:", file=out)
            written.append(target)
        out.write(data.decode())
    _remove(hooks_dir, stale, dry_run, out)
    return written


def _remove(hooks_dir: str, names: Iterable[str], dry_run: bool, out: TextIO) -> list[str]:
    removed = []
    for name in names:
        target = os.path.join(hooks_dir, name)
        if not os.path.lexists(target):
            continue
        if not is_ours(target):
            print(f"left {target} alone: not written by cdi-hook", file=out)
            continue
        if dry_run:
            print(f"would remove {target}", file=out)
            continue
        try:
            os.unlink(target)
        except OSError as error:
            raise CdiError(f"cannot remove {target}: {error.strerror}") from None
        print(f"removed {target}", file=out)
        removed.append(target)
    return removed


def uninstall(hooks_dir: str, *, dry_run: bool = False, out: TextIO | None = None) -> list[str]:
    out = out or sys.stdout
    removed = _remove(hooks_dir, ALL_FILES, dry_run, out)
    if not removed and not dry_run:
        print(f"nothing of cdi-hook's in {hooks_dir}", file=out)
    return removed


def _watch_writes(settings: dict[str, str]) -> list[str]:
    """The folders outside /run/cdi-hook (the unit's RuntimeDirectory) the watcher writes:
    the cache dir, and the state root whose container records it prunes."""
    paths = [settings.get("CDI_HOOK_CACHE_DIR") or ""]
    state_dir = settings.get("CDI_HOOK_STATE_DIR")
    if state_dir:
        paths.append(os.path.dirname(state_dir.rstrip("/")) or "/")
    return list(dict.fromkeys(p for p in paths if p and p.rstrip("/") != "/run/cdi-hook"))


def watch_unit(python: str, spec_dirs: list[str] | None, settings: dict[str, str]) -> str:
    """The systemd unit running `cdi-hook watch` with the hooks' interpreter and environment."""
    environment = [f"PATH={HOOK_PATH_ENV}"]
    if spec_dirs:
        environment.append("CDI_SPEC_DIRS=" + ":".join(spec_dirs))
    environment += [f"{name}={value}" for name, value in settings.items()]
    writable = "".join(f"ReadWritePaths={path}\n" for path in _watch_writes(settings))
    for item in environment:
        if any(c in item for c in '\n"\\%$') or " " in item:
            raise CdiError(f"cannot write {item!r} into a systemd unit (quotes, spaces, %, $ or newlines)")
    return f"""{UNIT_MARK}
# cdi-hook's spec watcher: keeps the compiled CDI spec cache current, so a container start
# checks one generation file instead of stat()ing every spec file (docs/operators/watch.md).
# The hooks stay correct without it: they fall back to checking every file.
# Then: systemctl daemon-reload && systemctl enable --now cdi-hook-watch
[Unit]
Description=cdi-hook spec watcher (keeps the compiled CDI spec cache current)
After=local-fs.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -I -m cdi_hook watch
{"".join(f"Environment={item}{chr(10)}" for item in environment)}Restart=on-failure
RestartSec=1s
# The watcher sends WATCHDOG=1 with every heartbeat (each second).
WatchdogSec=30s
TimeoutStartSec=5min
# It reads the spec dirs and writes only its cache dir and the records' folder (the hooks'
# /run/cdi-hook), where it removes the records of ended containers no poststop comes for.
RuntimeDirectory=cdi-hook
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
{writable}{_WATCH_ONLY_UNIT}
[Install]
WantedBy=multi-user.target
"""


# The watcher only reads the spec dirs and writes its cache: it runs confined.
_WATCH_ONLY_UNIT = """ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateNetwork=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
NoNewPrivileges=yes
RestrictAddressFamilies=AF_UNIX
"""


def install_watch_unit(systemd_dir: str, *, python: str | None = None, spec_dirs: list[str] | None = None,
                       dry_run: bool = False, out: TextIO | None = None) -> str | None:
    out = out or sys.stdout
    python = os.path.abspath(python or interpreter())
    _check_interpreter(python)
    settings = carried_settings()
    text = watch_unit(python, spec_dirs, settings)
    target = os.path.join(systemd_dir, WATCH_UNIT)
    if os.path.lexists(target) and not _is_our_unit(target):
        raise CdiError(f"{target} exists and was not written by cdi-hook; refusing to replace it")
    if dry_run:
        print(f"would write {target}:", file=out)
        out.write(text)
        return None
    try:
        for path in _watch_writes(settings):  # ReadWritePaths= needs it to exist; root-only, as the hooks require
            from cdi_hook.state import ensure_private_dir

            ensure_private_dir(path)
        os.makedirs(systemd_dir, mode=0o755, exist_ok=True)
        write_atomic(target, text.encode(), 0o644)
    except OSError as error:
        raise CdiError(f"cannot write {target}: {error.strerror}") from None
    print(f"wrote {target} (then: systemctl daemon-reload && systemctl enable --now {WATCH_UNIT}):", file=out)
    out.write(text)
    return target


def uninstall_watch_unit(systemd_dir: str, *, dry_run: bool = False, out: TextIO | None = None) -> str | None:
    # Compatibility: the unconfined unit an older `install --watch --serve` wrote had this
    # same file name and UNIT_MARK, so it is removed here too (and `install --watch`
    # replaces it with the confined one).
    return _remove_ours(os.path.join(systemd_dir, WATCH_UNIT), UNIT_MARK, dry_run, out or sys.stdout,
                        f" (stop it first: systemctl disable --now {WATCH_UNIT})")


def _not_ours(target: str) -> str:
    """Why install or uninstall leaves target alone, in one line."""
    if _is_ours_marked(target, PACKAGE_LOGROTATE_MARK):
        return f"left {target} alone: the cdi-hook package's (a conffile; edit it for another log path)"
    return f"left {target} alone: not written by cdi-hook"


def _remove_ours(target: str, mark: str, dry_run: bool, out: TextIO, note: str = "") -> str | None:
    """Remove a file install wrote (its first line is mark); one that is not ours is left alone."""
    if not os.path.lexists(target):
        return None
    if not _is_ours_marked(target, mark):
        print(_not_ours(target), file=out)
        return None
    if dry_run:
        print(f"would remove {target}", file=out)
        return None
    try:
        os.unlink(target)
    except OSError as error:
        raise CdiError(f"cannot remove {target}: {error.strerror}") from None
    print(f"removed {target}{note}", file=out)
    return target


def logrotate_config(log_file: str) -> str:
    """deploy/logrotate/cdi-hook for log_file."""
    if any(c.isspace() or c in '"\\{}#*?[' for c in log_file) or not os.path.isabs(log_file):
        raise CdiError(f"cannot write the log path {log_file!r} into a logrotate configuration")
    return LOGROTATE_TEXT.replace(DEFAULT_LOG_PATH + " {", log_file + " {", 1)


# deploy/logrotate/cdi-hook, word for word (tests/test_install.py checks the two agree)
LOGROTATE_TEXT = """\
# written by cdi-hook install
# logrotate(8) configuration for the cdi-hook log (one JSON line per container and stage).
# `cdi-hook install` writes this file into /etc/logrotate.d with the log path it is
# configured with ($CDI_HOOK_LOG); `cdi-hook uninstall` removes it.
#
# Why `create` (rename, then a new empty file) and no postrotate, not `copytruncate`:
# cdi-hook keeps no log file open. Every hook process opens the log (O_APPEND | O_CREAT),
# writes its one line with a single write(2) and closes it (cdi_hook/log.py append_line).
# So after logrotate renames the file, the next line goes to the new file with nobody to
# signal; a hook that opened the file just before the rename writes its line, whole, to the
# rotated file. No line is lost or split. copytruncate would lose the lines written between
# the copy and the truncate. `delaycompress` keeps the newest rotated file uncompressed for
# a hook that may still be appending its line to it.
/var/log/cdi-hook.log {
    weekly
    maxsize 50M
    rotate 8
    missingok
    notifempty
    compress
    delaycompress
    create 0640 root root
}
"""


def install_logrotate(logrotate_dir: str, *, dry_run: bool = False, out: TextIO | None = None) -> str | None:
    """Write the logrotate configuration for the configured log; None when logrotate_dir
    does not exist (no logrotate on this node) or on a dry run."""
    from cdi_hook import settings

    out = out or sys.stdout
    if not os.path.isdir(logrotate_dir):
        return None
    target = os.path.join(logrotate_dir, LOGROTATE_FILE)
    if os.path.lexists(target) and not _is_ours_marked(target, LOGROTATE_MARK):
        print(_not_ours(target), file=out)
        return None
    text = logrotate_config(settings.current().log_file)
    if dry_run:
        print(f"would write {target}:", file=out)
        out.write(text)
        return None
    try:
        write_atomic(target, text.encode(), 0o644)
    except OSError as error:
        raise CdiError(f"cannot write {target}: {error.strerror}") from None
    print(f"wrote {target} (logrotate rotates {settings.current().log_file})", file=out)
    return target


def uninstall_logrotate(logrotate_dir: str, *, dry_run: bool = False, out: TextIO | None = None) -> str | None:
    return _remove_ours(os.path.join(logrotate_dir, LOGROTATE_FILE), LOGROTATE_MARK, dry_run, out or sys.stdout)


def _is_our_unit(path: str) -> bool:
    return _is_ours_marked(path, UNIT_MARK)


def _is_ours_marked(path: str, mark: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.readline().rstrip(b"\n") == mark.encode()
    except OSError:
        return False


def _logrotate_dir_of(args: argparse.Namespace) -> str | None:
    if getattr(args, "no_logrotate", False):
        return None
    return getattr(args, "logrotate_dir", None) or LOGROTATE_DIR


def cmd_install(args: argparse.Namespace) -> int:
    install(hooks_dir_of(args), args.mode or default_mode(args), spec_dirs=_spec_dirs_from_env(),
            dry_run=args.dry_run)
    if getattr(args, "watch", False):
        install_watch_unit(args.systemd_dir or SYSTEMD_DIR, spec_dirs=_spec_dirs_from_env(), dry_run=args.dry_run)
    logrotate_dir = _logrotate_dir_of(args)
    if logrotate_dir:
        install_logrotate(logrotate_dir, dry_run=args.dry_run)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    uninstall(hooks_dir_of(args), dry_run=args.dry_run)
    if getattr(args, "watch", False):
        uninstall_watch_unit(args.systemd_dir or SYSTEMD_DIR, dry_run=args.dry_run)
    logrotate_dir = _logrotate_dir_of(args)
    if logrotate_dir:
        uninstall_logrotate(logrotate_dir, dry_run=args.dry_run)
    return 0
