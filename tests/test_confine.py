"""ldconfig's confinement (live/ldcache._confine) made through the syscalls the worker
already holds, so that nothing is imported inside a container's mount namespace: what a
child is left with after it, read back from the kernel."""

from __future__ import annotations

import json
import os
import resource

from cdi_hook.live import ldcache


def test_confine_leaves_three_capabilities_no_new_privileges_and_bounds(root_only):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ldcache._confine()
            status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
                          if ":\t" in line)
            found = {"bounding": int(status["CapBnd"].strip(), 16), "no_new_privs": status["NoNewPrivs"].strip(),
                     "cpu": resource.getrlimit(resource.RLIMIT_CPU), "as": resource.getrlimit(resource.RLIMIT_AS),
                     "core": resource.getrlimit(resource.RLIMIT_CORE)}
            os.write(write_end, json.dumps(found).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        found = json.loads(f.read())
    os.waitpid(pid, 0)
    assert found["bounding"] == (1 << 1) | (1 << 2) | (1 << 3)  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
    assert found["no_new_privs"] == "1"
    assert found["cpu"] == [ldcache.CPU_LIMIT_S] * 2
    assert found["as"] == [ldcache.MEMORY_LIMIT] * 2
    assert found["core"] == [0, 0]
