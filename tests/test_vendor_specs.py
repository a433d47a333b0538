"""Vendor-generated CDI specs (tests/vendor/) through every path: the container must see the same.

Each fixture keeps the layout, versions, hook args and mount options its generator writes
(its header, or amd-ctk.source, says where from); __HOST__ and __BIN__ are replaced by a
per-run dir of stand-in host files (char nodes with /dev/null's numbers, libraries built
here with the real SONAMEs, firmware, a socket, /dev/dri/by-path symlinks) and the dir of
the stand-in vendor hook (tests/vendor/nvidia-cdi-hook, as `nvidia-cdi-hook` and
`nvidia-ctk`). One busybox image with /etc/ld.so.conf, ld.so.conf.d and an ld.so.cache
(as glibc images have) runs a probe through

  runc-hook         runc, cdi-hook as the bundle's createRuntime hook (the live hook)
  podman-hook       Podman with `cdi-hook install --mode hook` hooks dir + annotation
  podman-precreate  Podman with `cdi-hook install --mode precreate` hooks dir + annotation
  runc-edits        runc on a bundle edited by `cdi-hook inject --mode edits` (the reference:
                    runc itself runs the spec's createContainer hooks)

and what the probe reports (nodes, links, modes, mounted files and their mounts, the
vendor hook's ld.so.conf.d drop-ins, the loader cache as soname -> path) must be equal.
The allowed differences, on the live paths only: the spec's env is not set (docs/reference/live-hook.md); the vendor's update-ldcache writes no 00-nvcr-*.conf for a
folder cdi-hook's own ldconfig step already listed in 00-cdi-hook.conf (the toolkit skips
configured folders), so the configured set of folders (ld-dirs) is compared instead. The stand-in logs each run: the tests check it ran once per
hook, in the same order on every path, inside the container's mount namespace, and saw
every mount and node of the spec in place.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

import oci_env
from conftest import require, require_program

VENDOR_DIR = Path(__file__).resolve().parent / "vendor"
STAND_IN = VENDOR_DIR / "nvidia-cdi-hook"
IMAGE = "localhost/cdi-hook-vendortest-" + uuid.uuid4().hex[:8]
# On this VM crun refuses the hybrid cgroups and root lacks CAP_SYS_RESOURCE (docs/operators/podman.md).
PODMAN_RUN = ["run", "--rm", "--runtime", "runc", "--network", "none",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
WAYS = ("runc-edits", "runc-hook", "podman-hook", "podman-precreate")
LIVE_WAYS = {"runc-hook", "podman-hook"}

# fixture file -> the devices a container asks for
FIXTURES = {
    "nvidia-ctk-1.17.yaml": ["nvidia.com/gpu=all"],
    "nvidia-ctk-1.14-legacy-hook.yaml": ["nvidia.com/gpu=all"],
    "nvidia-cdi-hook-head.yaml": ["example.com/device=0"],
    "amd-ctk.json": ["amd.com/gpu=0"],
    "intel-gpu.yaml": ["intel.com/gpu=0000-03-00-0-0x56a0"],
}

PROBE = r"""
for a in "$@"; do
  k=${a%%:*}; p=${a#*:}
  case $k in
  path)
    if [ -L "$p" ]; then echo "path:$p=link $(readlink "$p") to $(stat -L -c %F "$p" 2>/dev/null || echo nothing)"
    elif [ -e "$p" ]; then
      c=""; [ -f "$p" ] && c=" md5=$(md5sum < "$p" | cut -d' ' -f1)"
      r=no; [ -S "$p" ] || { (exec 3<"$p") 2>/dev/null && r=yes; }
      echo "path:$p=$(stat -c '%F mode=%a owner=%u:%g rdev=%t:%T' "$p")$c read=$r"
    else echo "path:$p=missing"; fi ;;
  mount)
    n=0
    while read -r id parent dev root target opts rest; do
      [ "$target" = "$p" ] || continue
      n=$((n+1)); echo "mount:$p#$n=$opts"
    done < /proc/self/mountinfo
    echo "mount:$p#count=$n" ;;
  dir)
    for f in "$p"/* "$p"/.[!.]*; do
      if [ -L "$f" ]; then echo "dir:$f=link $(readlink "$f")"
      elif [ -e "$f" ]; then echo "dir:$f=$(stat -c '%F mode=%a' "$f")"; fi
    done ;;
  env) eval "v=\${$p-<unset>}"; echo "env:$p=$v" ;;
  esac
done
echo "nvcr=$(cat /etc/ld.so.conf.d/00-nvcr-*.conf 2>/dev/null | tr '\n' ' ')"
echo "ld-dirs=$(cat /etc/ld.so.conf.d/*.conf 2>/dev/null | grep -v '^#' | sort -u | tr '\n' ' ')"
echo "nvcr-system=$(cat /etc/ld.so.conf.d/zz-nvcr-*.conf 2>/dev/null | tr '\n' ' ')"
echo "cache=$(base64 /etc/ld.so.cache 2>/dev/null | tr -d '\n')"
"""


# ------------------------------------------------------------------ stand-in host files


def soname_of(file_name: str) -> str:
    """libcuda.so.550.54.14 -> libcuda.so.1, the SONAME the real driver library carries."""
    return file_name[:file_name.index(".so") + 3] + ".1"


def build_library(cache: Path, soname: str) -> Path:
    """A real (tiny) ELF shared object with this SONAME, so ldconfig links and caches it."""
    out = cache / soname
    if not out.exists():
        source = cache / "stub.c"
        source.write_text(f"int cdi_hook_vendor_stub_{abs(hash(soname))};\n")
        subprocess.run(["gcc", "-shared", "-fPIC", "-nostdlib", f"-Wl,-soname,{soname}", "-o", str(out),
                        str(source)], check=True, capture_output=True)
    return out


def make_host_files(spec: dict, host: Path, lib_cache: Path) -> None:
    """Create every __HOST__ path the spec names: nodes, libraries, files, sockets, links."""
    null = os.stat("/dev/null").st_rdev
    every_edits = [spec.get("containerEdits") or {}] + [d.get("containerEdits") or {} for d in spec["devices"]]
    for edits in every_edits:
        for node in edits.get("deviceNodes") or []:
            source = node.get("hostPath", "")
            if source.startswith(str(host)) and not os.path.lexists(source):
                os.makedirs(os.path.dirname(source), exist_ok=True)
                os.mknod(source, 0o666 | stat.S_IFCHR, null)
        for mount in edits.get("mounts") or []:
            source = mount["hostPath"]
            if not source.startswith(str(host)) or os.path.lexists(source):
                continue
            os.makedirs(os.path.dirname(source), exist_ok=True)
            name = os.path.basename(source)
            if "/by-path/" in source:  # the host's udev links: pci-ADDR-card -> ../cardN
                nodes = sorted(os.listdir(os.path.dirname(os.path.dirname(source))))
                wanted = "card" if name.endswith("-card") else "renderD"
                os.symlink("../" + next(n for n in nodes if n.startswith(wanted)), source)
            elif name == "socket":
                cwd = os.getcwd()
                os.chdir(os.path.dirname(source))  # a socket path has at most 107 bytes
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.bind(name)
                finally:
                    os.chdir(cwd)
            elif ".so." in name:
                shutil.copy(build_library(lib_cache, soname_of(name)), source)
            else:
                Path(source).write_text(f"stand-in {name}\n")
                os.chmod(source, 0o755)


def hook_args(spec: dict, devices: list[str]) -> list[list[str]]:
    """args of every createContainer hook of the requested devices' edits."""
    names = {d.split("=", 1)[1] for d in devices}
    edits = [spec.get("containerEdits") or {}] + [d["containerEdits"] for d in spec["devices"] if d["name"] in names]
    return [h["args"] for e in edits for h in e.get("hooks") or [] if h["hookName"] == "createContainer"]


def requested_edits(spec: dict, devices: list[str]) -> list[dict]:
    names = {d.split("=", 1)[1] for d in devices}
    return [spec.get("containerEdits") or {}] + [d["containerEdits"] for d in spec["devices"] if d["name"] in names]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def probe_args(spec: dict, devices: list[str]) -> list[str]:
    """What the probe looks at: every path the spec or its hooks name, and their dirs."""
    paths, dirs, env = [], [], []
    for edits in requested_edits(spec, devices):
        for node in edits.get("deviceNodes") or []:
            paths.append(node["path"])
            dirs.append(os.path.dirname(node["path"]))
        for mount in edits.get("mounts") or []:
            paths.append(mount["containerPath"])
            dirs.append(os.path.dirname(mount["containerPath"]))
        env += [item.split("=", 1)[0] for item in edits.get("env") or []]
    for args in hook_args(spec, devices):
        for link in flag_values(args, "--link"):
            paths.append(link.split("::")[1])
            dirs.append(os.path.dirname(link.split("::")[1]))
        paths += flag_values(args, "--path")
        dirs += flag_values(args, "--folder")
    paths.append("/etc/nvidia/nvidia-application-profiles-rc.d/10-container.conf")
    mounts = [m["containerPath"] for e in requested_edits(spec, devices) for m in e.get("mounts") or []]
    return ([f"path:{p}" for p in dict.fromkeys(paths)] + [f"dir:{d}" for d in dict.fromkeys(dirs)]
            + [f"mount:{m}" for m in dict.fromkeys(mounts)] + [f"env:{e}" for e in dict.fromkeys(env)])


def parse_ld_cache(data: bytes) -> list[tuple[str, str]]:
    """(soname, path) of every entry of a glibc-ld.so.cache1.1 file, as the loader looks them up."""
    magic = b"glibc-ld.so.cache1.1"
    if not data.startswith(magic):
        return []
    nlibs = struct.unpack_from("<I", data, 20)[0]

    def string(offset: int) -> str:
        return data[offset:data.index(b"\0", offset)].decode()

    entries = []
    for i in range(nlibs):
        _flags, key, value = struct.unpack_from("<iII", data, 48 + 24 * i)
        entries.append((string(key), string(value)))
    return sorted(entries)


def parse_probe(output: str) -> dict[str, str]:
    seen = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            seen[key] = value
    if "cache" in seen:
        seen["cache"] = parse_ld_cache(base64.b64decode(seen["cache"])) if seen["cache"] else []
    return seen


def standin_log(work: Path) -> list[dict]:
    log = work / "bin" / "standin-hook.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ------------------------------------------------------------------ the four ways


def cdi_hook_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cdi_hook", *args], capture_output=True, text=True,
                          env=full_env, cwd=oci_env.REPO)


class Podman:
    def __init__(self, top: Path):
        self.top = top
        self.base = ["podman", "--root", str(top / "storage"), "--runroot", str(top / "runroot"),
                     "--storage-driver", "vfs"]

    def setup(self, rootfs: Path) -> None:
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(self.base + ["import", "-", IMAGE], stdin=tar.stdout, capture_output=True,
                                  text=True)
        tar.wait()
        assert imported.returncode == 0, f"podman import: {imported.stderr}"

    def run(self, hooks_dir: Path, devices: list[str], args: list[str]) -> subprocess.CompletedProcess:
        argv = self.base + ["--hooks-dir", str(hooks_dir)] + PODMAN_RUN
        for i, name in enumerate(devices):  # one key per device: Podman splits values at commas
            argv += ["--annotation", f"cdi.k8s.io/vendor{i}={name}"]
        return subprocess.run(argv + [IMAGE, "sh", "-c", PROBE, "probe", *args], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    def cleanup(self) -> None:
        subprocess.run(self.base + ["rm", "--all", "--force"], capture_output=True)
        subprocess.run(self.base + ["rmi", "--all", "--force"], capture_output=True)
        with open("/proc/self/mountinfo") as f:
            targets = [line.split()[4] for line in f]
        for target in sorted((t for t in targets if t.startswith(str(self.top) + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)


def make_image_rootfs(path: Path) -> Path:
    """busybox plus what a glibc image has for the loader: ld.so.conf, ld.so.conf.d, a cache."""
    import hook_env

    hook_env.glibc_like_rootfs(path)
    (path / "etc" / "ld.so.conf.d").mkdir()
    subprocess.run(["/sbin/ldconfig", "-r", str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    if os.geteuid() != 0:
        require(False, "needs root")
    for program in ("runc", "podman", "gcc", "tar"):
        require_program(program)
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")
    require(os.path.exists("/sbin/ldconfig"), "needs /sbin/ldconfig")
    top = tmp_path_factory.mktemp("vendor")
    (top / "libs").mkdir()
    image = make_image_rootfs(top / "image")
    podman = Podman(top)
    try:
        podman.setup(image)
        yield top, image, podman
    finally:
        podman.cleanup()


def prepare(top: Path, fixture: str, way: str) -> tuple[Path, dict, str]:
    """The way's own dir: bin/ (the stand-in as both names), host/, cdi/<fixture>; (dir, spec, spec dir)."""
    work = top / f"{fixture}-{way}"
    (work / "bin").mkdir(parents=True)
    for name in ("nvidia-cdi-hook", "nvidia-ctk"):
        shutil.copy2(STAND_IN, work / "bin" / name)
    text = (VENDOR_DIR / fixture).read_text()
    text = text.replace("__HOST__", str(work / "host")).replace("__BIN__", str(work / "bin"))
    (work / "cdi").mkdir()
    (work / "cdi" / fixture).write_text(text)
    spec = yaml.safe_load(text)
    make_host_files(spec, work / "host", top / "libs")
    return work, spec, str(work / "cdi")


def run_way(top: Path, image: Path, podman: Podman, fixture: str, way: str) -> tuple[Path, dict, dict]:
    devices = FIXTURES[fixture]
    work, spec, spec_dir = prepare(top, fixture, way)
    args = probe_args(spec, devices)
    if way.startswith("podman"):
        hooks_dir = work / "hooks.d"
        mode = "hook" if way == "podman-hook" else "precreate"
        installed = cdi_hook_cli("install", "--hooks-dir", str(hooks_dir), "--mode", mode, "--no-logrotate",
                                 env={"CDI_SPEC_DIRS": spec_dir})
        assert installed.returncode == 0, installed.stderr
        result = podman.run(hooks_dir, devices, args)
    else:
        bundle = work / "bundle"
        rootfs = bundle / "rootfs"
        shutil.copytree(image, rootfs, symlinks=True)
        annotations = {f"cdi.k8s.io/vendor{i}": name for i, name in enumerate(devices)}
        hooks = None
        if way == "runc-hook":
            hooks = {"createRuntime": [oci_env.hook_entry([spec_dir], log_file=str(work / "cdi-hook.log"))]}
        oci_env.make_bundle(bundle, ["sh", "-c", PROBE, "probe", *args], rootfs=rootfs,
                            annotations=annotations if way == "runc-hook" else None, hooks=hooks)
        if way == "runc-edits":
            device_args = [a for name in devices for a in ("--device", name)]
            edited = cdi_hook_cli("inject", "--spec-dir", spec_dir, "--bundle", str(bundle), *device_args,
                                  "--mode", "edits", env={"CDI_HOOK_INSECURE_SPECS": "1"})
            assert edited.returncode == 0, edited.stderr
        result = oci_env.run_container(bundle, root=str(top / "runc-state"))
    assert result.returncode == 0, f"{way}: rc={result.returncode}\n{result.stderr[-3000:]}"
    return work, spec, parse_probe(result.stdout)


# ------------------------------------------------------------------ the test


def test_fixtures_are_the_generators_shapes():
    """Every fixture names its source and parses once its placeholders are filled in."""
    for fixture in FIXTURES:
        text = (VENDOR_DIR / fixture).read_text()
        source = text if fixture.endswith(".yaml") else (VENDOR_DIR / (Path(fixture).stem + ".source")).read_text()
        assert any(repo in source for repo in ("NVIDIA/nvidia-container-toolkit", "ROCm/container-toolkit",
                                               "intel/intel-resource-drivers-for-kubernetes")), fixture
        assert any(word in source for word in ("commit", "tag v")), f"{fixture}: no commit or tag named"
        spec = yaml.safe_load(text.replace("__HOST__", "/h").replace("__BIN__", "/b"))
        assert {"cdiVersion", "kind", "devices"} <= set(spec), fixture
    assert os.access(STAND_IN, os.X_OK)
    assert STAND_IN.read_text().startswith("#!/usr/bin/python3\n")


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_vendor_spec_same_on_every_path(env, fixture):
    top, image, podman = env
    seen, logs = {}, {}
    failures = []
    for way in WAYS:
        try:
            work, spec, seen[way] = run_way(top, image, podman, fixture, way)
            logs[way] = standin_log(work)
        except AssertionError as error:
            failures.append(str(error))
    assert not failures, "\n".join(failures)
    devices = FIXTURES[fixture]
    expected_hooks = hook_args(spec, devices)
    reference = seen["runc-edits"]

    # The reference itself: what the vendor's hooks are for happened.
    for args in expected_hooks:
        for link in flag_values(args, "--link"):
            target, where = link.split("::")
            assert reference[f"path:{where}"].startswith(f"link {target} to "), (where, reference[f"path:{where}"])
    if any("update-ldcache" in args for args in expected_hooks):
        sonames = {soname for soname, _ in reference["cache"]}
        for edits in requested_edits(spec, devices):
            for mount in edits.get("mounts") or []:
                if ".so." in mount["containerPath"]:
                    assert soname_of(os.path.basename(mount["containerPath"])) in sonames, reference["cache"]

    differences = []
    for way in WAYS[1:]:
        for key in sorted(set(reference) | set(seen[way])):
            ref, got = reference.get(key), seen[way].get(key)
            if key.startswith("env:") and way in LIVE_WAYS:
                if got != "<unset>":
                    differences.append(f"{way}: {key}: the live hook cannot set env, yet got {got!r}")
                continue
            if key == "nvcr" and way in LIVE_WAYS:
                # The vendor hook leaves out folders already configured (the toolkit's
                # filterDirectories): after the live hook's own ldconfig step they are, in
                # 00-cdi-hook.conf. What counts is the same configured set (ld-dirs).
                continue
            if ref != got:
                differences.append(f"{way}: {key}: runc-edits {ref!r} != {got!r}")
    assert not differences, "\n".join(differences)

    # The stand-in vendor hook: once per hook, same order everywhere, in a real container.
    our_mnt_ns = os.readlink("/proc/self/ns/mnt")
    for way in WAYS:
        records = logs[way]
        assert [r["argv"][1:] for r in records] == [a[1:] for a in expected_hooks], (way, records)
        for record in records:
            assert record["outcome"] == "ok" or record["outcome"].startswith("exec ldconfig"), (way, record)
            assert record["mnt_ns"] != our_mnt_ns, f"{way}: the vendor hook ran in the host's mount namespace"
            assert record["state"]["id"] and record["state"]["bundle"], (way, record["state"])
            for edits in requested_edits(spec, devices):
                for mount in edits.get("mounts") or []:
                    assert mount["containerPath"] in record["mount_points"], \
                        f"{way}: {record['argv'][1:3]} did not see {mount['containerPath']} mounted"
                for node in edits.get("deviceNodes") or []:
                    assert node["path"] in record["nodes"], f"{way}: {record['argv'][1:3]} did not see {node['path']}"
