"""A hostile image: every place the hook writes to is a symlink to the host.

Each case plants one kind of link in an otherwise normal glibc-like rootfs: /dev, a library
folder, /etc, /etc/ld.so.conf.d, /etc/ld.so.cache and a mount target's parent, pointing at a
host sentinel folder by an absolute path, a `..` chain or /proc/self/root. The spec asks for
nodes, file/dir/library mounts (so ldconfig runs). Whatever the outcome (the container runs
with everything inside its rootfs, or the hook refuses), the sentinel is unchanged entry by
entry (types, modes, owners, contents, link targets), no mount appeared on the host, and no
traceback was printed. tests/test_hook_symlinks.py checks the successful cases' placement.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import hook_env
import oci_env

ALL = f"{hook_env.VENDOR}=all"
UP = "../" * 16  # more `..` than the rootfs is deep: the kernel would reach / on the host


def _sentinel(tmp_path: Path) -> Path:
    sentinel = tmp_path / "sentinel"
    for sub in ("dev", "lib", "etc/ld.so.conf.d", "mnt"):
        (sentinel / sub).mkdir(parents=True)
    (sentinel / "etc" / "ld.so.conf").write_text("# host decoy: include /etc/ld.so.conf.d/*.conf\n")
    (sentinel / "etc" / "ld.so.cache").write_bytes(b"host cache, never to be replaced")
    (sentinel / "etc" / "ld.so.conf.d" / "host.conf").write_text("/host/only\n")
    (sentinel / "dev" / "keep").write_text("host dev\n")
    (sentinel / "lib" / "libhost.so.1").write_bytes(b"\x7fELF host library")
    os.chmod(sentinel / "lib", 0o750)
    return sentinel


def _link(rootfs: Path, inside: str, target: str) -> None:
    path = rootfs / inside.lstrip("/")
    if path.is_dir() and not path.is_symlink():
        os.rename(path, str(path) + ".image")
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def _absolute(host: Path) -> str:
    return str(host)


def _dotdot(host: Path) -> str:
    return UP + str(host).lstrip("/")


def _proc_root(host: Path) -> str:
    return "/proc/self/root" + str(host)


# (case id, path in the image, host sub path of the sentinel, how the link is spelled)
CASES = [
    ("dev-absolute", "/dev", "dev", _absolute),
    ("dev-dotdot", "/dev", "dev", _dotdot),
    ("libdir-absolute", "/usr/lib", "lib", _absolute),
    ("libdir-proc-root", "/usr/lib", "lib", _proc_root),
    ("libdir-dotdot", "/usr/lib", "lib", _dotdot),
    ("etc-dotdot", "/etc", "etc", _dotdot),
    ("etc-proc-root", "/etc", "etc", _proc_root),
    ("confdir-absolute", "/etc/ld.so.conf.d", "etc/ld.so.conf.d", _absolute),
    ("confdir-proc-root", "/etc/ld.so.conf.d", "etc/ld.so.conf.d", _proc_root),
    ("cache-absolute", "/etc/ld.so.cache", "etc/ld.so.cache", _absolute),
    ("cache-dotdot", "/etc/ld.so.cache", "etc/ld.so.cache", _dotdot),
    ("mount-target-absolute", "/mnt/data", "mnt", _absolute),
    ("mount-target-proc-root", "/mnt/data", "mnt", _proc_root),
    ("mount-target-dotdot", "/mnt/data", "mnt", _dotdot),
    ("node-parent-absolute", "/opt/devs", "dev", _absolute),
]


def _spec(sources: dict) -> dict:
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-zero", "hostPath": "/dev/zero"},
                        {"path": "/opt/devs/cdi-null", "hostPath": "/dev/null"},
                        {"path": "/dev/kvm", "fileMode": 0o600}],
        "mounts": [
            {"hostPath": sources["library"], "containerPath": "/usr/lib/cdi/libz.so.1", "options": ["ro", "bind"]},
            {"hostPath": sources["dir"], "containerPath": "/mnt/data/target", "options": ["ro", "rbind"]},
            {"hostPath": sources["file"], "containerPath": "/etc/cdi-config.txt", "options": ["ro", "bind"]},
            {"hostPath": "tmpfs", "containerPath": "/mnt/data/tmp", "type": "tmpfs", "options": ["size=1m"]},
        ]}}]}


def _delta(before: dict, after: dict) -> dict:
    return {key: (before.get(key), after.get(key)) for key in before.keys() | after.keys()
            if before.get(key) != after.get(key)}


def _attack(tmp_path: Path, case, devices: list[str]):
    """Run the case's container once; (what changed under the sentinel, runc's result)."""
    _, inside, host_sub, spell = case
    sentinel = _sentinel(tmp_path)
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "mnt").mkdir(exist_ok=True)
    (rootfs / "mnt" / "data").mkdir()
    _link(rootfs, inside, spell(sentinel / host_sub))
    before = oci_env.tree_snapshot(sentinel)
    mounts_before = oci_env.host_mount_points()

    sources = hook_env.host_files(tmp_path)
    script = "test -c /dev/cdi-zero && test -f /usr/lib/cdi/libz.so.1 && cat /mnt/data/target/hello && echo SEEN"
    bundle, _ = hook_env.bundle_with_hook(tmp_path, _spec(sources), devices, script, rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    assert not any(str(sentinel) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return _delta(before, oci_env.tree_snapshot(sentinel)), result


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_link_never_reaches_the_host(runc, tmp_path, case):
    # The same image without a device request: what runc itself does to the host through the
    # link (runc 1.1 creates its /dev/fd, /dev/std* links through an image's /dev symlink).
    runtime_only, control = _attack(tmp_path / "control", case, [])
    changed, result = _attack(tmp_path / "attack", case, [ALL])

    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert "SEEN" in result.stdout, result.stdout + result.stderr
    else:
        assert "cdi-hook" in result.stderr or "error running hook" in result.stderr, result.stderr
    assert changed == runtime_only, "cdi-hook changed a host path outside the rootfs"
