"""A hostile rootfs: symlinks to host paths must resolve inside the rootfs, as runc resolves them.

The image links /usr/lib, /etc, /opt and a mount target's parent to a sentinel folder of the
host (absolute links and ../.. chains). After the hook ran, the sentinel is byte-for-byte
unchanged and everything the spec asked for is inside the rootfs, where the container sees it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import hook_env
import oci_env

ALL = f"{hook_env.VENDOR}=all"


def _snapshot(root: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else path.read_bytes()
    return found


def test_symlinks_in_the_rootfs_never_reach_the_host(runc, tmp_path):
    sentinel = tmp_path / "sentinel"
    for sub in ("lib", "etc", "opt", "mnt"):
        (sentinel / sub).mkdir(parents=True)
    (sentinel / "etc" / "ld.so.conf").write_text("# host decoy\n")
    (sentinel / "marker").write_text("untouched\n")
    before = _snapshot(sentinel)

    rootfs = oci_env.make_rootfs(tmp_path / "bundle" / "rootfs")
    depth = "../" * 12
    (rootfs / "usr").mkdir()
    (rootfs / "usr" / "lib").symlink_to(sentinel / "lib")  # absolute host path
    os.rename(rootfs / "etc", rootfs / "etc.real")
    (rootfs / "etc").symlink_to(depth + str(sentinel / "etc").lstrip("/"))  # ../.. chain
    (rootfs / "opt").symlink_to(sentinel / "opt")
    (rootfs / "mnt").mkdir(exist_ok=True)
    (rootfs / "mnt" / "data").symlink_to("../../../.." + str(sentinel / "mnt"))
    # What those links mean inside the rootfs: there the image keeps its real /etc.
    inside_etc = rootfs / str(sentinel / "etc").lstrip("/")
    inside_etc.parent.mkdir(parents=True)
    os.rename(rootfs / "etc.real", inside_etc)
    (inside_etc / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")

    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/opt/devs/cdi-zero", "hostPath": "/dev/zero"}],
        "mounts": [
            {"hostPath": sources["library"], "containerPath": "/usr/lib/cdi/libz.so.1", "options": ["ro", "bind"]},
            {"hostPath": sources["dir"], "containerPath": "/mnt/data/target", "options": ["ro", "rbind"]},
            {"hostPath": sources["file"], "containerPath": "/etc/cdi-config.txt", "options": ["ro", "bind"]},
        ]}}]}
    script = "\n".join([
        "test -c /opt/devs/cdi-zero && echo NODE",
        "test -f /usr/lib/cdi/libz.so.1 && echo LIB",
        "cat /mnt/data/target/hello",
        "cat /etc/cdi-config.txt",
        "cat /etc/ld.so.conf.d/00-cdi-hook.conf",
    ])
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script, rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    for expected in ("NODE", "LIB", "hello from the host", "read-only config", "/usr/lib/cdi"):
        assert expected in result.stdout, result.stdout + result.stderr

    assert _snapshot(sentinel) == before  # nothing created, written or mounted on the host
    assert not any(line.split()[4].startswith(str(sentinel)) for line in
                   Path("/proc/self/mountinfo").read_text().splitlines())
    inside = rootfs / str(sentinel).lstrip("/")
    assert (inside / "lib" / "cdi" / "libz.so.1").is_file()  # the mount point, left in the rootfs
    assert (inside / "mnt" / "target").is_dir()
    assert (inside_etc / "ld.so.conf.d" / "00-cdi-hook.conf").is_file()
    cache = subprocess.run(["ldconfig", "-C", str(inside_etc / "ld.so.cache"), "-p"],
                           capture_output=True, text=True, check=True).stdout
    assert "=> /usr/lib/cdi/libz.so.1" in cache


def test_symlinked_conf_file_is_replaced_never_followed(runc, tmp_path):
    """An image whose ld.so.conf.d/00-cdi-hook.conf is a symlink to a host file: the hook
    renames its own file over the link; the host file is never opened."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "target.conf").write_text("host file\n")
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "etc" / "ld.so.conf.d").mkdir()
    (rootfs / "etc" / "ld.so.conf.d" / "00-cdi-hook.conf").symlink_to(sentinel / "target.conf")
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": sources["library"], "containerPath": "/opt/new/libz.so.1", "options": ["bind"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "cat /etc/ld.so.conf.d/00-cdi-hook.conf", rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and "/opt/new" in result.stdout, result.stderr
    assert (sentinel / "target.conf").read_text() == "host file\n"
    assert not (rootfs / "etc" / "ld.so.conf.d" / "00-cdi-hook.conf").is_symlink()
