"""Network devices moved into real runc containers, and back.

Every address lives only in namespaces the test creates: the "runtime" side of each test
is a fresh network namespace (`cdi-test-...`), and the hook's functions run in a forked
child that joined it, as the hook would run in the runtime's namespace. The container gets
its own namespace from runc. Traffic goes only between the container and a test namespace
(TEST-NET-1, 192.0.2.0/24). Every interface, namespace and container is removed even when
a test fails: veths and macvlans die with the namespaces that hold them.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import re
import subprocess
import sys
import uuid

import pytest
from conftest import require, require_program
from oci_env import REPO, detached_container, make_bundle

from cdi_hook.errors import HookError
from cdi_hook.live import netdev
from cdi_hook.spec import rules
from cdi_hook.spec.model import NetDevice

CLONE_NEWNET = 0x40000000
ORIGIN = "vendor.com/net=a"


class ChildError(Exception):
    """An exception raised in the forked child, as 'ClassName: message'."""


def in_netns(netns_name: str, function, *args):
    """Call function(*args) in a forked child inside /run/netns/<netns_name>; return its result.

    The test process itself never changes namespace.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: join the namespace, run, report, exit without pytest's cleanup
        os.close(read_end)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns_name}", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            outcome = ("ok", function(*args))
        except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
            outcome = ("error", f"{type(error).__name__}: {error}")
        with os.fdopen(write_end, "wb") as pipe:
            pickle.dump(outcome, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise ChildError(value)
    return value


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = (["ip", "-n", netns] if netns else ["ip"]) + list(args)
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def link_names(netns: str | None = None) -> set[str]:
    links = json.loads(ip("-j", "link", "show", netns=netns) or "[]")
    return {link["ifname"] for link in links}


def unique(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:8]  # "cdt" + 8 + role letter < 16 bytes


@pytest.fixture
def netns(root_only):
    """A factory of test network namespaces, all deleted at the end."""
    require_program("ip")
    made = []

    def make() -> str:
        name = unique("cdi-test-")
        ip("netns", "add", name)
        made.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    yield make
    for name in made:
        ip("netns", "del", name, check=False)


@pytest.fixture
def runtime_ns(netns):
    """The namespace that plays the runtime's: the hook functions run in it."""
    return netns()


def veth_pair(runtime: str, peer_netns: str | None = None) -> tuple[str, str]:
    """A veth pair in `runtime`; the peer moved to `peer_netns` when given."""
    tag = unique("cdt")
    end, peer = tag + "a", tag + "b"
    ip("link", "add", end, "type", "veth", "peer", "name", peer, netns=runtime)
    if peer_netns:
        ip("link", "set", peer, "netns", peer_netns, netns=runtime)
    return end, peer


def container_bundle(tmp_path, *, namespaces=None, net_raw=False):
    bundle = make_bundle(tmp_path / "bundle", ["sleep", "120"], namespaces=namespaces)
    if net_raw:  # busybox ping needs a raw socket
        config = json.loads((bundle / "config.json").read_text())
        for kind in ("bounding", "effective", "permitted"):
            config["process"]["capabilities"][kind].append("CAP_NET_RAW")
        (bundle / "config.json").write_text(json.dumps(config))
    return bundle


DEFAULT_NAMESPACES = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]


def test_veth_moved_keeps_address_mtu_and_is_up_and_carries_traffic(runc, tmp_path, netns, runtime_ns):
    far = netns()  # the other end of the wire
    end, peer = veth_pair(runtime_ns, peer_netns=far)
    ip("addr", "add", "192.0.2.1/24", "dev", end, netns=runtime_ns)
    ip("-6", "addr", "add", "2001:db8:5::1/64", "dev", end, "nodad", netns=runtime_ns)
    ip("link", "set", end, "mtu", "1400", "up", netns=runtime_ns)
    ip("addr", "add", "192.0.2.2/24", "dev", peer, netns=far)
    ip("link", "set", peer, "mtu", "1400", "up", netns=far)

    with detached_container(container_bundle(tmp_path, net_raw=True)) as container:
        items = [(ORIGIN, NetDevice(end, "data0"))]
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)

        shown = container.exec(["ip", "addr", "show", "data0"])
        assert shown.returncode == 0, shown.stderr
        assert "mtu 1400" in shown.stdout
        assert "state UP" in shown.stdout or ",UP" in shown.stdout
        assert "inet 192.0.2.1/24" in shown.stdout
        assert "inet6 2001:db8:5::1/64" in shown.stdout
        assert end not in link_names(runtime_ns)  # it left the runtime's namespace

        ping = container.exec(["ping", "-c", "2", "-W", "3", "192.0.2.2"], timeout=20)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "2 packets received" in ping.stdout


def test_macvlan_moved_into_container(runc, tmp_path, netns, runtime_ns):
    parent, _ = veth_pair(runtime_ns)
    macvlan = unique("cdt") + "m"
    ip("link", "add", "link", parent, "name", macvlan, "type", "macvlan", "mode", "bridge", netns=runtime_ns)
    ip("addr", "add", "192.0.2.17/28", "dev", macvlan, netns=runtime_ns)

    with detached_container(container_bundle(tmp_path)) as container:
        items = [(ORIGIN, NetDevice(macvlan, "mv0"))]
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        shown = container.exec(["ip", "addr", "show", "mv0"])
        assert shown.returncode == 0, shown.stderr
        assert "inet 192.0.2.17/28" in shown.stdout
        assert "UP" in shown.stdout.split(">")[0]  # administratively up, as the spec says
        assert macvlan not in link_names(runtime_ns)


def test_missing_host_interface_refused(runc, tmp_path, runtime_ns):
    with detached_container(container_bundle(tmp_path)) as container:
        with pytest.raises(ChildError, match="HookError: network device for vendor.com/net=a: host interface "
                                             "'cdtnothere' does not exist in the runtime's network namespace"):
            in_netns(runtime_ns, netdev.move_into_container, container.pid, [(ORIGIN, NetDevice("cdtnothere", "x0"))],
                     container.id)


def test_name_clash_inside_refused_and_nothing_moved(runc, tmp_path, runtime_ns):
    first, _ = veth_pair(runtime_ns)
    second, _ = veth_pair(runtime_ns)
    with detached_container(container_bundle(tmp_path)) as container:
        items = [(ORIGIN, NetDevice(first, "data0")), ("vendor.com/net=b", NetDevice(second, "lo"))]
        with pytest.raises(ChildError, match="vendor.com/net=b: an interface named 'lo' already exists in the container"):
            in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        assert {first, second} <= link_names(runtime_ns)  # checked before anything moved
        assert "data0" not in container.exec(["ip", "link"]).stdout


def test_partial_failure_moves_back_what_was_moved(runc, tmp_path, runtime_ns):
    end, _ = veth_pair(runtime_ns)
    ip("addr", "add", "192.0.2.33/24", "dev", end, netns=runtime_ns)
    ip("link", "set", end, "mtu", "1300", "up", netns=runtime_ns)
    bridge = unique("cdt") + "r"  # the kernel never lets a bridge change namespace
    ip("link", "add", bridge, "type", "bridge", netns=runtime_ns)
    with detached_container(container_bundle(tmp_path)) as container:
        items = [(ORIGIN, NetDevice(end, "data0")), ("vendor.com/net=br", NetDevice(bridge, "br0"))]
        with pytest.raises(ChildError, match=f"vendor.com/net=br: moving '{bridge}' into the container as 'br0'"):
            in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        assert "data0" not in container.exec(["ip", "link"]).stdout
    shown = ip("addr", "show", end, netns=runtime_ns)
    assert "inet 192.0.2.33/24" in shown and "mtu 1300" in shown and "UP" in shown.split(">")[0]


def test_container_sharing_the_runtime_netns_refused(runc, tmp_path):
    require(os.path.exists("/proc/self/ns/net"), "needs /proc")
    no_network = [ns for ns in DEFAULT_NAMESPACES if ns["type"] != "network"]
    tag = unique("cdt")
    ip("link", "add", tag + "a", "type", "veth", "peer", "name", tag + "b")
    try:
        with detached_container(container_bundle(tmp_path, namespaces=no_network)) as container:
            with pytest.raises(HookError, match="the container shares the runtime's network namespace"):
                netdev.move_into_container(container.pid, [(ORIGIN, NetDevice(tag + "a", "data0"))], container.id)
        assert tag + "a" in link_names()
    finally:
        ip("link", "del", tag + "a", check=False)


def test_return_to_host_while_container_lives(runc, tmp_path, runtime_ns):
    end, _ = veth_pair(runtime_ns)
    ip("addr", "add", "192.0.2.49/24", "dev", end, netns=runtime_ns)
    with detached_container(container_bundle(tmp_path)) as container:
        items = [(ORIGIN, NetDevice(end, "data0"))]
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        state = {"pid": container.pid, "status": "running", "id": container.id}
        config = {"linux": {"namespaces": DEFAULT_NAMESPACES}}
        notes = in_netns(runtime_ns, netdev.return_to_host, state, config, items)
        assert notes == [f"{ORIGIN}: 'data0' returned to the host as '{end}' (down, without addresses)"]
        assert end in link_names(runtime_ns)
        assert "data0" not in container.exec(["ip", "link"]).stdout
        # the record went with the first call: a second one returns nothing, and says so
        again = in_netns(runtime_ns, netdev.return_to_host, state, config, items)
        assert again == [f"{ORIGIN}: no record of moving '{end}' into this namespace; nothing to return"]
    shown = ip("addr", "show", end, netns=runtime_ns)
    assert "192.0.2.49" not in shown and "UP" not in shown.split(">")[0]


def test_return_to_host_from_persistent_netns_path_after_container_is_gone(runc, tmp_path, netns, runtime_ns):
    persistent = netns()
    namespaces = [ns if ns["type"] != "network" else {"type": "network", "path": f"/run/netns/{persistent}"}
                  for ns in DEFAULT_NAMESPACES]
    end, _ = veth_pair(runtime_ns)
    items = [(ORIGIN, NetDevice(end, "data0"))]
    with detached_container(container_bundle(tmp_path, namespaces=namespaces)) as container:
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        pid, cid = container.pid, container.id
    assert "data0" in link_names(persistent)  # the container is gone, its namespace is not
    state = {"pid": pid, "status": "stopped", "id": cid}
    notes = in_netns(runtime_ns, netdev.return_to_host, state, {"linux": {"namespaces": namespaces}}, items)
    assert notes == [f"{ORIGIN}: 'data0' returned to the host as '{end}' (down, without addresses)"]
    assert end in link_names(runtime_ns)
    assert "data0" not in link_names(persistent)


def test_return_to_host_when_namespace_is_gone_is_said(runc, tmp_path, runtime_ns):
    """The interfaces moved in cannot come home by name when the container's namespace is
    gone first (CRI-O drops a pod's before its containers' poststop): said as the stage's
    warning (the hook logs a poststop HookError so), never silently; the record goes."""
    end, peer = veth_pair(runtime_ns)
    items = [(ORIGIN, NetDevice(end, "data0"))]
    with detached_container(container_bundle(tmp_path)) as container:
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        pid, record = container.pid, os.path.join(netdev.record_dir(), container.id + ".json")
        assert os.path.exists(record)
    # the namespace died with the container: the kernel destroyed the veth, and so its peer
    assert peer not in link_names(runtime_ns)
    with pytest.raises(ChildError, match="HookError: network device: at poststop: network namespace not found: .*"
                                         "destroyed virtual ones"):
        in_netns(runtime_ns, netdev.return_to_host, {"pid": pid, "status": "stopped", "id": container.id},
                 {"linux": {"namespaces": DEFAULT_NAMESPACES}}, items)
    assert not os.path.exists(record)  # the record goes all the same


def test_return_to_host_refuses_to_overwrite_a_host_name(runc, tmp_path, runtime_ns):
    end, _ = veth_pair(runtime_ns)
    items = [(ORIGIN, NetDevice(end, "data0"))]
    with detached_container(container_bundle(tmp_path)) as container:
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        ip("link", "add", end, "type", "veth", "peer", "name", end[:-1] + "z", netns=runtime_ns)  # name taken
        state = {"pid": container.pid, "status": "running", "id": container.id}
        with pytest.raises(ChildError, match=f"HookError: network device: at poststop: {ORIGIN}: 'data0' cannot "
                                             f"return: the host already has an interface named '{end}'"):
            in_netns(runtime_ns, netdev.return_to_host, state, {"linux": {"namespaces": DEFAULT_NAMESPACES}}, items)
        assert "data0" in container.exec(["ip", "link"]).stdout


@pytest.mark.parametrize("name, problem", [
    ("", "required"), ("a" * 16, "longer than 15"), ("a/b", "not a valid"), ("a b", "not a valid"),
    ("..", "not a valid"), ("a%s", "only once"), ("eth%d", None), ("eth0", None),
])
def test_interface_name_rules(name, problem):
    found = rules.interface_name_problem(name)
    assert (found is None) if problem is None else (problem in found)


def test_no_items_does_nothing_and_imports_nothing():
    # pyroute2 is heavy: a hook run for a spec without network devices must not load it
    code = ("import sys; from cdi_hook.live import netdev; netdev.move_into_container(1, [], 'x'); "
            "assert netdev.return_to_host({}, {}, []) == []; assert 'pyroute2' not in sys.modules")
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_name_template_lets_the_kernel_choose(runc, tmp_path, runtime_ns):
    end, _ = veth_pair(runtime_ns)
    items = [(ORIGIN, NetDevice(end, "lo%d"))]  # "lo" exists inside; a template may still be used
    with detached_container(container_bundle(tmp_path)) as container:
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        assert re.search(r"^\d+: lo0[@:]", container.exec(["ip", "link"]).stdout, re.M)
        # the record knows it by its index: it goes home under its host name
        state = {"pid": container.pid, "status": "running", "id": container.id}
        notes = in_netns(runtime_ns, netdev.return_to_host, state, {"linux": {"namespaces": DEFAULT_NAMESPACES}}, items)
        assert notes == [f"{ORIGIN}: 'lo0' returned to the host as '{end}' (down, without addresses)"]
        assert end in link_names(runtime_ns)


def _move_without_prechecks(container_pid, items):
    """move_into_container as if a clash appeared after the checks (runs in the forked child)."""
    netdev._check_all = lambda host, inner, items: [
        (origin, device, netdev._link_state(host, netdev._find_link(host, device.host_interface_name)))
        for origin, device in items]
    netdev.move_into_container(container_pid, items, "cdi-test-no-prechecks")


def test_rename_refused_after_move_is_undone(runc, tmp_path, runtime_ns):
    # The kernel moves first and renames second: a clash it finds leaves the interface in the
    # container under its host name. The hook must bring it back, addresses and all.
    end, _ = veth_pair(runtime_ns)
    ip("addr", "add", "192.0.2.65/24", "dev", end, netns=runtime_ns)
    ip("link", "set", end, "up", netns=runtime_ns)
    with detached_container(container_bundle(tmp_path)) as container:
        with pytest.raises(ChildError, match="an interface named 'lo' already exists in the container"):
            in_netns(runtime_ns, _move_without_prechecks, container.pid, [(ORIGIN, NetDevice(end, "lo"))])
        assert end not in container.exec(["ip", "link"]).stdout
    shown = ip("addr", "show", end, netns=runtime_ns)
    assert "inet 192.0.2.65/24" in shown and "UP" in shown.split(">")[0]


def test_container_netns_accepts_oci_objects(tmp_path, netns):
    from cdi_hook import oci

    persistent = netns()
    state = oci.State(id="x", bundle=str(tmp_path), pid=None, status="stopped")
    config = oci.Config(path="", rootfs="", raw={"linux": {"namespaces": [
        {"type": "network", "path": f"/run/netns/{persistent}"}]}})
    fd, where = netdev.container_netns(state, config)
    assert fd is not None and where == f"/run/netns/{persistent}"
    os.close(fd)
    fd, where = netdev.container_netns(state, oci.Config(path="", rootfs="", raw={"linux": {"namespaces": [
        {"type": "network"}]}}))
    assert fd is None and "ended with its processes" in where


def test_hook_moves_spec_net_device_and_poststop_returns_it(runc, tmp_path, netns):
    """End to end: runc runs cdi-hook at createRuntime and poststop for a 1.1.0 spec's netDevices."""
    from hook_env import bundle_with_hook
    from oci_env import hook_entry, run_container

    persistent = netns()  # the container's namespace outlives it, as with Podman or CNI
    namespaces = [ns if ns["type"] != "network" else {"type": "network", "path": f"/run/netns/{persistent}"}
                  for ns in DEFAULT_NAMESPACES]
    tag = unique("cdt")
    ip("link", "add", tag + "a", "type", "veth", "peer", "name", tag + "b")
    try:
        spec = {"cdiVersion": "1.1.0", "kind": "test.cdi-hook.io/net",
                "devices": [{"name": "nic", "containerEdits": {
                    "netDevices": [{"hostInterfaceName": tag + "a", "name": "data0"}]}}]}
        bundle, log_file = bundle_with_hook(tmp_path, spec, ["test.cdi-hook.io/net=nic"],
                                            "ip link show data0", namespaces=namespaces)
        config = json.loads((bundle / "config.json").read_text())
        config["hooks"]["poststop"] = [hook_entry([str(tmp_path / "cdi")], stage="poststop", log_file=str(log_file))]
        (bundle / "config.json").write_text(json.dumps(config))

        result = run_container(bundle)
        assert result.returncode == 0, result.stdout + result.stderr + (log_file.read_text() if log_file.exists() else "")
        assert re.search(r"^\d+: data0@", result.stdout, re.M) and "UP" in result.stdout
        assert tag + "a" in link_names()  # back home under its host name after poststop
        assert "data0" not in link_names(persistent)
    finally:
        ip("link", "del", tag + "a", check=False)


def test_without_a_record_nothing_is_returned(runc, tmp_path, runtime_ns):
    """An interface under the expected name but never recorded (the container's own, or a
    record lost) stays where it is, with a warning naming it."""
    end, _ = veth_pair(runtime_ns)
    items = [(ORIGIN, NetDevice(end, "data0"))]
    with detached_container(container_bundle(tmp_path)) as container:
        in_netns(runtime_ns, netdev.move_into_container, container.pid, items, container.id)
        os.unlink(os.path.join(netdev.record_dir(), container.id + ".json"))
        state = {"pid": container.pid, "status": "running", "id": container.id}
        with pytest.raises(ChildError, match=f"network device: at poststop: {ORIGIN}: '{end}' is not returned: "
                                             "there is no record of moving it into this namespace"):
            in_netns(runtime_ns, netdev.return_to_host, state, {"linux": {"namespaces": DEFAULT_NAMESPACES}}, items)
        assert "data0" in container.exec(["ip", "link"]).stdout
        assert end not in link_names(runtime_ns)


def test_record_dir_must_be_private(runc, tmp_path, runtime_ns, monkeypatch):
    """A record dir others may write is refused, and then nothing moves: without a record
    poststop could not tell the interface from one the container made."""
    top = tmp_path / "state"
    (top / "netdev").mkdir(parents=True, mode=0o700)
    os.chmod(top / "netdev", 0o777)
    monkeypatch.setenv("CDI_HOOK_STATE_DIR", str(top / "held"))
    end, _ = veth_pair(runtime_ns)
    with detached_container(container_bundle(tmp_path)) as container:
        with pytest.raises(ChildError, match=f"network device for {ORIGIN}: recording the moved interfaces in "
                                             f"{top}/netdev: .* not a private folder"):
            in_netns(runtime_ns, netdev.move_into_container, container.pid, [(ORIGIN, NetDevice(end, "data0"))],
                     container.id)
        assert "data0" not in container.exec(["ip", "link"]).stdout
    assert end in link_names(runtime_ns)  # moved back
