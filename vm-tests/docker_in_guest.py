"""Docker 26 (Debian 13's docker.io) with examples/runc-cdi as a runtime, against Docker's
own CDI as a native oracle (issue 24).

Run in the QEMU guest: `vm-tests/qemu/run -- vm-tests/docker_in_guest.py` (the Debian 13
guest image carries docker.io, its docker.service masked). Not collected by vm-tests/run
(the name is not test_*.py): CI's machine is Debian 12, whose docker.io 20.10 has neither
`--annotation` nor CDI, so the test could only fail there.

It starts a dockerd of its own (data root, exec root, pid file, socket and daemon.json in a
temp dir; no bridge, no iptables; cgroupfs) whose daemon.json names
  runtimes       {"runc-cdi": {"path": a wrapper that sets what runc-cdi and cdi-hook read
                 (CDI_HOOK, CDI_SPEC_DIRS, the session's log and cache) and execs
                 <checkout>/examples/runc-cdi: Docker runs a runtime's path with the shim's
                 environment, not dockerd's}}
  features       {"cdi": true}, and cdi-spec-dirs: the test's spec dir
The image is a busybox rootfs `docker import`ed. test_differential's scenarios run two ways:
  docker-native    docker run --device vendor/class=name             (Docker's CDI: the reference)
  docker-runc-cdi  docker run --runtime runc-cdi --annotation cdi.k8s.io/...=name
                   (cdi-hook precreate edits config.json before runc: env and groups too)
and the second must see what the first sees, but for ALLOWED_DIFFERENCES' node mode rule
(a node without fileMode: Docker's CDI library predates 1.1.0). Afterwards the containers,
the image, dockerd and its containerd are gone, nothing is mounted under the temp dir.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

import test_differential as diff
from ci_rules import TIME_FACTOR, require
from oci_env import REPO, host_mount_points, make_rootfs

IMAGE = "localhost/cdi-difftest-busybox:latest"
WAYS = ("docker-native", "docker-runc-cdi")


class Dockerd:
    def __init__(self, top: Path, spec_dir: Path):
        self.top = top
        self.socket = top / "docker.sock"
        # Docker runs a runtime's path in containerd's shim with an environment of its own, not
        # dockerd's (seen: "runc-cdi: 53: cdi-hook: not found"), so what runc-cdi and cdi-hook
        # read is set by a wrapper, as on a node (or cdi-hook on PATH and the default spec dirs).
        runtime = top / "runc-cdi"
        settings = {**{k: v for k, v in os.environ.items() if k.startswith("CDI_")},
                    "CDI_HOOK": str(REPO / ".venv" / "bin" / "cdi-hook"), "CDI_SPEC_DIRS": str(spec_dir)}
        runtime.write_text("#!/bin/sh\n" + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(settings.items()))
                           + f"exec {shlex.quote(str(REPO / 'examples' / 'runc-cdi'))} \"$@\"\n")
        runtime.chmod(0o755)
        config = top / "daemon.json"
        config.write_text(json.dumps({
            "runtimes": {"runc-cdi": {"path": str(runtime)}},
            "features": {"cdi": True}, "cdi-spec-dirs": [str(spec_dir)],
            "exec-opts": ["native.cgroupdriver=cgroupfs"], "bridge": "none", "iptables": False,
            "ip6tables": False, "storage-driver": "overlay2"}))
        self.log = open(top / "dockerd.log", "w")
        self.process = subprocess.Popen(
            ["dockerd", "--config-file", str(config), "--data-root", str(top / "data"), "--exec-root",
             str(top / "exec"), "--pidfile", str(top / "dockerd.pid"), "-H", f"unix://{self.socket}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120 * TIME_FACTOR
        while self.docker("version").returncode != 0:
            assert self.process.poll() is None, (top / "dockerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dockerd did not answer in time"
            time.sleep(0.5)

    def docker(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", f"unix://{self.socket}", *args], capture_output=True, text=True,
                              timeout=int(300 * TIME_FACTOR), **kw)

    def stop(self) -> list[str]:
        self.docker("rm", "--force", *self.docker("ps", "-aq").stdout.split())
        self.docker("rmi", "--force", IMAGE)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        left = [m for m in host_mount_points() if m.startswith(str(self.top))]
        for mount in reversed(left):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        return left


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("dockerd") is not None and shutil.which("docker") is not None,
            "needs docker.io (Debian 13: the QEMU guest image has it)")
    version = subprocess.run(["dockerd", "--version"], capture_output=True, text=True).stdout
    require((diff.runtime_versions.parse_version(version) or (0,)) >= (25,),
            f"needs Docker >= 25 (CDI, --annotation): {version.strip() or 'no dockerd --version'}")
    top = tmp_path_factory.mktemp("docker")
    spec_dir = top / "cdi"
    spec_dir.mkdir(mode=0o755)
    data = top / "data-files"
    diff.make_data(data)
    kvm = diff.host_nodes()
    rootfs = make_rootfs(top / "rootfs")
    tar = top / "rootfs.tar"
    with tarfile.open(tar, "w") as out:
        out.add(rootfs, arcname=".")
    daemon = Dockerd(top, spec_dir)
    left: list[str] = []
    try:
        imported = daemon.docker("import", str(tar), IMAGE)
        assert imported.returncode == 0, imported.stderr
        term = daemon.docker("run", "--rm", "--network", "none", IMAGE, "sh", "-c", 'echo "${TERM-<unset>}"')
        assert term.returncode == 0, term.stderr
        diff.RUNTIME_ENV["docker"] = {"TERM": term.stdout.strip()}
        yield daemon, spec_dir, data, kvm, version.strip()
    finally:
        left = daemon.stop()
        if kvm != "/dev/kvm":
            os.unlink(kvm)
        shutil.rmtree(top, ignore_errors=True)
    assert left == [], f"dockerd left mounts: {left}"


def _run(daemon: Dockerd, way: str, scenario: diff.Scenario) -> subprocess.CompletedProcess:
    argv = ["run", "--rm", "--network", "none"]
    if scenario.user:
        argv += ["--user", "%d:%d" % scenario.user]
    if way == "docker-native":
        for name in scenario.devices:
            argv += ["--device", name]
    else:
        argv += ["--runtime", "runc-cdi"]
        for i, name in enumerate(scenario.devices):
            argv += ["--annotation", f"cdi.k8s.io/difftest{i}={name}"]
    return daemon.docker(*argv, IMAGE, "sh", "-c", diff.PROBE, "probe", *scenario.probe_args())


@pytest.mark.parametrize("name", diff.SCENARIO_NAMES)
def test_runc_cdi_same_as_docker_native_cdi(docker, name, findings):
    daemon, spec_dir, data, kvm, version = docker
    scenario = next(s for s in diff.scenarios(data, kvm) if s.name == name)
    written, results, failures = [], {}, []
    try:
        for i, doc in enumerate(scenario.specs):
            path = spec_dir / f"difftest-{name}-{i}.json"
            path.write_text(json.dumps(doc, indent=2))
            path.chmod(0o644)
            written.append(path)
        for way in WAYS:
            run = _run(daemon, way, scenario)
            if run.returncode != 0:
                failures.append(f"{way}: exit {run.returncode}: {run.stderr.strip()[-2000:]}")
                continue
            results[way] = diff.parse_probe(run.stdout)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    assert not failures, "\n".join(failures)
    reference = results["docker-native"]
    assert all(not v.startswith("missing") for k, v in reference.items() if k.startswith("node:")), reference
    ctx = diff.Context(scenario, native_fills_file_mode=False)
    unexplained, allowed = diff.compare(reference, results["docker-runc-cdi"], "docker-runc-cdi", ctx,
                                        "docker-native")
    findings += [(name, *difference) for difference in allowed]
    assert not unexplained, f"runc-cdi under {version} differs from Docker's native CDI:\n" + "\n".join(unexplained)


def test_runc_cdi_refusal_reaches_docker_run(docker):
    """A device no spec names: runc-cdi's one line (cdi-hook precreate's) reaches `docker run`."""
    daemon, *_ = docker
    run = daemon.docker("run", "--rm", "--network", "none", "--runtime", "runc-cdi", "--annotation",
                        f"cdi.k8s.io/x={diff.VENDOR}/nodes=nope", IMAGE, "true")
    assert run.returncode != 0
    assert f"{diff.VENDOR}/nodes=nope" in run.stderr, run.stderr
