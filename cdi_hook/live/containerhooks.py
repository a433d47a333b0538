"""The spec's createContainer hooks, run by the worker the way a runtime runs them.

The OCI runtime specification (config.md, "createContainer hooks"): they run during create,
after the runtime environment is set up and before pivot_root; their path resolves in the
runtime namespace; they run in the container namespace. At createRuntime the container's
mount namespace has its rootfs mounted but not yet pivoted: after cdi-hook's own nodes,
mounts and loader cache, the worker (already in that mount namespace) runs each hook there.

What a hook gets, mirroring runc 1.1 (libcontainer/rootfs_linux.go prepareRootfs and
configs.Command.Run): argv as the spec says (args[0] is argv[0]; no args: the path), exactly
the spec's env, the OCI state on stdin with `pid` as the container sees it (runtime-spec
runtime.md: "for hooks executed in the container namespace, it is the pid as seen by the
container"; runc passes runc init's getpid()), the rootfs as working folder (runc init
chdir()s to config.Rootfs just before it runs them), stdout and stderr captured, the spec's
timeout. Namespaces: the container process's mount, network, UTS, IPC, PID and cgroup
namespaces, where runc runs them in runc init. Not the container's user namespace: the hook
keeps host root, as cdi-hook's own work does (a vendor tool may need host rights on host
files it reads); not the container's cgroup either: its device cgroup would deny the tool
the devices it may probe (runc's runc init is already in it).

The program is opened here, on the host, before the worker enters the container (open_programs):
what runs is the file the host path named then. A `#!` script is handled as the kernel's
binfmt_script would (interpreter path plus at most one argument), with the interpreter opened
on the host too and exec'd from its fd with the script as /dev/fd/N: that is the name the
kernel itself gives a script exec'd from an fd (fs/exec.c, alloc_bprm: execveat with an
empty path gets "/dev/fd/%d"), so the script reads exactly the file opened here, and sees
the same $0 it would if it were fexecve'd. One level only: an interpreter that is itself a
script is refused.
"""

from __future__ import annotations

import os
import select
import stat
import time

from cdi_hook.errors import HookError
from cdi_hook.live import syscalls
from cdi_hook.live.spechooks import OUTPUT_LIMIT, STEP, _tail

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from cdi_hook.spec.model import Hook

    _Refuse = Callable[[str], HookError]  # a message -> the HookError naming the hook

STAGE = "createContainer"
# The namespaces a hook joins itself; the PID namespace is entered by the worker for its
# children (setns(CLONE_NEWPID) moves only the caller's future children).
HOOK_NAMESPACES = syscalls.CLONE_NEWNET | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWCGROUP
SHEBANG_LIMIT = 256  # BINPRM_BUF_SIZE: the kernel reads the interpreter line from this many bytes
KEPT_OUTPUT = 4 * OUTPUT_LIMIT  # bytes of a hook's output kept while it runs (only the tail is shown)


class Program:
    """One createContainer hook, opened on the host: exec exec_fd with argv and env."""

    __slots__ = ("origin", "path", "exec_fd", "script_fd", "argv", "env", "timeout")

    def __init__(self, origin: str, path: str, exec_fd: int, script_fd: int | None, argv: list[str],
                 env: dict[str, str], timeout: int | None):
        self.origin, self.path, self.exec_fd, self.script_fd = origin, path, exec_fd, script_fd
        self.argv, self.env, self.timeout = argv, env, timeout


def open_programs(hooks: Iterable[tuple[str, Hook]]) -> list[Program]:
    """(origin, Hook) pairs → Programs, in order; HookError naming the device and path when a
    hook cannot be run (missing, not a regular file, not executable, a bad interpreter line)."""
    programs: list[Program] = []
    try:
        for origin, hook in hooks:
            programs.append(_open_program(origin, hook))
    except BaseException:
        close_programs(programs)
        raise
    return programs


def close_programs(programs: list[Program]) -> None:
    for program in programs:
        for fd in (program.exec_fd, program.script_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _open_program(origin: str, hook: Hook) -> Program:
    def refuse(message: str) -> HookError:
        return HookError(STEP, origin, f"{STAGE} hook {hook.path}: {message}")

    args = list(hook.args) or [hook.path]
    env = dict(item.split("=", 1) if "=" in item else (item, "") for item in hook.env)
    fd = _open_executable(hook.path, refuse)
    try:
        # What exec would refuse is refused now, before anything changes (for a script the
        # kernel checks these on the script too, though only its interpreter is exec'd here).
        if not os.fstat(fd).st_mode & 0o111:
            raise refuse("not executable")
        if os.fstatvfs(fd).f_flag & os.ST_NOEXEC:
            raise refuse("on a noexec mount")
        head = os.pread(fd, SHEBANG_LIMIT, 0)
        if not head.startswith(b"#!"):
            return Program(origin, hook.path, fd, None, args, env, hook.timeout)
        interpreter, argument = _interpreter_line(head, refuse)
        interpreter_fd = _open_executable(interpreter, refuse, f"its interpreter {interpreter}")
    except BaseException:
        os.close(fd)
        raise
    try:
        if os.pread(interpreter_fd, 2, 0) == b"#!":
            raise refuse(f"its interpreter {interpreter} is itself a script; only one level of #! is run "
                         "(name a binary interpreter)")
    except BaseException:
        os.close(interpreter_fd)
        os.close(fd)
        raise
    argv = [interpreter, *([argument] if argument else []), f"/dev/fd/{fd}", *args[1:]]
    return Program(origin, hook.path, interpreter_fd, fd, argv, env, hook.timeout)


def _open_executable(path: str, refuse: _Refuse, what: str = "") -> int:
    """path opened on the host (following symlinks, as exec does); a regular file or HookError."""
    what = f"{what}: " if what else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as error:
        raise refuse(f"{what}cannot open it on the host: {error.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(f"{what}not a regular file")
    return fd


def _interpreter_line(head: bytes, refuse: _Refuse) -> tuple[str, str]:
    """(interpreter, its one optional argument) as binfmt_script parses a `#!` line: blanks
    around the interpreter skipped, everything after it up to the end of the line (trailing
    blanks cut) is one argument. Stricter than the kernel: the whole line must fit in its
    256-byte buffer, and the interpreter must be an absolute path (a relative one would be
    looked up from the working folder: the container's rootfs)."""
    end = head.find(b"\n")
    if end < 0:
        raise refuse(f"its #! line is longer than {SHEBANG_LIMIT - 1} bytes")
    line = head[2:end].split(b"\0", 1)[0].strip(b" \t")
    cut = next((i for i, byte in enumerate(line) if byte in b" \t"), len(line))
    name, argument = line[:cut], line[cut:].strip(b" \t")
    if not name:
        raise refuse("its #! line names no interpreter")
    interpreter = os.fsdecode(name)
    if not interpreter.startswith("/"):
        raise refuse(f"its interpreter {interpreter!r} is not an absolute path")
    return interpreter, os.fsdecode(argument)


def container_state(raw: bytes, pid: int) -> bytes:
    """The runtime's OCI state with `pid` as the container's own PID namespace numbers it
    (the last NSpid of /proc/<pid>/status: 1 for a container with its own PID namespace)."""
    from cdi_hook import jsonio

    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"NSpid:"):
                    pid = int(line.split()[-1])
                    break
    except OSError as error:
        raise HookError(STEP, "", f"reading the container process's PID in its namespace: {error.strerror}") from None
    doc = jsonio.loads(raw)
    doc["pid"] = pid
    return jsonio.dumps(doc).encode()


def run_programs(programs: list[Program], state: bytes, rootfs_fd: int, ns_fd: int) -> None:
    """In the worker, inside the container's mount namespace: run each hook in order; the
    first failure raises HookError (the worker then undoes its rootfs work)."""
    try:
        syscalls.setns(ns_fd, syscalls.CLONE_NEWPID)
    except OSError as error:
        raise HookError(STEP, programs[0].origin, f"entering the container's PID namespace: {error.strerror}") from None
    for program in programs:
        _run(program, state, rootfs_fd, ns_fd)


def _run(program: Program, state: bytes, rootfs_fd: int, ns_fd: int) -> None:
    stdin_r, stdin_w = os.pipe()
    output_r, output_w = os.pipe()
    error_r, error_w = os.pipe()  # close-on-exec: carries why the exec failed, empty when it happened
    pid = os.fork()
    if pid == 0:  # the hook: never returns
        try:
            _exec(program, ns_fd, rootfs_fd, stdin_r, output_w, error_w)
        except BaseException as error:  # noqa: BLE001 - whatever stops the exec is reported
            os.write(error_w, (getattr(error, "strerror", None) or str(error)).encode("utf-8", "replace"))
        finally:
            os._exit(127)
    for fd in (stdin_r, output_w, error_w):
        os.close(fd)
    try:
        os.setpgid(pid, pid)  # as the child does: a timeout right after fork still finds the group
    except OSError:
        pass
    status, output = _wait(pid, stdin_w, output_r, state, program.timeout)
    with os.fdopen(error_r, "rb") as errors:
        exec_error = errors.read(1000).decode("utf-8", "replace")
    what = f"{STAGE} hook {program.path}"
    if exec_error:
        raise HookError(STEP, program.origin, f"cannot run {what}: {exec_error}")
    if status == "timeout":
        raise HookError(STEP, program.origin, f"{what} timed out after {program.timeout}s "
                                              f"(its process group was killed): {_tail(output)}")
    if status:
        raise HookError(STEP, program.origin, f"{what} failed ({status}): {_tail(output)}")


def _exec(program: Program, ns_fd: int, rootfs_fd: int, stdin_fd: int, output_fd: int, error_fd: int) -> None:
    """In the forked hook process (already in the container's mount and PID namespaces)."""
    import _signal  # the C module: signal would import enum

    syscalls.setns(ns_fd, HOOK_NAMESPACES)
    os.setpgid(0, 0)  # its own process group, so that a timeout kills what it started too
    os.fchdir(rootfs_fd)
    os.dup2(stdin_fd, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    keep = sorted({error_fd, program.exec_fd} | ({program.script_fd} if program.script_fd is not None else set()))
    low = 3
    for fd in keep:  # nothing of the worker's (pipes, pidfd, rootfs and mount fds) reaches the hook
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)
    if program.script_fd is not None:
        os.set_inheritable(program.script_fd, True)  # the interpreter opens it as /dev/fd/N
    os.execve(program.exec_fd, program.argv, program.env)


def _wait(pid: int, stdin_fd: int, output_fd: int, state: bytes, timeout: int | None) -> tuple[str, bytes]:
    """Feed the state, keep the output's tail, reap: ("" on exit 0, "exit status N",
    "signal N" or "timeout"; output). Not subprocess: it would cost its imports."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(output_fd, select.POLLIN)
    os.set_blocking(output_fd, False)
    os.set_blocking(stdin_fd, False)
    poller.register(stdin_fd, select.POLLOUT)
    output = bytearray()
    written = 0
    deadline = time.monotonic() + timeout if timeout else None
    open_fds = {stdin_fd, output_fd}
    try:
        exited = False
        while not exited:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                _kill_group(pid)
                os.waitpid(pid, 0)
                _read_into(output_fd, output)
                return "timeout", bytes(output)
            for fd, _ in poller.poll(None if left is None else int(left * 1000) + 1):
                if fd == pidfd:
                    exited = True
                elif fd == output_fd:
                    if not _read_into(output_fd, output):
                        poller.unregister(output_fd)
                elif fd == stdin_fd:
                    try:
                        written += os.write(stdin_fd, state[written:written + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # the hook closed its stdin or ended: the rest is not wanted
                        written = len(state)
                    if written >= len(state):
                        poller.unregister(stdin_fd)
                        os.close(stdin_fd)
                        open_fds.discard(stdin_fd)
        _read_into(output_fd, output)  # what it wrote before it ended; a child it left may hold the pipe
    finally:
        os.close(pidfd)
        for fd in open_fds:
            os.close(fd)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    return ("" if code == 0 else f"exit status {code}" if code > 0 else f"signal {-code}"), bytes(output)


def _read_into(fd: int, output: bytearray) -> bool:
    """Read what is there now into output (its last KEPT_OUTPUT bytes kept); False at EOF."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        output += chunk
        del output[:-KEPT_OUTPUT]


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, 9)  # SIGKILL
        except ProcessLookupError:
            pass
