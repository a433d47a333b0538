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


# The program an entry runs. `-I -S -c` with ENTRY_CODE: no site (its .pth processing costs
# every start ~3 ms in a clean venv, ~10 ms in an editable one), so the paths site would
# have added (and the package's own folder, for an editable install) are written into the
# code by install, found by asking that interpreter (site_paths). cdi_hook.start returns at
# once for a post stage with nothing recorded for it, and otherwise runs cdi_hook.cli.
# `-c`, not `-m`: -m goes through runpy (importlib.util, contextlib, collections, functools
# before cdi-hook's first line). Under -I the current directory is never on sys.path.
ENTRY_PREFIX = "import sys; sys.path[len(sys.path):] = "
ENTRY_SUFFIX = "; from cdi_hook.start import main; sys.exit(main())"
# For an interpreter that cannot be asked for its paths (the repo's hooks.d templates name
# a placeholder one; a broken install): with site, which finds the package itself.
SITE_FORM = ["-I", "-c", "import sys; from cdi_hook.start import main; sys.exit(main())"]
# What entries of earlier installs ran, still recognised (uninstall, doctor, inject): the -c
# form of 2026-11-30 to 2026-12-04 and the -m form before it.
OLDER_ENTRY_FORMS = (["-I", "-c", "import sys; from cdi_hook.cli import main; sys.exit(main())"],
                     ["-I", "-m", "cdi_hook"])

_site_paths: dict[str, list[str] | None] = {}

# Run by the interpreter under -I -S: site's work done by hand, then cdi_hook found as the
# hook will find it; prints the folders site adds (.pth path lines included) and the package's.
_SITE_PROBE = ("import sys; before = list(sys.path); import site; site.main(); import os, cdi_hook; "
               "found = [p for p in sys.path if p not in before]; "
               "found.append(os.path.dirname(os.path.dirname(os.path.abspath(cdi_hook.__file__)))); "
               "print('\\0'.join(dict.fromkeys(os.path.abspath(p) for p in found)))")


def site_paths(python: str) -> list[str] | None:
    """The folders an entry run without site needs on sys.path to find cdi-hook and what it
    imports, as that interpreter has them (asked once per interpreter); None when it cannot
    be asked (missing, or without cdi-hook: install refuses such an interpreter first)."""
    python = os.path.abspath(python)
    if python not in _site_paths:
        import subprocess

        try:
            probe = subprocess.run([python, "-I", "-S", "-c", _SITE_PROBE], capture_output=True, cwd="/",
                                   stdin=subprocess.DEVNULL)
        except OSError:
            _site_paths[python] = None
        else:
            found = [p for p in probe.stdout.decode().strip().split("\0") if p]
            _site_paths[python] = found if probe.returncode == 0 and found else None
    return _site_paths[python]


def entry_code(paths: list[str]) -> str:
    return ENTRY_PREFIX + repr(list(paths)) + ENTRY_SUFFIX


def argv(python: str, *command: str, paths: list[str] | None = None) -> list[str]:
    """[python, -I, -S, -c, ENTRY_CODE, *command]; paths: site_paths(python) unless given
    (SITE_FORM when it has none). argv[0] is the full path, not "python3": CPython locates
    its venv (pyvenv.cfg) from argv[0], and a bare name resolves through PATH to the system
    interpreter instead."""
    if paths is None:
        paths = site_paths(python)
    if paths is None:
        return [python, *SITE_FORM, *command]
    return [python, "-I", "-S", "-c", entry_code(paths), *command]


def _form_length(args: list) -> int:
    """How many args the entry form takes after the interpreter; 0 when it is not ours."""
    if (args[1:4] == ["-I", "-S", "-c"] and isinstance(args[4] if len(args) > 4 else None, str)
            and args[4].startswith(ENTRY_PREFIX) and args[4].endswith(ENTRY_SUFFIX)):
        return 4
    return 3 if args[1:4] == SITE_FORM or args[1:4] in OLDER_ENTRY_FORMS else 0


def is_cdi_hook_argv(args: object) -> bool:
    """Whether an entry's args run cdi-hook the way argv() writes them, now or before."""
    return isinstance(args, list) and _form_length(args) > 0


def entry_command(args: list) -> list:
    """The cdi-hook command an entry of ours runs (["hook", "--stage", "poststop"]), whatever its form."""
    return args[1 + _form_length(args):]


def hook_stages(hooks: object) -> list[str]:
    """The stages at which a config.json's hooks run cdi-hook's hook, in any form install,
    inject or a hand-written entry gives it (`hook --stage S`, `hook --spec-dir D --stage S`):
    any entry of ours under a stage whose command is `hook` counts for that stage."""
    if not isinstance(hooks, dict):
        return []
    return [stage for stage, entries in hooks.items() if isinstance(entries, list) and any(map(_runs_hook, entries))]


def _runs_hook(entry: object) -> bool:
    """Whether a config.json hook entry runs cdi-hook's `hook` command, in any of our forms."""
    return isinstance(entry, dict) and is_cdi_hook_argv(entry.get("args")) and entry_command(entry["args"])[:1] == ["hook"]


def mark_post_stages(hooks: dict, stages: Iterable[str]) -> None:
    """Say in each createRuntime entry of cdi-hook's hook which later stages the config
    runs it at too (settings.POST_STAGES_ENV): a record then knows whether a poststop will
    come to remove it. Only inject writes it: hooks.d files are static, and Podman runs
    their poststop itself, outside config.json."""
    value = f"{settings.POST_STAGES_ENV}={','.join(stages)}"
    for entry in hooks.get("createRuntime") or ():
        if _runs_hook(entry):
            env = [e for e in entry.get("env") or () if not (isinstance(e, str) and
                                                               e.startswith(settings.POST_STAGES_ENV + "="))]
            entry["env"] = env + [value]


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
