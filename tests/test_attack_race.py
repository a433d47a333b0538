"""A race: while the hook works, a path in the rootfs flips between a folder and a host link.

CVE-2024-0132 was a time-of-check/time-of-use race: a hook checked a path in the rootfs,
the image swapped it for a symlink to the host, and the hook mounted over a host path. Here
two processes swap /mnt/race and /etc/ld.so.conf.d each with a symlink to a host sentinel
folder (renameat2 RENAME_EXCHANGE, atomically, in a tight loop) for the whole life of many
containers whose spec puts nodes, bind mounts and a library (so a conf file and ldconfig)
under them. Containers may start or be refused, whichever the
race gives; the host sentinel never changes and no mount ever appears on the host.
"""

from __future__ import annotations

import subprocess
import sys
import time

import hook_env
import oci_env
from ci_rules import TIME_FACTOR

ALL = f"{hook_env.VENDOR}=all"
BUDGET_S = 30 * TIME_FACTOR  # wall time for the repeated containers
MAX_RUNS = 60

FLIPPER = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE, AT_FDCWD, SYS_renameat2 = 2, -100, 316
a, b = sys.argv[1].encode(), sys.argv[2].encode()
print("flipping", flush=True)
flips = 0
while True:
    libc.syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    flips += 1
'''


def test_flipping_folder_never_lets_the_hook_reach_the_host(runc, tmp_path):
    sentinel = tmp_path / "sentinel"
    (sentinel / "lib").mkdir(parents=True)
    (sentinel / "marker").write_text("host\n")
    (sentinel / "conf").mkdir()
    (sentinel / "conf" / "host.conf").write_text("/host/only\n")
    before = oci_env.tree_snapshot(sentinel)
    mounts_before = oci_env.host_mount_points()

    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "mnt").mkdir(exist_ok=True)
    (rootfs / "mnt" / "race").mkdir()
    (rootfs / "mnt" / "race.alt").symlink_to(sentinel)  # absolute: the host folder, to the kernel
    (rootfs / "etc" / "ld.so.conf.d").mkdir()  # where the hook writes its conf file, flipped too
    (rootfs / "etc" / "ld.so.conf.d.alt").symlink_to("../" * 12 + str(sentinel / "conf").lstrip("/"))
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/mnt/race/dev/zero", "hostPath": "/dev/zero"},
                        {"path": "/mnt/race/kvm", "hostPath": "/dev/kvm"}],
        "mounts": [{"hostPath": sources["dir"], "containerPath": "/mnt/race/target", "options": ["ro", "rbind"]},
                   {"hostPath": sources["file"], "containerPath": "/mnt/race/config.txt", "options": ["ro", "bind"]},
                   {"hostPath": sources["library"], "containerPath": "/mnt/race/lib/libz.so.1",
                    "options": ["ro", "bind"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)

    flippers = [subprocess.Popen([sys.executable, "-c", FLIPPER, str(rootfs / folder), str(rootfs / folder) + ".alt"],
                                 stdout=subprocess.PIPE, text=True) for folder in ("mnt/race", "etc/ld.so.conf.d")]
    outcomes = {"started": 0, "refused": 0}
    try:
        assert all(flipper.stdout.readline().strip() == "flipping" for flipper in flippers)
        deadline = time.monotonic() + BUDGET_S
        runs = 0
        while runs < MAX_RUNS and time.monotonic() < deadline:
            runs += 1
            result = oci_env.run_container(bundle)
            assert "Traceback" not in result.stderr, result.stderr
            outcomes["started" if result.returncode == 0 else "refused"] += 1
            assert all(flipper.poll() is None for flipper in flippers), "a flipper stopped"
            assert oci_env.tree_snapshot(sentinel) == before, f"run {runs}: a host path changed"
            assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    finally:
        for flipper in flippers:
            flipper.kill()
            flipper.wait()
    assert runs >= 10, f"only {runs} containers in {BUDGET_S}s"
    print(f"race: {runs} containers, {outcomes}")
