"""CDI names: vendor, class, device name, kind, qualified name; property-based round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdi_hook.errors import CdiError
from cdi_hook.spec.names import (
    class_problem,
    device_name_problem,
    is_qualified_name,
    kind_problem,
    parse_kind,
    parse_qualified_name,
    quote,
    qualified_name,
    vendor_problem,
)


@pytest.mark.parametrize("vendor", ["a", "vendor.com", "foo.bar.baz", "A_b-c.d9", "x1"])
def test_valid_vendors(vendor):
    assert vendor_problem(vendor) is None
    assert class_problem(vendor) is None


@pytest.mark.parametrize("vendor", ["", "1vendor", "vendor.", "vendor-", "-a", "ve/ndor", "ven dor", "ven=dor",
                                    "vendor\n", "véndor", ".a", "a:b"])
def test_invalid_vendors(vendor):
    assert vendor_problem(vendor)
    assert class_problem(vendor)


@pytest.mark.parametrize("name", ["0", "gpu0", "a:b", "A.b_c-d:9", "1a", "all"])
def test_valid_device_names(name):
    assert device_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "-a", "a-", "a:", ":a", "a/b", "a=b", "a b", "gpu0\n", "_a", "a."])
def test_invalid_device_names(name):
    assert device_name_problem(name)


@pytest.mark.parametrize("kind", ["vendor.com/gpu", "foo.bar.baz/foo-bar123.B_az", "a/b"])
def test_valid_kinds(kind):
    assert kind_problem(kind) is None
    assert parse_kind(kind) == tuple(kind.split("/"))


@pytest.mark.parametrize("kind", ["foo", "vendor.com/foo/", "vendor.com/foo/bar", "/gpu", "vendor.com/", "1v/gpu",
                                  "vendor.com/1gpu"])
def test_invalid_kinds(kind):
    assert kind_problem(kind)
    with pytest.raises(CdiError):
        parse_kind(kind)


def test_parse_qualified_name():
    assert parse_qualified_name("vendor.com/gpu=0") == ("vendor.com", "gpu", "0")
    assert parse_qualified_name("a.b/c.d=e:f") == ("a.b", "c.d", "e:f")


@pytest.mark.parametrize("name", ["vendor.com/gpu", "gpu=0", "vendor.com/gpu=", "vendor.com/gpu=0=1",
                                  "vendor.com/a/gpu=0", "=", "", "vendor.com/gpu=0,vendor.com/gpu=1"])
def test_invalid_qualified_names(name):
    assert not is_qualified_name(name)
    with pytest.raises(CdiError) as error:
        parse_qualified_name(name)
    assert "\n" not in str(error.value)


def test_qualified_name_builds_and_checks():
    assert qualified_name("vendor.com", "gpu", "0") == "vendor.com/gpu=0"
    with pytest.raises(CdiError, match="vendor"):
        qualified_name("1vendor", "gpu", "0")


def test_quote_keeps_one_line_and_is_bounded():
    text = quote("a\nb\"c" + "x" * 500)
    assert "\n" not in text and len(text) < 120 and '\\"' in text


# Property-based: generated valid names round-trip; any text fails only with CdiError.
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_LETTERS = _ALNUM[:52]


def _name(first, middle, last):
    return st.builds(lambda a, b, c: a + b + c, st.sampled_from(first),
                     st.text(alphabet=middle, max_size=20), st.sampled_from(last)) | st.sampled_from(first)


_vendor = _name(_LETTERS, _ALNUM + "_.-", _ALNUM)
_device = _name(_ALNUM, _ALNUM + "_.:-", _ALNUM)


@settings(max_examples=300)
@given(_vendor, _vendor, _device)
def test_valid_names_round_trip(vendor, device_class, device):
    name = qualified_name(vendor, device_class, device)
    assert parse_qualified_name(name) == (vendor, device_class, device)
    assert is_qualified_name(name)


@settings(max_examples=500)
@given(st.text())
def test_arbitrary_text_only_raises_cdi_error(text):
    try:
        vendor, device_class, device = parse_qualified_name(text)
    except CdiError as error:
        assert "\n" not in str(error)
    else:
        assert text == f"{vendor}/{device_class}={device}"
    for check in (vendor_problem, class_problem, device_name_problem, kind_problem):
        assert check(text) is None or "\n" not in check(text)


@settings(max_examples=300)
@given(st.text(alphabet="ab1=/.:_-\n ", max_size=30))
def test_structured_text_only_raises_cdi_error(text):
    try:
        parse_qualified_name(text)
    except CdiError:
        pass
