"""The one protocol between cdi-hook and a child it forks to work inside a container.

The hook's rootfs worker (live/worker.py) and the workers of `attach`, `detach` and `verify`
(live/attach.py) are children that enter a container's namespaces, do work there, and tell
the parent what they did. They speak this protocol, as runc's parent and `runc init` speak
the named messages of libcontainer/sync.go:

- parent -> child: a command, one byte each: RUN_HOOKS, COMMIT, UNDO (COMMANDS). A child
  refuses any other byte (ProtocolError) and undoes; end of file (the parent died) is UNDO.
- child -> parent: one Report per line (JSON). Its kind says which message it is (READY,
  HOOKS_DONE, FINISHED, RESULT, FAILED: KINDS); a kind the parent does not know is refused
  as a failure. The report is one namedtuple for every child: ok, error, notes, steps_ms,
  problems, and the payload fields the callers read (mounts and nodes as MountRecord and
  NodeRecord: what was done, by identity, for the container record).
- Every wait of the parent has a deadline (poll): a child that does not report in time is
  killed (its process group, when it has one) and reaped, and the answer is one FAILED
  report that says so; never a hang. The child's own wait for a command has no clock: it
  ends when the parent writes or exits (end of file). A child undoing on its own clock
  while the parent commits would leave a container started without its devices.
- Journal: what a child did, each with its undo; undone newest first on failure, kept
  (their keep actions run) on COMMIT.

Imported on the hook's hot path: os, time, select and _signal (built in) and jsonio only.
"""

from __future__ import annotations

import os
import select
import time
from _signal import SIGKILL  # not signal.py: its enum conversion costs a start time
from collections import namedtuple
from collections.abc import Callable

from cdi_hook import jsonio
from cdi_hook.errors import CdiError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

# parent -> child
RUN_HOOKS = b"h"  # run the spec's createContainer hooks, then report HOOKS_DONE
COMMIT = b"c"  # keep the work, report FINISHED
UNDO = b"u"  # undo the work, report FINISHED with the undo's problems
COMMANDS = frozenset((RUN_HOOKS, COMMIT, UNDO))

# child -> parent
READY = "ready"  # the work is done and waits for COMMIT or UNDO
HOOKS_DONE = "hooks done"  # after RUN_HOOKS
FINISHED = "finished"  # after COMMIT or UNDO; problems: what the undo could not undo
RESULT = "result"  # a one-shot child's answer (detach, verify): no command follows
FAILED = "failed"  # the work failed; the child undid what it had done and exits
KINDS = frozenset((READY, HOOKS_DONE, FINISHED, RESULT, FAILED))

# How long the parent waits for one report by default. A worker in the container's pid
# namespace can be stopped (SIGSTOP) by the container's root: no report ever comes.
DEADLINE_S = 30.0
MAX_REPORT = 16 << 20  # bytes of one report line


# A mount the child made: its id in the container's mount namespace (statx STATX_MNT_ID)
# and the device and inode of what is mounted (the host source of a bind mount).
MountRecord = namedtuple("MountRecord", ["origin", "path", "mount_id", "source_dev", "source_ino"])
# A device node the child made or found: created False for one left as it was (the image's,
# the runtime's, already as the spec says); replaced describes the entry ours replaced.
NodeRecord = namedtuple("NodeRecord", ["origin", "path", "type", "major", "minor", "mode", "uid", "gid",
                                       "created", "replaced"])


# One message of a child. notes: lines for the log; steps_ms: step -> ms; problems: what an
# undo (or a best-effort detach) could not do; mounts, nodes: MountRecord, NodeRecord lists;
# created: paths attach made (folders, mount points); checks: verify's items; failed: the
# origins whose node or mount a detach could not take back (it stays theirs); sent_at:
# time.monotonic() at sending (CLOCK_MONOTONIC is system-wide), for the time a report waited
# for the parent. A plain namedtuple, no subclass: each class made costs a start its time.
# The field names written out, not from a variable: a type checker reads them from the call.
Report = namedtuple("Report", ["kind", "ok", "error", "notes", "steps_ms", "problems", "mounts", "nodes", "created",
                               "checks", "sent_at", "failed"], defaults=(True, "", (), None, (), (), (), (), (), None, ()))
_FIELDS = Report._fields


def failure(error: str) -> Report:
    return Report(FAILED, ok=False, error=error)


class ProtocolError(CdiError):
    """A message outside the protocol: refused."""


def encode(report: Report) -> bytes:
    return (jsonio.dumps(report._asdict()) + "\n").encode()


def decode(line: bytes) -> Report:
    """The Report of one line; ProtocolError for anything that is not one."""
    try:
        doc = jsonio.loads(line)
    except ValueError:
        raise ProtocolError("the worker's report is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        raise ProtocolError(f"the worker sent an unknown message {str(kind)[:40]!r}; refused")
    report = Report(**{name: doc[name] for name in _FIELDS if name in doc})
    if report.mounts or report.nodes:
        report = report._replace(mounts=[MountRecord(*m) for m in report.mounts],
                                 nodes=[NodeRecord(*n) for n in report.nodes])
    return report


def one_line(error: BaseException) -> str:
    """The one line a child reports for what it raised: a CdiError's text, else (a bug,
    which must still undo and report, not hang the parent) where it happened."""
    if isinstance(error, CdiError):
        return " ".join(str(error).split())
    # Not traceback (~1 ms a start, and a child in a container's mount namespace imports nothing)
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"internal error: {error!r}" + (f" at {tb.tb_frame.f_code.co_name}" if tb is not None else "")


class _NoImports:
    """The first finder of sys.meta_path in a child that entered a container's mount
    namespace: a module not loaded yet would be read from the container's files (its image's
    code, run with the hook's capabilities), so none is found; the work fails instead."""

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> None:
        raise ImportError(f"cdi-hook imports nothing inside a container's mount namespace (asked for {name}: "
                          "import it before setns)")


def seal_imports() -> None:
    """Right after setns into a container's mount namespace (live/worker.py, live/attach.py);
    modules already loaded stay usable (an import of one asks no finder)."""
    import sys

    sys.meta_path.insert(0, _NoImports())


class Journal:
    """What a child did, each with how to undo it (and what keeping it takes: closing fds).
    undo() runs the undos newest first and returns their problems, never raises."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, Callable[[], list[str] | None], Callable[[], None] | None]] = []

    def add(self, what: str, undo: Callable[[], list[str] | None], keep: Callable[[], None] | None = None) -> None:
        self._entries.append((what, undo, keep))

    def undo(self) -> list[str]:
        problems: list[str] = []
        while self._entries:
            what, action, _ = self._entries.pop()
            try:
                problems += action() or []
            except (OSError, CdiError) as error:
                problems.append(f"{what}: {error}")
        return problems

    def keep(self) -> None:
        entries, self._entries = self._entries, []
        for _, _, keep in entries:
            if keep is not None:
                keep()


def undo_note(problems: list[str]) -> str:
    return f" (undo incomplete: {'; '.join(problems)})" if problems else ""


class Channel:
    """The child's end: reports out, commands in."""

    def __init__(self, report_fd: int, command_fd: int):
        self.report_fd = report_fd
        self.command_fd = command_fd

    def send(self, report: Report) -> None:
        data = encode(report)
        while data:  # a pipe takes a long report in pieces
            data = data[os.write(self.report_fd, data):]

    def command(self) -> bytes:
        """The parent's next command: UNDO when it has gone (end of file), ProtocolError for
        a byte that is none of COMMANDS."""
        try:
            received = os.read(self.command_fd, 1)
        except OSError:
            return UNDO
        if not received:
            return UNDO
        if received not in COMMANDS:
            raise ProtocolError(f"unknown command {received!r} from the parent; refused")
        return received


class Child:
    """The parent's handle on a forked child."""

    def __init__(self, pid: int, report_fd: int, command_fd: int, deadline_s: float = DEADLINE_S,
                 group: bool = False, step: str = ""):
        self.pid = pid
        self.step = step  # names the step in the failures the parent itself reports
        self.deadline_s = deadline_s
        self.group = group  # the child leads a process group: killed as one (its own children too)
        self._report_fd = report_fd
        self._command_fd = command_fd
        self._buffer = b""
        self._ended = False  # killed, or it closed its end: nothing more comes
        self._reaped = False

    def read(self, deadline_s: float | None = None) -> Report:
        """The child's next report, never raising: when none comes within the deadline the
        child is killed and reaped, and the answer is a FAILED report saying so."""
        if self._ended:
            return self._failure("the worker in the container stopped answering")
        limit = self.deadline_s if deadline_s is None else deadline_s
        deadline = time.monotonic() + limit
        poller = None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if poller is None:
                poller = select.poll()
                poller.register(self._report_fd, select.POLLIN)
            if left <= 0 or not poller.poll(max(1, int(left * 1000) + 1)):
                if time.monotonic() < deadline:
                    continue  # woken early (a signal): wait on
                self.kill()
                return self._failure(f"the worker in the container stopped answering for {limit:g} s "
                               "(the container may have stopped it); killed it; it may have left nodes or "
                               "mounts in the container's rootfs")
            chunk = os.read(self._report_fd, 65536)
            if not chunk:
                self._ended = True
                break
            self._buffer += chunk
            if len(self._buffer) > MAX_REPORT:
                self.kill()
                return self._failure("the worker's report is too long; killed it")
        line, _, self._buffer = self._buffer.partition(b"\n")
        if not line:
            return self._failure("the worker in the container died without a report")
        try:
            return decode(line)
        except ProtocolError as error:
            self.kill()
            return self._failure(str(error))

    def _failure(self, text: str) -> Report:
        return failure(f"{self.step}: {text}" if self.step else text)

    def send(self, command: bytes) -> None:
        if command not in COMMANDS:
            raise ProtocolError(f"unknown command {command!r}")
        try:
            os.write(self._command_fd, command)
        except OSError:
            pass  # it died: the missing report says so

    def kill(self) -> None:
        self._ended = True
        try:
            if self.group:
                os.killpg(self.pid, SIGKILL)  # SIGKILL ends a stopped process too
            else:
                os.kill(self.pid, SIGKILL)
        except OSError:
            pass
        self.close()

    def close(self, deadline_s: float | None = None) -> None:
        """Close the pipes (a child waiting for a command reads end of file: UNDO) and reap it;
        one that has not exited by the deadline is killed."""
        if self._reaped:
            return
        self._reaped = True
        for fd in (self._report_fd, self._command_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        if os.waitpid(self.pid, os.WNOHANG)[0]:
            return
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            pidfd = None
        if pidfd is not None:
            try:
                limit = self.deadline_s if deadline_s is None else deadline_s
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                exited = poller.poll(int(limit * 1000))
            finally:
                os.close(pidfd)
            if not exited:
                try:
                    (os.killpg if self.group else os.kill)(self.pid, SIGKILL)
                except OSError:
                    pass
        os.waitpid(self.pid, 0)


def fork(run: Callable[[Channel], int], deadline_s: float = DEADLINE_S, group: bool = False,
         step: str = "") -> Child:
    """Fork a child that runs run(channel) and exits with what it returns; whatever it raises
    is reported as FAILED (one line). group: the child leads a new process group (a child
    that forks again is killed whole at the deadline)."""
    report_r, report_w = os.pipe()
    command_r, command_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as error:
        for fd in (report_r, report_w, command_r, command_w):
            os.close(fd)
        from cdi_hook.errors import HookError

        raise HookError("start the worker", "", f"fork: {error.strerror}") from None
    if pid == 0:
        code = 1
        try:
            if group:
                os.setpgid(0, 0)
            os.close(report_r)
            os.close(command_w)
            channel = Channel(report_w, command_r)
            try:
                code = run(channel)
            except BaseException as error:  # noqa: BLE001 - reported, never a hang of the parent
                channel.send(failure(one_line(error)))
        finally:
            os._exit(code)
    if group:
        try:
            os.setpgid(pid, pid)  # as the child does itself: whichever runs first
        except OSError:
            pass
    os.close(report_w)
    os.close(command_r)
    return Child(pid, report_r, command_w, deadline_s, group, step)
