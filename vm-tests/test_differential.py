"""Proof against Podman's native CDI: the same container, five ways, must see the same devices.

For each scenario (a set of CDI specs and the devices a container asks for) one busybox
container runs a probe script that reports what it sees at the paths the specs name:
  device nodes  type, rdev, mode, uid, gid, whether it opens for reading / writing
  mounts        every /proc/self/mountinfo entry at the target (root, fs device, per-mount
                options, fs type, source) and how many there are, plus the content seen there
  env           the value of each variable a spec names
  groups        /proc/self/status Groups, uid:gid and the effective capabilities (the runc
                bundle gets Podman's process set-up, so these must agree before CDI matters)
It runs
  podman-native     podman run --device vendor/class=name              (the reference)
  podman-hook       podman --hooks-dir <cdi-hook install --mode hook> + cdi.k8s.io annotation
  podman-precreate  podman --hooks-dir <cdi-hook install --mode precreate> + annotation
  runc-edits        runc run on a bundle edited by `cdi-hook inject --mode edits`
  runc-hook         runc run on a bundle edited by `cdi-hook inject --mode hook`
and every way must report exactly what the reference reports, except for the differences
listed in ALLOWED_DIFFERENCES (each with its reason). Only the paths the specs name are
probed, so what a runtime sets up by itself (Podman's /dev, /etc/hosts, ...) stays out.

Podman reads native specs only from /etc/cdi and /var/run/cdi, so the specs go to
/var/run/cdi under unique names (root-owned, 0644, so the hook trusts them without
CDI_HOOK_INSECURE_SPECS) and are removed afterwards whatever happens. Podman uses a
throwaway --root/--runroot (vfs) and --hooks-dir, so the host's storage and hooks.d stay
untouched.

The reference is whatever Podman this machine has, judged by its version
(tests/runtime_versions.py): Podman 4.3 (Debian 12) vendors CDI library 0.5.2, which reads
cdiVersion <= 0.5.0 and leaves a node without fileMode to runc's 0666; Podman 5.2-5.4
(Debian 13: 5.4) vendors 0.8.0, which reads up to 0.8.0, so additionalGids (0.7.0) gets a
native reference there, and still leaves fileMode unset (the host node's mode is filled only
from CDI library 1.1.0 on, which no Podman release vendored as of 5.8). The scenarios' specs
are 0.5.0, which every reference reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable

import pytest

import runtime_versions
from conftest import require, require_programs
from oci_env import make_bundle, make_rootfs, run_container

REPO = Path(__file__).resolve().parent.parent
NATIVE_SPEC_DIR = "/var/run/cdi"
IMAGE = "localhost/cdi-hook-difftest-busybox"
RUN_ID = uuid.uuid4().hex[:8]
VENDOR = f"difftest{RUN_ID}.cdi-hook.test"  # unique kinds: no clash with any other spec there
# This VM has no CAP_SYS_RESOURCE for raising rlimits and crun refuses its hybrid cgroups.
PODMAN_RUN = ["run", "--rm", "--runtime", "runc", "--network", "none",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# containers.conf default_capabilities of Podman 4.3 and 5.4 (`podman run ... grep Cap /proc/self/status`)
PODMAN_CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                       "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
                       "CAP_SYS_CHROOT"]
WAYS = ("podman-native", "podman-hook", "podman-precreate", "runc-edits", "runc-hook")
CRUN_WAYS = ("podman-native", "crun-edits", "crun-hook")
# test_crio_differential.py: CRI-O's own CDI as the reference, cdi-hook alone (crio-hook) and
# beside it (crio-both: the env is CRI-O's there, so only the node mode rule applies)
CRIO_WAYS = ("crio-native", "crio-hook", "crio-both")
LIVE_HOOK_WAYS = {"podman-hook", "runc-hook", "crun-hook", "crio-hook"}
CDI_HOOK_WAYS = (set(WAYS) | set(CRUN_WAYS) | {"crio-hook", "crio-both", "docker-runc-cdi"}) - {"podman-native"}

# What the reference's CDI library does, from the Podman version found (None: no Podman).
PODMAN_CDI = runtime_versions.podman_cdi_library()
NATIVE_READS = runtime_versions.cdi_reads(PODMAN_CDI)
NATIVE_FILLS_FILE_MODE = runtime_versions.cdi_fills_file_mode(PODMAN_CDI)

PROBE = r"""
for a in "$@"; do
  k=${a%%:*}; p=${a#*:}
  case $k in
  node)
    if [ -e "$p" ]; then
      r=no; (exec 3<"$p") 2>/dev/null && r=yes
      w=no; (exec 3>>"$p") 2>/dev/null && w=yes
      echo "node:$p=$(stat -c '%F rdev=%t:%T mode=%a uid=%u gid=%g' "$p") read=$r write=$w"
    else
      echo "node:$p=missing"
    fi ;;
  mount)
    n=0
    while read -r id parent dev root target opts rest; do
      [ "$target" = "$p" ] || continue
      n=$((n+1))
      echo "mount:$p#$n=root=$root dev=$dev opts=$opts fs=$(echo " $rest" | sed 's/.* - //' | cut -d' ' -f1,2)"
    done < /proc/self/mountinfo
    echo "mount:$p#count=$n"
    if [ -d "$p" ]; then echo "content:$p=dir $(ls -A "$p" | tr '\n' ' ')"
    elif [ -f "$p" ]; then echo "content:$p=file $(md5sum < "$p" | cut -d' ' -f1)"
    else echo "content:$p=missing"; fi ;;
  env)
    eval "v=\${$p-<unset>}"; echo "env:$p=$v" ;;
  esac
done
echo "groups=$(sed -n 's/^Groups:[[:space:]]*//p' /proc/self/status)"
echo "ids=$(id -u):$(id -g)"
echo "caps=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)"
"""


# ------------------------------------------------------------------ allowed differences


@dataclasses.dataclass(frozen=True)
class Context:
    """What a difference check may look at: the scenario's specs, the host, and whether the
    reference's CDI library fills a node's missing fileMode from the host node."""
    scenario: "Scenario"
    native_fills_file_mode: bool = NATIVE_FILLS_FILE_MODE

    def node(self, path: str) -> dict | None:
        for edits in self.scenario.all_edits():
            for node in edits.get("deviceNodes", []):
                if node["path"] == path:
                    return node
        return None


@dataclasses.dataclass(frozen=True)
class Allowed:
    ways: frozenset
    key: str  # regex on the probe key
    reason: str
    check: Callable[[Context, str, str, str | None, str | None], bool]  # (ctx, way, key, reference, got)


# What each runtime sets by itself in every container: the runc/crun bundles (tests/oci_env
# make_bundle) TERM=xterm; Podman's is probed once by the env fixture (Podman 4.3 sets
# TERM=xterm without a tty, Podman 5.4 sets no TERM).
RUNTIME_ENV = {"podman": {"TERM": "xterm"}, "runc": {"TERM": "xterm"}, "crun": {"TERM": "xterm"},
               "crio": {"TERM": "xterm"}}


def _env_not_applied(ctx, way, key, reference, got) -> bool:
    return got == RUNTIME_ENV[way.split("-")[0]].get(key.split(":", 1)[1], "<unset>")


# Per-mount flags the live hook keeps from the source mount where runc's read-only remount drops them.
KEPT_SOURCE_FLAGS = {"nosuid", "nodev", "noexec"}


def _source_flags_kept_on_read_only_bind(ctx, way, key, reference, got) -> bool:
    """Only the per-mount options differ: a read-only bind of a nosuid/nodev source (Debian
    13's /tmp is such a tmpfs) is plain `ro` from runc, whose remount (MS_BIND|MS_REMOUNT|
    MS_RDONLY with only the spec's flags) clears them, and `ro,nosuid,nodev` from the live
    hook, whose mount_setattr sets MOUNT_ATTR_RDONLY and leaves the source's flags alone."""
    if reference is None or got is None:
        return False
    ref_opts, got_opts = (re.search(r" opts=(\S+)", v) for v in (reference, got))
    if not ref_opts or not got_opts:
        return False
    ref_set, got_set = set(ref_opts.group(1).split(",")), set(got_opts.group(1).split(","))
    return ("ro" in ref_set and ref_set < got_set and got_set - ref_set <= KEPT_SOURCE_FLAGS
            and reference.replace(ref_opts.group(0), got_opts.group(0)) == got)


def _host_mode_instead_of_0666(ctx, way, key, reference, got) -> bool:
    """Only the mode differs: 0666 from a Podman whose CDI library predates 1.1.0, the host
    node's mode from cdi-hook. A reference that fills fileMode itself must agree exactly."""
    if ctx.native_fills_file_mode:
        return False
    path = key.split(":", 1)[1]
    node = ctx.node(path)
    if node is None or "fileMode" in node or reference is None or got is None:
        return False
    host_mode = stat.S_IMODE(os.stat(node.get("hostPath", path)).st_mode)
    return reference.replace("mode=666 ", f"mode={host_mode:o} ") == got and "mode=666 " in reference


def _process_user_owns_unowned_node(ctx, way, key, reference, got) -> bool:
    """Only the owner differs, and with it what the container's user can open: a node whose
    spec gives no uid (gid) in a container run as a user is root's from Docker's own CDI,
    which sets no owner, and the process user's from cdi-hook, as Podman's own CDI gives it."""
    user, node = ctx.scenario.user, ctx.node(key.split(":", 1)[1])
    if user is None or node is None or reference is None or got is None:
        return False
    native = f"uid={node.get('uid', 0)} gid={node.get('gid', 0)}"
    ours = f"uid={node.get('uid', user[0])} gid={node.get('gid', user[1])}"
    access = re.compile(r" read=\w+ write=\w+$")
    return native != ours and native in reference and access.sub("", reference.replace(native, ours)) == \
        access.sub("", got)


# THE list of differences between Podman's native CDI and cdi-hook that this proof accepts.
ALLOWED_DIFFERENCES = (
    Allowed(frozenset(LIVE_HOOK_WAYS), r"^env:",
            "a live hook runs after the runtime fixed the process environment: env edits cannot "
            "be applied (cdi-hook logs a warning naming them; precreate / inject --mode edits apply them)",
            _env_not_applied),
    # additionalGids (the other edit a live hook cannot make) needs cdiVersion 0.7.0:
    # test_additional_gids covers it, against Podman's native CDI where that reads 0.7.0.
    Allowed(frozenset(CDI_HOOK_WAYS), r"^node:",
            f"a device node without fileMode: Podman {runtime_versions.version_text(runtime_versions.podman())} "
            f"vendors CDI {runtime_versions.version_text(PODMAN_CDI)} (CRI-O 1.33: 1.0.1), whose fillMissingInfo "
            "leaves fileMode unset, so runc creates the node 0666; cdi-hook follows the current CDI reference "
            "(1.1.0: fillMissingInfo copies the host node's permission bits)",
            _host_mode_instead_of_0666),
    Allowed(frozenset({"docker-runc-cdi"}), r"^node:",
            "a node without uid/gid in a container run as a user: Docker 26's own CDI leaves it root's "
            "(the user cannot open a 0600 node), cdi-hook gives it to the process's user as Podman's CDI does",
            _process_user_owns_unowned_node),
    Allowed(frozenset(LIVE_HOOK_WAYS), r"^mount:.*#\d+$",
            "a read-only bind of a nosuid/nodev source: runc's read-only remount clears the source's "
            "nosuid/nodev, the live hook's mount_setattr keeps them (never more than the host mount allows)",
            _source_flags_kept_on_read_only_bind),
)


# ------------------------------------------------------------------ scenarios


@dataclasses.dataclass
class Scenario:
    name: str
    specs: list[dict]        # CDI spec documents
    devices: list[str]       # the qualified names the container asks for
    user: tuple[int, int] | None = None

    def all_edits(self):
        for spec in self.specs:
            yield spec.get("containerEdits", {})
            for device in spec["devices"]:
                yield device.get("containerEdits", {})

    def probe_args(self) -> list[str]:
        args = []
        for edits in self.all_edits():
            args += [f"node:{n['path']}" for n in edits.get("deviceNodes", [])]
            args += [f"mount:{m['containerPath']}" for m in edits.get("mounts", [])]
            args += [f"env:{e.split('=', 1)[0]}" for e in edits.get("env", [])]
        return list(dict.fromkeys(args))


def spec(cls: str, devices: dict[str, dict], edits: dict | None = None, vendor: str = VENDOR) -> dict:
    doc = {"cdiVersion": "0.5.0", "kind": f"{vendor}/{cls}",
           "devices": [{"name": name, "containerEdits": e} for name, e in devices.items()]}
    if edits:
        doc["containerEdits"] = edits
    return doc


def scenarios(data: Path, kvm: str = "/dev/kvm") -> list[Scenario]:
    """kvm: /dev/kvm, or a stand-in node c 10:232 where the host has none (a QEMU guest without KVM)."""
    d = str(data)
    return [
        Scenario("nodes", [spec("nodes", {
            "kvm": {"deviceNodes": [{"path": kvm}]},                                    # path only
            "zero-elsewhere": {"deviceNodes": [{"path": "/dev/cdi/zero", "hostPath": "/dev/zero"}]},
            "loop-typed": {"deviceNodes": [{"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0}]},
        })], [f"{VENDOR}/nodes=kvm", f"{VENDOR}/nodes=zero-elsewhere", f"{VENDOR}/nodes=loop-typed"]),
        Scenario("owners", [spec("owners", {
            "owned": {"deviceNodes": [
                {"path": "/dev/loop1", "fileMode": 0o640, "uid": 1000, "gid": 44, "permissions": "r"},
                {"path": "/dev/cdi-null", "hostPath": "/dev/null", "fileMode": 0o600, "uid": 12, "gid": 34},
                {"path": kvm, "fileMode": 0o660, "permissions": "rw"},
            ]},
        })], [f"{VENDOR}/owners=owned"]),
        Scenario("mounts", [spec("mounts", {
            "data": {"mounts": [
                # listed deeper first: the reference orders mounts by depth, so /opt/data comes first
                {"hostPath": f"{d}/nested", "containerPath": "/opt/data/nested", "options": ["ro", "bind"]},
                {"hostPath": f"{d}/data", "containerPath": "/opt/data", "options": ["ro", "rbind"]},
                {"hostPath": f"{d}/rw", "containerPath": "/opt/rw", "options": ["rw", "rbind"]},
                {"hostPath": f"{d}/file.txt", "containerPath": "/etc/cdi-file", "options": ["ro", "bind"]},
                {"hostPath": f"{d}/file-rw.txt", "containerPath": "/opt/file-rw", "options": ["bind"]},
            ]},
        })], [f"{VENDOR}/mounts=data"]),
        Scenario("layers", [spec("layers", {
            "dev": {"env": ["LAYER=device", "DEV_ONLY=2"],
                    "deviceNodes": [{"path": kvm, "fileMode": 0o660, "gid": 44}],
                    "mounts": [{"hostPath": f"{d}/data", "containerPath": "/srv/dev", "options": ["ro", "bind"]}]},
        }, edits={"env": ["LAYER=spec", "SPEC_ONLY=1"],
                  "deviceNodes": [{"path": "/dev/cdi-spec-zero", "hostPath": "/dev/zero"}],
                  "mounts": [{"hostPath": f"{d}/file.txt", "containerPath": "/etc/spec-level",
                              "options": ["ro", "bind"]}]})],
                 [f"{VENDOR}/layers=dev"]),
        Scenario("two-specs", [
            spec("first", {"one": {"env": ["FIRST=1"], "deviceNodes": [{"path": "/dev/loop1", "fileMode": 0o660}],
                                   "mounts": [{"hostPath": f"{d}/file.txt", "containerPath": "/opt/first-file",
                                               "options": ["ro", "bind"]}]}}),
            spec("second", {"two": {"env": ["SECOND=2"], "deviceNodes": [{"path": kvm, "fileMode": 0o666}],
                                    "mounts": [{"hostPath": f"{d}/rw", "containerPath": "/opt/second-dir",
                                                "options": ["rbind"]}]}},
                 vendor="second." + VENDOR),
        ], [f"{VENDOR}/first=one", f"second.{VENDOR}/second=two"]),
        Scenario("runtime-env", [spec("runtime-env", {   # a variable the runtime sets itself
            "term": {"env": ["TERM=cdi-term"], "deviceNodes": [{"path": "/dev/cdi-env-null", "hostPath": "/dev/null"}]},
        })], [f"{VENDOR}/runtime-env=term"]),
        Scenario("same-destination", [spec("same-dest", {   # spec-level, then the device's: the later replaces it
            "twice": {"mounts": [{"hostPath": f"{d}/data", "containerPath": "/srv/twice", "options": ["ro", "bind"]}]},
        }, edits={"mounts": [{"hostPath": f"{d}/rw", "containerPath": "/srv/twice", "options": ["rw", "bind"]}]})],
                 [f"{VENDOR}/same-dest=twice"]),
        # Nodes at paths where every runtime creates a node itself (Podman's and runc's defaults).
        Scenario("over-runtime-node", [spec("over", {   # another device than the runtime's
            "full-is-zero": {"deviceNodes": [{"path": "/dev/full", "hostPath": "/dev/zero"}]},
        })], [f"{VENDOR}/over=full-is-zero"]),
        Scenario("restyle-runtime-node", [spec("restyle", {   # the same device, another owner and mode
            "random": {"deviceNodes": [{"path": "/dev/random", "fileMode": 0o600, "uid": 12, "gid": 34}]},
        })], [f"{VENDOR}/restyle=random"]),
        Scenario("user", [spec("user", {
            "as-user": {"deviceNodes": [{"path": "/dev/cdi-user-null", "hostPath": "/dev/null"},
                                        {"path": kvm, "fileMode": 0o600},
                                        {"path": "/dev/loop1", "fileMode": 0o640, "gid": 44}],
                        "mounts": [{"hostPath": f"{d}/file.txt", "containerPath": "/etc/user-file",
                                    "options": ["ro", "bind"]}]},
        })], [f"{VENDOR}/user=as-user"], user=(1000, 1000)),
    ]


# ------------------------------------------------------------------ environment


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, **kw)


def _cdi_hook(*args: str) -> subprocess.CompletedProcess:
    result = _run([sys.executable, "-m", "cdi_hook", *args], cwd=REPO,
                  env={**os.environ, "CDI_SPEC_DIRS": NATIVE_SPEC_DIR})
    assert result.returncode == 0, f"cdi-hook {' '.join(args)}: {result.stderr}"
    return result


def _umount_below(top: Path) -> None:
    """Unmount whatever a crashed run left mounted under top (deepest first)."""
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    for target in sorted((t for t in targets if t.startswith(str(top) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


class Podman:
    def __init__(self, top: Path):
        self.top = top
        self.base = ["podman", "--root", str(top / "storage"), "--runroot", str(top / "runroot"),
                     "--storage-driver", "vfs"]
        self.hooks_dirs = {way: top / f"hooks-{way}" for way in ("podman-native", "podman-hook", "podman-precreate")}

    def setup(self, rootfs: Path) -> None:
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(self.base + ["import", "-", IMAGE], stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        assert imported.returncode == 0, f"podman import: {imported.stderr}"
        # The reference gets an empty hooks dir: nothing of the host's hooks.d may take part.
        self.hooks_dirs["podman-native"].mkdir()
        _cdi_hook("install", "--hooks-dir", str(self.hooks_dirs["podman-hook"]), "--mode", "hook", "--no-logrotate")
        _cdi_hook("install", "--hooks-dir", str(self.hooks_dirs["podman-precreate"]), "--mode", "precreate",
                  "--no-logrotate")
        # What Podman itself puts in the environment (the live hook's env rule compares with it).
        argv = self.base + ["--hooks-dir", str(self.hooks_dirs["podman-native"])] + PODMAN_RUN
        term = _run(argv + [IMAGE, "sh", "-c", 'echo "${TERM-<unset>}"'])
        assert term.returncode == 0, f"podman run: {term.stderr}"
        RUNTIME_ENV["podman"] = {"TERM": term.stdout.strip()}

    def run(self, way: str, scenario: Scenario) -> subprocess.CompletedProcess:
        argv = self.base + ["--hooks-dir", str(self.hooks_dirs[way])] + PODMAN_RUN
        if scenario.user:
            argv += ["--user", "%d:%d" % scenario.user]
        if way == "podman-native":
            for name in scenario.devices:
                argv += ["--device", name]
        else:
            # One key per device: Podman 4.3 splits an --annotation value at commas, so
            # "cdi.k8s.io/x=a/b=c,d/e=f" would become two annotations, the second not ours.
            for i, name in enumerate(scenario.devices):
                argv += ["--annotation", f"cdi.k8s.io/difftest{i}={name}"]
        return _run(argv + [IMAGE, "sh", "-c", PROBE, "probe", *scenario.probe_args()])

    def cleanup(self) -> None:
        _run(self.base + ["rm", "--all", "--force"])
        _run(self.base + ["rmi", "--all", "--force"])
        _umount_below(self.top)


def make_data(data: Path) -> None:
    """The host files the scenarios' mounts name."""
    (data / "data").mkdir(parents=True)
    (data / "data" / "a.txt").write_text("a\n")
    (data / "data" / "sub").mkdir()
    (data / "data" / "nested").mkdir()  # the mount point of /opt/data/nested inside read-only /opt/data
    (data / "nested").mkdir()
    (data / "nested" / "n.txt").write_text("nested\n")
    (data / "rw").mkdir()
    (data / "rw" / "r.txt").write_text("rw\n")
    (data / "file.txt").write_text("the file\n")
    (data / "file-rw.txt").write_text("the rw file\n")


def host_nodes() -> str:
    """Make sure the loop nodes the scenarios name exist; the kvm node to use: /dev/kvm, or a
    stand-in the caller removes afterwards on a host without KVM (a TCG guest): a root-only
    node of the same number, which opens nowhere (ENODEV) but is still created, owned, moded
    and allowed the same way by all."""
    if not os.path.exists("/dev/loop1"):
        subprocess.run(["modprobe", "loop"], capture_output=True)  # creates /dev/loop0..7
    require(os.path.exists("/dev/loop0") and os.path.exists("/dev/loop1"), "needs /dev/loop0 and /dev/loop1")
    if os.path.exists("/dev/kvm"):
        return "/dev/kvm"
    kvm = f"/dev/cdi-difftest-{RUN_ID}-kvm"
    os.mknod(kvm, 0o600 | stat.S_IFCHR, os.makedev(10, 232))
    return kvm


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_programs("podman", "runc", "tar")
    top = tmp_path_factory.mktemp("difftest")
    data = top / "data"
    make_data(data)
    rootfs = make_rootfs(top / "rootfs")
    kvm = host_nodes()
    podman = Podman(top)
    made_spec_dir = not os.path.isdir(NATIVE_SPEC_DIR)  # a fresh machine may have none yet
    try:
        os.makedirs(NATIVE_SPEC_DIR, mode=0o755, exist_ok=True)
        podman.setup(rootfs)
        yield top, data, rootfs, podman, kvm
    finally:
        if kvm != "/dev/kvm":
            os.unlink(kvm)
        podman.cleanup()
        shutil.rmtree(top, ignore_errors=True)
        if made_spec_dir:
            with contextlib.suppress(OSError):
                os.rmdir(NATIVE_SPEC_DIR)


def _install_specs(scenario: Scenario) -> list[Path]:
    written = []
    for i, doc in enumerate(scenario.specs):
        path = Path(NATIVE_SPEC_DIR) / f"cdi-hook-difftest-{RUN_ID}-{scenario.name}-{i}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        written.append(path)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
    return written


def _like_podman(config_path: Path, user: tuple[int, int] | None) -> None:
    """Give the runc container Podman's process set-up, so only the CDI edits differ.

    runc's default spec keeps 3 capabilities; without Podman's CAP_DAC_OVERRIDE root could
    not open a node owned by another uid with mode 0600. Podman also lists the user's
    primary gid as a supplementary group (/proc/self/status Groups).
    """
    config = json.loads(config_path.read_text())
    caps = PODMAN_CAPABILITIES
    # Podman gives a non-root user no effective or permitted capabilities.
    held = [] if user and user[0] != 0 else caps
    config["process"]["capabilities"] = {"bounding": caps, "effective": held, "permitted": held}
    if user:
        config["process"]["user"] = {"uid": user[0], "gid": user[1], "additionalGids": [user[1]]}
    config_path.write_text(json.dumps(config, indent=2))


def _run_bundle(way: str, scenario: Scenario, top: Path, rootfs_template: Path) -> subprocess.CompletedProcess:
    """runc or crun on a bundle that `cdi-hook inject` edited (way: "<runtime>-<inject mode>")."""
    runtime, mode = way.split("-")
    bundle = top / f"bundle-{scenario.name}-{way}"
    rootfs = bundle / "rootfs"
    shutil.copytree(rootfs_template, rootfs, symlinks=True)  # runtimes and the hook create mount points in it
    make_bundle(bundle, ["sh", "-c", PROBE, "probe", *scenario.probe_args()], rootfs=rootfs)
    _like_podman(bundle / "config.json", scenario.user)
    device_args = [a for name in scenario.devices for a in ("--device", name)]
    _cdi_hook("inject", "--spec-dir", NATIVE_SPEC_DIR, "--bundle", str(bundle), *device_args, "--mode", mode)
    if runtime == "runc":
        return run_container(bundle, root=str(top / "runc-state"))
    return run_crun(bundle, str(top / "crun-state"))


# crun 1.8 refuses a hybrid cgroup host ("cgroups in hybrid mode not supported"), and in a
# cgroup2-only mount namespace it fails raising RLIMIT_MEMLOCK for its device eBPF program
# where root lacks CAP_SYS_RESOURCE. Hiding the cgroup2 mount in a private mount namespace
# makes it a plain cgroup v1 host for crun; on a v2-only host nothing is hidden.
CRUN_NAMESPACE = ("mountpoint -q /sys/fs/cgroup/unified && umount /sys/fs/cgroup/unified; "
                  'exec crun --root "$0" "$@"')


def run_crun(bundle: Path, state_root: str) -> subprocess.CompletedProcess:
    cid = "cdi-difftest-" + uuid.uuid4().hex[:12]
    crun = ["unshare", "--mount", "--propagation", "private", "sh", "-c", CRUN_NAMESPACE, state_root]
    try:
        return _run(crun + ["run", "--bundle", str(bundle), cid])
    finally:
        _run(crun + ["delete", "--force", cid])


def parse_probe(output: str) -> dict[str, str]:
    seen = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            seen[key] = value
    return seen


def compare(reference: dict, got: dict, way: str, ctx: Context,
            reference_way: str = "podman-native") -> tuple[list[str], list[tuple]]:
    """(unexplained differences, allowed ones as (way, key, reference, got, reason))."""
    unexplained, allowed = [], []
    for key in sorted(set(reference) | set(got)):
        ref, value = reference.get(key), got.get(key)
        if ref == value:
            continue
        line = f"{way}: {key}: {reference_way} {ref!r} != {value!r}"
        rule = next((a for a in ALLOWED_DIFFERENCES
                     if way in a.ways and re.search(a.key, key) and a.check(ctx, way, key, ref, value)), None)
        if rule is None:
            unexplained.append(line)
        else:
            allowed.append((way, key, ref, value, rule.reason))
    return unexplained, allowed


# ------------------------------------------------------------------ the test


SCENARIO_NAMES = ["nodes", "owners", "mounts", "layers", "two-specs", "runtime-env", "same-destination",
                  "over-runtime-node", "restyle-runtime-node", "user"]


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_same_as_podman_native_cdi(env, name, findings):
    differential(env, name, WAYS, findings)


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_crun_same_as_podman_native_cdi(env, name, findings):
    require_programs("crun", "unshare", "mountpoint")
    differential(env, name, CRUN_WAYS, findings)


def differential(env, name: str, ways: tuple[str, ...], findings: list) -> None:
    top, data, rootfs, podman, kvm = env
    scenario = next(s for s in scenarios(data, kvm) if s.name == name)
    results, failures = {}, []
    spec_files = []
    try:
        spec_files = _install_specs(scenario)
        for way in ways:
            run = podman.run(way, scenario) if way.startswith("podman") else _run_bundle(way, scenario, top, rootfs)
            if run.returncode != 0:
                failures.append(f"{way}: exit {run.returncode}: {run.stderr.strip()[-2000:]}")
                continue
            results[way] = parse_probe(run.stdout)
    finally:
        for path in spec_files:
            path.unlink(missing_ok=True)
    assert not failures, "\n".join(failures)

    reference = results["podman-native"]
    # The probe must have seen the devices at all, or agreement would prove nothing.
    assert all(not v.startswith("missing") for k, v in reference.items() if k.startswith("node:")), reference
    ctx = Context(scenario)
    problems = []
    for way in ways[1:]:
        unexplained, allowed = compare(reference, results[way], way, ctx)
        problems += unexplained
        findings += [(name, *difference) for difference in allowed]
    report = "\n".join(f"  {k}={v}" for k, v in sorted(reference.items()))
    assert not problems, "differences from Podman's native CDI:\n" + "\n".join(problems) + \
        "\npodman-native saw:\n" + report


def test_additional_gids(env, findings):
    """additionalGids needs cdiVersion 0.7.0. Where Podman's native CDI reads it (Podman 5.2 and
    later: CDI library 0.8.0) it is the reference; where it does not (Podman 4.3) there is none.

    Either way the editors (precreate, inject --mode edits) must give exactly the spec's groups;
    the live hook cannot (ALLOWED_DIFFERENCES) and must leave the groups as the runtime made them.
    """
    top, data, rootfs, podman, kvm = env
    native = NATIVE_READS is not None and NATIVE_READS >= (0, 7, 0)
    doc = spec("gids", {"grouped": {"deviceNodes": [{"path": "/dev/cdi-gids-null", "hostPath": "/dev/null"}],
                                    "additionalGids": [44, 1000]}})
    doc["cdiVersion"] = "0.7.0"
    scenario = Scenario("gids", [doc], [f"{VENDOR}/gids=grouped"])
    ways = (("podman-native",) if native else ()) + ("podman-precreate", "runc-edits", "podman-hook", "runc-hook")
    results, spec_files = {}, []
    try:
        spec_files = _install_specs(scenario)
        for way in ways:
            run = podman.run(way, scenario) if way.startswith("podman") else _run_bundle(way, scenario, top, rootfs)
            assert run.returncode == 0, f"{way}: {run.stderr}"
            results[way] = parse_probe(run.stdout)
    finally:
        for path in spec_files:
            path.unlink(missing_ok=True)
    groups = {way: results[way]["groups"].split() for way in ways}
    if native:
        assert groups["podman-native"] == ["44", "1000"], groups
        for way in ways[1:]:  # everything but the groups is the reference's
            unexplained, _ = compare({k: v for k, v in results["podman-native"].items() if k != "groups"},
                                     {k: v for k, v in results[way].items() if k != "groups"}, way, Context(scenario))
            assert not unexplained, unexplained
    assert groups["podman-precreate"] == ["44", "1000"], groups
    assert groups["runc-edits"] == ["44", "1000"], groups
    assert groups["podman-hook"] == [] and groups["runc-hook"] == [], groups
    reference = "44 1000 (podman-native)" if native else "44 1000 (the spec's additionalGids; no native reference)"
    for way in ("podman-hook", "runc-hook"):
        findings.append(("gids", way, "groups", reference, "",
                         "additionalGids is process set-up: a live hook runs after the runtime set the credentials"))
    for way in ways:  # the device itself arrives every way
        assert results[way]["node:/dev/cdi-gids-null"].startswith("character special file rdev=1:3"), results[way]


def test_compare_flags_what_it_must(tmp_path):
    """The comparator itself: a doubled mount or an editor's missing env is never 'allowed'."""
    host_node = tmp_path / "node"
    host_node.touch(mode=0o600)
    scenario = Scenario("self", [spec("self", {"d": {"env": ["X=1"],
                                                     "deviceNodes": [{"path": "/dev/x", "hostPath": str(host_node)}]}})],
                        [f"{VENDOR}/self=d"])
    ctx = Context(scenario)
    reference = {"env:X": "1", "mount:/opt/x#count": "1",
                 "node:/dev/x": "character special file rdev=a:e8 mode=666 uid=0 gid=0 read=yes write=yes"}
    assert compare(reference, {**reference, "mount:/opt/x#count": "2"}, "podman-hook", ctx)[0]
    assert compare(reference, {**reference, "env:X": "<unset>"}, "podman-precreate", ctx)[0]
    assert not compare(reference, {**reference, "env:X": "<unset>"}, "podman-hook", ctx)[0]
    own_mode = reference["node:/dev/x"].replace("mode=666", "mode=600")
    # the host node's mode for 0666 is allowed only against a reference that does not fill it
    assert bool(compare(reference, {**reference, "node:/dev/x": own_mode}, "runc-edits", ctx)[0]) \
        == NATIVE_FILLS_FILE_MODE
    # any other change of the node (owner here) stays a difference
    assert compare(reference, {**reference, "node:/dev/x": own_mode.replace("uid=0", "uid=1")}, "runc-edits", ctx)[0]
    # a read-only bind that kept its source's nosuid,nodev: allowed for the live hook only
    ro = {"mount:/opt/x#1": "root=/data dev=0:33 opts=ro fs=tmpfs tmpfs"}
    kept = {"mount:/opt/x#1": "root=/data dev=0:33 opts=ro,nosuid,nodev fs=tmpfs tmpfs"}
    assert not compare(ro, kept, "runc-hook", ctx)[0]
    assert compare(ro, kept, "runc-edits", ctx)[0]
    assert compare({"mount:/opt/x#1": ro["mount:/opt/x#1"].replace("ro", "rw")},
                   {"mount:/opt/x#1": kept["mount:/opt/x#1"].replace("ro,", "rw,")}, "runc-hook", ctx)[0]
    assert compare(ro, {"mount:/opt/x#1": "root=/data dev=0:33 opts=ro,noatime fs=tmpfs tmpfs"}, "runc-hook", ctx)[0]
    assert compare(ro, {"mount:/opt/x#1": "root=/other dev=0:33 opts=ro,nosuid fs=tmpfs tmpfs"}, "runc-hook", ctx)[0]
    # a node without uid/gid given to the container's user: allowed against Docker's CDI only,
    # and only the owner (and so the user's access) may differ
    as_user = Context(dataclasses.replace(scenario, user=(1000, 1000)))
    root_owned = {"node:/dev/x": "character special file rdev=a:e8 mode=600 uid=0 gid=0 read=no write=no"}
    user_owned = {"node:/dev/x": "character special file rdev=a:e8 mode=600 uid=1000 gid=1000 read=yes write=yes"}
    assert not compare(root_owned, user_owned, "docker-runc-cdi", as_user)[0]
    assert compare(root_owned, user_owned, "podman-precreate", as_user)[0]
    assert compare(root_owned, user_owned, "docker-runc-cdi", ctx)[0]   # no user: no allowance
    assert compare(root_owned, {"node:/dev/x": user_owned["node:/dev/x"].replace("600", "666")}, "docker-runc-cdi",
                   as_user)[0]
