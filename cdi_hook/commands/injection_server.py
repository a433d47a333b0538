"""The server of `cdi-hook watch --serve` (commands/serve.py has the protocol and the client):
the watcher's listening socket and its spare, the process that takes a hook's request.
"""

from __future__ import annotations

import os
import sys

from cdi_hook import settings
from cdi_hook.errors import CdiError
from cdi_hook.commands.serve import (ACCEPTED, DEFAULT_SPEC_DIRS, GO, GO_TIMEOUT_S, MAGIC, MAX_REQUEST, PASSED_FDS,
                                     _peer_uid, socket_path)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable
    from typing import Any

    from cdi_hook.settings import Settings

    HookArgs = Any  # cli.HookArgs (cli is a layer above: tests/test_layout.py)

    # argv, the hook's settings -> (args, spec dirs) of a plain `hook` invocation, or None
    ParseHook = Callable[[list[str], Settings], tuple[HookArgs, list[str] | None] | None]


class Server:
    """The listening socket of a watcher and its spare: one process forked in advance that
    waits for the next request, so no fork() stands between a hook's connect and its work.

    The spare holds nothing that a request's answer depends on: it is the watcher's memory
    (imported modules, settings; the watcher never loads the cache itself) and reads the
    generation file, the cache and the spec files when it serves, as the hook process
    would. It is replaced after each request it takes and after every cache rebuild anyway
    (replace_spare), so no spare is older than the last rebuild. Only a spare accepts. Each
    spare has a socketpair with the watcher: the spare says "taken" on it when it accepts, and
    leaves when the watcher closes its end (retired, or the watcher is gone), so no idle
    spare outlives its watcher. The next spare is forked when the request's process ends
    (its end closes) or, sooner, when another hook is waiting on the socket: a fork is a few
    ms of CPU, which would otherwise compete with the request being served."""

    def __init__(self, spec_dirs: tuple[str, ...], parse_hook: ParseHook, run_hook: Callable[[HookArgs], int],
                 log: Callable[[str], None]) -> None:
        import _socket

        self.dirs = tuple(spec_dirs)
        self.pid = os.getpid()
        # From cli (a higher layer): parse_hook(argv, settings) -> (args, spec dirs) of a plain
        # `hook` argv or None; run_hook(args) -> exit code, what the hook process runs.
        self.parse_hook = parse_hook
        self.run_hook = run_hook
        self.log = log
        self.path = socket_path(self.dirs)
        self.sock: _socket.socket | None = None
        self.spare: tuple[int, _socket.socket] | None = None  # (pid, the watcher's end of its socketpair)
        self.busy: _socket.socket | None = None  # the socketpair of the spare serving the latest request, until it ends
        self.children: set[int] = set()  # spares and the requests they became, until reaped
        problem = confinement()
        if problem:
            self.log(f"not serving injections: {problem}")
            return
        if self.path is None or len(self.path.encode()) > 107:
            self.log(f"not serving injections: socket path {self.path!r} unusable (relative or too long)")
            return
        _preload()  # and the code they are, before a hook can find the socket
        self.code_files = _code_files()
        self.code = _code_identity(self.code_files)
        from cdi_hook import state

        try:
            state.ensure_private_dir(os.path.dirname(self.path))
        except state.StateError as error:
            self.log(f"not serving injections: {error}")
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.settimeout(0)  # a spare accepts only what poll() said is there (another may be faster)
        self.sock = sock
        self.log(f"serving injections on {self.path}")

    def reap(self) -> None:
        """Collect the spares and requests that have ended (by pid: the watcher's rebuild child
        is subprocess's to wait for)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def filenos(self) -> list[int]:
        """What the watcher polls (then calls handle): the idle spare's socketpair; without
        one, the busy one's and the listening socket."""
        if self.spare is not None:
            return [self.spare[1].fileno()]
        return ([] if self.busy is None else [self.busy.fileno()]) + ([] if self.sock is None else [self.sock.fileno()])

    def handle(self, fd: int) -> None:
        """One of filenos() is ready."""
        if self.spare is not None and fd == self.spare[1].fileno():
            try:
                taken = self.spare[1].recv(1) == b"T"
            except BlockingIOError:
                return  # nothing yet (an event from before the fds changed)
            except OSError:
                taken = False
            if taken:  # the next spare when this request ends, or when another hook waits
                self._release_busy()
                self.busy, self.spare = self.spare[1], None
            else:
                self.replace_spare()  # the spare died
        elif self.busy is not None and fd == self.busy.fileno():
            self._release_busy()  # the request's process ended
            self.replace_spare()
        elif self.spare is None and self.sock is not None and fd == self.sock.fileno():
            self.replace_spare()  # a hook waits and the last spare is still busy

    def _release_busy(self) -> None:
        if self.busy is not None:
            self.busy.close()
            self.busy = None

    def replace_spare(self) -> None:
        """Retire the idle spare (it leaves) and fork a new one."""
        import _socket

        self.reap()
        if self.spare is not None:
            self.spare[1].close()  # the spare sees its end close: it leaves, unless it took a request
            self.spare = None
        if self.sock is None:
            return
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as error:
            ours.close()
            theirs.close()
            self.log(f"no spare for injections ({error}); the next heartbeat tries again")
            return
        if pid == 0:
            try:
                ours.close()
                self._spare(theirs)
            except BaseException:
                pass
            os._exit(1)
        theirs.close()
        ours.setblocking(False)
        self.children.add(pid)
        self.spare = (pid, ours)

    def close(self) -> None:
        self._release_busy()
        if self.spare is not None:
            self.spare[1].close()
            self.spare = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)  # type: ignore[arg-type]  # a path: __init__ made a socket there
            except OSError:
                pass

    # -- in the spare -------------------------------------------------------------------

    def _spare(self, pair: _socket.socket) -> None:
        """Wait for a request (or for the watcher to let go), then serve it; never returns."""
        import select
        import signal

        os.setsid()  # a signal to the watcher's process group is not one to a hook
        for signum in (signal.SIGTERM, signal.SIGINT):  # the watcher's handlers: not a hook's
            signal.signal(signum, signal.SIG_DFL)
        # Nothing of the watcher's stays open here (its generation file's flock above all:
        # a dead watcher must stop being trusted at once). Its stderr stays for log lines
        # until the hook's stdio replaces it.
        assert self.sock is not None  # replace_spare forks a spare only while listening
        keep = {0, 1, 2, self.sock.fileno(), pair.fileno()}
        for fd in [int(n) for n in os.listdir("/proc/self/fd")]:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(pair.fileno(), select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if pair.fileno() in ready:
                os._exit(0)  # retired, or the watcher is gone
            try:
                conn_fd, _ = self.sock._accept()  # type: ignore[attr-defined]  # typeshed lacks _socket.socket._accept
                break
            except BlockingIOError:
                continue  # a retiring spare took it
        try:
            pair.send(b"T")  # "taken"; the pair stays open (close-on-exec) until this process ends
        except OSError:
            pass  # retired meanwhile: the watcher has a new spare already
        self.sock.close()
        self._request(conn_fd)
        os._exit(1)

    def _request(self, conn_fd: int) -> None:
        """Check the request; "accepted", wait for "go", then become the hook."""
        import _socket

        conn = _socket.socket(fileno=conn_fd)
        fds: list[int] = []
        try:
            conn.settimeout(1.0)
            if _peer_uid(conn) != 0:
                self.log("refused an injection request from a non-root peer")
                return
            data, ancillary, _, _ = conn.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(PASSED_FDS * 4))
            for level, kind, payload in ancillary:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    fds += [int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)]
            if len(fds) == PASSED_FDS:
                problem = peer_problem(conn, fds[4])
                if problem is not None:
                    self.log(f"refused an injection request: {problem}")
                    return
            request = self._parse(data, fds)
            if request is None:
                return
            if _code_identity(self.code_files) != self.code:
                self.log("cdi-hook's code changed since this watcher started: hooks work in-process "
                         "until it is restarted")
                return
            umask = _umask(fds[4])
            if umask is None:
                self.log("refused an injection request: the hook's umask is unreadable")
                return
            os.umask(umask)  # it decides the modes of what the hook creates (folders, mountpoints)
            self._serve(conn, fds, *request)
        except OSError as error:
            self.log(f"injection request dropped: {error}")

    def _parse(self, data: bytes, fds: list[int]) -> tuple[list[str], Settings, HookArgs] | None:
        """(argv, the hook's settings, args) of a request this server may serve, else None (logged)."""
        fields = data.split(b"\0")
        if len(fds) != PASSED_FDS or fields[0] != MAGIC or len(fields) < 2 or not fields[1].isdigit() \
                or len(fields) < 2 + int(fields[1]):
            self.log("refused a malformed injection request")
            return None
        end = 2 + int(fields[1])
        argv = [os.fsdecode(f) for f in fields[2:end]]
        env = dict(os.fsdecode(f).partition("=")[::2] for f in fields[end:] if b"=" in f)
        try:
            hook = settings.from_environ(env)
        except CdiError:  # a bad CDI_* value: the hook says so itself, in-process
            return None
        parsed = self.parse_hook(argv, hook)
        if parsed is None:
            self.log("refused an injection request that is not a plain `hook` invocation")
            return None
        args, spec_dirs = parsed
        if tuple(DEFAULT_SPEC_DIRS if spec_dirs is None else spec_dirs) != self.dirs or hook != settings.current() \
                or env.get("PATH") != os.environ.get("PATH"):
            return None  # another installation's hook: it works in-process
        return argv, hook, args

    def _serve(self, conn: _socket.socket, fds: list[int], argv: list[str], hook: Settings, args: HookArgs) -> None:
        stdin, stdout, stderr, cwd, pidfd = fds
        conn.settimeout(GO_TIMEOUT_S)
        # Taking the hook's place changes nothing outside this process, and is done before
        # "accepted": if it fails, this process just ends and the hook, never told
        # "accepted", works in-process. No setns: the hook is in this process's namespaces
        # (peer_problem), so everything the work reads and imports is the host's, as in the
        # hook; only its worker enters the container, having opened and imported all first.
        os.fchdir(cwd)
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        for fd in {stdin, stdout, stderr, cwd, pidfd} - {0, 1, 2}:
            os.close(fd)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        # The hook's settings, equal to this process's but its own (their environ too); nothing
        # the hook does reads os.environ (spec hooks and ldconfig get explicit environments).
        settings.use(hook)
        sys.argv = ["-c", *argv]
        conn.sendall(ACCEPTED)
        if conn.recv(1) != GO:
            return  # the hook went its own way (in-process) or away: nothing was done
        import gc

        from cdi_hook import log

        log.SERVED_BY = f"cdi-hook watch --serve (pid {self.pid})"
        gc.disable()
        code = 1
        try:
            code = self.run_hook(args)
        except BaseException:
            import traceback

            traceback.print_exc()  # as the hook process would have printed it
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                conn.settimeout(None)
                conn.sendall(bytes([code & 0xFF]))
                os._exit(code)


# The namespaces a peer must share with the server (/proc/<pid>/ns/*): user, mount and PID
# prove it a host process and not a container's (whose root may see the socket through a
# hostPath), and with the rest the served process does the hook's work where the hook would,
# entering none of them (so it never reads or imports a file of another mount namespace).
SHARED_NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")


def peer_problem(conn: _socket.socket, pidfd: int) -> str | None:
    """Why the connected peer is not provably a hook on this host, or None: the pidfd it
    handed over must be its own (its SO_PEERCRED pid), and its namespaces and root folder,
    read through that pidfd-pinned /proc entry, this process's own."""
    import _socket
    import signal

    creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    peer = int.from_bytes(creds[0:4], sys.byteorder, signed=True)
    handed = _pidfd_pid(pidfd)
    if peer <= 0 or handed != peer:
        return f"the pidfd it handed over is not its own (the peer is pid {peer}, the pidfd's process {handed})"
    try:
        proc = os.open(f"/proc/{peer}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        return f"/proc/{peer}: {error.strerror}"
    try:
        signal.pidfd_send_signal(pidfd, 0)  # alive after the open: /proc/<peer> is the pidfd's process
        for name in SHARED_NAMESPACES:
            theirs, ours = os.stat(f"ns/{name}", dir_fd=proc), os.stat(f"/proc/self/ns/{name}")
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                return f"pid {peer} is in another {name} namespace than the server (a container's process?)"
        theirs, ours = os.stat("root", dir_fd=proc), os.stat("/")
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            return f"pid {peer} has another root folder than the server (chrooted?)"
    except OSError as error:
        return f"pid {peer}: its /proc entry: {error.strerror}"
    finally:
        os.close(proc)
    return None


def _pidfd_pid(pidfd: int) -> int | None:
    """The pid (in this process's PID namespace) of the process behind pidfd, from its fdinfo
    (-1 once it has ended); None when it is no pidfd."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Pid:")))
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def confinement() -> str | None:
    """Why this process cannot act as a hook (NoNewPrivileges, a seccomp filter), or None."""
    try:
        with open("/proc/self/status") as f:
            status = dict(line.rstrip("\n").partition(":\t")[::2] for line in f)
    except OSError as error:
        return f"/proc/self/status: {error.strerror}"
    if status.get("NoNewPrivs", "0") != "0":
        return "it runs with NoNewPrivileges (spec hooks would too)"
    if status.get("Seccomp", "0") != "0":
        return "it runs under a seccomp filter (e.g. systemd RestrictAddressFamilies=)"
    return None


def _preload() -> None:
    """The modules a start imports, imported once here so each request's process has them."""
    import cdi_hook.attribution  # noqa: F401
    import cdi_hook.cache  # noqa: F401
    import cdi_hook.commands.hook  # noqa: F401
    import cdi_hook.hostdev  # noqa: F401
    import cdi_hook.live.cgroups  # noqa: F401
    import cdi_hook.live.devices  # noqa: F401
    import cdi_hook.live.inject  # noqa: F401
    import cdi_hook.live.ldcache  # noqa: F401
    import cdi_hook.live.ldmemo  # noqa: F401
    import cdi_hook.live.mounts  # noqa: F401
    import cdi_hook.live.worker  # noqa: F401
    import cdi_hook.log  # noqa: F401
    import cdi_hook.oci  # noqa: F401
    import cdi_hook.plan  # noqa: F401
    import cdi_hook.policy  # noqa: F401
    import cdi_hook.registry  # noqa: F401
    import cdi_hook.request  # noqa: F401


def _umask(pidfd: int) -> int | None:
    """The umask of the process behind pidfd (the hook), from /proc (Linux 4.7+), or None."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            pid = next(line.split()[1] for line in f if line.startswith("Pid:"))
        with open(f"/proc/{pid}/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def _code_files() -> list[str]:
    return sorted(m.__file__ for name, m in list(sys.modules.items())  # type: ignore[misc]  # only with a __file__
                  if name.startswith("cdi_hook") and getattr(m, "__file__", None))


def _code_identity(files: list[str]) -> list[tuple[int, int] | None]:
    """(size, mtime) of cdi_hook's module files loaded when serving began: an upgrade on disk
    changes it, and a spare (the watcher's code) then refuses, so a hook never runs older
    code than its own."""
    identity: list[tuple[int, int] | None] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            identity.append(None)
        else:
            identity.append((st.st_size, st.st_mtime_ns))
    return identity
