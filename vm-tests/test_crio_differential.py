"""CRI-O's own CDI as a second native oracle (issue 24): test_differential.py's scenarios
through CRI-O 1.33.13 (../shared/crio, run as tests/test_crio.py runs it), three ways:

  crio-native  the kubelet's request (a `cdi.k8s.io/` annotation on the container config)
               in a CRI-O with no cdi-hook hooks: CRI-O's CDI (container-device-interface
               1.0.1) applies it. The reference.
  crio-hook    the same devices asked by the pod (sandbox annotations), which CRI-O never
               injects itself, in a CRI-O with the hooks.d files `cdi-hook install --mode
               hook` writes and a policy that lets this test's pods ask: cdi-hook alone.
  crio-both    the kubelet's request in the CRI-O with cdi-hook's hooks: CRI-O's CDI and
               cdi-hook both apply it (what a node gets where both are set up; doctor warns).

crio-hook may differ from the reference only as ALLOWED_DIFFERENCES lets a live hook (env;
a node without fileMode; a read-only bind's source flags). crio-both must see each node,
mount and variable once, as CRI-O alone gives it, with one allowed difference: a node whose
spec gives no fileMode. CRI-O 1.33's CDI 1.0.1 leaves its mode unset, so runc makes it
0666; cdi-hook, at createRuntime, reads the spec as the current CDI reference does (1.1.0:
the host node's mode) and puts its own node in place of CRI-O's (live/devices.py: never a
chmod of a node it did not make). One node, cdi-hook's mode. The rule is tied to the
reference's CDI version: a CRI-O vendoring CDI >= 1.1.0 fills the mode itself, and then no
difference at all is allowed.

Two CRI-Os (one without hooks, one with), each with its own config, storage, socket and
spec dir, the scenario's specs written into both; both are stopped and nothing of them
left (tests/test_crio.py's check). Under CI=true a missing ../shared/crio, conmon, runc,
Podman (the image import) or CNI plugin fails, as in tests/test_crio.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

import runtime_versions
import test_differential as diff
from test_crio import Crio, _prerequisites

CRIO_CDI = (1, 0, 1)   # container-device-interface that CRI-O 1.33.13 vendors (its go.mod)
WAYS = diff.CRIO_WAYS


@pytest.fixture(scope="module")
def crios(tmp_path_factory, private_cache_and_log):
    """(CRI-O without cdi-hook, CRI-O with it, the host data folder, the kvm node)."""
    _prerequisites()
    data = tmp_path_factory.mktemp("crio-difftest-data")
    diff.make_data(data)
    kvm = diff.host_nodes()
    kinds = [f"{diff.VENDOR}/*", f"second.{diff.VENDOR}/*"]
    policy = (f'version: "1"\nrules:\n  - {{action: allow, sources: [pod], namespaces: [ml], '
              f'devices: {json.dumps(kinds)}}}\n')
    started: list[Crio] = []
    try:
        for name, hooks in (("native", False), ("hooked", True)):
            top = tmp_path_factory.mktemp(f"crio-{name[0]}")   # short: Podman refuses a run root over 50 characters
            os.chmod(top, 0o755)
            started.append(Crio(top, policy=policy, hooks=hooks))
        term = started[0].run_to_end(started[0].pod(), {}, ("sh", "-c", 'echo "${TERM-<unset>}"'))
        assert term.returncode == 0, term.stderr
        diff.RUNTIME_ENV["crio"] = {"TERM": term.stdout.strip()}
        started[0].remove_pods()
        yield started[0], started[1], data, kvm
    finally:
        left = {}
        for crio in started:
            found = crio.stop()
            if found:
                left[str(crio.top)] = found
            shutil.rmtree(crio.top, ignore_errors=True)
        if kvm != "/dev/kvm":
            os.unlink(kvm)
        shutil.rmtree(data, ignore_errors=True)
    assert left == {}, f"CRI-O left behind: {left}"


def _run(crio: Crio, way: str, scenario: diff.Scenario):
    """The probe in a new pod of crio, the scenario's devices asked as way asks them."""
    annotations = {f"cdi.k8s.io/difftest{i}": name for i, name in enumerate(scenario.devices)}
    pod = crio.pod(annotations if way == "crio-hook" else None)
    try:
        return crio.run_to_end(pod, {} if way == "crio-hook" else annotations,
                               ("sh", "-c", diff.PROBE, "probe", *scenario.probe_args()), scenario.user)
    finally:
        crio.remove_pods()


@pytest.mark.parametrize("name", diff.SCENARIO_NAMES)
def test_same_as_crio_native_cdi(crios, name, findings):
    native, hooked, data, kvm = crios
    scenario = next(s for s in diff.scenarios(data, kvm) if s.name == name)
    written = []
    results, failures = {}, []
    try:
        for crio in (native, hooked):
            for i, doc in enumerate(scenario.specs):
                written.append(_write_spec(crio, f"difftest-{name}-{i}.json", doc))
        for way in WAYS:
            run = _run(native if way == "crio-native" else hooked, way, scenario)
            if run.returncode != 0:
                failures.append(f"{way}: exit {run.returncode}: {(run.stderr or run.stdout).strip()[-2000:]}")
                continue
            results[way] = diff.parse_probe(run.stdout)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    assert not failures, "\n".join(failures)

    reference = results["crio-native"]
    assert all(not v.startswith("missing") for k, v in reference.items() if k.startswith("node:")), reference
    ctx = diff.Context(scenario, native_fills_file_mode=runtime_versions.cdi_fills_file_mode(CRIO_CDI))
    report = "\n".join(f"  {k}={v}" for k, v in sorted(reference.items()))
    for way, what in (("crio-hook", "cdi-hook alone"), ("crio-both", "CRI-O's CDI with cdi-hook beside it")):
        unexplained, allowed = diff.compare(reference, results[way], way, ctx, "crio-native")
        findings += [(name, *difference) for difference in allowed]
        assert not unexplained, f"{what} differs from CRI-O's native CDI:\n" + "\n".join(unexplained) + \
            "\ncrio-native saw:\n" + report
    # nothing is there twice: every mount the probe looks at is there as often as CRI-O alone has it
    counts = {k: v for k, v in reference.items() if k.endswith("#count")}
    assert {k: results["crio-both"][k] for k in counts} == counts


def _write_spec(crio: Crio, name: str, doc: dict):
    path = crio.spec_dir / name
    path.write_text(json.dumps(doc, indent=2))
    path.chmod(0o644)
    return path
