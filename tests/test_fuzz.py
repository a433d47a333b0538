"""Property-based fuzzing of everything that reads untrusted or hand-written input.

Spec bytes (JSON and YAML) go through decode -> build -> validate; names, kinds and
annotations through their parsers; the OCI state and config.json through theirs. Any
exception other than CdiError is a bug, and every CdiError's message is one line.

Inputs are seeded from tests/fuzz_corpus/ (kept in the repo: add a file there whenever a
bug is found) and mutated byte-wise, or generated from JSON-shaped strategies around a spec
skeleton. The budget is fixed (FUZZ_EXAMPLES per test, default 500; set CDI_FUZZ_EXAMPLES
to fuzz longer); each example has a deadline, so a slow path (alias bombs, deep nesting)
fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdi_hook import oci
from cdi_hook.errors import CdiError
from cdi_hook.request import requested_devices
from cdi_hook.spec import names
from cdi_hook.spec.parse import build_spec, decode_document
from cdi_hook.spec.validate import validate_spec
from ci_rules import TIME_FACTOR

CORPUS = Path(__file__).parent / "fuzz_corpus"
FUZZ_EXAMPLES = int(os.environ.get("CDI_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=2000 * TIME_FACTOR, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPEC_FILES = sorted(p for p in CORPUS.iterdir() if p.suffix in (".json", ".yaml"))
SEEDS = [p.read_bytes() for p in SPEC_FILES]
ANNOTATION_SEEDS = [line for line in (CORPUS / "annotations.txt").read_text().splitlines() if line]


def _one_line(error: CdiError) -> None:
    assert "\n" not in str(error), repr(str(error))


def _spec_pipeline(data: bytes, path: str) -> None:
    try:
        document = decode_document(data, path)
        spec = build_spec(document, path)
    except CdiError as error:
        _one_line(error)
        return
    for problem in validate_spec(spec):
        assert isinstance(problem, CdiError)
        _one_line(problem)


# Fragments that once broke a parser or are known to stress one: structure, aliases, NUL,
# an integer past Python's 4300-digit limit, an impossible date, YAML tags.
SPLICES = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"*a", b"&a ", b"\n- ", b"\x00", b"\\u0000", b"..", b"/",
           b"9" * 4400, b"2001-02-30", b"!!python/name:os.system ", b"!!binary AAAA"]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level edits: replace, insert, delete, duplicate a slice."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["replace", "insert", "delete", "duplicate"]))
        if action == "replace" and data:
            data[where] = draw(st.integers(0, 255))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(SPLICES))
        elif action == "delete" and data:
            del data[where:where + draw(st.integers(1, 16))]
        elif action == "duplicate" and data:
            end = min(len(data), where + draw(st.integers(1, 64)))
            data[where:where] = data[where:end]
    return bytes(data)


JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True)
             | st.text(max_size=40) | st.sampled_from(["/dev/null", "../..", "a.com/b", "x=y", "rw", "bind", ""]))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.text(max_size=12) | st.sampled_from(
                              ["path", "hostPath", "containerPath", "options", "type", "major", "minor",
                               "fileMode", "permissions", "uid", "gid", "env", "hooks", "hookName", "args",
                               "timeout", "mounts", "deviceNodes", "netDevices", "intelRdt", "closID",
                               "additionalGids", "name", "annotations"]), inner, max_size=6), max_leaves=30)


@st.composite
def spec_shaped(draw) -> dict:
    edits = draw(st.dictionaries(st.sampled_from(["env", "deviceNodes", "mounts", "hooks", "netDevices",
                                                  "intelRdt", "additionalGids"]), JSON_VALUE, max_size=4))
    return {"cdiVersion": draw(st.sampled_from(["0.3.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"])
                               | st.text(max_size=8)),
            "kind": draw(st.sampled_from(["vendor.com/gpu", "a.b/c"]) | st.text(max_size=20)),
            "devices": [{"name": draw(st.text(max_size=10) | st.just("gpu0")), "containerEdits": edits}],
            **draw(st.dictionaries(st.text(max_size=8), JSON_VALUE, max_size=2))}


def test_corpus_files_never_crash():
    for path, data in zip(SPEC_FILES, SEEDS):
        _spec_pipeline(data, str(path))


@FUZZ
@given(data=mutated(SEEDS), as_yaml=st.booleans())
def test_fuzz_mutated_spec_files(data, as_yaml):
    _spec_pipeline(data, "fuzz.yaml" if as_yaml else "fuzz.json")


@FUZZ
@given(doc=spec_shaped(), as_yaml=st.booleans())
def test_fuzz_spec_shaped_documents(doc, as_yaml):
    try:
        data = json.dumps(doc, allow_nan=True).encode()
    except (ValueError, OverflowError):
        return
    # JSON is YAML: the same bytes also go through the YAML decoder
    _spec_pipeline(data, "fuzz.yaml" if as_yaml else "fuzz.json")


@FUZZ
@given(text=st.text(max_size=80) | st.sampled_from(ANNOTATION_SEEDS).map(lambda s: s.split("=", 1)[1]))
def test_fuzz_names(text):
    for parse in (names.parse_qualified_name, names.parse_kind):
        try:
            parse(text)
        except CdiError as error:
            _one_line(error)
    for check in (names.vendor_problem, names.class_problem, names.device_name_problem, names.kind_problem):
        problem = check(text)
        assert problem is None or "\n" not in problem
    assert "\n" not in names.quote(text)


@FUZZ
@given(pairs=st.lists(st.tuples(st.text(max_size=30).map(lambda k: "cdi.k8s.io/" + k) | st.text(max_size=20),
                                st.text(max_size=80) | st.sampled_from(ANNOTATION_SEEDS)), max_size=5),
       seed_line=st.sampled_from(ANNOTATION_SEEDS))
def test_fuzz_annotations(pairs, seed_line):
    key, value = seed_line.split("=", 1)
    annotations = dict(pairs)
    annotations.setdefault(key, value)
    try:
        found = requested_devices(annotations, None)
    except CdiError as error:
        _one_line(error)
        return
    assert len(found) == len(set(found))
    assert all(names.is_qualified_name(name) for name in found)


@FUZZ
@given(doc=JSON_VALUE | st.fixed_dictionaries({"id": JSON_LEAF, "bundle": JSON_LEAF, "pid": JSON_LEAF,
                                               "annotations": JSON_VALUE}),
       raw=st.binary(max_size=64))
def test_fuzz_oci_state_and_config(doc, raw):
    for data in (json.dumps(doc).encode(), raw):
        try:
            oci.parse_state(data)
        except CdiError as error:
            _one_line(error)
    config = doc if isinstance(doc, dict) else {"root": doc}
    try:
        oci.parse_config(config, "/bundle", "/bundle/config.json")
    except CdiError as error:
        _one_line(error)
