"""The hot path's stand-ins behave exactly as what they stand in for.

To keep `json` and `re` (and with it `enum`) out of a container start, the hook uses: jsonio (json.loads/json.dumps through _json), a quote
split for the JSON depth pre-scan (was a regex), character sets for the CDI name patterns
and the library-name test (were regexes), a hand decoder of mountinfo escapes (was re.sub),
names.escape (was the unicode_escape codec, a module of its own),
Each is compared here with the original on many inputs. (The syscalls stay with ctypes: a C
extension was measured and not worth it, see live/syscalls.py.)
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
from itertools import accumulate

import pytest

from cdi_hook import jsonio, oci, request
from cdi_hook.live import _linux_ctypes, ldcache, mountinfo
from cdi_hook.spec import names

DOCUMENTS = [b'{"a": [1, 2.5, -3e5, true, false, null, "x\\u00e9\\n", {"b": {}}]}', b'  [1]\n ', b'"s"', b"NaN",
             b"[Infinity, -Infinity]", b"", b"   ", b'{"a":1} x', b'{"a":', b"[1,]", b'\xef\xbb\xbf{"a":1}',
             '{"é": "ü"}'.encode(), b'{"a": "\xff"}', b'{"a":"\\ud800"}', b"1 2", b'{"a":1}\n\n', b'{"a": "\x01"}',
             '{"a": 1}'.encode("utf-16"), b"[" * 50 + b"]" * 50, b'{"k": 1, "k": 2}', b"-0", b"1e999"]


def _outcome(function, document):
    try:
        return "ok", repr(function(document))
    except Exception as error:  # noqa: BLE001 - the very exception is what is compared
        return type(error).__name__, str(error)


@pytest.mark.parametrize("document", DOCUMENTS + [d.decode("utf-8", "replace") for d in DOCUMENTS])
def test_jsonio_loads_is_json_loads(document):
    assert _outcome(jsonio.loads, document) == _outcome(json.loads, document)


def test_jsonio_dumps_is_json_dumps():
    values = [{"a": [1, 2.5, float("nan"), None, True, "é\n\x1b\u2028", ("t", 1)], "b": {1: 2, None: 3, 2.5: 1}},
              "x", 1, [], float("inf"), {"container": "c1", "steps_ms": {"nodes": 1.25}}]
    for value in values:
        assert jsonio.dumps(value) == json.dumps(value)
    circular: list = []
    circular.append(circular)
    for value in ({"a": object()}, {(1, 2): 1}, circular):
        assert _outcome(jsonio.dumps, value) == _outcome(json.dumps, value)


def test_the_depth_scan_agrees_with_the_regex_it_replaced_on_valid_json():
    string = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)

    def by_regex(data: bytes) -> int:
        skeleton = string.sub(b"", data).translate(oci._DEPTH_STEP, oci._NOT_BRACKET)
        return max(accumulate(memoryview(skeleton).cast("b")), default=0)

    rng = random.Random(7)
    alphabet = [b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b",", b":"]
    checked = 0
    for _ in range(60_000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            json.loads(data)
        except ValueError:
            continue
        checked += 1
        assert oci.json_depth(data) == by_regex(data), data
    for data in (b'{"a": "[[[", "b": "\\"[[[", "c": ["\\\\", [1]]}', b'["\\\\\\"]]]", [[]]]'):
        assert oci.json_depth(data) == by_regex(data)
    assert checked > 100


def test_name_patterns_are_the_regexes_they_replaced():
    vendor = re.compile(r"[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
    device = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")
    key = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
    rng = random.Random(3)
    alphabet = ["a", "Z", "0", "_", ".", "-", ":", "é", "\n", " ", "٣", "/"]
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        assert names.fits_pattern(text, names.VENDOR_PATTERN) == bool(vendor.fullmatch(text)), text
        assert names.fits_pattern(text, names.DEVICE_PATTERN) == bool(device.fullmatch(text)), text
        assert names.fits_pattern(text, request._KEY_NAME) == bool(key.fullmatch(text)), text


def test_library_names_are_the_regex_it_replaced():
    library = re.compile(r"^[^/]+\.so(\.[0-9]+)*$")
    rng = random.Random(5)
    alphabet = ["l", "i", "b", ".", "s", "o", "1", "2", "x", "/", "٣"]
    for _ in range(50_000):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert ldcache.is_library_name(path) == bool(library.match(os.path.basename(path))), path


def test_escape_is_the_codec_it_replaces():
    """names.escape (quote's, and ldcache's for ldconfig's complaints) is the unicode_escape
    codec by hand: the codec is a module loaded on first use (~0.5 ms of a start), which the
    worker could not import inside the container."""
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0x200)] + ["\u2028", "\ufeff", "\uffff", "\ud800", "\U0001f600", "\U0010ffff"]
    texts = ["", "vendor.com/class=name", '\\"', "a\\nb"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(5000)]
    for text in texts:
        assert names.escape(text) == text.encode("unicode_escape").decode("ascii"), repr(text)
        assert names.quote(text) == '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def test_mountinfo_unescape_is_the_re_sub_it_replaced():
    def by_regex(field: bytes) -> str:
        return os.fsdecode(re.sub(rb"\\([0-3][0-7]{2})", lambda m: bytes((int(m.group(1), 8),)), field))

    fields = [rb"/mnt/dev\040cg", rb"a\\040", b"\\", rb"\04", rb"\0400", rb"x\777y\12", rb"\\\040", rb"\08", b"plain",
              rb"\303\274", b"\xff\\134"]
    rng = random.Random(7)
    alphabet = [b"\\", b"0", b"1", b"3", b"4", b"7", b"8", b"a", b" ", b"\xc3", b"\xbc", b"\xff"]
    fields += [b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(20_000)]
    for field in fields:
        assert mountinfo.unescape(field) == by_regex(field), field
        if b" " not in field:  # parse() decodes the whole line first, then unescapes: the same
            [mount] = mountinfo.parse(b"1 2 3:4 / /" + field + b" rw - tmpfs none rw\n")
            assert mount.mount_point == "/" + by_regex(field), field


def test_the_static_elf_check_reads_the_program_headers():
    for path, static in (("/sbin/ldconfig", True), ("/bin/busybox", True), ("/bin/ls", False)):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert ldcache.is_static_elf(fd) is static, path
        finally:
            os.close(fd)


def test_the_syscalls_raise_oserror_naming_the_path_or_call(tmp_path):
    from cdi_hook.live import syscalls

    (tmp_path / "dir").mkdir()
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = _linux_ctypes.openat2(root, b"dir", os.O_PATH | os.O_CLOEXEC, syscalls.RESOLVE_IN_ROOT, 0, "dir")
        os.close(fd)
        with pytest.raises(FileNotFoundError) as missing:
            _linux_ctypes.openat2(root, b"nope", os.O_PATH, syscalls.RESOLVE_IN_ROOT, 0, "nope")
        assert missing.value.filename == "nope" and missing.value.errno == errno.ENOENT
        with pytest.raises(OSError) as bad:
            _linux_ctypes.setns(-1, syscalls.CLONE_NEWNS, "setns")
        assert (bad.value.errno, bad.value.filename) == (errno.EBADF, "setns")
        with pytest.raises(OSError) as bad:
            _linux_ctypes.move_mount(-1, -1, 0x44, "move_mount")
        assert bad.value.filename == "move_mount"
    finally:
        os.close(root)


def test_a_start_imports_none_of_the_modules_it_stands_in_for():
    """What a createRuntime injection with libraries imports (a remembered ldconfig run, no
    exclusive device, cgroup v1): none of json, re, enum, signal (ctypes, which the syscalls
    need, brings struct)."""
    import subprocess
    import sys

    from oci_env import REPO

    # -S: no site, so not the dev venv's editable-install finder (which imports re itself);
    # the repo on sys.path as an installed package would be.
    probe = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
             "import cdi_hook.cli, cdi_hook.commands.hook, cdi_hook.oci, cdi_hook.request, cdi_hook.log\n"
             "import cdi_hook.registry, cdi_hook.cache, cdi_hook.plan, cdi_hook.policy, cdi_hook.attribution\n"
             "import cdi_hook.hostdev, cdi_hook.live.inject, cdi_hook.live.worker, cdi_hook.live.cgroups\n"
             "import cdi_hook.live.ldmemo\n"
             "print(' '.join(m for m in ('json', 're', 'enum', 'signal') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], cwd="/", capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [], out
