"""cdi-hook's settings: every CDI_* environment variable, read once, checked, frozen.

A runtime gives a hook only the environment its entry names (hook_entry.py), so these
variables are the installed hook's configuration. They are read from the environment in
one place, here, into a Settings record; everything else asks `current()` (or is handed a
Settings, as doctor does for the installed hook's entry). A bad value is one line naming
the variable, before anything is done.

Stdlib-only and tiny: every container start imports it.
"""

from __future__ import annotations

import os
from collections import namedtuple

TYPE_CHECKING = False  # typing and collections.abc are not otherwise imported by a hook start
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")  # CDI's defaults: later dirs win
DEFAULT_LOG_FILE = "/var/log/cdi-hook.log"
DEFAULT_CACHE_DIR = "/run/cdi-hook"
DEFAULT_STATE_DIR = "/run/cdi-hook/held"
DEFAULT_RESCTRL = "/sys/fs/resctrl"
DEFAULT_POLICY = "/etc/cdi-hook/policy.yaml"
DEFAULT_MAX_SPEC_SIZE = 4 << 20
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

# The variables, by name (install carries the CARRIED ones into a hook's entry).
SPEC_DIRS_ENV = "CDI_SPEC_DIRS"
LOG_ENV = "CDI_HOOK_LOG"
LOG_LEVEL_ENV = "CDI_HOOK_LOG_LEVEL"
CACHE_DIR_ENV = "CDI_HOOK_CACHE_DIR"
MAX_SPEC_SIZE_ENV = "CDI_HOOK_MAX_SPEC_SIZE"
RESCTRL_ENV = "CDI_HOOK_RESCTRL"
POLICY_ENV = "CDI_HOOK_POLICY"
STATE_DIR_ENV = "CDI_HOOK_STATE_DIR"
INSECURE_ENV = "CDI_HOOK_INSECURE_SPECS"
# Written by `inject --mode hook` into the createRuntime entry it writes (never carried by
# install): the later stages it also wrote an entry for. Unset: every later stage may come
# (hooks.d files, hand-written entries, older installs), and a record waits for its poststop.
POST_STAGES_ENV = "CDI_HOOK_POST_STAGES"
POST_STAGES = ("poststart", "poststop")
NAMES = (SPEC_DIRS_ENV, LOG_ENV, LOG_LEVEL_ENV, CACHE_DIR_ENV, MAX_SPEC_SIZE_ENV, RESCTRL_ENV, POLICY_ENV,
         STATE_DIR_ENV, INSECURE_ENV, POST_STAGES_ENV)


class Settings(namedtuple("Settings", [
        "spec_dirs",        # tuple of dirs from CDI_SPEC_DIRS, or None: the defaults (or --spec-dir)
        "log_file",         # where the hook's JSON lines go
        "log_level",        # a LOG_LEVELS number
        "cache_dir",        # absolute path, or None: no compiled cache (a relative path was given)
        "max_spec_size",    # bytes
        "resctrl",          # where resctrl is mounted
        "policy",           # the policy file
        "policy_explicit",  # CDI_HOOK_POLICY named it: it must exist
        "state_dir",        # the exclusive holds' folder; its parent is the state root
        "insecure_specs",   # CDI_HOOK_INSECURE_SPECS=1: spec files not root's are read (tests only)
        "post_stages",      # the later stages inject wrote entries for (CDI_HOOK_POST_STAGES), or None: all may come
        "environ",          # the CDI_* variables that were set, as given
])):
    __slots__ = ()

    @property
    def state_root(self) -> str:
        """The folder of cdi-hook's records (holds, container records, moved interfaces):
        the parent of the holds' folder, /run/cdi-hook by default (gone at reboot, like the
        containers the records describe)."""
        return os.path.dirname(self.state_dir.rstrip("/")) or "/"


def _bad(message: str) -> Exception:
    # errors.py only for a bad value
    from cdi_hook.errors import CdiError

    return CdiError(message)


def from_environ(environ: Mapping[str, str]) -> Settings:
    """The settings an environment gives; CdiError naming the variable for a bad value."""
    def get(name: str) -> str:
        return environ.get(name) or ""

    raw_dirs = environ.get(SPEC_DIRS_ENV)
    spec_dirs = None if raw_dirs is None else tuple(d for d in raw_dirs.split(":") if d)
    level_name = get(LOG_LEVEL_ENV).strip().lower() or "info"
    if level_name not in LOG_LEVELS:
        raise _bad(f"{LOG_LEVEL_ENV}={level_name!r}: not a log level ({', '.join(LOG_LEVELS)})")
    cache_dir = get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    size_text = get(MAX_SPEC_SIZE_ENV)
    try:
        max_spec_size = int(size_text) if size_text else DEFAULT_MAX_SPEC_SIZE
    except ValueError:
        max_spec_size = -1
    if max_spec_size <= 0:
        raise _bad(f"{MAX_SPEC_SIZE_ENV}={size_text!r} is not a positive number of bytes")
    state_dir = get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    if not os.path.isabs(state_dir):
        raise _bad(f"{STATE_DIR_ENV}={state_dir!r}: not an absolute path (the records must not depend on "
                       "the folder a runtime starts the hook in)")
    insecure = get(INSECURE_ENV)
    if insecure not in ("", "0", "1"):
        raise _bad(f"{INSECURE_ENV}={insecure!r}: 1 or 0")
    raw_stages = environ.get(POST_STAGES_ENV)
    post_stages = None if raw_stages is None else tuple(s for s in raw_stages.split(",") if s)
    if post_stages is not None and not set(post_stages) <= set(POST_STAGES):
        raise _bad(f"{POST_STAGES_ENV}={raw_stages!r}: a comma-separated list of {', '.join(POST_STAGES)}")
    return Settings(
        spec_dirs=spec_dirs,
        log_file=get(LOG_ENV) or DEFAULT_LOG_FILE,
        log_level=LOG_LEVELS[level_name],
        # relative: no cache, rather than one that depends on the hook's working directory
        cache_dir=cache_dir if os.path.isabs(cache_dir) else None,
        max_spec_size=max_spec_size,
        resctrl=get(RESCTRL_ENV) or DEFAULT_RESCTRL,
        policy=get(POLICY_ENV) or DEFAULT_POLICY,
        policy_explicit=bool(get(POLICY_ENV)),
        state_dir=state_dir,
        insecure_specs=insecure == "1",
        post_stages=post_stages,
        environ=tuple((name, environ[name]) for name in NAMES if name in environ),
    )


_current: Settings | None = None


def current() -> Settings:
    """This process's settings, read from its environment the first time they are asked for."""
    global _current
    if _current is None:
        _current = from_environ(os.environ)
    return _current


def use(settings: Settings | None) -> None:
    """Make settings this process's (tests, bench);
    None: read the environment again at the next current()."""
    global _current
    _current = settings
