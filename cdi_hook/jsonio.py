"""json.loads and json.dumps for the hook's hot path, through the interpreter's C
accelerator (_json) alone.

Every container start parses the OCI state and config.json and writes a JSON log line.
The json package imports re (and re imports enum): ~10 ms of a start, more than all the
rest of the JSON work. _json is the C code json itself runs on; here it is driven directly:
loads() and dumps() give exactly what json.loads() and json.dumps() with default arguments
give (tests/test_fast_equivalents.py compares them). A document the C scanner refuses is
parsed again by json itself, which raises its own json.JSONDecodeError (the scanner can
only raise that once json.decoder is imported): the error path alone imports json. So
does anything unusual (bytes in UTF-16 or UTF-32).
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from typing import Any, NoReturn

_WHITESPACE = " \t\n\r"  # json.decoder.WHITESPACE
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Decoder:
    """The attributes the C scanner reads from json.JSONDecoder(): its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan_once = _json.make_scanner(_Decoder())  # type: ignore[arg-type]  # typeshed: any object with its attributes


def loads(data: bytes | bytearray | str) -> Any:
    """json.loads(data)."""
    if isinstance(data, str):
        text = data
    else:
        if data[:1] in (b"\xef", b"\xfe", b"\xff") or b"\x00" in data[:4]:  # a BOM, UTF-16/32
            return _json_loads(data)
        try:
            text = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return _json_loads(data)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        if text.startswith("\ufeff"):
            raise ValueError("a BOM")
        value, end = _scan_once(text, start)
    except (StopIteration, ValueError, SystemError):
        # Not JSON: json raises its own error. (The C scanner raises json's JSONDecodeError
        # only once json.decoder is imported; before, it fails with a SystemError.)
        return _json_loads(data)
    if end != len(text) and text[end:].strip(_WHITESPACE):
        return _json_loads(data)  # extra data after the document
    return value


def _json_loads(data: bytes | bytearray | str) -> Any:
    import json

    return json.loads(data)


def dumps(value: object) -> str:
    """json.dumps(value): ASCII, separators ", " and ": ", NaN allowed, circular references refused."""
    encode = _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ",
                                False, False, True)
    return "".join(encode(value, 0))


def _not_serializable(value: object) -> NoReturn:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")
