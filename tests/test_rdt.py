"""Intel RDT against a fake resctrl tree (a plain directory with resctrl's layout).

This VM has no resctrl (no /sys/fs/resctrl, no rdt_a/cat_l3 cpu flags), so the kernel's
side (pid moved between groups, schemata normalized) cannot be run here; the tree stands
in for it and the tests check what the hook writes and what it refuses.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cdi_hook.errors import HookError
from cdi_hook.live import mountinfo, rdt
from cdi_hook.spec.model import IntelRdt

ORIGIN = "vendor.com/rdt=fast"


@pytest.fixture
def resctrl(tmp_path, monkeypatch):
    root = tmp_path / "resctrl"
    (root / "info" / "L3").mkdir(parents=True)
    (root / "info" / "L3_MON").mkdir()
    (root / "mon_groups").mkdir()
    (root / "tasks").write_text("1\n")
    (root / "schemata").write_text("    L3:0=fff;1=fff\n    MB:0=100;1=100\n")
    monkeypatch.setenv("CDI_HOOK_RESCTRL", str(root))
    return root


def test_creates_group_with_schemata_in_spec_order(resctrl):
    rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", l3_cache_schema="L3:0=f0;1=f", mem_bw_schema="MB:0=20;1=70",
                                     schemata=("L2:0=3",)))
    assert (resctrl / "gold" / "schemata").read_text() == "L3:0=f0;1=f\nMB:0=20;1=70\nL2:0=3\n"
    assert (resctrl / "gold" / "tasks").read_text() == "4242\n"
    assert not (resctrl / "gold" / "mon_groups").exists()


def test_joins_existing_group_with_matching_schemata(resctrl):
    group = resctrl / "gold"
    group.mkdir()
    # as the kernel prints it back: padded names, its own bitmask spelling
    group.joinpath("schemata").write_text("    L3:0=0f0;1=00f\n    MB:0=20;1=70\n")
    rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", l3_cache_schema="L3:0=f0;1=f", mem_bw_schema="MB:0=20"))
    assert group.joinpath("tasks").read_text() == "4242\n"
    assert group.joinpath("schemata").read_text() == "    L3:0=0f0;1=00f\n    MB:0=20;1=70\n"  # untouched


def test_refuses_existing_group_with_other_schemata(resctrl):
    group = resctrl / "gold"
    group.mkdir()
    group.joinpath("schemata").write_text("    L3:0=fff;1=fff\n")
    with pytest.raises(HookError, match=r"intel RDT for vendor.com/rdt=fast: .*gold exists with other schemata: "
                                        r"L3:0 is 4095 .* wants 240"):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", l3_cache_schema="L3:0=f0"))
    assert not group.joinpath("tasks").exists()
    assert group.joinpath("schemata").read_text() == "    L3:0=fff;1=fff\n"


def test_closid_without_schemata_needs_preconfigured_group(resctrl):
    with pytest.raises(HookError, match="names no pre-configured resctrl group"):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="silver"))
    assert not (resctrl / "silver").exists()
    (resctrl / "silver").mkdir()
    rdt.apply(4242, ORIGIN, IntelRdt(clos_id="silver"))
    assert (resctrl / "silver" / "tasks").read_text() == "4242\n"
    assert not (resctrl / "silver" / "schemata").exists()  # no lines: never written


def test_empty_closid_uses_container_id_and_release_removes_it(resctrl):
    spec = IntelRdt(l3_cache_schema="L3:0=3")
    rdt.apply(4242, ORIGIN, spec, container_id="ctr-1")
    assert (resctrl / "ctr-1" / "tasks").read_text() == "4242\n"
    (resctrl / "ctr-1" / "tasks").unlink()  # the kernel's files vanish with the group
    (resctrl / "ctr-1" / "schemata").unlink()
    rdt.release(ORIGIN, spec, container_id="ctr-1")
    assert not (resctrl / "ctr-1").exists()


def test_empty_closid_without_container_id_is_refused(resctrl):
    with pytest.raises(HookError, match="closID is empty and the container id is unknown"):
        rdt.apply(4242, ORIGIN, IntelRdt(l3_cache_schema="L3:0=3"))


def test_monitoring_group_named_after_container(resctrl):
    rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", l3_cache_schema="L3:0=3", enable_monitoring=True),
              container_id="ctr-2")
    assert (resctrl / "gold" / "tasks").read_text() == "4242\n"
    assert (resctrl / "gold" / "mon_groups" / "ctr-2" / "tasks").read_text() == "4242\n"
    (resctrl / "gold" / "mon_groups" / "ctr-2" / "tasks").unlink()
    rdt.release(ORIGIN, IntelRdt(clos_id="gold", enable_monitoring=True), container_id="ctr-2")
    assert not (resctrl / "gold" / "mon_groups" / "ctr-2").exists()
    assert (resctrl / "gold").is_dir()  # a named class of service stays


def test_monitoring_in_default_group_without_container_id_uses_closid(resctrl):
    (resctrl / "gold").mkdir()
    rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", enable_monitoring=True))
    assert (resctrl / "gold" / "mon_groups" / "gold" / "tasks").read_text() == "4242\n"


def test_root_closid_is_the_default_group(resctrl):
    rdt.apply(4242, ORIGIN, IntelRdt(clos_id="/"))
    assert (resctrl / "tasks").read_text() == "4242\n"


def test_monitoring_refused_without_monitoring_support(resctrl):
    (resctrl / "info" / "L3_MON").rmdir()
    with pytest.raises(HookError, match="no monitoring"):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", l3_cache_schema="L3:0=3", enable_monitoring=True))
    assert not (resctrl / "gold").exists()  # refused before anything was created


@pytest.mark.parametrize("clos_id", ["../escape", "a/b", "..", "info", "mon_groups"])
def test_unusable_closid_refused(resctrl, clos_id):
    with pytest.raises(HookError, match="not a usable resctrl group name"):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id=clos_id, l3_cache_schema="L3:0=3"))
    assert not (resctrl.parent / "escape").exists()


@pytest.mark.parametrize("spec, why", [
    (IntelRdt(clos_id="g", mem_bw_schema="L3:0=3"), "must start with 'MB:'"),
    (IntelRdt(clos_id="g", l3_cache_schema="L3:0=3\nMB:0=10"), "contains a newline"),
    (IntelRdt(clos_id="g", schemata=("garbage",)), "not 'RESOURCE:id=value"),
])
def test_malformed_schemata_refused(resctrl, spec, why):
    with pytest.raises(HookError, match=why):
        rdt.apply(4242, ORIGIN, spec)
    assert not (resctrl / "g").exists()


def test_missing_resctrl_at_configured_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_RESCTRL", str(tmp_path / "nothing"))
    with pytest.raises(HookError, match=r"is not a resctrl filesystem .*CDI_HOOK_RESCTRL"):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold"))


def test_default_path_must_be_a_resctrl_mount(monkeypatch):
    monkeypatch.delenv("CDI_HOOK_RESCTRL", raising=False)
    monkeypatch.setattr(rdt, "is_resctrl_mount", lambda path: False)  # as on this VM, whatever the host
    with pytest.raises(HookError, match="no resctrl filesystem is mounted at /sys/fs/resctrl"):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold"))


def test_mountinfo_check_finds_only_resctrl_mounts():
    assert rdt.is_resctrl_mount(rdt.Path("/proc")) is False  # a mount, but of type proc
    assert rdt.is_resctrl_mount(rdt.Path("/nonexistent")) is False


def test_resctrl_mount_found_at_a_non_ascii_path(tmp_path, monkeypatch):
    # Was decoded with unicode_escape, which turned UTF-8 "ü" into "Ã¼": never equal to the path.
    where = tmp_path / os.fsdecode(b"res ctrl \xc3\xbc \xff")
    where.mkdir()
    escaped = os.fsencode(where).replace(b" ", b"\\040")
    table = (b"41 25 0:41 / " + escaped + b" rw,relatime shared:9 - resctrl resctrl rw\n"
             b"42 25 0:42 / " + escaped + b"x rw,relatime - resctrl resctrl rw\n")
    monkeypatch.setattr(mountinfo, "read", lambda pid="self": mountinfo.parse(table))
    assert rdt.is_resctrl_mount(where) is True
    assert rdt.is_resctrl_mount(tmp_path) is False
    monkeypatch.setattr(mountinfo, "read", lambda pid="self": mountinfo.parse(table.replace(b"- resctrl", b"- tmpfs")))
    assert rdt.is_resctrl_mount(where) is False


def test_schemata_comparison_is_by_value():
    assert rdt.schemata_mismatch(["L3:0=00ff"], "  L3:0=ff;1=3\n") is None
    assert rdt.schemata_mismatch(["MB:1=70"], "MB:0=20;1=70") is None
    assert rdt.schemata_mismatch(["MB:1=70"], "MB:0=20;1=7") == "MB:1 is 7 in the group, the spec wants 70"
    assert rdt.schemata_mismatch(["L2:0=f"], "L3:0=f") == "L2:0 is unset in the group, the spec wants 15"


def _failing_writes(monkeypatch, fail_when):
    """Make rdt's own writes fail (EINVAL, as the kernel answers a bad pid) where fail_when(path)."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and fail_when(str(path)):
            raise OSError(22, "Invalid argument", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rdt, "open", fake_open, raising=False)
    # resctrl's rmdir removes a group with its files (the kernel's own); a plain dir would not
    monkeypatch.setattr(type(Path()), "rmdir", lambda path: shutil.rmtree(path))


@pytest.mark.parametrize("failing", ["gold/tasks", "mon_groups/ctr-1/tasks"])
def test_failed_write_half_way_removes_what_it_created(resctrl, monkeypatch, failing):
    _failing_writes(monkeypatch, lambda path: path.endswith(failing))
    with pytest.raises(HookError) as raised:
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", l3_cache_schema="L3:0=f0", enable_monitoring=True),
                  container_id="ctr-1")
    message = str(raised.value)
    assert message.startswith("intel RDT for vendor.com/rdt=fast: writing pid 4242 to ")
    assert failing in message and "\n" not in message
    assert not (resctrl / "gold").exists()  # the group made for this container is gone, MON group too


def test_undo_failure_is_named_in_the_same_line(resctrl, monkeypatch):
    _failing_writes(monkeypatch, lambda path: path.endswith("gold/tasks"))
    def refuse_rmdir(path):
        raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr(type(resctrl), "rmdir", refuse_rmdir)
    with pytest.raises(HookError, match=r"^intel RDT for vendor.com/rdt=fast: writing pid 4242 .*; undo failed too: "
                                        r"intel RDT for vendor.com/rdt=fast: removing resctrl group .*gold: "
                                        r"Device or resource busy$"):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", l3_cache_schema="L3:0=f0"))


def test_existing_mon_group_is_not_removed_on_failure(resctrl, monkeypatch):
    group = resctrl / "gold"
    (group / "mon_groups" / "ctr-1").mkdir(parents=True)
    _failing_writes(monkeypatch, lambda path: path.endswith("mon_groups/ctr-1/tasks"))
    with pytest.raises(HookError):
        rdt.apply(4242, ORIGIN, IntelRdt(clos_id="gold", enable_monitoring=True), container_id="ctr-1")
    assert (group / "mon_groups" / "ctr-1").is_dir()  # not ours: left as it was


def test_poststop_removes_the_recorded_rdt_group_with_no_spec_left(resctrl, tmp_path, monkeypatch):
    """The container's record names its RDT group: poststop removes it though no spec file
    describes the device any more (spec dirs empty), and removes the record."""
    import json

    from cdi_hook import oci, record, settings
    from cdi_hook.commands import hook
    from cdi_hook.plan import Plan

    monkeypatch.setenv("CDI_HOOK_STATE_DIR", str(tmp_path / "state" / "held"))
    settings.use(None)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                                                    "annotations": {"cdi.k8s.io/x": ORIGIN}}))
    group = resctrl / "ctr-rdt"
    group.mkdir()  # (resctrl removes a group whole; a plain folder must be empty for rmdir)
    given = Plan(devices=(ORIGIN,), nodes=(), device_rules=(), mounts=(), env=(), hooks=(), additional_gids=(),
                 intel_rdt=(ORIGIN, IntelRdt(l3_cache_schema="L3:0=f0")), net_devices=())
    record.save(record.from_plan(given, "ctr-rdt", 0, None, str(bundle), {}, []))
    state = oci.parse_state(json.dumps({"ociVersion": "1.0.2", "id": "ctr-rdt", "status": "stopped",
                                        "bundle": str(bundle)}).encode())
    assert hook._later_stage_from_record("poststop", state) is True
    assert not group.exists()
    assert record.load("ctr-rdt") is None
