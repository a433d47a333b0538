"""The image's environment and files never reach the hook's interpreter, ldconfig or a spec hook.

CVE-2025-23266 was a hook that inherited LD_PRELOAD from the image's config; CVE-2025-23267
an ldconfig that ran with the image's loader. Here the container's process.env carries
LD_PRELOAD, LD_LIBRARY_PATH, PYTHONPATH, PYTHONHOME and PATH pointing into the image, which
also holds an /etc/ld.so.preload, a sitecustomize.py and a library to preload; a spec hook
reports its own environment and mapped files and those of its parent (the hook's Python).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import hook_env
import oci_env
from conftest import require_root
from cdi_hook.live import ldcache

ALL = f"{hook_env.VENDOR}=all"
HOSTILE = ("LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "evil")


def _hostile_rootfs(path: Path) -> Path:
    rootfs = hook_env.glibc_like_rootfs(path)
    shutil.copy(os.path.realpath(hook_env.LIBRARY_SOURCE), rootfs / "evil.so")
    (rootfs / "etc" / "ld.so.preload").write_text("/evil.so\n")
    (rootfs / "evilpy").mkdir()
    (rootfs / "evilpy" / "sitecustomize.py").write_text("open('/tmp/cdi-evil-ran', 'w').write('ran')\n")
    (rootfs / "evilbin").mkdir()
    return rootfs


def test_image_environment_never_reaches_hook_ldconfig_or_spec_hook(runc, tmp_path):
    rootfs = _hostile_rootfs(tmp_path / "bundle" / "rootfs")
    report = tmp_path / "spec-hook.report"
    script = tmp_path / "report.sh"
    script.write_text("#!/bin/sh\n"
                      f"{{ echo ENV; env; echo MAPS; cat /proc/self/maps; echo PARENT-ENV;"
                      f" tr '\\0' '\\n' < /proc/$PPID/environ; echo PARENT-MAPS; cat /proc/$PPID/maps; }} > {report}\n")
    script.chmod(0o755)
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": sources["library"], "containerPath": "/opt/lib/libz.so.1", "options": ["ro", "bind"]}],
        "hooks": [{"hookName": "createRuntime", "path": str(script), "env": ["SPEC=1"]}]}}]}
    # The hook entry (the runtime's, trusted) also names a PYTHONPATH into the image: -I ignores it.
    bundle, log_file = hook_env.bundle_with_hook(
        tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs,
        extra_env={"PYTHONPATH": str(rootfs / "evilpy"), "PYTHONHOME": str(rootfs / "evilpy")})
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["env"] = ["LD_PRELOAD=/evil.so", "LD_LIBRARY_PATH=/evilbin", "PYTHONPATH=/evilpy",
                                "PYTHONHOME=/evilpy", "PATH=/evilbin:/bin"]
    (bundle / "config.json").write_text(json.dumps(config))
    Path("/tmp/cdi-evil-ran").unlink(missing_ok=True)

    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
    text = report.read_text()
    own_env = text.split("ENV\n", 1)[1].split("MAPS\n", 1)[0]
    assert "SPEC=1" in own_env
    for word in HOSTILE + ("/evilbin",):
        assert word not in own_env, f"{word} reached the spec hook"
    maps = text.split("MAPS\n", 1)[1].split("PARENT-ENV\n", 1)[0] + text.split("PARENT-MAPS\n", 1)[1]
    assert str(rootfs) not in maps and "evil" not in maps, "a file of the image is mapped by the hook or spec hook"
    parent_env = text.split("PARENT-ENV\n", 1)[1].split("PARENT-MAPS\n", 1)[0]
    for word in ("LD_PRELOAD", "LD_LIBRARY_PATH", "/evilbin"):
        assert word not in parent_env, f"{word} reached the hook"
    assert not Path("/tmp/cdi-evil-ran").exists(), "the hook's interpreter ran the image's sitecustomize.py"
    # ldconfig ran (the library is in the image's cache) and did not preload the image's library
    cache = subprocess.run(["ldconfig", "-C", str(rootfs / "etc/ld.so.cache"), "-p"],
                           capture_output=True, text=True, check=True).stdout
    assert "/opt/lib/libz.so.1" in cache


def test_ldconfig_runs_with_an_empty_environment(tmp_path, monkeypatch):
    """The chrooted runner gives the program nothing of ours: busybox (static) `env` prints nothing."""
    require_root()
    rootfs = _hostile_rootfs(tmp_path / "rootfs")
    for name, value in (("LD_PRELOAD", "/evil.so"), ("LD_LIBRARY_PATH", "/evilbin"), ("PYTHONPATH", "/evilpy")):
        monkeypatch.setenv(name, value)
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY)
    program_fd = os.open(rootfs / "bin" / "busybox", os.O_PATH)
    try:
        status, output = ldcache._run_chrooted(root_fd, program_fd, ["env"])
    finally:
        os.close(root_fd)
        os.close(program_fd)
    assert (status, output) == ("0", "")


def test_only_a_static_ldconfig_is_run(monkeypatch):
    """A dynamic ldconfig chrooted into the image would load the image's loader and libc."""
    for path, static in (("/sbin/ldconfig", True), ("/bin/busybox", True), ("/bin/ls", False),
                         ("/etc/passwd", False), ("/bin/sh", False)):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert ldcache.is_static_elf(fd) is static, path
        finally:
            os.close(fd)
    monkeypatch.setattr(ldcache, "HOST_LDCONFIG", ("/bin/ls", "/no/such/ldconfig"))
    assert ldcache.open_host_ldconfig() is None
    monkeypatch.setattr(ldcache, "HOST_LDCONFIG", ("/bin/ls", "/sbin/ldconfig"))
    fd = ldcache.open_host_ldconfig()
    assert fd is not None and os.path.samestat(os.fstat(fd), os.stat("/sbin/ldconfig"))
    os.close(fd)


def test_ldconfig_runner_confinement():
    """What _confine leaves a program: no_new_privs and a bounding set of the three capabilities ldconfig needs."""
    require_root()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import resource

            ldcache._confine()  # through ctypes: nothing imported in the container's namespace
            with open("/proc/self/status") as status:
                limits = [resource.getrlimit(r) for r in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_CORE)]
                os.write(write_end, (status.read() + f"Limits:\t{limits}\n").encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        status = dict(line.split(":\t", 1) for line in reader.read().splitlines() if ":\t" in line)
    os.waitpid(pid, 0)
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapBnd"], 16) == (1 << 1) | (1 << 2) | (1 << 3)  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
    cpu, memory = ldcache.CPU_LIMIT_S, ldcache.MEMORY_LIMIT
    assert status["Limits"].strip() == str([(cpu, cpu), (memory, memory), (0, 0)])
