"""The resident injector: `cdi-hook watch --serve` does a hook's work in a process forked
from itself, whose modules are already imported; the hook process only asks.

A hook (cli.main, entered as a runtime runs it) first tries the socket of a watcher of its
own spec dirs, `<cache dir>/inject-<key>.sock` (a root-only dir; the socket 0600). It sends
its argv and environment with its stdin, stdout, stderr, current directory and a pidfd of
itself (SCM_RIGHTS). The server serves only a root peer (SO_PEERCRED) that is provably a
process of the host: the pidfd it hands over is its own (SO_PEERCRED pid), and it is in the
server's own user, mount, PID, network, IPC, UTS and cgroup namespaces, with the server's
root folder (injection_server.peer_problem: a container's root that can see the socket is
refused, with one logged line); whose `hook` argv parses and whose settings (the Settings
its CDI_* variables give, PATH, the spec dirs) equal its own; and only while it runs
unconfined (no NoNewPrivileges, no seccomp filter: spec hooks and netlink must behave as in
the hook). The request is taken by the watcher's spare, a process forked in advance that
closed everything of the watcher's (injection_server.Server); it checks the request, says
"accepted" and takes the hook's cwd, stdio, settings and umask, entering no namespace (it
is in the hook's already: everything the work reads and imports is the host's, as in the
hook); once the hook has answered "go" it runs the very `cdi-hook hook` the hook would have
run (cli.run). Its exit code is the verdict.

Nothing has changed before "go": any failure until then (no socket, refused, other
settings, timeout, no root peer) and the hook does the work in-process, so correctness
never depends on the server. After "go" a lost connection fails the start: the child's
worker undoes its rootfs work when its own pipe closes, and the runtime removes a container
whose hook failed.

This module is the client, imported by every hook start (only _socket and zlib besides);
the server is commands/injection_server.py, imported by the watcher alone.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    import _socket
    from collections.abc import Iterable

    from cdi_hook.settings import Settings

# registry.DEFAULT_SPEC_DIRS, repeated so the client imports no registry
# (tests/test_serve.py checks they agree).
DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
MAGIC = b"cdi-hook-inject-1"
ACCEPTED, GO = b"A", b"G"
ASK_TIMEOUT_S = 2.0  # until "accepted": then the hook works in-process instead
GO_TIMEOUT_S = 5.0  # the child waits this long for "go", then gives up having done nothing
MAX_REQUEST = 1 << 16
PASSED_FDS = 5  # stdin, stdout, stderr, cwd, pidfd


def socket_path(spec_dirs: Iterable[str] | None, settings: Settings | None = None) -> str | None:
    """The server socket of a watcher of these spec dirs (None: no usable cache dir), under
    the settings' cache dir (this process's unless given). The same key as cache.generation_path."""
    import zlib

    if settings is None:
        from cdi_hook.settings import current

        settings = current()
    if settings.cache_dir is None:  # a relative CDI_HOOK_CACHE_DIR: no cache, no server
        return None
    dirs = tuple(DEFAULT_SPEC_DIRS if spec_dirs is None else spec_dirs)
    return os.path.join(settings.cache_dir, f"inject-{zlib.crc32(repr(dirs).encode()):08x}.sock")


def _peer_uid(sock: _socket.socket) -> int:
    import _socket

    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


# ---------------------------------------------------------------------------------------
# the client: in the hook process


def ask(argv: list[str], spec_dirs: Iterable[str] | None) -> int | None:
    """The exit code of a server that did the work; None when none took it (then the hook
    works in-process). A server lost after "go" is a one-line error and exit code 1."""
    path = socket_path(spec_dirs)
    if path is None or len(path.encode()) > 107 or not os.path.exists(path):
        return None  # no server (one that starts now serves the next start): no _socket import
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    fds = []
    try:
        sock.settimeout(ASK_TIMEOUT_S)
        try:
            sock.connect(path)
            if _peer_uid(sock) != 0:
                return None
            fds = [os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), os.pidfd_open(os.getpid())]
            message = b"\0".join([MAGIC, b"%d" % len(argv), *(os.fsencode(a) for a in argv),
                                  *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items())])
            passed = b"".join(fd.to_bytes(4, sys.byteorder) for fd in [0, 1, 2, *fds])
            sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, passed)])
            if sock.recv(1) != ACCEPTED:
                return None  # refused (other settings, confined server): nothing was done
            sock.sendall(GO)
        except OSError:
            return None
        # Committed: the server's child does the work now; only its verdict counts.
        sock.settimeout(None)
        try:
            verdict = sock.recv(1)
        except OSError:
            verdict = b""
        if not verdict:
            print("cdi-hook: injection server: the connection broke before its verdict; the start fails "
                  "(its worker undoes its rootfs work)", file=sys.stderr)
            return 1
        return verdict[0]
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
