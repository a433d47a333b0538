"""Nothing is imported after entering a container's mount namespace, with real runc: an
import there is read from the container's files, so its image's code would run with the
hook's capabilities (issue 22; this test lived in test_serve.py with the injection server,
now removed, and checks the hook process alone).
"""

from __future__ import annotations

import json

import hook_env
import oci_env

SCRIPT = "\n".join([
    "stat -c 'STAT %n %F %t:%T %a %u:%g' /dev/kvm /dev/loop0 /dev/cdi/nested/zero",
    "cat /etc/cdi-config.txt /mnt/cdi-dir/hello",
    "grep -c cdi-config /proc/mounts",
    "ls /etc/ld.so.conf.d",
    "echo END",
])
ALL = f"{hook_env.VENDOR}=all"

# Prepended to the hook's code: writes each module a finder was asked for, with "away" when
# the asking process is in another mount namespace than the one it started in.
IMPORTS_SEEN = """import os, sys
class _Seen:
    home = os.readlink("/proc/self/ns/mnt")
    def find_spec(self, name, path=None, target=None):
        where = "home" if os.readlink("/proc/self/ns/mnt") == self.home else "away"
        fd = os.open({out!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, f"{{where}} {{os.getpid()}} {{name}}\\n".encode())
        os.close(fd)
sys.meta_path.insert(0, _Seen())
"""


def test_nothing_is_imported_after_entering_a_containers_mount_namespace(runc, tmp_path):
    """Every module (ldconfig's confinement too) is imported before the worker's setns; a
    start with every kind of edit (nodes, mounts, a library and so ldconfig, spec hooks)
    imports nothing after. Before the fix python-prctl and resource were imported in the
    container's mount namespace."""
    seen = tmp_path / "imports"
    spec = hook_env.full_spec(hook_env.host_files(tmp_path))
    (tmp_path / "b").mkdir()
    bundle, log_file = hook_env.bundle_with_hook(tmp_path / "b", spec, [ALL], SCRIPT, extra_env={
        "CDI_HOOK_CACHE_DIR": str(tmp_path / "b" / "cache"), "CDI_HOOK_LOG_LEVEL": "debug"})
    config = json.loads((bundle / "config.json").read_text())
    entry = config["hooks"]["createRuntime"][0]
    assert entry["args"][1:4] == ["-I", "-S", "-c"]
    entry["args"][4] = IMPORTS_SEEN.format(out=str(seen)) + entry["args"][4]
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "END" in result.stdout, result.stdout
    assert "ran ldconfig" in json.dumps(hook_env.log_lines(log_file))  # ldconfig ran, confined
    recorded = seen.read_text().splitlines()
    assert [line for line in recorded if line.startswith("home ")], "the recorder saw no import at all"
    assert [line for line in recorded if line.startswith("away ")] == []
