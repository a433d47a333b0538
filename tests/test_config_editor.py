"""plan.build + config_editor.apply_plan: every CDI edit rule, as the reference library
applies it to an OCI spec (its ContainerEdits.Apply does both: decide and write)."""

from __future__ import annotations

import copy
import os

import pytest

from cdi_hook.errors import CdiError
from cdi_hook import config_editor, plan
from cdi_hook.plan import mount_depth
from cdi_hook.registry import EditsPart, Selection
from cdi_hook.request import APPLIED_ANNOTATION
from cdi_hook.spec.model import ContainerEdits, DeviceNode, Hook, IntelRdt, Mount, NetDevice


def plan_of(*parts: tuple[str, ContainerEdits]) -> Selection:
    devices = tuple(dict.fromkeys(origin for origin, _ in parts if "=" in origin))
    return Selection(devices, tuple(EditsPart(origin, "/etc/cdi/test.json", edits) for origin, edits in parts))


def apply_plan(config: dict, selection: Selection, stat_host: bool = True) -> dict:
    """What the editor commands do: decide (plan.build, for this config's process user), then write."""
    uid, gid = config_editor.process_ids(config)
    decided = plan.build(selection, process_uid=uid, process_gid=gid, stat_host=stat_host)
    return config_editor.apply_plan(config, decided)


def one(**edits) -> Selection:
    return plan_of(("vendor.com/class=dev0", ContainerEdits(**edits)))


def base_config() -> dict:
    return {
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": ["PATH=/bin", "TERM=xterm"]},
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs"},
        ],
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


CHAR = DeviceNode(path="/dev/vendor0", type="c", major=10, minor=200, file_mode=0o660)


# ---------------------------------------------------------------------------- env


def test_env_replaces_by_name_and_appends_new():
    out = apply_plan(base_config(), one(env=("TERM=dumb", "VENDOR=1")), stat_host=False)
    assert out["process"]["env"] == ["PATH=/bin", "TERM=dumb", "VENDOR=1"]


def test_env_later_edit_replaces_earlier_edit():
    plan = plan_of(("vendor.com/class (spec-level)", ContainerEdits(env=("A=spec",))),
                   ("vendor.com/class=dev0", ContainerEdits(env=("A=device", "B=1"))))
    out = apply_plan(base_config(), plan, stat_host=False)
    assert out["process"]["env"] == ["PATH=/bin", "TERM=xterm", "A=device", "B=1"]


def test_env_replaces_last_occurrence_of_duplicated_name():
    config = base_config()
    config["process"]["env"] = ["X=1", "Y=2", "X=3"]
    out = apply_plan(config, one(env=("X=new",)), stat_host=False)
    assert out["process"]["env"] == ["X=1", "Y=2", "X=new"]


def test_env_creates_process_when_absent():
    config = base_config()
    del config["process"]
    out = apply_plan(config, one(env=("A=1",)), stat_host=False)
    assert out["process"]["env"] == ["A=1"]


def test_input_config_is_not_modified():
    config = base_config()
    before = copy.deepcopy(config)
    apply_plan(config, one(env=("A=1",), device_nodes=(CHAR,), mounts=(Mount("/h", "/c"),)), stat_host=False)
    assert config == before


# ---------------------------------------------------------------------------- device nodes


def test_device_node_and_cgroup_rule_default_rwm():
    out = apply_plan(base_config(), one(device_nodes=(CHAR,)), stat_host=False)
    assert out["linux"]["devices"] == [{"path": "/dev/vendor0", "type": "c", "major": 10, "minor": 200,
                                        "fileMode": 0o660}]
    assert out["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},
    ]


def test_device_permissions_are_kept_and_none_means_empty_access():
    nodes = (DeviceNode(path="/dev/a", type="c", major=1, minor=3, permissions="rw"),
             DeviceNode(path="/dev/b", type="b", major=7, minor=1, permissions="none"))
    rules = apply_plan(base_config(), one(device_nodes=nodes), stat_host=False)["linux"]["resources"]["devices"]
    assert rules[1] == {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}
    assert rules[2] == {"allow": True, "type": "b", "major": 7, "minor": 1}


def test_fifo_gets_no_cgroup_rule():
    out = apply_plan(base_config(), one(device_nodes=(DeviceNode(path="/dev/fifo", type="p"),)), stat_host=False)
    assert out["linux"]["devices"] == [{"path": "/dev/fifo", "type": "p", "major": 0, "minor": 0}]
    assert len(out["linux"]["resources"]["devices"]) == 1


def test_device_dedup_by_path_replaces_existing():
    config = base_config()
    config["linux"]["devices"] = [
        {"path": "/dev/other", "type": "c", "major": 1, "minor": 5},
        {"path": "/dev/vendor0", "type": "c", "major": 99, "minor": 99},
    ]
    out = apply_plan(config, one(device_nodes=(CHAR,)), stat_host=False)
    paths = [(d["path"], d["major"]) for d in out["linux"]["devices"]]
    assert paths == [("/dev/other", 1), ("/dev/vendor0", 10)]


def test_device_listed_twice_in_plan_appears_once():
    plan = plan_of(("v.com/c=a", ContainerEdits(device_nodes=(CHAR,))),
                   ("v.com/c=b", ContainerEdits(device_nodes=(CHAR,))))
    out = apply_plan(base_config(), plan, stat_host=False)
    assert [d["path"] for d in out["linux"]["devices"]] == ["/dev/vendor0"]


def test_uid_gid_default_to_process_user_when_nonzero():
    config = base_config()
    config["process"]["user"] = {"uid": 1000, "gid": 1001}
    out = apply_plan(config, one(device_nodes=(CHAR,)), stat_host=False)
    assert out["linux"]["devices"][0]["uid"] == 1000
    assert out["linux"]["devices"][0]["gid"] == 1001


def test_uid_gid_not_set_for_root_process():
    out = apply_plan(base_config(), one(device_nodes=(CHAR,)), stat_host=False)
    assert "uid" not in out["linux"]["devices"][0] and "gid" not in out["linux"]["devices"][0]


def test_spec_uid_gid_win_over_process_user():
    config = base_config()
    config["process"]["user"] = {"uid": 1000, "gid": 1001}
    node = DeviceNode(path="/dev/x", type="c", major=1, minor=3, uid=0, gid=44)
    out = apply_plan(config, one(device_nodes=(node,)), stat_host=False)
    assert out["linux"]["devices"][0]["uid"] == 0 and out["linux"]["devices"][0]["gid"] == 44


def test_host_fills_type_numbers_and_mode():
    # Like the current reference's fillMissingInfo: a node without fileMode takes the host's.
    st = os.stat("/dev/null")
    node = DeviceNode(path="/dev/mynull", host_path="/dev/null")
    out = apply_plan(base_config(), one(device_nodes=(node,)))
    assert out["linux"]["devices"] == [{"path": "/dev/mynull", "type": "c", "major": os.major(st.st_rdev),
                                        "minor": os.minor(st.st_rdev), "fileMode": st.st_mode & 0o7777}]
    assert out["linux"]["resources"]["devices"][-1]["major"] == os.major(st.st_rdev)


def test_host_path_defaults_to_path():
    out = apply_plan(base_config(), one(device_nodes=(DeviceNode(path="/dev/zero"),)))
    assert out["linux"]["devices"][0]["type"] == "c"
    assert (out["linux"]["devices"][0]["major"], out["linux"]["devices"][0]["minor"]) == (1, 5)


def test_spec_file_mode_is_kept_with_host_numbers():
    out = apply_plan(base_config(), one(device_nodes=(DeviceNode(path="/dev/zero", file_mode=0o640),)))
    assert out["linux"]["devices"] == [{"path": "/dev/zero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o640}]


def test_missing_host_node_is_one_line_error_naming_device():
    node = DeviceNode(path="/dev/does-not-exist-cdi")
    with pytest.raises(CdiError) as error:
        apply_plan(base_config(), one(device_nodes=(node,)))
    assert "vendor.com/class=dev0" in str(error.value) and "\n" not in str(error.value)


def test_wrong_config_type_is_cdierror():
    config = base_config()
    config["linux"]["devices"] = {"not": "a list"}
    with pytest.raises(CdiError, match="linux.devices"):
        apply_plan(config, one(device_nodes=(CHAR,)), stat_host=False)


# ---------------------------------------------------------------------------- mounts


def dests(config):
    return [m["destination"] for m in config["mounts"]]


def test_mount_added_and_sorted_by_depth():
    out = apply_plan(base_config(), one(mounts=(Mount("/host/lib", "/usr/lib/vendor", ("ro", "bind")),)),
                     stat_host=False)
    assert out["mounts"][-1] == {"destination": "/usr/lib/vendor", "source": "/host/lib", "options": ["ro", "bind"]}
    # depth 1: /proc /dev /sys ; depth 2: /dev/pts /usr/lib/vendor, existing order kept within a depth
    assert dests(out) == ["/proc", "/dev", "/sys", "/dev/pts", "/usr/lib/vendor"]


def test_mount_type_kept():
    out = apply_plan(base_config(), one(mounts=(Mount("tmpfs", "/scratch", ("size=1m",), "tmpfs"),)),
                     stat_host=False)
    assert {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]} in out["mounts"]


def test_mount_replaces_same_destination():
    out = apply_plan(base_config(), one(mounts=(Mount("/host/pts", "/dev/pts", ("bind",)),)), stat_host=False)
    pts = [m for m in out["mounts"] if m["destination"] == "/dev/pts"]
    assert pts == [{"destination": "/dev/pts", "source": "/host/pts", "options": ["bind"]}]


def test_mount_sort_is_stable_for_existing_equal_depth():
    config = base_config()
    config["mounts"] = [{"destination": d, "source": "x"} for d in ("/z/b", "/a", "/z/a", "/m", "/b/c/d", "/c")]
    out = apply_plan(config, one(mounts=(Mount("/h", "/y/x"), Mount("/h2", "/0"))), stat_host=False)
    assert dests(out) == ["/a", "/m", "/c", "/0", "/z/b", "/z/a", "/y/x", "/b/c/d"]


def test_mount_depth_cleans_like_go():
    assert mount_depth("/") == 1
    assert mount_depth("/a") == 1
    assert mount_depth("/a/b/") == 2
    assert mount_depth("//a//b/./c/..") == 2
    assert mount_depth("/a/../b/c") == 2
    assert mount_depth("") == 0


def test_mount_later_edit_wins_for_same_destination():
    plan = plan_of(("v.com/c=a", ContainerEdits(mounts=(Mount("/one", "/data"),))),
                   ("v.com/c=b", ContainerEdits(mounts=(Mount("/two", "/data"),))))
    out = apply_plan(base_config(), plan, stat_host=False)
    assert [m["source"] for m in out["mounts"] if m["destination"] == "/data"] == ["/two"]


# ---------------------------------------------------------------------------- hooks


def test_hooks_appended_by_stage():
    hooks = tuple(Hook(stage, f"/bin/{stage}", ("x", "-a"), ("K=V",), 5) for stage in
                  ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"))
    config = base_config()
    config["hooks"] = {"createRuntime": [{"path": "/existing"}]}
    out = apply_plan(config, one(hooks=hooks), stat_host=False)
    assert out["hooks"]["createRuntime"] == [
        {"path": "/existing"}, {"path": "/bin/createRuntime", "args": ["x", "-a"], "env": ["K=V"], "timeout": 5}]
    for stage in ("prestart", "createContainer", "startContainer", "poststart", "poststop"):
        assert out["hooks"][stage] == [{"path": f"/bin/{stage}", "args": ["x", "-a"], "env": ["K=V"], "timeout": 5}]


def test_hook_without_optional_fields():
    out = apply_plan(base_config(), one(hooks=(Hook("poststop", "/bin/true"),)), stat_host=False)
    assert out["hooks"] == {"poststop": [{"path": "/bin/true"}]}


def test_unknown_hook_name_is_error():
    with pytest.raises(CdiError, match="vendor.com/class=dev0.*bogus"):
        apply_plan(base_config(), one(hooks=(Hook("bogus", "/bin/true"),)), stat_host=False)


# ---------------------------------------------------------------------------- gids, rdt, netdevs


def test_additional_gids_dedup_and_skip_zero():
    config = base_config()
    config["process"]["user"]["additionalGids"] = [44]
    out = apply_plan(config, one(additional_gids=(0, 44, 45, 45, 46)), stat_host=False)
    assert out["process"]["user"]["additionalGids"] == [44, 45, 46]


def test_only_gid_zero_adds_nothing():
    out = apply_plan(base_config(), one(additional_gids=(0,)), stat_host=False)
    assert "additionalGids" not in out["process"]["user"]


def test_intel_rdt_set_last_wins():
    plan = plan_of(("v.com/c=a", ContainerEdits(intel_rdt=IntelRdt(clos_id="one"))),
                   ("v.com/c=b", ContainerEdits(intel_rdt=IntelRdt(clos_id="two", l3_cache_schema="L3:0=f",
                                                                   mem_bw_schema="MB:0=50",
                                                                   schemata=("L2:0=3",), enable_monitoring=True))))
    out = apply_plan(base_config(), plan, stat_host=False)
    assert out["linux"]["intelRdt"] == {"closID": "two", "l3CacheSchema": "L3:0=f", "memBwSchema": "MB:0=50",
                                        "schemata": ["L2:0=3"], "enableMonitoring": True}


def test_net_devices_map_host_name_to_container_name():
    config = base_config()
    config["linux"]["netDevices"] = {"eth9": {"name": "keep"}}
    out = apply_plan(config, one(net_devices=(NetDevice("enp1s0", "net0"), NetDevice("eth9", "net1"))),
                     stat_host=False)
    assert out["linux"]["netDevices"] == {"eth9": {"name": "net1"}, "enp1s0": {"name": "net0"}}


# ---------------------------------------------------------------------------- marker


def test_marker_lists_applied_devices():
    plan = plan_of(("v.com/c (spec-level)", ContainerEdits(env=("A=1",))),
                   ("v.com/c=a", ContainerEdits(env=("B=1",))), ("v.com/c=b", ContainerEdits(env=("C=1",))))
    out = apply_plan(base_config(), plan, stat_host=False)
    assert out["annotations"][APPLIED_ANNOTATION] == "v.com/c=a,v.com/c=b"


def test_marker_merges_with_existing_value():
    config = base_config()
    config["annotations"] = {APPLIED_ANNOTATION: "v.com/c=x,v.com/c=a", "other": "1"}
    out = apply_plan(config, plan_of(("v.com/c=a", ContainerEdits(env=("B=1",))),
                                     ("v.com/c=b", ContainerEdits(env=("C=1",)))), stat_host=False)
    assert out["annotations"] == {APPLIED_ANNOTATION: "v.com/c=x,v.com/c=a,v.com/c=b", "other": "1"}


def test_empty_plan_changes_nothing():
    config = base_config()
    assert apply_plan(config, Selection((), ()), stat_host=False) == config
