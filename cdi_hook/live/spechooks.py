"""Run the spec's own hooks for the current stage, as a runtime would run them.

Each hook gets exactly the environment its spec declares (nothing inherited, neither ours
nor the container's), its declared args (args[0] is argv[0], as in OCI), its timeout and
the OCI state on stdin. A failing hook fails the stage and its output is in the error.
These run in the hook's own (runtime) namespaces; createContainer hooks are run by the
worker inside the container's (containerhooks.py), which shares STEP and _tail but not the
subprocess import (~2 ms), hence the import inside run_hook.
"""

from __future__ import annotations

import os

from cdi_hook.errors import HookError
from cdi_hook.spec.model import Hook

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Callable

STEP = "spec hook"
OUTPUT_LIMIT = 2000


def run_hooks(hooks: list[tuple[str, Hook]], state: bytes) -> None:
    for origin, hook in hooks:
        run_hook(origin, hook, state)


def run_hook(origin: str, hook: Hook, state: bytes) -> None:
    import subprocess

    argv = list(hook.args) or [hook.path]
    env = dict(item.split("=", 1) if "=" in item else (item, "") for item in hook.env)
    try:
        result = subprocess.run(argv, executable=hook.path, env=env, input=state, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=hook.timeout or None, close_fds=True, cwd="/",
                                preexec_fn=_dies_with_the_hook(os.getpid()))
    except subprocess.TimeoutExpired as expired:
        raise HookError(STEP, origin, f"{hook.path} timed out after {hook.timeout}s: {_tail(expired.output)}") from None
    except OSError as error:
        raise HookError(STEP, origin, f"cannot run {hook.path}: {error.strerror}") from None
    if result.returncode != 0:
        how = f"exit status {result.returncode}" if result.returncode > 0 else f"signal {-result.returncode}"
        raise HookError(STEP, origin, f"{hook.path} failed ({how}): {_tail(result.stdout)}")


def _dies_with_the_hook(hook_pid: int) -> Callable[[], None]:
    """A spec hook is part of this hook's work: when the runtime kills the hook (its timeout),
    the spec hook must not run on alone, unseen, as a child of init."""
    def preexec() -> None:
        import signal

        import prctl  # in the child only, ~1 ms before the spec hook's exec

        prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != hook_pid:  # the hook died before the line above
            os._exit(1)
    return preexec


def _tail(output: bytes | None) -> str:
    text = " ".join((output or b"").decode("utf-8", "replace").split())
    return (text[-OUTPUT_LIMIT:] if text else "no output")
