"""cdi.k8s.io/ annotations: reading the requested devices and building annotations."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdi_hook.errors import CdiError
from cdi_hook.request import annotation_key, annotation_value, build_annotations, requested_devices


def test_reads_every_cdi_annotation_in_order_deduped():
    first = {"cdi.k8s.io/a": "vendor.com/gpu=0,vendor.com/gpu=1", "other.io/x": "not a device",
             "cdi.k8s.io/b": "vendor.com/gpu=0"}
    second = {"cdi.k8s.io/c": "acme.com/nic=eth, vendor.com/gpu=1"}
    assert requested_devices(first, None, second) == ["vendor.com/gpu=0", "vendor.com/gpu=1", "acme.com/nic=eth"]


def test_no_annotations_no_devices():
    assert requested_devices() == []
    assert requested_devices(None, {}) == []
    assert requested_devices({"io.kubernetes.cri-o/x": "y"}) == []


@pytest.mark.parametrize("value", ["", "vendor.com/gpu", "vendor.com/gpu=0,,vendor.com/gpu=1", "gpu0",
                                   "vendor.com/gpu=0,", "vendor.com/gpu=a b"])
def test_malformed_value_names_the_key(value):
    with pytest.raises(CdiError) as error:
        requested_devices({"cdi.k8s.io/mykey": value})
    assert '"cdi.k8s.io/mykey"' in str(error.value)
    assert "\n" not in str(error.value)


def test_value_must_be_a_string():
    with pytest.raises(CdiError, match="cdi.k8s.io/k"):
        requested_devices({"cdi.k8s.io/k": ["vendor.com/gpu=0"]})


@pytest.mark.parametrize("key", ["cdi.k8s.io/", "cdi.k8s.io/-a", "cdi.k8s.io/a-", "cdi.k8s.io/a/b",
                                 "cdi.k8s.io/" + "a" * 64, "cdi.k8s.io/a b"])
def test_malformed_keys_are_errors(key):
    with pytest.raises(CdiError) as error:
        requested_devices({key: "vendor.com/gpu=0"})
    assert "annotation" in str(error.value)


@pytest.mark.parametrize("key", ["cdi.k8s.io/a", "cdi.k8s.io/" + "a" * 63, "cdi.k8s.io/plugin_dev.1-x"])
def test_valid_keys(key):
    assert requested_devices({key: "vendor.com/gpu=0"}) == ["vendor.com/gpu=0"]


def test_annotation_key_builds_like_the_reference_library():
    assert annotation_key("plugin", "vendor.com/gpu") == "cdi.k8s.io/plugin_vendor.com_gpu"
    with pytest.raises(CdiError):
        annotation_key("plugin", "x" * 60)
    with pytest.raises(CdiError):
        annotation_key("", "dev")
    with pytest.raises(CdiError):
        annotation_key("-plugin", "dev")


def test_build_annotations_round_trips():
    built = build_annotations("plugin", "dev", ["vendor.com/gpu=0", "vendor.com/gpu=1"], {"keep": "me"})
    assert built == {"keep": "me", "cdi.k8s.io/plugin_dev": "vendor.com/gpu=0,vendor.com/gpu=1"}
    assert requested_devices(built) == ["vendor.com/gpu=0", "vendor.com/gpu=1"]
    with pytest.raises(CdiError, match="already set"):
        build_annotations("plugin", "dev", ["vendor.com/gpu=0"], built)
    with pytest.raises(CdiError):
        annotation_value([])
    with pytest.raises(CdiError):
        annotation_value(["not-qualified"])


def test_request_module_is_cheap_to_import():
    code = "import sys, cdi_hook.request; print(sorted(m for m in ('yaml', 'cdi_hook.registry', 'json') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@given(st.dictionaries(st.one_of(st.text(), st.just("cdi.k8s.io/k"), st.text().map(lambda t: "cdi.k8s.io/" + t)),
                       st.one_of(st.text(), st.integers(), st.none())))
def test_arbitrary_annotations_only_raise_cdi_error(annotations):
    try:
        names = requested_devices(annotations)
    except CdiError as error:
        assert "\n" not in str(error)
    else:
        assert len(names) == len(set(names))
