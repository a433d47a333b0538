"""The Debian package end to end (issue 25 part 7), on Debian 12 and 13 alike: in a clean
chroot of each release the package is built from this tree (`dpkg-buildpackage -us -uc -b`
with that release's debhelper, pybuild, go-md2man, protoc) and installed with dpkg; there
`cdi-hook install --crio` writes hooks.d files that run Debian's /usr/bin/python3,
`cdi-hook doctor` finds nothing failing, a runc container gets a device from a small spec
through the installed hook's entries, the kubelet API code generated at build time answers a
gRPC call with that release's grpcio and protobuf, and a purge leaves no file behind.
scripts/build-deb itself builds on the host.

Each chroot comes from `debootstrap --variant=minbase` off the mirror apt uses, with runc,
busybox-static, the build dependencies and the package's Depends and Recommends installed,
cached as a tarball under /var/cache/cdi-hook-tests: the first run takes a few minutes more,
later ones unpack it in seconds. The dependencies are in the cached system, not installed by
the test, so the snapshot taken before the install is the system the purge must leave; dpkg
then checks that they satisfy the package's Depends.

Every command runs in `unshare --mount`, the chroot pivoted to be its root: the proc, sys and
dev mounts live in that mount namespace and go with its last process, whatever happens to
the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

import oci_env
from cdi_hook.commands import install
from ci_rules import skip_if_deb_on_host_declared
from conftest import require, require_program, require_root

REPO = Path(__file__).resolve().parent.parent
SUITES = {"bookworm": "Debian 12", "trixie": "Debian 13"}
CACHE_DIR = Path("/var/cache/cdi-hook-tests")
CACHE_MAX_AGE_S = 30 * 86400  # then built again, with the point release's packages
DEPENDS = ["python3-yaml", "python3-pyroute2", "python3-prctl", "python3-structlog"]
RECOMMENDS = ["python3-grpcio", "python3-protobuf"]
# debian/control's Build-Depends (build-essential is not needed for an arch-all package:
# dpkg-buildpackage -d skips only that check).
BUILD_DEPENDS = ["debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools",
                 "go-md2man", "protobuf-compiler", "protobuf-compiler-grpc"]
CHROOT_PACKAGES = ["runc", "busybox-static", *DEPENDS, *RECOMMENDS, *BUILD_DEPENDS]
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
             "DEBIAN_FRONTEND": "noninteractive"}
KIND = "deb-test.cdi-hook.io/dev"
# Paths the purge must leave exactly as they were before the install.
CHECKED = ("usr", "etc", "run", "var/log")
# apt's and dpkg's own logs record the install and the purge: not the package's files.
APT_LOGS = ("var/log/apt/", "var/log/dpkg.log", "var/log/alternatives.log")

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _mirror() -> str:
    """The Debian mirror apt uses here (its main suite's site)."""
    targets = subprocess.run(["apt-get", "indextargets", "--format", "$(SITE) $(RELEASE)"],
                             capture_output=True, text=True).stdout.split("\n")
    for line in targets:
        site, _, release = line.partition(" ")
        if release and "-" not in release and "security" not in site:
            return site
    return "http://deb.debian.org/debian"


def _cached_chroot(suite: str) -> Path:
    """The tarball of a minbase suite with CHROOT_PACKAGES; made when missing or old."""
    key = hashlib.sha256(" ".join(CHROOT_PACKAGES).encode()).hexdigest()[:12]
    tarball = CACHE_DIR / f"{suite}-minbase-{key}.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < CACHE_MAX_AGE_S:
        return tarball
    require_program("debootstrap")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR))
    try:
        # debootstrap's own --include resolver trips over Debian 13's t64 renames
        # (libgrpc29t64): only the base here, the rest with apt inside.
        made = subprocess.run(["debootstrap", "--variant=minbase", suite, str(work / "root"), _mirror()],
                              capture_output=True, text=True, env=CLEAN_ENV, timeout=900)
        assert made.returncode == 0, "debootstrap failed:\n" + made.stdout[-3000:] + made.stderr[-3000:]
        shutil.copy("/etc/resolv.conf", work / "root" / "etc" / "resolv.conf")
        _ok(_in_chroot(work / "root", "apt-get update -q && apt-get install -y -q --no-install-recommends "
                                      + " ".join(CHROOT_PACKAGES) + " && apt-get clean", timeout=900))
        partial = work / "root.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(work / "root"), "-cf", str(partial), "."], check=True)
        os.replace(partial, tarball)  # atomic: a run killed midway leaves no half tarball
        for old in CACHE_DIR.glob(f"{suite}-minbase-*.tar"):
            if old != tarball:
                old.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


def _in_chroot(root: Path, script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`sh -ec script` with the chroot as the root of a private mount namespace, proc, sys and
    dev mounted. pivot_root, not a plain chroot: the live hook enters the container's mount
    namespace (setns), whose root is the namespace's root, not its caller's chroot; and
    runc's own pivot_root needs a root that is a mount point."""
    setup = ('r="$1"; mount --bind "$r" "$r" && mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" '
             '&& mount --rbind /dev "$r/dev" && cd "$r" && mkdir -p .old-root && pivot_root . .old-root '
             '&& exec /usr/sbin/chroot . /bin/sh -c \'umount -l /.old-root && rmdir /.old-root && exec /bin/sh -ec "$0"\' '
             '"$0"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, script, str(root)],
                          capture_output=True, text=True, env=CLEAN_ENV, timeout=timeout, stdin=subprocess.DEVNULL)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _files(root: Path) -> set[str]:
    """Every non-directory under CHECKED (the folders themselves may stay, empty or not)."""
    found = set()
    for top in CHECKED:
        for folder, _, names in os.walk(root / top):
            found.update(os.path.relpath(os.path.join(folder, name), root) for name in names)
    return {path for path in found if not path.startswith(APT_LOGS)}


@pytest.fixture(params=sorted(SUITES))
def chroot(request):
    skip_if_deb_on_host_declared()
    require_root()
    for program in ("unshare", "chroot", "tar", "runc", "git", "ip"):
        require_program(program)
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")
    tarball = _cached_chroot(request.param)
    top = Path(tempfile.mkdtemp(prefix="cdi-hook-deb-"))
    try:
        root = top / "root"
        root.mkdir()
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-xf", str(tarball)], check=True)
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")  # apt in the chroot, if it must fetch
        yield root
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _copy_tree(target: Path) -> None:
    """This tree's tracked and untracked-but-not-ignored files, as scripts/build-deb copies them."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, names):
        source = REPO / os.fsdecode(name)
        if source.is_file() or source.is_symlink():
            (target / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / os.fsdecode(name), follow_symlinks=False)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    skip_if_deb_on_host_declared()
    require_root()
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run(["bash", str(REPO / "scripts" / "build-deb"), "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    path = Path(built.stdout.strip().splitlines()[-1])
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert path.name == f"cdi-hook_{version}_all.deb", path  # build-deb checks debian/changelog agrees
    return path


def test_deb_names_debians_packages(deb):
    fields = {name: _ok(subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True))
              for name in ("Depends", "Recommends", "Architecture")}
    assert fields["Architecture"].strip() == "all"
    for package in DEPENDS:
        assert package in fields["Depends"], fields
    for package in RECOMMENDS:
        assert package in fields["Recommends"], fields
    listing = _ok(subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True))
    for path in ("./usr/bin/cdi-hook", "./usr/share/man/man8/cdi-hook.8.gz", "./usr/share/man/man8/cdi-hook-install.8.gz",
                 "./usr/share/man/man5/cdi-hook-policy.5.gz", "systemd/system/cdi-hook-watch.service",
                 "./etc/logrotate.d/cdi-hook", "./usr/lib/python3/dist-packages/cdi_hook/kubelet/api_pb2_grpc.py"):
        assert path in listing, path
    # The kubelet API code is Debian's protoc's, not the committed code that refuses Debian's grpcio.
    files = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"GRPC_GENERATED_VERSION" not in files and b"ValidateProtobufRuntimeVersion" not in files
    man_pages = len(list((REPO / "man").glob("*.md")))
    assert listing.count("/usr/share/man/man") - 2 == man_pages, listing  # less the folders man5, man8


def test_builds_installs_runs_and_purges_in_a_clean_chroot(chroot):
    root = chroot
    source = root / "build" / "cdi-hook"
    _copy_tree(source)
    _ok(_in_chroot(root, "cd /build/cdi-hook && dpkg-buildpackage -us -uc -b -d >/build/build.log 2>&1 "
                         "|| { tail -n 40 /build/build.log; exit 1; }"))
    version = _ok(_in_chroot(root, "cd /build/cdi-hook && dpkg-parsechangelog -S Version")).strip()
    deb = root / "build" / f"cdi-hook_{version}_all.deb"
    shutil.copy(deb, root / "tmp" / deb.name)
    shutil.rmtree(root / "build")
    before = _files(root)

    # dpkg, not apt: it refuses the package unless the installed packages satisfy its Depends.
    _ok(_in_chroot(root, f"dpkg -i /tmp/{deb.name}"))
    os.unlink(root / "tmp" / deb.name)
    shebang = _ok(_in_chroot(root, "head -n 1 /usr/bin/cdi-hook; cdi-hook --version")).split("\n")[0]
    assert shebang.replace(" ", "") == "#!/usr/bin/python3", shebang  # Debian 13's installer writes "#! "
    unit = (root / "lib/systemd/system/cdi-hook-watch.service").read_text()
    assert "ExecStart=/usr/bin/python3 -I -m cdi_hook watch" in unit and "/opt/cdi-hook" not in unit
    assert not list((root / "etc/systemd/system").glob("*.wants/cdi-hook-watch.service")), "the unit is enabled"

    # The kubelet API code generated at build time, with Debian's grpcio 1.51 and protobuf 3.21:
    # a server with the plugin's servicer answers a client over a unix socket.
    probe = """
import grpc, tempfile, os
from concurrent import futures
from cdi_hook.kubelet import api_pb2, api_pb2_grpc
class Plugin(api_pb2_grpc.DevicePluginServicer):
    def GetDevicePluginOptions(self, request, context):
        return api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)
path = os.path.join(tempfile.mkdtemp(), "dp.sock")
server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
api_pb2_grpc.add_DevicePluginServicer_to_server(Plugin(), server)
server.add_insecure_port("unix://" + path)
server.start()
with grpc.insecure_channel("unix://" + path) as channel:
    options = api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(api_pb2.Empty(), timeout=10)
server.stop(None)
print("grpc", grpc.__version__, "answered", options.get_preferred_allocation_available)
"""
    (root / "tmp" / "grpc_probe.py").write_text(probe)
    assert "answered True" in _ok(_in_chroot(root, "python3 -I /tmp/grpc_probe.py; rm /tmp/grpc_probe.py"))

    # A small spec: /dev/zero at /dev/cdi-hook-deb; and a veth end (the chroot shares the
    # host's network namespace) moved in as net0, through that release's pyroute2 (Debian
    # 12's 0.7.2 has no IPRoute(netns=)).
    veth = f"cdd{os.getpid() % 10**8:08d}"
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"], check=True)
    try:
        oci_env.write_spec(root / "etc" / "cdi", "deb-test.json", {
            "cdiVersion": "1.1.0", "kind": KIND,
            "devices": [{"name": "zero", "containerEdits": {
                             "deviceNodes": [{"path": "/dev/cdi-hook-deb", "hostPath": "/dev/zero"}]}},
                        {"name": "net", "containerEdits": {
                             "netDevices": [{"hostInterfaceName": veth, "name": "net0"}]}}]})

        # install, from the package: entries that run Debian's python3 isolated and without site,
        # with the package's folder written in.
        # --watch too: removing the package must take that unit away with the hooks.d files.
        installed = _ok(_in_chroot(root, "cdi-hook install --crio --watch"))
        assert (root / "etc/systemd/system/cdi-hook-watch.service").is_file()
        # The package's logrotate conffile carries the mark install knows as the package's.
        assert (root / "etc/logrotate.d/cdi-hook").read_text().split("\n")[0] == install.PACKAGE_LOGROTATE_MARK
        assert "left /etc/logrotate.d/cdi-hook alone: the cdi-hook package's" in installed, installed
        hooks_dir = root / "usr/share/containers/oci/hooks.d"
        hooks = {}
        for stage in ("createRuntime", "poststart", "poststop"):
            definition = json.loads((hooks_dir / f"cdi-hook-{stage}.json").read_text())
            entry = definition["hook"]
            assert entry["path"] == "/usr/bin/python3"
            assert entry["args"][:4] == ["/usr/bin/python3", "-I", "-S", "-c"]
            assert "'/usr/lib/python3/dist-packages'" in entry["args"][4], entry
            hooks[stage] = [entry]

        doctor = _ok(_in_chroot(root, "cdi-hook doctor"))
        assert doctor.rstrip().endswith(" 0 fail"), doctor
        for stage in hooks:
            assert f"cdi-hook-{stage}.json: /usr/bin/python3 runs cdi-hook " in doctor, doctor

        # A runc container carrying the installed entries, as an oci-hooks runtime would add them.
        bundle = root / "bundle"
        oci_env.make_bundle(bundle, ["/bin/sh", "-c", "stat -c 'DEV %t:%T' /dev/cdi-hook-deb; "
                                     "head -c 4 /dev/cdi-hook-deb | od -An -tx1; grep -o ' net0:' /proc/net/dev"],
                            annotations={"cdi.k8s.io/deb-test": f"{KIND}=zero,{KIND}=net"}, hooks=hooks)
        out = _ok(_in_chroot(root, "runc run --bundle /bundle deb-test; "
                                   "runc delete --force deb-test 2>/dev/null || true"))
        assert "DEV 1:5" in out and "00 00 00 00" in out and " net0:" in out, out
        shutil.rmtree(bundle)
        os.unlink(root / "etc" / "cdi" / "deb-test.json")
        os.rmdir(root / "etc" / "cdi")
        assert (root / "run" / "cdi-hook").is_dir() and (root / "var" / "log" / "cdi-hook.log").is_file()
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)  # its peer goes with it
        subprocess.run(["ip", "link", "del", veth + "p"], capture_output=True)

    _ok(_in_chroot(root, "dpkg --purge cdi-hook"))
    left = sorted(_files(root) - before)
    assert not left, f"left after purge: {left}"
    assert not (root / "run" / "cdi-hook").exists()
