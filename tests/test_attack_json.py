"""Hostile JSON and hostile bytes: every error is one bounded line, every printed byte is safe.

A runtime hands the hook a state on stdin and a config.json; the pod author writes the
annotations in it; the image names the files ldconfig complains about and feeds the
programs that read it. None of them may make the hook print a traceback, an error line
hundreds of kilobytes long, a log line of megabytes, or a terminal escape sequence: the
hook's stderr reaches an operator's terminal (runc embeds it in its own error, Podman and
CRI-O log it) and its log file is read with `jq -r`, `tail`, `less -R`.

Each case runs the hook as a runtime runs it (`python -I -m cdi_hook hook`, the state on
stdin) or under real runc, with the hook's own stderr captured byte for byte by a wrapper
around the hook entry, so that runc's escaping of its own message hides nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hook_env
import oci_env
from cdi_hook import log
from cdi_hook.errors import listed, printable

ALL = f"{hook_env.VENDOR}=all"
MAX_LINE = 4096  # bytes of the hook's one stderr line
MAX_LOG_LINE = 8192  # bytes of its one log line
RAW_CONTROL = [bytes([c]) for c in (*range(0x20), 0x7F)] + ["\x9b".encode(), "\u202e".encode()]


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hook(stdin: bytes, tmp_path: Path) -> subprocess.CompletedProcess:
    log = tmp_path / "hook.log"
    return subprocess.run([sys.executable, "-I", "-m", "cdi_hook", "hook"], input=stdin, capture_output=True,
                          cwd=oci_env.REPO, timeout=60,
                          env={"CDI_SPEC_DIRS": str(tmp_path / "no-specs"), "CDI_HOOK_LOG": str(log),
                               "CDI_HOOK_INSECURE_SPECS": "1", "CDI_HOOK_CACHE_DIR": str(tmp_path / "cache")})


def _assert_one_bounded_line(stderr: bytes) -> str:
    assert b"Traceback" not in stderr, stderr[-2000:]
    assert len(stderr) < MAX_LINE, (len(stderr), stderr[:300])
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdi-hook: "), lines
    for byte in RAW_CONTROL:
        assert byte not in stderr.rstrip(b"\n"), (byte, stderr)
    return lines[0]


def _bundle(tmp_path: Path, annotations: dict, extra: dict | None = None) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = {"root": {"path": "rootfs"}, "annotations": annotations, **(extra or {})}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def _state(bundle: Path, **extra) -> bytes:
    return json.dumps({"ociVersion": "1.0.2", "id": "c1", "status": "creating", "bundle": str(bundle),
                       **extra}).encode()


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_state_is_one_bounded_line(tmp_path, depth):
    stdin = b'{"id": "c1", "bundle": "/b", "x": ' + _deep(depth).encode() + b"}"
    result = _hook(stdin, tmp_path)
    assert result.returncode != 0
    line = _assert_one_bounded_line(result.stderr)
    assert "OCI state on stdin" in line and "nested" in line, line


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_config_json_is_one_bounded_line(tmp_path, depth):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}, "annotations": {"cdi.k8s.io/x": '
                                        f'"vendor.com/c=d"}}, "x": {_deep(depth)}}}')
    result = _hook(_state(bundle), tmp_path)
    assert result.returncode != 0
    line = _assert_one_bounded_line(result.stderr)
    assert "config.json" in line and "nested" in line, line


def test_brackets_inside_strings_are_not_nesting(tmp_path):
    """The depth bound counts JSON structure only: an annotation full of brackets is data."""
    bundle = _bundle(tmp_path, {"note": _deep(5000), "other": "{" * 3000 + '\\"' + "[" * 3000})
    result = _hook(_state(bundle, annotations={"x": "[" * 5000}), tmp_path)
    assert result.returncode == 0 and result.stderr == b"", result.stderr[-500:]


def test_ten_thousand_annotations_asking_nothing_cost_nothing(tmp_path):
    bundle = _bundle(tmp_path, {f"example.com/a{i}": "x" * 30 for i in range(10_000)})
    result = _hook(_state(bundle), tmp_path)
    assert result.returncode == 0 and result.stderr == b"", result.stderr[-500:]


@pytest.mark.parametrize("same_device", [False, True], ids=["distinct-devices", "one-device"])
def test_ten_thousand_requests_are_one_bounded_line(tmp_path, same_device):
    annotations = {f"cdi.k8s.io/a{i}": "vendor.com/c=d" if same_device else f"vendor.com/c=device{i}"
                   for i in range(10_000)}
    bundle = _bundle(tmp_path, annotations)
    result = _hook(_state(bundle, annotations=annotations), tmp_path)
    assert result.returncode != 0
    line = _assert_one_bounded_line(result.stderr)
    assert "cdi.k8s.io/" in line, line
    for entry in hook_env.log_lines(tmp_path / "hook.log"):
        assert len(json.dumps(entry)) < MAX_LOG_LINE


def test_many_unresolvable_devices_give_bounded_error_and_log_line(tmp_path):
    """200 devices no spec defines: within the request limit, so the hook gets as far as the
    registry; the error lists a few and counts the rest, and so does the log line."""
    names = [f"vendor.com/class=device-number-{i}" for i in range(200)]
    bundle = _bundle(tmp_path, {"cdi.k8s.io/many": ",".join(names)})
    result = _hook(_state(bundle), tmp_path)
    assert result.returncode != 0
    line = _assert_one_bounded_line(result.stderr)
    assert "unresolvable" in line and names[0] in line and "more)" in line, line
    raw = (tmp_path / "hook.log").read_bytes()
    assert raw.count(b"\n") == 1 and len(raw) < MAX_LOG_LINE, (len(raw), raw[:300])
    entry = json.loads(raw)
    assert entry["level"] == "error" and names[0] in entry["devices"] and len(entry["devices"]) < 20, entry


def test_printable_escapes_every_control_character_and_cuts():
    hostile = "".join(map(chr, range(0x20))) + "\x7f" + "".join(map(chr, range(0x80, 0xA0))) + "\u202e\u2028"
    shown = printable("a" + hostile + "é✓z")
    assert shown.startswith("a") and shown.endswith("é✓z") and shown.isprintable(), shown
    assert "\\x1b" in shown and "\\x9b" in shown and "\\u202e" in shown
    assert printable("x" * 10_000, 100) == "x" * 100 + "... (9900 more characters)"
    assert listed(range(3)) == "0, 1, 2" and listed(range(25), 2) == "0, 1, ... (23 more)"


def test_log_line_and_warnings_are_escaped_and_bounded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDI_HOOK_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("CDI_HOOK_LOG_LEVEL", "debug")
    devices = [f"vendor.com/c=d{i}" for i in range(10_000)]
    container_log = log.ContainerLog("c\x1b[2J", "createRuntime", devices)
    container_log.fields["sources"] = dict.fromkeys(devices, "admin")
    for i in range(1000):
        container_log.warning(f"warning {i}: \x1b]0;owned\x07" + "w" * 5000)
        container_log.note(f"note {i}: \x9b2J" + "n" * 5000)
    container_log.finish(error="failed: \x1b[31m" + "e" * 100_000)
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1000 and "\x1b" not in stderr and "\x07" not in stderr
    assert max(map(len, stderr.splitlines())) < MAX_LINE
    raw = (tmp_path / "log").read_bytes()
    assert raw.count(b"\n") == 1 and len(raw) < 64 << 10, len(raw)
    entry = json.loads(raw)
    _assert_no_control_bytes(entry)
    assert entry["devices"][:2] == devices[:2] and entry["devices"][-1] == "... (9990 more)"
    assert len(entry["sources"]) == 11 and len(entry["warnings"]) == len(entry["notes"]) == 11
    assert entry["container"] == "c\\x1b[2J" and entry["error"].startswith("failed: \\x1b[31m")


def _cli(args: list[str], stdin: bytes, tmp_path: Path) -> subprocess.CompletedProcess:
    policy = tmp_path / "policy.yaml"  # the built-in default's, and none of the host's
    policy.write_text('version: "1"\n')
    return subprocess.run([sys.executable, "-I", "-m", "cdi_hook", *args], input=stdin, capture_output=True,
                          cwd=oci_env.REPO, timeout=60,
                          env={"CDI_SPEC_DIRS": str(tmp_path / "no-specs"), "CDI_HOOK_LOG": str(tmp_path / "log"),
                               "CDI_HOOK_CACHE_DIR": str(tmp_path / "cache"),
                               "CDI_HOOK_POLICY": str(policy)})


def test_precreate_refuses_deep_or_crowded_config_with_one_line(tmp_path):
    deep = ('{"root": {"path": "rootfs"}, "x": ' + _deep(100_000) + "}").encode()
    crowded = json.dumps({"root": {"path": "rootfs"}, "annotations": {
        f"cdi.k8s.io/a{i}": f"vendor.com/c=device{i}" for i in range(10_000)}}).encode()
    for stdin, words in ((deep, "nested"), (crowded, "cdi.k8s.io/")):
        result = _cli(["precreate"], stdin, tmp_path)
        assert result.returncode != 0 and result.stdout == b""
        assert words in _assert_one_bounded_line(result.stderr)


def test_explain_refuses_crowded_or_deep_bundles_with_one_line(tmp_path):
    bundle = _bundle(tmp_path, {f"cdi.k8s.io/a{i}": f"vendor.com/c=device{i}" for i in range(10_000)})
    result = _cli(["explain", "--bundle", str(bundle)], b"", tmp_path)
    assert result.returncode != 0
    assert "cdi.k8s.io/" in _assert_one_bounded_line(result.stderr)
    result = _cli(["explain"], b'{"id": "c1", "bundle": "/b", "x": ' + _deep(100_000).encode() + b"}", tmp_path)
    assert result.returncode != 0
    assert "nested" in _assert_one_bounded_line(result.stderr)


# --- control bytes from the image, under real runc ------------------------------------------

CAPTURE = 'capture="$1"; shift; "$@" 2>"$capture"; status=$?; cat "$capture" >&2; exit $status'
ESCAPES = "\x1b[31mRED\x1b]0;title\x07\x7f\x9b2J"


def _capture_hook_stderr(bundle: Path, capture: Path) -> None:
    """Run the bundle's cdi-hook entry under sh, which keeps the hook's own stderr in capture
    and hands it on to runc unchanged."""
    config = json.loads((bundle / "config.json").read_text())
    for entries in config["hooks"].values():
        for entry in entries:
            entry["args"] = ["sh", "-c", CAPTURE, "sh", str(capture), entry["path"], *entry["args"][1:]]
            entry["path"] = "/bin/sh"
    (bundle / "config.json").write_text(json.dumps(config))


def _assert_no_control_bytes(value) -> None:
    """Every string of a decoded log line: what `jq -r` would put on a terminal."""
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_no_control_bytes(key)
            _assert_no_control_bytes(item)
    elif isinstance(value, list):
        for item in value:
            _assert_no_control_bytes(item)
    elif isinstance(value, str):
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value), value


def _image_with_hostile_names(tmp_path: Path) -> Path:
    """An image whose /lib holds a non-ELF "library" named with escape sequences (CSI colour,
    OSC window title with BEL, DEL, an 8-bit CSI clearing the screen)."""
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "lib").mkdir()
    (rootfs / "lib" / f"lib{ESCAPES}.so.1").write_bytes(b"\0" * 4096)
    return rootfs


def _spec(**edits) -> dict:
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}], **edits}}]}


def test_a_failing_spec_hook_that_reads_the_image_prints_nothing_raw(runc, tmp_path):
    """A spec hook lists the image's /lib (as a driver's hook reads the rootfs) and fails: its
    output, the image's file names, goes into the hook's error line and log line, escaped."""
    rootfs = _image_with_hostile_names(tmp_path)
    spec = _spec(hooks=[{"hookName": "createRuntime", "path": "/bin/sh",
                         "args": ["sh", "-c", f"ls {rootfs}/lib >&2; exit 3"]}])
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    capture = tmp_path / "hook.stderr"
    _capture_hook_stderr(bundle, capture)

    result = oci_env.run_container(bundle)

    assert result.returncode != 0 and "RAN" not in result.stdout, result.stdout + result.stderr
    assert "\x1b" not in result.stderr and "\x9b" not in result.stderr, repr(result.stderr)
    line = _assert_one_bounded_line(capture.read_bytes())
    assert "spec hook" in line and "\\x1b[31mRED\\x1b]0;title\\x07\\x7f\\x9b2J" in line, line
    raw = log_file.read_bytes()
    assert raw.count(b"\n") == 1 and len(raw) < MAX_LOG_LINE, raw[:300]
    entry = json.loads(raw)
    assert entry["level"] == "error" and "\\x1b[31mRED" in entry["error"], entry
    _assert_no_control_bytes(entry)


def test_ldconfig_complaints_about_image_files_never_reach_the_terminal(runc, tmp_path):
    """ldconfig names the image's hostile "library" in a warning; the container starts and
    neither runc's output, the hook's stderr nor its log line (debug: notes included) carries
    a raw control character."""
    rootfs = _image_with_hostile_names(tmp_path)
    (rootfs / "etc" / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n/lib\n")
    sources = hook_env.host_files(tmp_path)
    spec = _spec(mounts=[{"hostPath": sources["library"], "containerPath": "/opt/lib/libz.so.1",
                          "options": ["ro", "bind"]}])
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs,
                                                 extra_env={"CDI_HOOK_LOG_LEVEL": "debug"})
    capture = tmp_path / "hook.stderr"
    _capture_hook_stderr(bundle, capture)

    result = oci_env.run_container(bundle)

    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
    for raw in (result.stderr.encode(), capture.read_bytes(), log_file.read_bytes()):
        for byte in RAW_CONTROL:
            assert byte not in raw.replace(b"\n", b""), (byte, raw[:500])
    _assert_no_control_bytes(hook_env.log_lines(log_file))


def _nest_deeply(path: Path) -> None:
    """Add a key runc ignores, nested 5,000 deep (written as text: Python's json cannot)."""
    text = path.read_text().rstrip()
    path.write_text(text[:-1].rstrip() + ', "io.example.deep": ' + _deep(5000) + "}")


def test_deeply_nested_config_json_under_runc(runc, tmp_path):
    """runc itself reads a config.json nested 5,000 deep in a key it ignores (Go allows 10,000)
    and starts the container; the hook refuses it with one line instead of a traceback."""
    control = tmp_path / "control"
    control.mkdir()
    control_bundle = oci_env.make_bundle(control / "bundle", ["sh", "-c", "echo RAN"])
    _nest_deeply(control_bundle / "config.json")
    result = oci_env.run_container(control_bundle)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr

    bundle, _ = hook_env.bundle_with_hook(tmp_path, _spec(), [ALL], "echo RAN")
    capture = tmp_path / "hook.stderr"
    _capture_hook_stderr(bundle, capture)
    _nest_deeply(bundle / "config.json")

    result = oci_env.run_container(bundle)

    assert result.returncode != 0 and "RAN" not in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr) < 2 * MAX_LINE, result.stderr[-1000:]
    line = _assert_one_bounded_line(capture.read_bytes())
    assert "config.json" in line and "nested" in line, line


def test_ten_thousand_requests_under_runc(runc, tmp_path):
    """10,000 cdi.k8s.io/ annotations: runc alone starts the container; with the hook it is
    refused with one short line, and runc's own error stays short too."""
    annotations = {f"cdi.k8s.io/a{i}": f"vendor.com/c=device{i}" for i in range(10_000)}
    control = oci_env.make_bundle(tmp_path / "control", ["sh", "-c", "echo RAN"], annotations=annotations)
    result = oci_env.run_container(control)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr

    bundle, log_file = hook_env.bundle_with_hook(tmp_path, hook_env.full_spec(hook_env.host_files(tmp_path)), [],
                                                 "echo RAN", annotations=annotations)
    capture = tmp_path / "hook.stderr"
    _capture_hook_stderr(bundle, capture)

    result = oci_env.run_container(bundle)

    assert result.returncode != 0 and "RAN" not in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr) < 2 * MAX_LINE, result.stderr[-1000:]
    _assert_one_bounded_line(capture.read_bytes())
    for entry in hook_env.log_lines(log_file):
        assert len(json.dumps(entry)) < MAX_LOG_LINE
