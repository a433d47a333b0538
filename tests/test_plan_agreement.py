"""The config.json editor and the live injector, side by side over generated specs: from
one plan they describe the same device nodes, mounts, device cgroup rules and hooks.

The editor's side is read back from the config.json it writes; the live side is what the
injector hands its worker (node and mount jobs), the device cgroup writer (rules) and the
spec-hook runner (hooks by stage). Real runs of both sides are in test_hook_runc.py and
vm-tests/test_differential.py; this test covers the combinations no hand-written case does.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from cdi_hook import config_editor, plan
from cdi_hook.live import inject
from cdi_hook.registry import EditsPart, Selection
from cdi_hook.spec import HOOK_STAGES
from cdi_hook.spec.model import ContainerEdits, DeviceNode, Hook, Mount

# Host nodes every Linux machine has, so completion from the host (lstat) takes part too.
HOST_NODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DESTINATIONS = ("/opt/a", "/opt/a/", "/opt/a/b", "/usr/lib/x.so", "/usr//lib/x.so", "/etc/conf", "/opt/./a")

node_paths = st.sampled_from(("/dev/a", "/dev/b", "/dev/vendor/c", "/dev/a/"))
device_nodes = st.one_of(
    # minimally specified: type, numbers and mode come from the host node
    st.builds(DeviceNode, path=node_paths, host_path=st.sampled_from(HOST_NODES),
              permissions=st.sampled_from(("", "r", "rw", "rwm", "none")),
              uid=st.none() | st.integers(0, 3000), gid=st.none() | st.integers(0, 3000)),
    # fully specified (no host node needed)
    st.builds(DeviceNode, path=node_paths, host_path=st.just("/dev/cdi-hook-test-absent"),
              type=st.sampled_from(("b", "c")), major=st.integers(1, 4095), minor=st.integers(0, 1 << 19),
              file_mode=st.sampled_from((0o600, 0o660, 0o666)),
              permissions=st.sampled_from(("", "rw", "none"))),
)
mounts = st.builds(Mount, host_path=st.sampled_from(("/usr/lib", "/etc/hostname", "/tmp")),
                   container_path=st.sampled_from(DESTINATIONS),
                   options=st.sampled_from(((), ("ro", "bind"), ("rbind", "nosuid"))),
                   type=st.sampled_from(("", "bind")))
hooks = st.builds(Hook, hook_name=st.sampled_from(HOOK_STAGES), path=st.sampled_from(("/bin/true", "/bin/echo")),
                  args=st.sampled_from(((), ("echo", "x"))))
edits = st.builds(ContainerEdits, device_nodes=st.lists(device_nodes, max_size=4).map(tuple),
                  mounts=st.lists(mounts, max_size=4).map(tuple), hooks=st.lists(hooks, max_size=3).map(tuple),
                  env=st.lists(st.sampled_from(("A=1", "A=2", "B=x")), max_size=3).map(tuple))
selections = st.lists(edits, min_size=1, max_size=4).map(
    lambda parts: Selection(tuple(f"v.com/c=d{i}" for i in range(len(parts))),
                            tuple(EditsPart(f"v.com/c=d{i}", "/etc/cdi/v.json", e) for i, e in enumerate(parts))))
process_users = st.sampled_from(((0, 0), (1000, 1000), (0, 44)))


def editor_side(config: dict):
    linux = config.get("linux", {})
    nodes = [(d["path"], d["type"], d["major"], d["minor"], d.get("fileMode"), d.get("uid", 0), d.get("gid", 0))
             for d in linux.get("devices", [])]
    mounts = [(m["destination"], m["source"], m.get("type", ""), tuple(m.get("options", ())))
              for m in config.get("mounts", [])]
    rules = [(r["type"], r["major"], r["minor"], r["access"])
             for r in linux.get("resources", {}).get("devices", []) if r.get("access")]
    hooks = {stage: [(h["path"], tuple(h.get("args", ()))) for h in entries]
             for stage, entries in config.get("hooks", {}).items()}
    return nodes, mounts, rules, hooks


def live_side(decided):
    nodes = [(j.node.path, j.node.type, j.node.major or 0, j.node.minor or 0, j.node.file_mode, j.uid, j.gid)
             for j in inject.node_jobs(decided)]
    mounts = [(j.mount.container_path, j.mount.host_path, j.mount.type, tuple(j.mount.options))
              for j in inject.mount_jobs(decided)]
    rules = [(r.type, r.major, r.minor, r.access) for r in inject.cgroup_rules(decided)]
    hooks = {stage: [(h.path, tuple(h.args)) for _, h in decided.hooks_at(stage)]
             for stage in HOOK_STAGES if decided.hooks_at(stage)}
    return nodes, mounts, rules, hooks


@settings(max_examples=300, deadline=None)
@given(selection=selections, user=process_users)
def test_editor_and_live_injector_agree(selection, user):
    uid, gid = user
    config = {"root": {"path": "rootfs"}, "process": {"user": {"uid": uid, "gid": gid}}}
    decided = plan.build(selection, process_uid=uid, process_gid=gid)
    edited = config_editor.apply_plan(config, decided)
    assert editor_side(edited) == live_side(decided)


def test_the_generator_reaches_the_interesting_cases():
    """Replacement by destination and by node path, "none" permissions, every hook stage:
    each is drawn at least once in a fixed sample (so the property above is not vacuous)."""
    seen = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(selection=selections)
    def sample(selection):
        merged = selection.merged()
        destinations = [m.container_path for m in merged.mounts]
        if len(destinations) != len(set(destinations)):
            seen.add("mount replaced")
        paths = [n.path for n in merged.device_nodes]
        if len(paths) != len(set(paths)):
            seen.add("node replaced")
        if any(n.permissions == "none" for n in merged.device_nodes):
            seen.add("none")
        seen.update(h.hook_name for h in merged.hooks)

    sample()
    assert {"mount replaced", "node replaced", "none", *HOOK_STAGES} <= seen
