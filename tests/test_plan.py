"""plan.build: each decision made once, for both the config.json editor and the live injector."""

from __future__ import annotations

import pytest

from cdi_hook import plan
from cdi_hook.errors import CdiError
from cdi_hook.registry import EditsPart, Selection
from cdi_hook.spec.model import ContainerEdits, DeviceNode, Hook, IntelRdt, Mount, NetDevice


def _plan(*edits: ContainerEdits, uid: int = 0, gid: int = 0):
    parts = tuple(EditsPart(f"v.com/c=d{i}", "/etc/cdi/v.json", e) for i, e in enumerate(edits))
    return plan.build(Selection(tuple(p.origin for p in parts), parts), process_uid=uid, process_gid=gid,
                      stat_host=False)


def test_plan_owner_follows_cdi():
    node = DeviceNode("/dev/x", type="c", major=1, minor=3)
    owners = lambda p: [(n.uid, n.gid) for n in p.nodes]  # noqa: E731
    assert owners(_plan(ContainerEdits(device_nodes=(node,)), uid=1000, gid=44)) == [(1000, 44)]
    assert owners(_plan(ContainerEdits(device_nodes=(node,)))) == [(None, None)]  # the runtime's default: root
    explicit = node._replace(uid=0, gid=5)
    assert owners(_plan(ContainerEdits(device_nodes=(explicit,)), uid=1000, gid=44)) == [(0, 5)]


def test_plan_groups_hooks_by_stage_in_plan_order():
    a, b, c = Hook("createRuntime", "/a"), Hook("poststop", "/b"), Hook("prestart", "/c")
    p = _plan(ContainerEdits(hooks=(a, b)), ContainerEdits(hooks=(c,)))
    assert p.hooks_at("createRuntime") == [("v.com/c=d0", a)]
    assert p.hooks_at("prestart", "createRuntime") == [("v.com/c=d1", c), ("v.com/c=d0", a)]


@pytest.mark.parametrize("destination", ["/", "", ".", "/..", "//", "/a/.."])
def test_plan_refuses_a_mount_on_the_root(destination):
    with pytest.raises(CdiError, match="v.com/c=d0: mount /h on .*"):
        _plan(ContainerEdits(mounts=(Mount("/h", destination),)))


def test_plan_node_rules_follow_permissions():
    nodes = (DeviceNode("/dev/a", type="c", major=1, minor=3), DeviceNode("/dev/b", type="b", major=7, minor=0,
             permissions="r"), DeviceNode("/dev/c", type="c", major=1, minor=5, permissions="none"),
             DeviceNode("/dev/p", type="p"), DeviceNode("/dev/u", type="u", major=4, minor=1))
    rules = [(r.type, r.major, r.minor, r.access) for r in _plan(ContainerEdits(device_nodes=nodes)).device_rules]
    # a fifo needs no rule; an unbuffered "u" node is a character device to the cgroup
    assert rules == [("c", 1, 3, "rwm"), ("b", 7, 0, "r"), ("c", 1, 5, ""), ("c", 4, 1, "rwm")]


def test_plan_replaces_a_node_path_named_again_and_keeps_both_rules():
    first, second = DeviceNode("/dev/x", type="c", major=1, minor=3), DeviceNode("/dev/x", type="c", major=1, minor=5)
    p = _plan(ContainerEdits(device_nodes=(first,)), ContainerEdits(device_nodes=(second,)))
    assert [(n.origin, n.node.minor) for n in p.nodes] == [("v.com/c=d1", 5)]
    assert [r.minor for r in p.device_rules] == [3, 5]  # as the reference appends a rule per node


def test_plan_mounts_replace_by_exact_destination_then_sort_by_depth():
    p = _plan(ContainerEdits(mounts=(Mount("/1", "/opt/x/y"), Mount("/2", "/opt/x"), Mount("/3", "/opt/x/"))),
              ContainerEdits(mounts=(Mount("/4", "/opt/x"),)))
    assert [(m.host_path, m.container_path) for _, m in p.mounts] == [("/3", "/opt/x/"), ("/4", "/opt/x"),
                                                                      ("/1", "/opt/x/y")]


def test_plan_env_replaces_in_place_gids_once_rdt_last():
    p = _plan(ContainerEdits(env=("A=1", "B=2"), additional_gids=(0, 5, 6), intel_rdt=IntelRdt(clos_id="a")),
              ContainerEdits(env=("A=3",), additional_gids=(5, 7), intel_rdt=IntelRdt(clos_id="b")))
    assert p.env == (("v.com/c=d1", "A=3"), ("v.com/c=d0", "B=2"))
    assert [g for _, g in p.additional_gids] == [5, 6, 7]
    assert p.intel_rdt == ("v.com/c=d1", IntelRdt(clos_id="b"))


@pytest.mark.parametrize("second, message", [
    (NetDevice("eth9", "net1"), "host interface 'eth9' is also requested by v.com/c=d0"),
    (NetDevice("eth8", "net0"), "container interface name 'net0' is also used by v.com/c=d0"),
])
def test_plan_refuses_two_devices_for_one_interface(second, message):
    with pytest.raises(CdiError, match=f"^v.com/c=d1: {message}$"):
        _plan(ContainerEdits(net_devices=(NetDevice("eth9", "net0"),)), ContainerEdits(net_devices=(second,)))


def test_plan_lets_two_templates_share_a_pattern():
    p = _plan(ContainerEdits(net_devices=(NetDevice("eth9", "net%d"),)),
              ContainerEdits(net_devices=(NetDevice("eth8", "net%d"),)))
    assert len(p.net_devices) == 2


def test_plan_identities_are_host_devices_so_aliases_share_them():
    """What holds key by: the device-level nodes' numbers (a "u" node as "c") and bind mounts'
    host paths; spec-level edits (control devices every unit shares) are nobody's identity;
    a device with neither is its name."""
    gpu0 = DeviceNode("/dev/gpu0", type="c", major=195, minor=0)
    control = EditsPart("v.com/c (spec-level)", "/etc/cdi/v.json",
                        ContainerEdits(device_nodes=(DeviceNode("/dev/ctl", type="c", major=195, minor=255),)))
    zero = EditsPart("v.com/c=0", "/etc/cdi/v.json", ContainerEdits(
        device_nodes=(gpu0,), mounts=(Mount("/fw/0/", "/lib/fw", ("ro", "bind")), Mount("tmpfs", "/t", (), "tmpfs"))))
    everything = EditsPart("v.com/c=all", "/etc/cdi/v.json", ContainerEdits(
        device_nodes=(gpu0._replace(path="/dev/x", type="u"), DeviceNode("/dev/gpu1", type="c", major=195, minor=1))))
    env_only = EditsPart("v.com/c=env", "/etc/cdi/v.json", ContainerEdits(env=("A=1",)))
    parts = (control, zero, everything, env_only)
    p = plan.build(Selection(("v.com/c=0", "v.com/c=all", "v.com/c=env"), parts), stat_host=False)
    assert p.identities == (("v.com/c=0", ("c 195:0", "mount /fw/0")), ("v.com/c=all", ("c 195:0", "c 195:1")),
                            ("v.com/c=env", ("name v.com/c=env",)))
    assert p.identity_of(["v.com/c=all"]) == [("v.com/c=all", ("c 195:0", "c 195:1"))]
