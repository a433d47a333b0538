"""A container with CAP_NET_ADMIN against the poststop return of its network devices.

The hook moves a host interface into the container at createRuntime and, at poststop,
sends it home under its host name. The container owns its namespace meanwhile: it can
rename the interface, make its own under the expected name, delete a virtual interface and
make one with the same index and MAC, add alternative names. Whatever it does, poststop
must send home only the interface that was moved in (found by what was recorded at
createRuntime), never one the container made, and the real one under its host name.

Everything runs through real runc with cdi-hook at createRuntime and poststop. The
container's network namespace is a persistent one (`/run/netns/...`, as Podman and CNI make
it), so it outlives the container and poststop can still act in it. The host interface is a
veth pair in the runtime's (this test's) namespace; both ends are removed at the end.
A control run of runc alone is not meaningful here: without the hook nothing is moved in.
"""

from __future__ import annotations

import json
import os
import stat
import uuid

import pytest
from conftest import require_program
from hook_env import bundle_with_hook, log_lines
from oci_env import detached_container, hook_entry, run_container
from test_netdev import ip

DEVICE = "test.cdi-hook.io/net=nic"
DEFAULT_NAMESPACES = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]


def links(netns: str | None = None) -> dict[str, dict]:
    """name -> `ip -d -j link` entry, in the namespace."""
    return {link["ifname"]: link for link in json.loads(ip("-d", "-j", "link", "show", netns=netns) or "[]")}


def record_dir() -> str:
    """Where the hook keeps its records of moved interfaces: beside the exclusive-device holds."""
    return os.path.join(os.path.dirname(os.environ["CDI_HOOK_STATE_DIR"]), "netdev")


@pytest.fixture
def host_veth(root_only):
    """A veth pair on the host (the runtime's namespace): (the end the spec names, its peer)."""
    require_program("ip")
    tag = "cdt" + uuid.uuid4().hex[:8]
    ip("link", "add", tag + "a", "type", "veth", "peer", "name", tag + "b")
    yield tag + "a", tag + "b"
    for name in (tag + "a", tag + "b"):
        ip("link", "del", name, check=False)


@pytest.fixture
def persistent_netns(root_only):
    require_program("ip")
    name = "cdi-test-" + uuid.uuid4().hex[:8]
    ip("netns", "add", name)
    yield name
    ip("netns", "del", name, check=False)


def net_bundle(tmp_path, host_if: str, netns: str, script: str):
    """A bundle that asks for host_if as 'data0', with cdi-hook at createRuntime and poststop,
    in the persistent namespace `netns`, its process holding CAP_NET_ADMIN."""
    spec = {"cdiVersion": "1.1.0", "kind": "test.cdi-hook.io/net",
            "devices": [{"name": "nic", "containerEdits": {
                "netDevices": [{"hostInterfaceName": host_if, "name": "data0"}]}}]}
    namespaces = [ns if ns["type"] != "network" else {"type": "network", "path": f"/run/netns/{netns}"}
                  for ns in DEFAULT_NAMESPACES]
    bundle, log_file = bundle_with_hook(tmp_path, spec, [DEVICE], script, namespaces=namespaces)
    config = json.loads((bundle / "config.json").read_text())
    config["hooks"]["poststop"] = [hook_entry([str(tmp_path / "cdi")], stage="poststop", log_file=str(log_file))]
    for kind in ("bounding", "effective", "permitted"):
        config["process"]["capabilities"][kind].append("CAP_NET_ADMIN")
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle, log_file


def warnings(log_file) -> list[str]:
    return [w for line in log_lines(log_file) for w in line.get("warnings", [])]


def test_renamed_interface_comes_home_and_the_impostor_stays(runc, tmp_path, host_veth, persistent_netns):
    """The container renames the interface it got and makes its own 'data0': poststop must send
    the real one home under its host name and leave the impostor where it was made."""
    end, peer = host_veth
    mac = links()[end]["address"]
    script = "ip link set data0 down && ip link set data0 name hidden0 && ip link add name data0 type veth && ip -o link"
    bundle, log_file = net_bundle(tmp_path, end, persistent_netns, script)

    cid = "cdi-test-" + uuid.uuid4().hex[:12]
    result = run_container(bundle, container_id=cid)
    assert result.returncode == 0, result.stdout + result.stderr + (log_file.read_text() if log_file.exists() else "")
    assert "hidden0" in result.stdout and ": data0@" in result.stdout  # the attack happened

    home = links()
    assert end in home, "the real interface stayed trapped in the container's namespace"
    assert home[end]["address"] == mac and home[end].get("link") == peer  # the real one: its MAC, its peer
    inside = links(persistent_netns)
    assert "hidden0" not in inside
    assert "data0" in inside and inside["data0"]["address"] != mac  # the impostor stays where it was made
    assert not os.path.exists(os.path.join(record_dir(), cid + ".json"))  # the record went at poststop
    assert not warnings(log_file)


def test_forged_index_and_mac_is_never_sent_home(runc, tmp_path, host_veth, persistent_netns):
    """The container deletes the veth it got (its peer on the host dies with it) and makes a
    veth with the same index, name and MAC: poststop must send nothing home, and say so."""
    end, _ = host_veth
    bundle, log_file = net_bundle(tmp_path, end, persistent_netns, "sleep 120")
    with detached_container(bundle) as container:
        record = os.path.join(record_dir(), container.id + ".json")
        modes = [stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else None
                 for path in (record_dir(), record)]
        real = links(persistent_netns)["data0"]
        ip("link", "del", "data0", netns=persistent_netns)
        ip("link", "add", "data0", "index", str(real["ifindex"]), "address", real["address"], "type", "veth",
           "peer", "name", "imp0", netns=persistent_netns)
        forged = links(persistent_netns)["data0"]
        assert (forged["ifindex"], forged["address"]) == (real["ifindex"], real["address"])
    # runc delete ran poststop
    assert end not in links(), "an interface the container made was moved onto the host"
    assert "data0" in links(persistent_netns)
    assert modes == [0o700, 0o600]  # root-only, while the container ran
    assert not os.path.exists(record)
    found = warnings(log_file)
    assert len(found) == 1 and f"'{end}'" in found[0] and "not returned" in found[0], found


def test_altname_added_by_the_container_stays_behind(runc, tmp_path, host_veth, persistent_netns):
    """The container gives the interface an alternative name that a host interface has: the
    interface must still come home, under its host name only."""
    end, peer = host_veth
    bundle, log_file = net_bundle(tmp_path, end, persistent_netns, "sleep 120")
    with detached_container(bundle):
        ip("link", "property", "add", "dev", "data0", "altname", peer, netns=persistent_netns)
        ip("link", "property", "add", "dev", "data0", "altname", end + "x", netns=persistent_netns)
    home = links()
    assert end in home, f"the interface stayed trapped: {warnings(log_file)}"
    assert not home[end].get("altnames")
    assert home[peer]["ifindex"] != home[end]["ifindex"]
    assert not warnings(log_file)
