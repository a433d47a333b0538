"""Helpers of the node-fault tests (tests/test_faults*.py): a small tmpfs of the test's own,
filled to the last byte or remounted read-only under what cdi-hook writes."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path


@contextlib.contextmanager
def small_tmpfs(where: Path, *, size: str = "64k", full: bool = True, readonly: bool = False):
    """A tmpfs of its own at `where`: filled to the last byte (full) or remounted read-only
    once the caller's files are in (readonly, through the yielded remount function)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "cdi-fault", str(where)], check=True)
    try:
        def fill() -> None:
            fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)

        def make_readonly() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)

        yield fill if full else make_readonly
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
