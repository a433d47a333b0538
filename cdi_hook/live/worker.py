"""The rootfs work, done in a forked child inside the container's mount namespace.

The hook process itself never changes namespace: it forks a worker, then clones the bind
mounts' host sources and hands them over (start()). The worker opens what else it needs
from the host (the host's ldconfig, the ldconfig memo, under a user namespace clones of the
host's device nodes) while still in the host's mount namespace, then setns()'s into the
container process's mount namespace (through its pidfd), opens the rootfs (the path as the
container's namespace sees it: for runc at createRuntime/prestart the rootfs is not yet
pivoted, so the bundle's rootfs path is right) and creates nodes, mounts and the loader
cache there. It speaks live/child.py's protocol: a READY report (notes, step times, and what
it did by identity: the nodes and mounts it made), then the hook's commands: RUN_HOOKS runs
the spec's createContainer hooks (containerhooks.py; opened on the host by the hook before
the fork) and reports HOOKS_DONE; COMMIT keeps everything; UNDO, an unknown command or the
hook's exit (end of file) undoes what it made, through its journal. A failing
createContainer hook is undone like any failed step; what the hook itself wrote into the
rootfs cannot be, but the container never starts. The hook waits for each report until a
deadline (WORKER_DEADLINE_S; for the createContainer hooks their own timeouts more).
"""

from __future__ import annotations

import os
import sys
import time

from cdi_hook.errors import CdiError, HookError
from cdi_hook.live import child, devices, ldcache, ldmemo, mounts, syscalls
from cdi_hook.live.child import READY
from cdi_hook.live.rootfs import Rootfs

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    import _socket


class RootfsWork:
    def __init__(self, rootfs: str, nodes: list[devices.NodeJob], mounts: list[mounts.MountJob],
                 by_bind_mount: bool = False, creator_ids: tuple[int, int] | None = None,
                 container_hooks: list | None = None, hook_state: bytes = b""):
        self.rootfs = rootfs
        self.nodes = nodes
        self.mounts = mounts
        self.by_bind_mount = by_bind_mount  # the container has a user namespace
        self.creator_ids = creator_ids  # host uid/gid of the container's root (user namespace)
        self.container_hooks = container_hooks or []  # containerhooks.Program, opened on the host
        self.hook_state = hook_state  # the OCI state those hooks get on stdin
        self.forked_at = 0.0  # time.monotonic() just before the fork, for the "fork" step


class Worker:
    """The hook's handle on a running worker child (a child.Child)."""

    def __init__(self, handle: child.Child, runs_container_hooks: bool = False, hooks_deadline_s: float = 0.0):
        self.pid = handle.pid
        self.runs_container_hooks = runs_container_hooks  # it holds createContainer hooks to run
        self.hooks_deadline_s = hooks_deadline_s  # how long the parent waits for them
        self._child = handle
        self._reported = False  # its first report was read
        self._failed = False  # it failed, undid its work and exited

    def wait_report(self) -> child.Report:
        """Its READY report; CdiError when it failed (it has undone its work then)."""
        self._reported = True
        return self._read(READY)

    def run_container_hooks(self) -> child.Report:
        """After wait_report: the worker runs the spec's createContainer hooks; CdiError when
        one failed (the worker has undone its rootfs work and exited then)."""
        self._child.send(child.RUN_HOOKS)
        return self._read(child.HOOKS_DONE, self.hooks_deadline_s or None)

    def _read(self, kind: str, deadline_s: float | None = None) -> child.Report:
        report = self._child.read(deadline_s)
        received = time.monotonic()
        if not report.ok or report.kind != kind:
            self._failed = True
            self._child.close()
            raise CdiError(report.error or f"inject: the worker sent {report.kind!r}, not {kind!r}")
        if report.sent_at is not None:  # how long the report waited for the hook
            steps_ms = dict(report.steps_ms or {})
            steps_ms["report"] = round((received - report.sent_at) * 1000, 2)
            report = report._replace(steps_ms=steps_ms)
        return report

    def finish(self, commit: bool) -> list[str]:
        """Tell the worker to keep (commit) or undo its work; returns undo problems."""
        if self._failed:
            return []  # it failed, undid its work itself and exited
        if not self._reported:  # a step running beside it failed first: its report comes first
            try:
                self.wait_report()
            except CdiError:
                return []
        self._child.send(child.COMMIT if commit else child.UNDO)
        report = self._child.read()
        self._child.close()
        if report.kind == child.FINISHED:
            return list(report.problems)
        return [] if commit else [f"worker: {report.error or 'died during undo'}"]


def start(container_pidfd: int, work: RootfsWork) -> Worker:
    """Fork the worker; it enters the mount namespace of the process container_pidfd holds
    (a pidfd, not a pid number, which a new process could have taken over).

    The host sources of bind mounts are cloned here, in the host's mount namespace, while
    the worker enters the container and makes the nodes (two CPUs at work instead of one);
    the clones reach it over a socket pair (SCM_RIGHTS) before its mounts. A source that
    cannot be cloned fails the start here, after the worker has undone its nodes."""
    ns_fd = os.dup(container_pidfd)
    binds = [job for job in work.mounts if job.options.bind]
    sources = _socket_pair() if binds else None
    work.forked_at = time.monotonic()

    def run(channel: child.Channel) -> int:
        if sources is not None:
            sources[0].close()
        return _child(ns_fd, work, channel, sources[1] if sources is not None else None, binds)

    try:
        handle = child.fork(run, WORKER_DEADLINE_S, step="inject")
    finally:
        os.close(ns_fd)
    worker = Worker(handle, runs_container_hooks=bool(work.container_hooks),
                    hooks_deadline_s=_hooks_deadline(work.container_hooks))
    if sources is not None:
        sources[1].close()
        try:
            mounts.clone_sources(binds)
            _send_sources(sources[0], binds)
        except BaseException:
            sources[0].close()  # the worker finds no sources, undoes its nodes, reports
            worker.finish(commit=False)
            raise
        finally:
            mounts.close_sources(binds)  # the worker has its own copies (or failed)
        sources[0].close()
    return worker


# How long the hook waits for each report of its worker: its ldconfig alone may take
# ldcache.TIMEOUT_S. A worker past it is killed: the hook fails with one line, never hangs
# the runtime (whose own timeout would leave no message).
WORKER_DEADLINE_S = 45.0


def _hooks_deadline(programs: list) -> float:
    """The wait for the createContainer hooks: their own timeouts, a hook without one
    counted as WORKER_DEADLINE_S, and WORKER_DEADLINE_S more for the worker itself."""
    return WORKER_DEADLINE_S + sum(p.timeout or WORKER_DEADLINE_S for p in programs)


# SCM_MAX_FD (include/net/scm.h): at most 253 fds in one message.
_FDS_PER_MESSAGE = 250


def _socket_pair() -> tuple[_socket.socket, _socket.socket]:
    import _socket  # not socket.py: its enum and selectors imports cost a start ~2 ms

    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)


def _send_sources(sock: _socket.socket, binds: list) -> None:
    """Each bind job's clone fd, in job order; per fd a byte: b"d" for a folder, b"f" otherwise."""
    import _socket

    for first in range(0, len(binds), _FDS_PER_MESSAGE):
        chunk = binds[first:first + _FDS_PER_MESSAGE]
        kinds = b"".join(b"d" if job.source_is_dir else b"f" for job in chunk)
        fds = b"".join(job.tree_fd.to_bytes(4, sys.byteorder) for job in chunk)
        try:
            sock.sendmsg([kinds], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        except OSError as error:
            raise HookError("inject", "", f"passing the mounts' host sources to the worker: {error.strerror}") from None


def _receive_sources(sock: _socket.socket, binds: list) -> None:
    """The worker's side of _send_sources; HookError when the hook sent none (it failed)."""
    import _socket

    for first in range(0, len(binds), _FDS_PER_MESSAGE):
        chunk = binds[first:first + _FDS_PER_MESSAGE]
        # CLOEXEC: ldconfig, which the worker may run, must not inherit host mounts.
        kinds, ancillary, _, _ = sock.recvmsg(len(chunk), _socket.CMSG_SPACE(4 * len(chunk)),
                                              _socket.MSG_CMSG_CLOEXEC)
        fds = [int.from_bytes(data[i:i + 4], sys.byteorder) for level, kind, data in ancillary
               if (level, kind) == (_socket.SOL_SOCKET, _socket.SCM_RIGHTS) for i in range(0, len(data) - 3, 4)]
        for job, fd in zip(chunk, fds):
            job.tree_fd = fd
        if len(kinds) != len(chunk) or len(fds) != len(chunk):
            raise HookError("inject", "", "the hook sent no clones of the mounts' host sources")
        for job, kind in zip(chunk, kinds):
            job.source_is_dir = kind == ord("d")


def _child(ns_fd: int, work: RootfsWork, channel: child.Channel, sources: _socket.socket | None,
           binds: list) -> int:
    """sources: the worker's end of the socket pair the bind jobs' clones (binds) come on."""
    mounted: list[int] = []
    notes: list[str] = []
    steps_ms: dict[str, float] = {}
    made_nodes: list[child.NodeRecord] = []
    made_mounts: list[child.MountRecord] = []
    journal = child.Journal()
    rootfs = None
    started = _timed(steps_ms, "fork", work.forked_at)

    def failed(error: BaseException) -> int:
        """Undo, report the error as the one line, end the worker."""
        channel.send(child.failure(child.one_line(error) + child.undo_note(journal.undo())))
        return 1

    host_ns_fd: int | None = None

    def clone_late(job: devices.NodeJob) -> None:
        """mknod was refused: back to the host's mount namespace for a clone of its node."""
        assert host_ns_fd is not None  # given to create_nodes only with it
        syscalls.setns(host_ns_fd, syscalls.CLONE_NEWNS)
        try:
            devices.clone_host_nodes([job])
        finally:
            syscalls.setns(ns_fd, syscalls.CLONE_NEWNS)

    try:
        if work.by_bind_mount:
            devices.clone_host_nodes(work.nodes)  # every node is a bind mount of the host's
        elif work.nodes:
            # mknod is the way; the host's node is cloned only for one whose mknod is refused
            # (an LSM or device cgroup confining the hook: rare), which saves a clone per node.
            host_ns_fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        # Only for mounts: a worker that runs createContainer hooks alone needs no ldconfig.
        ldconfig_fd = ldcache.open_host_ldconfig() if work.mounts else None
        # The folder of remembered ldconfig runs is on the host: opened before setns.
        memo_fd = ldmemo.open_dir() if ldconfig_fd is not None and any(
            ldcache.is_library_name(j.mount.container_path) for j in work.mounts) else None
        started = _timed(steps_ms, "host files", started)
        try:
            syscalls.setns(ns_fd, syscalls.CLONE_NEWNS)
        except OSError as error:
            raise HookError("enter container", "", f"setns into its mount namespace: {error.strerror} "
                                                   "(is the container process running?)") from None
        child.seal_imports()
        try:
            rootfs = Rootfs.open(work.rootfs, work.creator_ids)
        except OSError as error:
            raise HookError("open rootfs", "", f"{work.rootfs}: {error.strerror}") from None
        # Undone newest first: the mounts (on entries the rootfs made), then the entries.
        journal.add("rootfs", rootfs.undo, keep=rootfs.forget)
        journal.add("mounts", lambda: mounts.unmount_all(mounted), keep=lambda: _close_all(mounted))
        started = _timed(steps_ms, "enter", started)
        devices.create_nodes(rootfs, work.nodes, work.by_bind_mount, mounted, notes,
                             clone_late if host_ns_fd is not None else None, made_nodes, made_mounts)
        started = _timed(steps_ms, "nodes", started)
        if sources is not None:
            _receive_sources(sources, binds)
            sources.close()
            started = _timed(steps_ms, "sources", started)
        mounts.apply(rootfs, work.mounts, mounted, notes, made_mounts)
        started = _timed(steps_ms, "mounts", started)
        file_jobs = [j for j in work.mounts if j.options.bind and not j.source_is_dir]
        library_origins = dict.fromkeys(j.origin for j in file_jobs if ldcache.is_library_name(j.mount.container_path))
        ldcache.update(rootfs, ldcache.library_dirs([j.mount.container_path for j in file_jobs]), ldconfig_fd,
                       notes, device=", ".join(library_origins), memo_fd=memo_fd)
        _timed(steps_ms, "ldconfig", started)
    except BaseException as error:  # noqa: BLE001 - see child.one_line
        return failed(error)
    channel.send(child.Report(READY, notes=notes, steps_ms=steps_ms, mounts=made_mounts, nodes=made_nodes,
                              sent_at=time.monotonic()))
    try:
        command = channel.command()
        if command == child.RUN_HOOKS and work.container_hooks:
            # After the hook's host-side steps (cgroup, RDT, netdev, prestart/createRuntime
            # hooks), as a runtime runs createContainer hooks after createRuntime ones.
            try:
                from cdi_hook.live import containerhooks

                started = time.monotonic()
                containerhooks.run_programs(work.container_hooks, work.hook_state, rootfs.root_fd, ns_fd)
                steps_ms = {}
                _timed(steps_ms, "createContainer hooks", started)
            except BaseException as error:  # noqa: BLE001 - see child.one_line
                return failed(error)
            channel.send(child.Report(child.HOOKS_DONE, steps_ms=steps_ms))
            command = channel.command()
    except child.ProtocolError as error:  # refused: the work is undone
        channel.send(child.Report(child.FINISHED, problems=[str(error)] + journal.undo()))
        return 1
    if command == child.COMMIT:
        journal.keep()
        channel.send(child.Report(child.FINISHED))
        return 0
    channel.send(child.Report(child.FINISHED, problems=journal.undo()))
    return 0


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _timed(steps_ms: dict, step: str, started: float) -> float:
    now = time.monotonic()
    steps_ms[step] = round((now - started) * 1000, 2)
    return now
