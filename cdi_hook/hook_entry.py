"""The one builder of an OCI hook entry that runs cdi-hook: hooks.d files (install),
config.json hooks (inject --mode hook) and the tests all take their entries from here.

The entry runs the interpreter by its full path, isolated (-I: no PYTHON* variables, no
user site, no current directory on sys.path), with an explicit environment: PATH, the
spec dirs when given, and the settings passed in. A runtime gives a hook no other
environment, and nothing of the container's reaches it.
"""

from __future__ import annotations

import os
import sys

from cdi_hook import settings

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable

HOOK_PATH_ENV = "/usr/sbin:/usr/bin:/sbin:/bin"
HOOK_TIMEOUT_S = 60
LIVE_HOOK_STAGES = ("createRuntime", "poststart", "poststop")

# cdi-hook's own settings that `install` and `inject --mode hook` carry into the entry's env
# when they are set at that time. CDI_HOOK_INSECURE_SPECS is deliberately not one of them:
# it belongs in test set-ups, never in an installed hook.
CARRIED_SETTINGS = ("CDI_HOOK_LOG", "CDI_HOOK_LOG_LEVEL", "CDI_HOOK_CACHE_DIR", "CDI_HOOK_MAX_SPEC_SIZE",
                    "CDI_HOOK_RESCTRL", "CDI_HOOK_POLICY", "CDI_HOOK_STATE_DIR")


def interpreter() -> str:
    """The absolute path of the running interpreter.

    Made absolute but NOT symlink-resolved: a venv's bin/python is a symlink to the system
    python, and resolving it would lose the venv (and with it the installed cdi_hook).
    """
    return os.path.abspath(sys.executable)


def carried_settings() -> dict[str, str]:
    """The CARRIED_SETTINGS this process was given (non-empty), as given."""
    return {name: value for name, value in settings.current().environ if name in CARRIED_SETTINGS and value}


# The program an entry runs: `-c` with this, not `-m cdi_hook`. -m goes through runpy, which
# imports importlib.util, contextlib, collections and functools before cdi-hook's first line
# (~7 ms on every container start); -c imports only cdi_hook.cli. Under -I the venv's
# site-packages are still on sys.path (the interpreter is the venv's), the current
# directory is not, so both forms find the same installed package.
ENTRY_CODE = "import sys; from cdi_hook.cli import main; sys.exit(main())"
# What entries are recognised by (uninstall, doctor): today's form, and the -m form that
# installs before 2026-11-30 wrote.
ENTRY_FORMS = (["-I", "-c", ENTRY_CODE], ["-I", "-m", "cdi_hook"])


def argv(python: str, *command: str) -> list[str]:
    # argv[0] is the full path, not "python3": CPython locates its venv (pyvenv.cfg) from
    # argv[0], and a bare name resolves through PATH to the system interpreter instead.
    return [python, *ENTRY_FORMS[0], *command]


def is_cdi_hook_argv(args: object) -> bool:
    """Whether an entry's args run cdi-hook the way argv() writes them, now or before."""
    return isinstance(args, list) and args[1:4] in ENTRY_FORMS



def hook_entry(*command: str, python: str | None = None, spec_dirs: Iterable[str] | None = None,
               settings: dict | None = None, timeout: int = HOOK_TIMEOUT_S) -> dict:
    """{"path", "args", "env", "timeout"} running `cdi-hook COMMAND...`."""
    python = os.path.abspath(python or interpreter())
    env = [f"PATH={HOOK_PATH_ENV}"]
    if spec_dirs:
        env.append("CDI_SPEC_DIRS=" + ":".join(spec_dirs))
    env += [f"{name}={value}" for name, value in (settings or {}).items()]
    return {"path": python, "args": argv(python, *command), "env": env, "timeout": timeout}


def live_hook_entry(stage: str, python: str | None = None, spec_dirs: Iterable[str] | None = None) -> dict:
    """The entry that runs `cdi-hook hook --stage STAGE` with the carried settings."""
    return hook_entry("hook", "--stage", stage, python=python, spec_dirs=spec_dirs, settings=carried_settings())


def precreate_entry(python: str | None = None, spec_dirs: Iterable[str] | None = None) -> dict:
    return hook_entry("precreate", python=python, spec_dirs=spec_dirs, settings=carried_settings())
