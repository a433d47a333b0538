"""The project's own error type, and how any text reaches a terminal or a log line.

Every error a user can cause (a bad spec, an unknown device, a hostile rootfs, a broken
state on stdin) is a CdiError whose str() is one line that says where and what: the CLI
prints it on stderr and exits non-zero. Anything else escaping is a bug.

Messages carry text from the image (file names ldconfig complains about), from programs
that read it (a spec hook's output) and from config.json (annotations). printable() is
the one gate at every boundary where such text is printed or logged (cli.py, log.py): an
image cannot put a terminal escape sequence in front of an operator, break the one-line
format, or make one line megabytes long.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable

MAX_MESSAGE_LENGTH = 3000  # characters of one error or warning line; ldconfig's and a spec hook's output tails are 2000
MAX_LISTED = 10  # items a message lists before "... (N more)"


def _escape_table() -> dict[int, str]:
    table = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}  # C0, DEL, C1
    table[ord("\t")] = table[ord("\n")] = " "  # a library's multi-line message stays readable on one line
    # Unicode line/paragraph separators and bidirectional overrides: they break or reorder a
    # line in terminals and log viewers as a newline would (Trojan Source).
    for code in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)):
        table[code] = f"\\u{code:04x}"
    return table


_ESCAPES = _escape_table()


def printable(text: object, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """text as one safe line: control characters escaped (ESC becomes the four characters
    \\x1b, so no ANSI sequence survives), cut to limit characters with a count of the rest."""
    text = str(text).translate(_ESCAPES)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text


def listed(items: Iterable[object], limit: int = MAX_LISTED, separator: str = ", ") -> str:
    """items joined, at most limit of them, then "... (N more)": a message naming every one
    of 10,000 annotations would be longer than anyone reads."""
    items = list(items)
    shown = separator.join(str(item) for item in items[:limit])
    return f"{shown}{separator}... ({len(items) - limit} more)" if len(items) > limit else shown


class CdiError(Exception):
    """An error the user can act on; str() is the one line shown to them."""


class SpecError(CdiError):
    """A problem in one spec file, at one field path (e.g. devices[2].containerEdits)."""

    def __init__(self, file: str, field: str, message: str):
        self.file = file
        self.field = field
        self.message = message
        where = f"{file}: {field}: " if field else f"{file}: "
        super().__init__(where + message)


class ResolveError(CdiError):
    """Requested devices that no valid spec defines."""


class HookError(CdiError):
    """A step of the live injection failed; names the step and the device."""

    def __init__(self, step: str, device: str, message: str):
        self.step = step
        self.device = device
        self.detail = message
        super().__init__(f"{step} for {device}: {message}" if device else f"{step}: {message}")
