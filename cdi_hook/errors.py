"""The project's own error type.

Every error a user can cause (a bad spec, an unknown device, a hostile rootfs, a broken
state on stdin) is a CdiError whose str() is one line that says where and what: the CLI
prints it on stderr and exits non-zero. Anything else escaping is a bug.
"""


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
