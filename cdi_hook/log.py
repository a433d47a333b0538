"""Logging for the hook: one JSON line per container, errors and warnings on stderr.

The hook collects what it did in a ContainerLog and writes it once, at the end, through
structlog to $CDI_HOOK_LOG (default /var/log/cdi-hook.log). structlog is imported only at
that moment, and only when the line will be written at the configured level
($CDI_HOOK_LOG_LEVEL, default info), so a container that asks for no device pays nothing.
With level debug the line also carries the step-by-step notes and each step's duration
(`steps_ms`: resolve, worker, nodes, mounts, ldconfig, device cgroup, rdt, netdev, spec hooks). A log file that cannot be
written never fails a container: one warning on stderr instead.

Every text that reaches stderr or the log line goes through errors.printable (control
characters escaped, length cut), and long lists are summarised: an image or a pod author
cannot put escape sequences in front of an operator, nor make one line megabytes long.
"""

from __future__ import annotations

import os
import stat
import sys
import time

from cdi_hook import settings
from cdi_hook.errors import MAX_MESSAGE_LENGTH, printable
from cdi_hook.settings import LOG_LEVELS as LEVELS

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from typing import Any, TextIO

    from structlog.typing import Processor

# Bounds of the log line: a list (devices, warnings, notes, sources) keeps its first
# MAX_LOG_ITEMS entries and a count of the rest; each entry is cut at MAX_LOG_ITEM
# characters; the error at MAX_MESSAGE_LENGTH, as on stderr. So the line stays a few KB
# (at most ~60 KB) whatever the annotations and the image hold.
MAX_LOG_ITEMS = 10
MAX_LOG_ITEM = 500


def configured_level() -> int:
    return settings.current().log_level


def warn(message: str) -> None:
    print(f"cdi-hook: warning: {printable(message)}", file=sys.stderr)


class ContainerLog:
    """What the hook did for one container at one stage; finish() writes it as one line."""

    def __init__(self, container_id: str, stage: str, devices: list[str]):
        self.started = time.monotonic()
        self.fields: dict = {"container": container_id, "stage": stage, "devices": devices}
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.steps_ms: dict[str, float] = {}  # step -> duration, logged at debug level

    def step(self, name: str) -> _Step:
        """`with log.step("mounts"):` records how long the step took."""
        return _Step(self, name)

    def record_step(self, name: str, ms: float) -> None:
        self.steps_ms[name] = round(self.steps_ms.get(name, 0.0) + ms, 2)

    def warning(self, message: str) -> None:
        """A warning shown on stderr now and kept for the log line."""
        warn(message)
        self.warnings.append(message)

    def note(self, message: str) -> None:
        """Step detail, logged only at debug level."""
        self.notes.append(message)

    def finish(self, error: str | None = None) -> None:
        level = "error" if error else ("warning" if self.warnings else "info")
        if LEVELS[level] < configured_level():
            return
        fields = {key: _bounded(value) for key, value in self.fields.items()}
        fields["duration_ms"] = round((time.monotonic() - self.started) * 1000, 1)
        if self.warnings:
            fields["warnings"] = _bounded(self.warnings)
        if error:
            fields["error"] = printable(error, MAX_MESSAGE_LENGTH)
        if configured_level() <= LEVELS["debug"]:
            if self.steps_ms:
                fields["steps_ms"] = self.steps_ms
            if self.notes:
                fields["notes"] = _bounded(self.notes)
        _write(level, "cdi-hook injected" if not error else "cdi-hook failed", fields)


def _bounded(value: Any) -> Any:
    """A log field safe and short: strings escaped and cut, lists and dicts summarised."""
    if isinstance(value, str):
        return printable(value, MAX_LOG_ITEM)
    if isinstance(value, (list, tuple)):
        items = [_bounded(item) for item in value[:MAX_LOG_ITEMS]]
        if len(value) > MAX_LOG_ITEMS:
            items.append(f"... ({len(value) - MAX_LOG_ITEMS} more)")
        return items
    if isinstance(value, dict):
        pairs = list(value.items())
        bounded = {_bounded(key): _bounded(item) for key, item in pairs[:MAX_LOG_ITEMS]}
        if len(pairs) > MAX_LOG_ITEMS:
            bounded["..."] = f"{len(pairs) - MAX_LOG_ITEMS} more"
        return bounded
    return value


class _Step:
    def __init__(self, log: ContainerLog, name: str):
        self.log, self.name = log, name

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.log.record_step(self.name, (time.monotonic() - self.started) * 1000)


def _write(level: str, event: str, fields: dict) -> None:
    if level == "info" and "notes" not in fields and "steps_ms" not in fields:
        # The plain "injected" line of every container start: importing structlog costs
        # ~25 ms (it pulls in asyncio, logging, ssl), more than the rest of the hook's
        # imports together. This writes the very line structlog's processors below would
        # (same keys, order, timestamp and JSON; tests/test_cache.py compares the two);
        # warnings, errors and debug notes still go through structlog.
        line = render_line(level, event, fields)
    else:
        import io

        rendered = io.StringIO()
        getattr(structlog_logger(rendered), level)(event, **fields)
        line = rendered.getvalue()
    path = settings.current().log_file
    problem = append_line(path, line.encode("utf-8", "backslashreplace"))
    if problem:
        # Best effort: a log line never costs a container its start (a full or read-only
        # /var/log, EIO, a missing folder, a FIFO someone left there). The line goes to
        # stderr, which the runtime keeps (runc shows it when a hook fails, CRI-O and
        # Podman log it), and the start goes on.
        warn(f"cannot write log file {path}: {problem}; the line follows")
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def append_line(path: str, data: bytes) -> str | None:
    """Append data (one whole line) to path with a single write on an O_APPEND descriptor;
    None when written, else what went wrong, for the operator.

    One write(2) of one line on O_APPEND is what makes concurrent hooks and logrotate safe:
    every hook opens the file anew for its line, so the kernel appends whole lines, never
    interleaved, and a hook that opened the file before a rotation renamed it writes its
    line, whole, to the rotated file (deploy/logrotate/cdi-hook). O_NONBLOCK: a FIFO left at
    the path must not hang a container start (no reader: ENXIO)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK,
                     0o640)
    except OSError as error:
        return error.strerror or str(error)
    try:
        mode = os.fstat(fd).st_mode
        # a character device (/dev/null, to drop the lines) is fine; anything else not a file is not
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            return "not a regular file"
        written = os.write(fd, data)
        if written != len(data):
            return f"short write ({written} of {len(data)} bytes: the file system is full?)"
        return None
    except OSError as error:
        return error.strerror or str(error)
    finally:
        os.close(fd)


_PROCESSORS: list[Processor] | None = None


def structlog_logger(log_file: TextIO) -> Any:
    """A structlog logger writing JSON lines to log_file; the processors are built once."""
    global _PROCESSORS
    import structlog

    if _PROCESSORS is None:
        _PROCESSORS = [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    return structlog.wrap_logger(structlog.WriteLogger(log_file), processors=_PROCESSORS)


def render_line(level: str, event: str, fields: dict, now_ns: int | None = None) -> str:
    """structlog's add_log_level + TimeStamper(fmt="iso", utc=True) + JSONRenderer, by hand."""
    from cdi_hook import jsonio  # json.dumps without importing json (re, enum): ~10 ms a start

    line = dict(fields, event=event, level=level, timestamp=iso_utc(time.time_ns() if now_ns is None else now_ns))
    return jsonio.dumps(line) + "\n"


def iso_utc(ns: int) -> str:
    """datetime.now(timezone.utc).isoformat() with Z, without importing datetime."""
    seconds, micros = divmod(ns // 1000, 1_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{micros:06d}Z" if micros else f"{stamp}Z"
