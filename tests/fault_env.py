"""Helpers of the fault tests (tests/test_faults*.py): a small tmpfs of the test's own,
filled to the last byte or remounted read-only under what cdi-hook writes; a seccomp
filter that makes chosen syscalls of the hook fail with EIO; the check that a start failed
with one line and left the rootfs and the host's mounts as they were."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

import hook_env
import oci_env
from conftest import require

ALL = f"{hook_env.VENDOR}=all"


@contextlib.contextmanager
def small_tmpfs(where: Path, *, size: str = "64k", full: bool = True, readonly: bool = False):
    """A tmpfs of its own at `where`: filled to the last byte (full) or remounted read-only
    once the caller's files are in (readonly, through the yielded remount function)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "cdi-fault", str(where)], check=True)
    try:
        def fill() -> None:
            fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)

        def make_readonly() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)

        yield fill if full else make_readonly
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


SYSCALLS_X86_64 = {"mknodat": 259, "move_mount": 429, "mount_setattr": 442, "mount": 165, "bpf": 321,
                   "fsync": 74, "rename": 82}

SECCOMP_WRAPPER = r'''
import ctypes, errno, os, struct, sys
# argv: wrapper.py SYSCALL_NR [SYSCALL_NR...] -- program args...
split = sys.argv.index("--")
numbers = [int(n) for n in sys.argv[1:split]]
program = sys.argv[split + 1:]
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
code = [(BPF_LD_W_ABS, 0, 0, 0)]  # the syscall number
for number in numbers:
    code += [(BPF_JEQ_K, 0, 1, number), (BPF_RET_K, 0, 0, ERRNO | errno.EIO)]
code.append((BPF_RET_K, 0, 0, ALLOW))
raw = b"".join(struct.pack("HBBI", *insn) for insn in code)
buffer = ctypes.create_string_buffer(raw)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(len(code), ctypes.addressof(buffer))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
    sys.exit("cannot install the seccomp filter: " + os.strerror(ctypes.get_errno()))
os.execv(program[0], program)
'''


def failing_syscalls(tmp_path: Path, names: list[str]) -> list[str]:
    """The command prefix that runs a program under a filter failing `names` with EIO."""
    require(platform.machine() == "x86_64", "the seccomp fault filter knows x86_64 syscall numbers only")
    wrapper = tmp_path / "seccomp_wrapper.py"
    wrapper.write_text(SECCOMP_WRAPPER)
    return [oci_env.PYTHON, "-I", str(wrapper), *[str(SYSCALLS_X86_64[n]) for n in names], "--"]


def with_failing_syscalls(bundle: Path, tmp_path: Path, names: list[str]) -> None:
    """Rewrite the bundle's cdi-hook entry to run under a filter failing `names` with EIO."""
    prefix = failing_syscalls(tmp_path, names)
    config = json.loads((bundle / "config.json").read_text())
    for entries in config["hooks"].values():
        for entry in entries:
            entry["args"] = [*prefix, *entry["args"]]
    (bundle / "config.json").write_text(json.dumps(config))


def run_and_check(tmp_path: Path, bundle: Path, rootfs: Path, step: str, extra: str = "", run=None,
                   device: str = ALL) -> str:
    before = oci_env.tree_snapshot(rootfs)
    mounts_before = oci_env.host_mount_points()
    result = (run or oci_env.run_container)(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = next((x for x in result.stderr.splitlines() if x.startswith("cdi-hook")), result.stderr)
    assert f"{step} for {device}" in line or (step in line and device in line), result.stderr
    assert extra in result.stderr, result.stderr
    after = oci_env.tree_snapshot(rootfs)
    assert after == before, {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                             if before.get(k) != after.get(k)}
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    return result.stderr
