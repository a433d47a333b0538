"""`cdi-hook doctor`: every check against a node laid out in temp dirs (--config-root holds
the containers.conf and crio.conf it reads; CONTAINERS_CONF points the real Podman at the
same containers.conf for --probe), never the host's /etc.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import oci_env
from cdi_hook import cache, probe_spec, state
from cdi_hook.cli import main
from cdi_hook.commands import install
from cdi_hook.errors import ResolveError
from cdi_hook.registry import Registry
from conftest import require, require_program, require_root

SPEC = {"cdiVersion": "0.5.0", "kind": "doctor-test.example.com/dev",
        "devices": [{"name": "null", "containerEdits": {"deviceNodes": [{"path": "/dev/x-null", "hostPath": "/dev/null"}]}}]}


class Node:
    """A config root (etc/containers/containers.conf and etc/crio/crio.conf.d naming `hooks`),
    a hooks dir and a spec dir, all under tmp_path."""

    def __init__(self, tmp_path, monkeypatch):
        self.root = tmp_path / "root"
        self.hooks = tmp_path / "hooks"
        self.specs = tmp_path / "specs"
        self.specs.mkdir(mode=0o755)
        os.chmod(self.specs, 0o755)
        self.containers_conf = self.root / "etc/containers/containers.conf"
        self.write_conf(self.hooks)
        monkeypatch.setenv("CONTAINERS_CONF", str(self.containers_conf))
        monkeypatch.delenv("CDI_SPEC_DIRS", raising=False)
        monkeypatch.delenv("CDI_HOOK_POLICY", raising=False)
        monkeypatch.delenv("CDI_HOOK_INSECURE_SPECS", raising=False)

    def write_conf(self, hooks_dir) -> None:
        self.containers_conf.parent.mkdir(parents=True, exist_ok=True)
        self.containers_conf.write_text(f'[engine]\nhooks_dir = ["{hooks_dir}"]\n')
        crio = self.root / "etc/crio/crio.conf.d"
        crio.mkdir(parents=True, exist_ok=True)
        (crio / "50-cdi-hook.conf").write_text(f'[crio.runtime]\nhooks_dir = ["{hooks_dir}"]\n')

    def install(self, mode="hook", hooks_dir=None, python=None):
        install.install(str(hooks_dir or self.hooks), mode, python=python, spec_dirs=[str(self.specs)],
                        out=io.StringIO())

    def write_files(self, mode, python, hooks_dir=None):
        """What install writes, without install's interpreter check (a broken install)."""
        directory = hooks_dir or self.hooks
        directory.mkdir(exist_ok=True)
        for name, definition in install.hook_definitions(mode, python, [str(self.specs)]).items():
            (directory / name).write_bytes(install.render(definition))

    def doctor(self, *extra, capsys) -> tuple[int, list[dict]]:
        capsys.readouterr()
        code = main(["doctor", "--config-root", str(self.root), "--format", "json", *extra])
        return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def node(tmp_path, monkeypatch):
    require_root()
    return Node(tmp_path, monkeypatch)


def find(findings, check_prefix, status=None):
    found = [f for f in findings if f["check"] == check_prefix and (status is None or f["status"] == status)]
    assert found, f"no {status or ''} finding {check_prefix!r} in {json.dumps(findings, indent=1)}"
    return found


def statuses(findings) -> set[str]:
    return {f["status"] for f in findings}


def test_healthy_install_passes(node, capsys):
    node.install("hook")
    (node.specs / "dev.json").write_text(json.dumps(SPEC))
    code, findings = node.doctor(capsys=capsys)
    assert code == 0, findings
    assert FAIL not in statuses(findings)
    assert find(findings, "crio hooks", "ok")[0]["detail"].startswith("mode hook")
    assert find(findings, "specs", "ok")[0]["detail"].startswith("1 valid spec file(s), 1 device(s)")
    assert find(findings, "spec dirs")[0]["detail"] == f"{node.specs} (from the installed hook's CDI_SPEC_DIRS)"
    assert {f["check"] for f in findings} >= {"cache dir", "watcher", "watcher unit", "policy"}


FAIL, WARN, OK = "fail", "warn", "ok"


def test_files_an_older_version_wrote_with_dash_m_are_checked(node, capsys):
    """Installs before the -c entry wrote `-I -m cdi_hook`: doctor still finds and checks them."""
    node.install("hook")
    for path in node.hooks.iterdir():
        definition = json.loads(path.read_text())
        definition["hook"]["args"][1:5] = ["-I", "-m", "cdi_hook"]
        path.write_text(json.dumps(definition))
    (node.specs / "dev.json").write_text(json.dumps(SPEC))
    code, findings = node.doctor(capsys=capsys)
    assert code == 0, findings
    assert find(findings, "crio hooks", "ok")[0]["detail"].startswith("mode hook")
    assert find(findings, "spec dirs")[0]["detail"] == f"{node.specs} (from the installed hook's CDI_SPEC_DIRS)"


def test_missing_interpreter_fails_with_the_fix(node, capsys, tmp_path):
    missing = str(tmp_path / "removed-venv/bin/python3")
    node.write_files("hook", missing)
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    broken = find(findings, f"hooks.d {node.hooks}/cdi-hook-createRuntime.json", FAIL)
    assert any(f"interpreter {missing} is missing" in f["detail"] and f"reinstall cdi-hook into {missing}" in f["fix"]
               for f in broken), broken


def test_both_modes_present_warn(node, capsys):
    node.install("hook")
    node.write_files("precreate", install.interpreter())
    code, findings = node.doctor(capsys=capsys)
    warning = find(findings, "crio hooks", WARN)[0]
    assert "both modes installed" in warning["detail"] and "--mode precreate|hook" in warning["fix"]
    assert code == 0  # injected twice is a warning: containers still start


def test_precreate_only_fails_for_crio(node, capsys):
    node.install("precreate")
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    assert "CRI-O runs no precreate hooks" in find(findings, "crio hooks", FAIL)[0]["detail"]


def test_crio_drop_ins_later_file_wins(node, capsys, tmp_path):
    other = tmp_path / "other-hooks"
    (node.root / "etc/crio/crio.conf.d/99-last.conf").write_text(f'[crio.runtime]\nhooks_dir = ["{other}"]\n')
    (node.root / "etc/crio/crio.conf").write_text('[crio.runtime]\nhooks_dir = ["/nowhere"]\n')
    node.install("hook")
    code, findings = node.doctor(capsys=capsys)
    assert find(findings, "crio hooks_dir")[0]["detail"].startswith(f"{other} (from {node.root}/etc/crio/crio.conf.d/"
                                                                    "99-last.conf)")
    assert "which crio does not read" in find(findings, "crio hooks", FAIL)[0]["detail"]
    assert code == 1


def test_unparsable_config_fails(node, capsys):
    (node.root / "etc/crio/crio.conf.d/60-bad.conf").write_text("[crio.runtime\n")
    node.install("hook")
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    assert "60-bad.conf" in find(findings, "crio config", FAIL)[0]["detail"]


def test_insecure_spec_dir_fails(node, capsys):
    node.install("hook")
    (node.specs / "dev.json").write_text(json.dumps(SPEC))
    os.chmod(node.specs, 0o777)
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    refused = find(findings, f"spec dir {node.specs}", FAIL)[0]
    assert "writable by every user" in refused["detail"] and "refuses" in refused["detail"]
    assert refused["fix"] == f"chown root:root {node.specs} && chmod go-w {node.specs}"


def test_insecure_spec_dir_only_warns_when_the_hook_accepts_it(node, capsys, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    node.write_files("hook", install.interpreter())
    for name in install.HOOK_FILES.values():  # an entry that carries it (install never does)
        path = node.hooks / name
        data = json.loads(path.read_text())
        data["hook"]["env"].append("CDI_HOOK_INSECURE_SPECS=1")
        path.write_text(json.dumps(data))
    os.chmod(node.specs, 0o777)
    monkeypatch.delenv("CDI_HOOK_INSECURE_SPECS")
    code, findings = node.doctor(capsys=capsys)
    assert "accepted only because" in find(findings, f"spec dir {node.specs}", WARN)[0]["detail"]
    assert find(findings, f"hooks.d {node.hooks}/cdi-hook-createRuntime.json", WARN)
    assert code == 0


def test_invalid_spec_fails_naming_the_file(node, capsys):
    node.install("hook")
    bad = node.specs / "broken.json"
    bad.write_text(json.dumps({**SPEC, "devices": [{"name": "bad name!", "containerEdits": {}}]}))
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    failure = find(findings, f"spec {bad}", FAIL)[0]
    assert f"cdi-hook validate {bad}" in failure["fix"]


def test_conflicting_specs_fail(node, capsys):
    node.install("hook")
    (node.specs / "a.json").write_text(json.dumps(SPEC))
    (node.specs / "b.json").write_text(json.dumps(SPEC))
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    assert "also defined in" in find(findings, f"spec {node.specs}/a.json", FAIL)[0]["detail"]


def test_world_writable_policy_fails(node, capsys, monkeypatch, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text('version: "1"\nrules: []\n')
    monkeypatch.setenv("CDI_HOOK_POLICY", str(policy))
    node.install("hook")  # carries CDI_HOOK_POLICY into the entries
    monkeypatch.delenv("CDI_HOOK_POLICY")
    code, findings = node.doctor(capsys=capsys)
    assert code == 0 and find(findings, "policy", OK)[0]["detail"].startswith(f"{policy}: valid")
    os.chmod(policy, 0o666)
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    failure = find(findings, "policy", FAIL)[0]
    assert "writable by every user" in failure["detail"] and failure["fix"].startswith(f"chown root:root {policy}")
    os.chmod(policy, 0o644)
    policy.write_text('version: "1"\nrules: [{action: maybe, devices: ["*"]}]\n')
    code, findings = node.doctor(capsys=capsys)
    assert code == 1 and "rules[0].action" in find(findings, "policy", FAIL)[0]["detail"]


def test_healthy_watcher_and_current_cache(node, capsys):
    """A generation file as a running watcher keeps it (root-only, locked, fresh): healthy;
    a cache written for that generation: current."""
    node.install("hook")
    (node.specs / "dev.json").write_text(json.dumps(SPEC))
    dirs = (str(node.specs),)
    path = cache.generation_path(dirs)
    state.ensure_private_dir(os.path.dirname(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, cache.generation_content(dirs, os.urandom(16)))
        cache.select(["doctor-test.example.com/dev=null"], list(dirs))  # compiles it for that generation
        code, findings = node.doctor(capsys=capsys)
        assert code == 0, findings
        assert "healthy" in find(findings, "watcher", OK)[0]["detail"]
        assert "vouched for by the watcher" in find(findings, "compiled cache", OK)[0]["detail"]
        fcntl.flock(fd, fcntl.LOCK_UN)  # the watcher died
        code, findings = node.doctor(capsys=capsys)
        assert "the watcher is gone" in find(findings, "watcher", WARN)[0]["detail"]
    finally:
        os.close(fd)
        os.unlink(path)


def test_watcher_unit_checked_against_the_hooks(node, capsys, monkeypatch):
    node.install("hook")
    unit_dir = node.root / "etc/systemd/system"
    install.install_watch_unit(str(unit_dir), spec_dirs=["/elsewhere/cdi"], out=io.StringIO())
    code, findings = node.doctor(capsys=capsys)
    warning = find(findings, "watcher unit", WARN)[0]
    assert f"it watches /elsewhere/cdi, the hooks read {node.specs}" in warning["detail"]
    assert "systemctl enable --now" in find(findings, "watcher", WARN)[0]["fix"]
    install.install_watch_unit(str(unit_dir), spec_dirs=[str(node.specs)], out=io.StringIO())
    code, findings = node.doctor(capsys=capsys)
    assert find(findings, "watcher unit", OK)


def test_the_debian_packages_unit_is_checked_when_install_wrote_none(node, capsys):
    node.install("hook")
    packaged = node.root / "lib/systemd/system"
    packaged.mkdir(parents=True)
    # The package's unit: the hooks' interpreter, no CDI_SPEC_DIRS (the defaults).
    (packaged / "cdi-hook-watch.service").write_text(install.watch_unit(sys.executable, None, {}))
    code, findings = node.doctor(capsys=capsys)
    warning = find(findings, "watcher unit", WARN)[0]
    assert warning["detail"].startswith(f"{packaged}/cdi-hook-watch.service: it watches /etc/cdi, /var/run/cdi")
    # The hooks' settings too (this test's cache dir), as an edited or overriding unit has them.
    hook_settings = install.carried_settings()
    (packaged / "cdi-hook-watch.service").write_text(install.watch_unit(sys.executable, [str(node.specs)],
                                                                        hook_settings))
    code, findings = node.doctor(capsys=capsys)
    assert find(findings, "watcher unit", OK)[0]["detail"].startswith(f"{packaged}/cdi-hook-watch.service (same")


def test_text_format_one_line_per_finding(node, capsys):
    node.install("hook")
    capsys.readouterr()
    assert main(["doctor", "--config-root", str(node.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].endswith("0 fail")
    assert all(line.split()[0] in (OK, WARN, FAIL) for line in lines[:-1])


# ---------------------------------------------------------------------------------------
# --probe: real Podman and runc containers through the installed hooks


def _probe_prerequisites():
    require_root()
    require_program("podman")
    require_program("runc")
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")


def _leftovers(node) -> list[str]:
    return [p.name for p in node.specs.iterdir()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hook", "precreate"])
def test_probe_passes_through_the_hooks_podman_reads(node, capsys, mode):
    _probe_prerequisites()
    (node.root / "etc/crio/crio.conf.d/50-cdi-hook.conf").unlink()  # CRI-O runs no precreate: Podman only
    node.install(mode)
    code, findings = node.doctor("--probe", capsys=capsys)
    assert code == 0, json.dumps(findings, indent=1)
    assert find(findings, "probe podman", OK)[0]["detail"].startswith("a Podman container got /dev/cdi-hook-probe")
    assert find(findings, "probe runc", OK)
    assert "removed afterwards" in find(findings, "probe spec", OK)[0]["detail"]
    assert _leftovers(node) == []


@pytest.mark.slow
def test_probe_fails_when_podman_reads_another_dir(node, capsys, tmp_path):
    _probe_prerequisites()
    elsewhere = tmp_path / "elsewhere"
    node.install("hook", hooks_dir=elsewhere)  # Podman's containers.conf names node.hooks
    code, findings = node.doctor("--probe", "--hooks-dir", str(elsewhere), capsys=capsys)
    assert code == 1
    static = find(findings, "podman hooks", FAIL)[0]
    assert f"cdi-hook's files are in {elsewhere}, which podman does not read" in static["detail"]
    assert static["fix"].startswith(f"cdi-hook install --hooks-dir {node.hooks}")
    probe = find(findings, "probe podman", FAIL)[0]
    assert "the container started but has no /dev/cdi-hook-probe" in probe["detail"]
    assert find(findings, "probe runc", OK)  # the entry itself works: only Podman does not run it
    assert _leftovers(node) == []


@pytest.mark.slow
def test_probe_fails_with_a_missing_interpreter(node, capsys, tmp_path):
    _probe_prerequisites()
    node.write_files("hook", str(tmp_path / "removed-venv/bin/python3"))
    code, findings = node.doctor("--probe", capsys=capsys)
    assert code == 1
    assert "failed" in find(findings, "probe runc", FAIL)[0]["detail"]
    assert find(findings, "probe podman", FAIL)
    assert _leftovers(node) == []


def test_probe_spec_leaves_no_created_dir(node, capsys, tmp_path, monkeypatch):
    """No spec dir exists yet: the probe makes the first and removes it again."""
    _probe_prerequisites()
    missing = tmp_path / "not-yet"
    install.install(str(node.hooks), "hook", spec_dirs=[str(missing)], out=io.StringIO())
    monkeypatch.setattr("cdi_hook.commands.doctor.RUNTIMES", ("runc",))  # one container is enough here
    code, findings = node.doctor("--probe", capsys=capsys)
    assert f"with the dir {missing} it created" in find(findings, "probe spec", OK)[0]["detail"]
    assert find(findings, "probe runc", OK)
    assert not missing.exists()
    assert code == 0, findings


# ---------------------------------------------------------------------------------------
# --probe interrupted or killed: nothing of it stays where starts and the device plugin look


def _probe_spec(writer: str | None, token: str) -> dict:
    """A probe spec as doctor writes it, naming `writer` (None: none, as an older doctor's)."""
    spec = {"cdiVersion": "0.6.0", "kind": probe_spec.PROBE_KIND, "devices": [{"name": f"p{token}", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-hook-probe", "hostPath": "/dev/null"}]}}]}
    if writer is not None:
        spec["annotations"] = {probe_spec.WRITER_ANNOTATION: writer}
    return spec


def _dead_writer() -> str:
    """The identity of a process that ran and is gone."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        identity = probe_spec.writer_identity(child.pid)
    finally:
        child.kill()
        child.wait()
    return identity


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_probe_interrupted_leaves_nothing(node, tmp_path, signum):
    """doctor --probe stopped mid-probe (its runc run blocked) removes its spec and temp dir,
    and its child, reports the interruption and exits 128 + the signal."""
    require_program("runc")
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")
    node.install("hook")
    temp = tmp_path / "tmp"
    temp.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "runc-run-started"
    # runc as doctor finds it on PATH: `runc run` blocks (its pid noted), all else is the real runc.
    fake = bin_dir / "runc"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = run ] && echo $$ > {started}.tmp && '
                    f'/bin/mv {started}.tmp {started} && exec /bin/sleep 600; done\nexec {require_program("runc")} "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": str(bin_dir), "TMPDIR": str(temp), "CONTAINERS_CONF": os.environ["CONTAINERS_CONF"]}
    doctor = subprocess.Popen([sys.executable, "-I", "-m", "cdi_hook", "doctor", "--config-root", str(node.root),
                               "--format", "json", "--probe"], cwd=oci_env.REPO, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    blocked = None
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert doctor.poll() is None and time.monotonic() < deadline, [
                (f["check"], f["status"], f["detail"]) for f in json.loads(doctor.communicate()[0] or "[]")
                if f["status"] != OK or f["check"].startswith("probe")]
            time.sleep(0.05)
        blocked = int(started.read_text())
        assert [p.name for p in node.specs.iterdir()][0].startswith(probe_spec.SPEC_PREFIX)  # mid-probe
        assert [p.name for p in temp.iterdir()][0].startswith(probe_spec.TEMP_PREFIX)
        doctor.send_signal(signum)
        out, err = doctor.communicate(timeout=60)
    finally:
        if doctor.poll() is None:
            doctor.kill()
            doctor.wait()
        if blocked is not None and os.path.exists(f"/proc/{blocked}/cmdline") and \
                b"sleep" in open(f"/proc/{blocked}/cmdline", "rb").read():
            os.kill(blocked, signal.SIGKILL)  # before the fix: left behind
    assert _leftovers(node) == [] and list(temp.iterdir()) == []
    assert doctor.returncode == 128 + signum, err
    interrupted = find(json.loads(out), "probe", FAIL)[-1]
    assert interrupted["detail"] == f"interrupted by {signal.Signals(signum).name}: its spec and temp dir removed"
    assert not os.path.exists(f"/proc/{blocked}/cmdline") or b"sleep" not in open(f"/proc/{blocked}/cmdline",
                                                                                   "rb").read()


def test_a_killed_probes_leftovers_are_removed_by_the_next_run(node, capsys, tmp_path, monkeypatch):
    """A probe spec and temp dir whose doctor is gone (SIGKILL) are removed by the next doctor,
    with a warning each; those of a doctor still probing (this process) stay."""
    node.install("hook")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    dead, alive = _dead_writer(), probe_spec.writer_identity()
    for name, writer in (("dead", dead), ("alive", alive), ("older", None)):
        oci_env.write_spec(node.specs, f"{probe_spec.SPEC_PREFIX}{name}.json", _probe_spec(writer, name))
        directory = temp / f"{probe_spec.TEMP_PREFIX}{name}"
        directory.mkdir()
        (directory / "rootfs").mkdir()
        if writer is not None:
            (directory / probe_spec.WRITER_FILE).write_text(writer)
    (node.specs / "dev.json").write_text(json.dumps(SPEC))
    code, findings = node.doctor(capsys=capsys)
    assert code == 0, findings
    assert sorted(_leftovers(node)) == ["cdi-hook-doctor-probe-alive.json", "dev.json"]
    # A dir without a writer file is not known to be a probe's: left alone.
    assert sorted(p.name for p in temp.iterdir()) == ["cdi-hook-doctor-alive", "cdi-hook-doctor-older"]
    removed = [f["detail"] for f in find(findings, "probe leftover", WARN)]
    assert removed == [f"removed {node.specs}/cdi-hook-doctor-probe-dead.json, the probe spec of a doctor --probe "
                       f"that was killed ({dead})",
                       f"removed {node.specs}/cdi-hook-doctor-probe-older.json, the probe spec of a doctor --probe "
                       "that was killed (no writer named)",
                       f"removed {temp}/cdi-hook-doctor-dead, the temp dir of a doctor --probe that was killed"]
    code, findings = node.doctor(capsys=capsys)
    assert not [f for f in findings if f["check"] == "probe leftover"]


def test_a_probe_device_resolves_only_while_its_doctor_lives(tmp_path):
    """The hook (the registry's select, also from the compiled cache) gives a probe device to
    the doctor's containers while it runs; a killed doctor's spec gives nobody anything."""
    specs = tmp_path / "specs"
    oci_env.write_spec(specs, "alive.json", _probe_spec(probe_spec.writer_identity(), "alive"))
    oci_env.write_spec(specs, "dead.json", _probe_spec(_dead_writer(), "dead"))
    oci_env.write_spec(specs, "older.json", _probe_spec(None, "older"))
    kind = probe_spec.PROBE_KIND
    for select in (lambda names: Registry.load([str(specs)]).select(names),
                   lambda names: cache.select(names, [str(specs)])):
        assert select([f"{kind}=palive"]).devices == (f"{kind}=palive",)
        for name in ("pdead", "polder"):
            with pytest.raises(ResolveError, match="the probe of a `cdi-hook doctor --probe` that is gone"):
                select([f"{kind}={name}"])


def test_native_cdi_runtimes_said_and_cdi_hook_beside_crio_warned(tmp_path):
    """CRI-O >= 1.23, containerd >= 1.7 and Docker >= 25 apply CDI requests themselves:
    doctor says which; cdi-hook's live hooks in a dir CRI-O reads are a warning (the kubelet's
    requests applied twice) with what to change; an older CRI-O, or none of ours, no warning."""
    from cdi_hook.commands import doctor, install

    hooks = tmp_path / "hooks.d"
    files = {str(hooks / name): doctor.HookFile(str(hooks / name), {"hook": {}})
             for name in install.HOOK_FILES.values()}
    runtimes = {"crio": "/usr/bin/crio", "containerd": "/usr/bin/containerd", "dockerd": "/usr/bin/dockerd"}
    views = {"crio": ([str(hooks)], "test")}
    versions = {"crio": "crio version 1.33.13", "containerd": "containerd containerd.io 1.7.24 abc",
                "dockerd": "Docker version 26.1.5+dfsg1, build a72d7cd"}
    report = doctor.Report()
    doctor.check_native_cdi(report, runtimes, views, files, versions)
    found = {(f["check"], f["status"]): f for f in report.findings}
    assert set(found) == {("crio native CDI", "ok"), ("containerd native CDI", "ok"), ("dockerd native CDI", "ok"),
                          ("crio native CDI", "warn")}
    assert "the kubelet's cdi.k8s.io/ annotations" in found["crio native CDI", "ok"]["detail"]
    assert "applied twice" in found["crio native CDI", "warn"]["detail"]
    assert "cdi-hook uninstall --hooks-dir" in found["crio native CDI", "warn"]["fix"]

    report = doctor.Report()
    doctor.check_native_cdi(report, runtimes, views, files, {"crio": "crio version 1.22.5",
                                                             "containerd": "containerd 1.6.20", "dockerd": "Docker 24.0.7"})
    assert report.findings == []
    report = doctor.Report()
    doctor.check_native_cdi(report, {"crio": "/usr/bin/crio"}, views, {}, versions)
    assert [(f["check"], f["status"]) for f in report.findings] == [("crio native CDI", "ok")]
