"""`cdi-hook generate` and `watch --generate` (issue 26): specs from a fake /dev and sysfs.

The fake host is built as the kernel and udev lay theirs out: /sys/devices/.../usb1/1-1
with idVendor, idProduct, serial, busnum, devnum, dev and uevent (DEVNAME=bus/usb/001/002),
its interface 1-1:1.0 with a ttyUSB0 child (tty/ttyUSB0/dev), /sys/bus/usb/devices/* as
links to them (interfaces included, which have no idVendor), a hub with a device behind
it, and /dev with real character nodes (of /dev/zero's and /dev/null's numbers, so a
container can open them), /dev/bus/usb/001/00N and /dev/serial/by-id links. Then the spec
goes through `validate`, a real runc container through the live hook and through `inject
--mode edits`, the shareable count through holds (three containers, two shares) and the
device plugin's units (the test kubelet), and hotplug: a node made or removed under a
watched fake /dev reaches the spec within a second.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hook_env
import oci_env
from cdi_hook.commands import generate
from cdi_hook.commands.device_plugin import device_of, unit_ids
from cdi_hook.errors import CdiError
from cdi_hook.hostscan import Match
from cdi_hook.live import holds
from cdi_hook.spec.rules import SHARED_ANNOTATION

KIND = "test.cdi-hook.io/serial"
ZERO, NULL = os.makedev(1, 5), os.makedev(1, 3)
USB = {  # sysfs name -> (vendor, product, serial, bus device number, its tty or hidraw child)
    "1-1": ("0403", "6001", "A50285BI", 2, ("tty", "ttyUSB0")),
    "1-2": ("0403", "6001", "B7XK21QA", 3, ("tty", "ttyUSB1")),
    "1-3": ("046d", "c52b", None, 4, ("hidraw", "hidraw0")),
    "1-4": ("05e3", "0608", None, 5, None),  # a hub; 1-4.1 behind it
}
NODES = {"ttyUSB0": ZERO, "ttyUSB1": NULL, "hidraw0": os.makedev(240, 0), "kvm": ZERO, "fuse": NULL,
         "bus/usb/001/002": os.makedev(189, 1), "bus/usb/001/003": os.makedev(189, 2),
         "bus/usb/001/004": os.makedev(189, 3), "bus/usb/001/005": os.makedev(189, 4),
         "bus/usb/001/006": os.makedev(189, 5), "ttyACM0": os.makedev(166, 0)}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _usb_device(devices: Path, name: str, vendor: str, product: str, serial: str | None, devnum: int,
                child: tuple[str, str] | None) -> Path:
    folder = devices / name
    for attr, value in (("idVendor", vendor), ("idProduct", product), ("busnum", "1"), ("devnum", str(devnum)),
                        ("dev", f"189:{devnum - 1}"), ("uevent", f"MAJOR=189\nMINOR={devnum - 1}\n"
                                                                 f"DEVNAME=bus/usb/001/{devnum:03d}\nDEVTYPE=usb_device")):
        _write(folder / attr, value)
    if serial:
        _write(folder / "serial", serial)
    interface = folder / f"{name}:1.0"
    _write(interface / "bInterfaceNumber", "00")
    if child:
        subsystem, node = child
        rdev = NODES[node]
        parent = interface / node / "tty" if subsystem == "tty" else interface / "0003:046D:C52B.0001" / "hidraw"
        _write(parent / node / "dev", f"{os.major(rdev)}:{os.minor(rdev)}")
        _write(parent / node / "uevent", f"MAJOR={os.major(rdev)}\nMINOR={os.minor(rdev)}\nDEVNAME={node}")
    return folder


@pytest.fixture
def host(root_only, tmp_path) -> Path:
    """tmp_path/dev and tmp_path/sys, a fake host with the USB devices of USB."""
    dev, sys_root = tmp_path / "dev", tmp_path / "sys"
    for name, rdev in NODES.items():
        (dev / name).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(dev / name, stat.S_IFCHR | 0o666, rdev)
    by_id = dev / "serial" / "by-id"
    by_id.mkdir(parents=True)
    (by_id / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0").symlink_to("../../ttyUSB0")
    (by_id / "usb-FTDI_FT232R_USB_UART_B7XK21QA-if00-port0").symlink_to("../../ttyUSB1")
    (by_id / "dangling").symlink_to("../../ttyUSB9")
    root_hub = sys_root / "devices" / "pci0000:00" / "0000:00:14.0" / "usb1"
    links = sys_root / "bus" / "usb" / "devices"
    links.mkdir(parents=True)
    for name, (vendor, product, serial, devnum, child) in USB.items():
        folder = _usb_device(root_hub, name, vendor, product, serial, devnum, child)
        (links / name).symlink_to(os.path.relpath(folder, links))
        (links / f"{name}:1.0").symlink_to(os.path.relpath(folder / f"{name}:1.0", links))
    # behind the hub 1-4: an FTDI FT230X (0403:6015) with its ttyACM0, a USB device of its own
    behind = _usb_device(root_hub / "1-4", "1-4.1", "0403", "6015", None, 6, None)
    _write(behind / "1-4.1:1.0" / "ttyACM0" / "tty" / "ttyACM0" / "dev", "166:0")
    (links / "1-4.1").symlink_to(os.path.relpath(behind, links))
    return tmp_path


def cli(*args: str, host: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    roots = ["--dev-root", str(host / "dev"), "--sys-root", str(host / "sys")] if host else []
    result = subprocess.run([sys.executable, "-m", "cdi_hook", *args, *roots], capture_output=True, text=True,
                            cwd=oci_env.REPO, timeout=60)
    assert not check or result.returncode == 0, result.stderr
    return result


def spec_of(*args: str, host: Path) -> dict:
    return json.loads(cli("generate", "--kind", KIND, *args, host=host, check=True).stdout)


def devices_of(spec: dict) -> dict[str, list[tuple[str, str | None, int, int]]]:
    return {d["name"]: [(n["path"], n.get("hostPath"), n["major"], n["minor"])
                        for n in d["containerEdits"]["deviceNodes"]] for d in spec["devices"]}


# --- what is selected -----------------------------------------------------------------------

def test_a_glob_is_one_device_per_node_named_by_template(host):
    spec = spec_of("--device", "serial-{name}=/dev/ttyUSB*", "--device", "n{index}=/dev/bus/usb/001/00[23]",
                   host=host)
    dev = host / "dev"
    assert devices_of(spec) == {
        "serial-ttyUSB0": [("/dev/ttyUSB0", f"{dev}/ttyUSB0", 1, 5)],
        "serial-ttyUSB1": [("/dev/ttyUSB1", f"{dev}/ttyUSB1", 1, 3)],
        "n0": [("/dev/bus/usb/001/002", f"{dev}/bus/usb/001/002", 189, 1)],
        "n1": [("/dev/bus/usb/001/003", f"{dev}/bus/usb/001/003", 189, 2)],
    }
    assert {n["type"] for d in spec["devices"] for n in d["containerEdits"]["deviceNodes"]} == {"c"}
    assert spec["cdiVersion"] == "0.5.0"  # hostPath (the fake /dev) is the newest field used


def test_stable_links_are_resolved_and_named_by_the_link(host):
    spec = spec_of("--device", "{name}=/dev/serial/by-id/usb-FTDI_*", host=host)
    dev = host / "dev"
    link = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
    assert devices_of(spec)["usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"] == [
        ("/dev/ttyUSB0", f"{dev}/ttyUSB0", 1, 5), (link, f"{dev}/ttyUSB0", 1, 5)]
    assert len(spec["devices"]) == 2  # "dangling" is no match of this glob, and no device


def test_usb_selects_every_node_of_each_matching_device(host):
    dev = host / "dev"
    spec = spec_of("--device", "ftdi-{name}=usb:0403:6001", "--device", "receiver=usb:046D:C52B", host=host)
    assert devices_of(spec) == {
        "ftdi-A50285BI": [("/dev/bus/usb/001/002", f"{dev}/bus/usb/001/002", 189, 1),
                          ("/dev/ttyUSB0", f"{dev}/ttyUSB0", 1, 5)],
        "ftdi-B7XK21QA": [("/dev/bus/usb/001/003", f"{dev}/bus/usb/001/003", 189, 2),
                          ("/dev/ttyUSB1", f"{dev}/ttyUSB1", 1, 3)],
        "receiver": [("/dev/bus/usb/001/004", f"{dev}/bus/usb/001/004", 189, 3),
                     ("/dev/hidraw0", f"{dev}/hidraw0", 240, 0)],
    }
    only = spec_of("--device", "one=usb:0403:6001:B7XK21QA", host=host)
    assert list(devices_of(only)) == ["one"] and devices_of(only)["one"][1][0] == "/dev/ttyUSB1"
    hub = spec_of("--device", "hub=usb:05e3:0608", host=host)
    # the hub's own node only: the device behind it is its own USB device
    assert devices_of(hub) == {"hub": [("/dev/bus/usb/001/005", f"{dev}/bus/usb/001/005", 189, 4)]}
    vendor = spec_of("--device", "ftdi-{index}=usb:0403:*", host=host)  # every product of FTDI's
    assert list(devices_of(vendor)) == ["ftdi-0", "ftdi-1", "ftdi-2"]
    behind = spec_of("--device", "acm=usb:0403:6015", host=host)
    assert [n[0] for n in devices_of(behind)["acm"]] == ["/dev/bus/usb/001/006", "/dev/ttyACM0"]


def test_extra_edits_shares_and_the_lowest_version(host):
    spec = spec_of("--device", "fuse=/dev/fuse", "--shared", "100", "--env", "FUSE=1",
                   "--mount", f"{host}:/mnt/host:ro", host=host)
    [device] = spec["devices"]
    assert device["annotations"] == {SHARED_ANNOTATION: "100"}
    assert device["containerEdits"]["env"] == ["FUSE=1"]
    assert device["containerEdits"]["mounts"] == [{"hostPath": str(host), "containerPath": "/mnt/host",
                                                   "options": ["bind", "ro"]}]
    assert spec["cdiVersion"] == "0.6.0"  # device annotations
    real = json.loads(cli("generate", "--kind", KIND, "--device", "null=/dev/null", check=True).stdout)
    assert real == {"cdiVersion": "0.3.0", "kind": KIND, "devices": [{"name": "null", "containerEdits": {
        "deviceNodes": [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3}]}}]}


def test_a_selector_that_matches_nothing_is_one_line_or_a_warning(host):
    output = host / "out.json"
    result = cli("generate", "--kind", KIND, "--device", "kvm=/dev/kvm", "--device", "x{index}=/dev/ttyS*",
                 "--output", str(output), host=host)
    assert result.returncode == 1 and not output.exists()
    assert result.stderr == 'cdi-hook: --device "x{index}=/dev/ttyS*": selector "/dev/ttyS*" matches no device\n'
    result = cli("generate", "--kind", KIND, "--device", "kvm=/dev/kvm", "--device", "x{index}=/dev/ttyS*",
                 "--output", str(output), "--allow-empty", host=host)
    assert result.returncode == 0, result.stderr
    assert "warning: --device" in result.stderr and "matches no device" in result.stderr
    assert [d["name"] for d in json.loads(output.read_text())["devices"]] == ["kvm"]
    # not a device node: named as what was met
    result = cli("generate", "--kind", KIND, "--device", "d=/dev/serial/by-id/dangling", host=host)
    assert result.returncode == 1 and "a link to no device node under /dev" in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--device", "serial=/dev/ttyUSB*"], 'needs {name} or {index}'),
    (["--device", "a=/dev/kvm", "--device", "a=/dev/fuse"], 'device "a" (/dev/fuse) is also --device "a=/dev/kvm"'),
    (["--device", "kvm=/etc/passwd"], "neither a path under /dev"),
    (["--device", "kvm=usb:403:6001"], "is not usb:VENDOR:PRODUCT[:SERIAL]"),
    (["--device", "kvm"], "not NAME=SELECTOR"),
    (["--device=-bad=/dev/kvm"], 'device name "-bad"'),
    (["--device", "kvm=/dev/kvm", "--shared", "0"], "--shared: \"0\" is not a whole number"),
    (["--device", "kvm=/dev/kvm", "--env", "=x"], "env[0]:"),
])
def test_bad_input_is_one_line(host, args, message):
    result = cli("generate", "--kind", KIND, *args, host=host)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not result.stdout


def test_from_a_file_to_an_output_written_atomically_and_only_when_changed(host):
    output = host / "cdi" / "serial.yaml"
    output.parent.mkdir()
    conf = host / "serial-gen.yaml"
    conf.write_text(f"kind: {KIND}\noutput: {output}\ndevices:\n"
                    "  - name: 'adapter-{name}'\n    selector: usb:0403:6001\n    shared: 2\n"
                    "    env: [SERIAL=1]\n  - name: kvm\n    selector: /dev/kvm\n")
    cli("generate", "--from", str(conf), host=host, check=True)
    import yaml

    spec = yaml.safe_load(output.read_text())
    assert [d["name"] for d in spec["devices"]] == ["adapter-A50285BI", "adapter-B7XK21QA", "kvm"]
    assert stat.S_IMODE(output.stat().st_mode) == 0o644 and output.stat().st_uid == 0
    assert cli("validate", str(output)).returncode == 0
    inode = output.stat().st_ino
    again = cli("generate", "--from", str(conf), host=host, check=True)
    assert "unchanged" in again.stderr and output.stat().st_ino == inode
    assert sorted(p.name for p in output.parent.iterdir()) == ["serial.yaml"]  # no temp file left

    conf.write_text(f"kind: {KIND}\ndevices:\n  - name: kvm\n    selector: /dev/kvm\n    mount: []\n")
    result = cli("generate", "--from", str(conf), host=host)
    assert result.returncode == 1 and result.stderr.startswith(f"cdi-hook: {conf}: devices[0].mount: unknown field")
    result = cli("generate", "--from", str(conf), "--kind", KIND, host=host)
    assert result.returncode == 1 and "give no --kind" in result.stderr


# --- pure parts -------------------------------------------------------------------------------

def test_templates_clean_what_the_host_names():
    selector = generate.Selector("--device x", "dev-{name}-{index}", "/dev/x*", ("path", "/dev/x*"), None, {})
    assert generate.device_name(selector, Match("weird name+1", "/dev/x", ()), 3, 4) == "dev-weird_name_1-3"


def test_hold_slot_files_read_back_as_their_key():
    for key in ("c 10:229", "mount /srv/a%slot1", "name v.com/c=x", "b 7:0"):
        for slot in (0, 1, 42):
            assert holds._key_of_file(holds._record_name(key, slot)) == key


def test_shared_unit_ids():
    assert unit_ids("kvm", 1) == ["kvm"]
    assert unit_ids("fuse", 3) == ["fuse#0", "fuse#1", "fuse#2"]
    assert device_of("fuse#2") == "fuse" and device_of("kvm") == "kvm"


def test_validate_refuses_a_bad_share_count(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"cdiVersion": "0.6.0", "kind": KIND, "devices": [
        {"name": "a", "annotations": {SHARED_ANNOTATION: "07"}, "containerEdits": {"env": ["A=1"]}}]}))
    result = cli("validate", str(path))
    assert result.returncode == 1
    assert f'{path}: devices[0].annotations: {SHARED_ANNOTATION} "07" is not a whole number' in result.stderr


def test_a_file_without_a_known_suffix_is_refused(tmp_path):
    with pytest.raises(CdiError, match="ends in .yaml"):
        generate.load_request(str(tmp_path / "gen.conf"))


# --- containers -------------------------------------------------------------------------------

def _top(host: Path, name: str) -> Path:
    (host / name).mkdir()
    return host / name


SCRIPT = ("for n in /dev/ttyUSB0 /dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0; do "
          "test -c $n && head -c 2 $n | od -An -tx1; done; echo END")


def test_generated_spec_reaches_a_runc_container_through_the_live_hook(host, runc):
    spec = spec_of("--device", "{name}=/dev/serial/by-id/*A50285BI*", host=host)
    name = f"{KIND}=usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
    bundle, log_file = hook_env.bundle_with_hook(_top(host, "run"), spec, [name], SCRIPT)
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("00 00") == 2 and "END" in result.stdout, result.stdout
    [line] = hook_env.log_lines(log_file)
    assert line["devices"] == [name]


def test_generated_spec_reaches_a_runc_container_through_inject_edits(host, runc, monkeypatch):
    spec = spec_of("--device", "{name}=/dev/serial/by-id/*A50285BI*", host=host)
    spec_dir = host / "run" / "cdi"
    oci_env.write_spec(spec_dir, "serial.json", spec)
    bundle = oci_env.make_bundle(host / "run" / "bundle", ["sh", "-c", SCRIPT])
    name = f"{KIND}=usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
    result = subprocess.run([sys.executable, "-m", "cdi_hook", "inject", "--bundle", str(bundle), "--mode", "edits",
                             "--device", name, "--spec-dir", str(spec_dir)], capture_output=True, text=True,
                            cwd=oci_env.REPO, env={**os.environ, "CDI_HOOK_INSECURE_SPECS": "1"})
    assert result.returncode == 0, result.stderr
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("00 00") == 2 and "END" in result.stdout, result.stdout


def test_a_shared_device_is_held_by_at_most_its_count_of_containers(host, runc):
    spec = spec_of("--device", "kvm=/dev/kvm", "--shared", "2", host=host)
    name = f"{KIND}=kvm"
    bundles = []
    for i in range(3):
        bundle, _ = hook_env.bundle_with_hook(_top(host, f"c{i}"), spec, [name], "test -c /dev/kvm && sleep 120")
        bundles.append(bundle)
    with oci_env.detached_container(bundles[0]) as first, oci_env.detached_container(bundles[1]) as second:
        result = oci_env.run_container(bundles[2])
        assert result.returncode != 0, "a third container got a device its spec shares among two"
        [line] = [line for line in result.stderr.splitlines() if "all 2 shares" in line]
        assert (f"exclusive device for {name}: all 2 shares are held, as {name}, by running containers "
                f"'{first.id}' (pid {first.pid}), '{second.id}' (pid {second.pid})") in line, line
        assert SHARED_ANNOTATION in line
        explain = subprocess.run([sys.executable, "-m", "cdi_hook", "explain", "--bundle", str(bundles[2]),
                                  "--spec-dir", str(host / "c2" / "cdi")], capture_output=True, text=True,
                                 cwd=oci_env.REPO, env={**os.environ, "CDI_HOOK_INSECURE_SPECS": "1"})
        ids = sorted((first.id, second.id))
        assert (f"shared by 2, held by {ids[0]} as {name} (c 1:5); held by {ids[1]} as {name} (c 1:5)"
                in explain.stdout), explain
        # edits cannot hold: refused, not given unheld
        refused = subprocess.run([sys.executable, "-m", "cdi_hook", "inject", "--bundle", str(bundles[2]),
                                  "--mode", "edits", "--device", name, "--spec-dir", str(host / "c2" / "cdi")],
                                 capture_output=True, text=True, cwd=oci_env.REPO,
                                 env={**os.environ, "CDI_HOOK_INSECURE_SPECS": "1"})
        assert refused.returncode == 1 and "(shared by 2)" in refused.stderr, refused.stderr
    # both holders gone: their holds are stale, the next one starts
    bundle, _ = hook_env.bundle_with_hook(_top(host, "c3"), spec, [name], "test -c /dev/kvm && echo GOT-IT")
    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and "GOT-IT" in result.stdout, result.stderr


def test_the_device_plugin_lists_a_shared_device_as_its_count_of_units(host, root_only):
    import test_device_plugin as dp

    socket_dir = Path(__import__("tempfile").mkdtemp(prefix="cdi-dp-", dir="/tmp"))
    node = dp.Node(host / "plugin", socket_dir)
    (host / "plugin").mkdir()
    try:
        node.start()
        # --shared counts for every device of its line: kvm, unshared, is a line of its own
        oci_env.write_spec(node.spec_dir, "fuse.json", spec_of("--device", "fuse=/dev/fuse", "--shared", "3",
                                                               host=host))
        oci_env.write_spec(node.spec_dir, "kvm.json", spec_of("--device", "kvm=/dev/kvm", host=host))
        dp.registered(node, KIND)
        node.kubelet.wait_for(KIND, {"fuse#0": "Healthy", "fuse#1": "Healthy", "fuse#2": "Healthy",
                                     "kvm": "Healthy"})
        lines = [json.loads(line) for line in node.plugin_log().splitlines() if '"device"' in line]
        fuse = [line for line in lines if line.get("event") == "device" and line.get("device") == "fuse"]
        assert len(fuse) == 1 and fuse[0]["units"] == 3, lines  # one line for its units, not three
        response = node.allocate(["fuse#0", "fuse#2"], ["fuse#1"], resource=KIND)
        first, second = response.container_responses
        assert [d.name for d in first.cdi_devices] == [f"{KIND}=fuse"]  # two units, one device
        assert [d.name for d in second.cdi_devices] == [f"{KIND}=fuse"]
        os.unlink(host / "dev" / "fuse")  # the node goes: every unit of it goes unhealthy
        node.kubelet.wait_for(KIND, {"fuse#0": "Unhealthy", "fuse#1": "Unhealthy", "fuse#2": "Unhealthy",
                                     "kvm": "Healthy"})
    finally:
        node.stop()
        import shutil

        shutil.rmtree(socket_dir, ignore_errors=True)


# --- hotplug -----------------------------------------------------------------------------------

def _wait_for(predicate, what: str, log: Path, seconds: float = 1.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{what} not within {seconds} s; watcher log:\n{log.read_text()}")


def _names(output: Path) -> list[str] | None:
    try:
        return [d["name"] for d in json.loads(output.read_text())["devices"]]
    except (FileNotFoundError, ValueError):
        return None


def test_hotplug_a_node_made_or_removed_reaches_the_spec_within_a_second(host):
    output = host / "cdi" / "serial.json"
    output.parent.mkdir()
    conf = host / "gen.yaml"
    conf.write_text(f"kind: {KIND}\noutput: {output}\ndevices:\n  - name: 'serial-{{name}}'\n"
                    "    selector: /dev/ttyUSB*\n  - name: '{name}'\n    selector: /dev/serial/by-id/*\n")
    log = host / "watch.log"
    with open(log, "w") as log_file:
        watcher = subprocess.Popen([sys.executable, "-m", "cdi_hook", "watch", "--generate", str(conf),
                                    "--dev-root", str(host / "dev"), "--sys-root", str(host / "sys")],
                                   cwd=oci_env.REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        by_id = ["usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0", "usb-FTDI_FT232R_USB_UART_B7XK21QA-if00-port0"]
        _wait_for(lambda: _names(output) == ["serial-ttyUSB0", "serial-ttyUSB1", *by_id], "the first spec", log,
                  10)
        os.mknod(host / "dev" / "ttyUSB2", stat.S_IFCHR | 0o666, os.makedev(188, 2))
        _wait_for(lambda: "serial-ttyUSB2" in (_names(output) or []), "a new node", log)
        os.unlink(host / "dev" / "ttyUSB0")
        _wait_for(lambda: "serial-ttyUSB0" not in (_names(output) or []), "a removed node", log)
        # a folder made later (udev's first by-id link of a boot) is watched too
        (host / "dev" / "serial" / "by-id").rename(host / "by-id-away")
        _wait_for(lambda: not any(n.startswith("usb-") for n in _names(output) or []), "links gone", log)
        (host / "dev" / "serial" / "by-id").mkdir()
        time.sleep(0.3)  # the folder's own event handled: the link must be seen by a watch on it
        (host / "dev" / "serial" / "by-id" / "usb-new").symlink_to("../../ttyUSB2")
        _wait_for(lambda: "usb-new" in (_names(output) or []), "a link in a new folder", log)
        for name in ("ttyUSB1", "ttyUSB2"):
            os.unlink(host / "dev" / name)
        _wait_for(lambda: not output.exists() and "removed, no device" in log.read_text(),
                  "the spec removed with its last device", log)
        assert watcher.poll() is None, log.read_text()
    finally:
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(10) == 0, log.read_text()
    text = log.read_text()
    assert "written, 4 device(s)" in text and "removed, no device matches" in text, text


def test_watch_generate_refuses_what_it_cannot_run(tmp_path):
    conf = tmp_path / "gen.yaml"
    conf.write_text(f"kind: {KIND}\ndevices:\n  - name: kvm\n    selector: /dev/kvm\n")
    result = cli("watch", "--generate", str(conf))
    assert result.returncode == 1 and result.stderr == (
        f"cdi-hook: watch --generate {conf}: no output: give --output FILE or `output:` in the file\n")
    result = cli("watch", "--output", str(tmp_path / "x.json"))
    assert result.returncode == 1 and "go with --generate FILE" in result.stderr
