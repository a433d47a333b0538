"""Helpers shared by the live-hook tests: a spec over safe host devices, a bundle with the hook."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import oci_env

VENDOR = "test.cdi-hook.io/dev"
LIBRARY_SOURCE = "/lib/x86_64-linux-gnu/libz.so.1"  # a small real shared library of the host
LIB_DIR_IN_CONTAINER = "/opt/cdi-libs"


def glibc_like_rootfs(path: Path) -> Path:
    """busybox rootfs plus an etc/ld.so.conf, so the hook treats it as a glibc image."""
    oci_env.make_rootfs(path)
    (path / "etc" / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    return path


def host_files(tmp_path: Path) -> dict:
    """Host-side sources for the spec's mounts: a file, a directory and a library."""
    src = tmp_path / "host"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "hello").write_text("hello from the host\n")
    (src / "config.txt").write_text("read-only config\n")
    real = os.path.realpath(LIBRARY_SOURCE)
    library = src / os.path.basename(LIBRARY_SOURCE)
    shutil.copy(real, library)
    return {"file": str(src / "config.txt"), "dir": str(src / "dir"), "library": str(library)}


def full_spec(sources: dict) -> dict:
    """One device 'all' with every kind of edit, one device 'other' never requested."""
    return {
        "cdiVersion": "0.6.0",
        "kind": VENDOR,
        "devices": [
            {"name": "all", "containerEdits": {
                "deviceNodes": [
                    {"path": "/dev/kvm", "fileMode": 0o640, "uid": 1234, "gid": 44},
                    {"path": "/dev/loop0"},
                    {"path": "/dev/null"},
                    {"path": "/dev/cdi/nested/zero", "hostPath": "/dev/zero", "permissions": "rw"},
                ],
                "mounts": [
                    {"hostPath": sources["file"], "containerPath": "/etc/cdi-config.txt",
                     "options": ["ro", "nosuid", "nodev", "bind"]},
                    {"hostPath": sources["dir"], "containerPath": "/mnt/cdi-dir", "options": ["rw", "rbind"]},
                    {"hostPath": sources["library"],
                     "containerPath": LIB_DIR_IN_CONTAINER + "/" + os.path.basename(sources["library"]),
                     "options": ["ro", "nosuid", "nodev", "bind"]},
                    {"hostPath": "tmpfs", "containerPath": "/run/cdi-tmp", "type": "tmpfs",
                     "options": ["nosuid", "noexec", "size=1m", "mode=750"]},
                ],
            }},
            {"name": "other", "containerEdits": {"deviceNodes": [{"path": "/dev/loop1"}]}},
        ],
    }


def bundle_with_hook(tmp_path: Path, spec: dict | None, devices: list[str], script: str, *,
                     rootfs: Path | None = None, stage: str = "createRuntime", extra_env: dict | None = None,
                     **bundle_args) -> tuple[Path, Path]:
    """A bundle running `sh -c script` whose createRuntime hook is cdi-hook; (bundle, log file)."""
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir(exist_ok=True)
    if spec is not None:
        oci_env.write_spec(spec_dir, "test.json", spec)
    log_file = tmp_path / "cdi-hook.log"
    bundle = tmp_path / "bundle"
    if rootfs is None:
        rootfs = glibc_like_rootfs(bundle / "rootfs")
    annotations = {"cdi.k8s.io/test": ",".join(devices)} if devices else {}
    annotations.update(bundle_args.pop("annotations", {}) or {})
    process_user = bundle_args.pop("process_user", None)
    hooks = {stage: [oci_env.hook_entry([str(spec_dir)], stage=stage, log_file=str(log_file),
                                        extra_env=extra_env)]}
    oci_env.make_bundle(bundle, ["sh", "-c", script], rootfs=rootfs, annotations=annotations,
                        hooks=hooks, **bundle_args)
    if process_user is not None:
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["user"] = {"uid": process_user[0], "gid": process_user[1]}
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle, log_file


def log_lines(log_file: Path) -> list[dict]:
    if not log_file.exists():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
