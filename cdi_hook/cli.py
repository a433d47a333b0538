"""Command line: argument parsing and exit codes only; each command lives in cdi_hook/commands/.

Modules are imported only for the command that runs, so `cdi-hook hook` on a container
that asks for no device pays for little more than the interpreter.
"""

from __future__ import annotations

import os
import sys

from cdi_hook import settings as config
from cdi_hook.spec import HOOK_STAGES as STAGES

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    import argparse
    from typing import Any


def _spec_dirs(args: Any) -> list[str] | None:  # Namespace or HookArgs
    """--spec-dir wins over CDI_SPEC_DIRS, which wins over the defaults (None)."""
    if getattr(args, "spec_dir", None):
        return list(args.spec_dir)
    dirs = config.current().spec_dirs
    return None if dirs is None else list(dirs)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="cdi-hook",
        description="Give CDI devices to containers through OCI hooks.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_specs(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--spec-dir",
            action="append",
            metavar="DIR",
            help="CDI spec dir (repeatable; later dirs win). Default: $CDI_SPEC_DIRS or /etc/cdi:/var/run/cdi",
        )
        return p

    p = with_specs(sub.add_parser("list", help="list every resolvable device"))
    p.add_argument("--format", choices=("table", "json", "yaml"), default="table")

    p = with_specs(sub.add_parser("validate", help="validate spec files (default: every spec in the spec dirs)"))
    p.add_argument("files", nargs="*", metavar="FILE")

    p = with_specs(sub.add_parser("show", help="show the merged edits the named devices would apply"))
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--format", choices=("json", "yaml"), default="json")

    p = with_specs(sub.add_parser("hook", help="the OCI hook: OCI state on stdin"))
    p.add_argument("--stage", choices=STAGES, default="createRuntime")

    with_specs(sub.add_parser("precreate", help="Podman precreate filter: config.json on stdin, edited on stdout"))

    p = with_specs(sub.add_parser("watch", help="watch the spec dirs and keep the compiled cache current, so hook "
                                                "starts skip the per-file checks (a long-running service)"))
    # The systemd unit an older `install --watch --serve` wrote still runs `watch --serve`:
    # accepted and ignored (with a warning), so that unit keeps the watcher running after an
    # upgrade; the injection server itself is gone (docs/development/performance.md).
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--generate", metavar="FILE", help="instead: keep the spec of a `generate --from` FILE current "
                                                      "as devices appear and disappear under /dev (hotplug)")
    p.add_argument("--output", metavar="FILE", help="with --generate: where the spec goes (default: FILE's output)")
    p.add_argument("--dev-root", default="/dev", metavar="DIR", help="with --generate: the /dev to watch (tests)")
    p.add_argument("--sys-root", default="/sys", metavar="DIR", help="with --generate: the /sys to read (tests)")
    p.add_argument("--rescan-interval", type=float, default=60.0, metavar="SECONDS",
                   help="with --generate: also scan this often, for changes no /dev event shows "
                        "(default: %(default)s)")

    p = sub.add_parser("generate", help="write a CDI spec for host devices named by path, glob, stable link or "
                                        "USB id (no hand-written spec)")
    p.add_argument("--kind", metavar="VENDOR/CLASS", help="the spec's kind, e.g. example.com/serial")
    p.add_argument("--device", action="append", metavar="NAME=SELECTOR",
                   help="a device (or a {name}/{index} template for many) and its selector: /dev/PATH, a glob, "
                        "a link such as /dev/serial/by-id/*, or usb:VENDOR:PRODUCT[:SERIAL] (repeatable)")
    p.add_argument("--from", dest="from_file", metavar="FILE", help="read kind and devices from a YAML file")
    p.add_argument("--output", metavar="FILE", help="write the spec here atomically (default: stdout)")
    p.add_argument("--shared", type=int, metavar="N", help="each device may be held by N containers at once")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="also set this in each container "
                                                                        "(repeatable)")
    p.add_argument("--mount", action="append", metavar="HOST:CONTAINER[:OPTIONS]",
                   help="also bind-mount this into each container (repeatable)")
    p.add_argument("--allow-empty", action="store_true", help="a selector that matches nothing is a warning")
    p.add_argument("--format", choices=("json", "yaml"), default="json", help="stdout's format (default: json)")
    p.add_argument("--dev-root", default="/dev", metavar="DIR", help="scan DIR as /dev (tests)")
    p.add_argument("--sys-root", default="/sys", metavar="DIR", help="scan DIR as /sys (tests)")

    p = with_specs(sub.add_parser("inject", help="edit a bundle's config.json for manual runc use"))
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--device", action="append", required=True, metavar="NAME")
    p.add_argument("--mode", choices=("edits", "hook"), default="edits")

    p = sub.add_parser("install", help="install the hooks.d files")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--podman", action="store_true")
    where.add_argument("--crio", action="store_true")
    where.add_argument("--hooks-dir", metavar="DIR")
    p.add_argument("--mode", choices=("precreate", "hook"))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--watch", action="store_true", help="also write the systemd unit of `cdi-hook watch`")
    p.add_argument("--systemd-dir", metavar="DIR", help="where --watch writes it (default /etc/systemd/system)")
    p.add_argument("--logrotate-dir", metavar="DIR", help="where the log's logrotate configuration goes, "
                   "if the folder exists (default /etc/logrotate.d)")
    p.add_argument("--no-logrotate", action="store_true", help="write no logrotate configuration")

    p = sub.add_parser("policy", help="the request policy: `policy check [FILE]`")
    policy_sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    check = policy_sub.add_parser("check", help="validate a policy file (default: $CDI_HOOK_POLICY or "
                                                "/etc/cdi-hook/policy.yaml)")
    check.add_argument("file", nargs="?", metavar="FILE")

    p = with_specs(sub.add_parser("explain", help="which devices a container asks for, who asked, and whether "
                                                  "each is honoured (a bundle, or an OCI state on stdin)"))
    p.add_argument("container", nargs="?", metavar="CONTAINER",
                   help="runc:ID, podman:NAME-OR-ID or crio:ID (its config.json, as its runtime names it)")
    p.add_argument("--bundle", metavar="DIR")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--runc-root", default="/run/runc", metavar="DIR", help="runc's --root (default: %(default)s)")
    p.add_argument("--crio-socket", default="/var/run/crio/crio.sock", metavar="PATH",
                   help="CRI-O's socket, for crio:ID (default: %(default)s)")

    p = with_specs(sub.add_parser("device-plugin", help="serve each CDI kind as a Kubernetes extended resource "
                                                        "(the kubelet's device plugin API v1beta1)"))
    p.add_argument("--socket-dir", default="/var/lib/kubelet/device-plugins", metavar="DIR",
                   help="the kubelet's device plugin dir, with its kubelet.sock (default: %(default)s)")
    p.add_argument("--host-root", default="/", metavar="DIR",
                   help="where the host's device nodes are seen, for the health checks: DIR/dev/... "
                        "(default: %(default)s; in a container with the host's /dev at /host/dev: /host)")
    p.add_argument("--poll-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often the spec dirs, device nodes and kubelet.sock are checked (default: %(default)s)")

    for name, text in (("verify", "check that a running container has what its devices promise"),
                       ("attach", "give a running container devices (root only)"),
                       ("detach", "take devices back from a running container (root only)")):
        p = with_specs(sub.add_parser(name, help=text))
        p.add_argument("container", metavar="CONTAINER", help="runc:ID, podman:NAME-OR-ID, crio:ID or pid:N")
        if name == "verify":
            p.add_argument("--format", choices=("text", "json"), default="text")
        else:
            p.add_argument("devices", nargs="+", metavar="DEVICE")
        p.add_argument("--runc-root", default="/run/runc", metavar="DIR", help="runc's --root (default: %(default)s)")
        p.add_argument("--crio-socket", default="/var/run/crio/crio.sock", metavar="PATH",
                       help="CRI-O's socket, for crio:ID (default: %(default)s)")
        p.add_argument("--bundle", metavar="DIR", help="the container's bundle, when its runtime does not say")

    p = with_specs(sub.add_parser("stale", help="list the running containers whose devices' specs changed since "
                                                "they got them (after a driver upgrade: which to restart)"))
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = sub.add_parser("uninstall", help="remove the hooks.d files install wrote")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--podman", action="store_true")
    where.add_argument("--crio", action="store_true")
    where.add_argument("--hooks-dir", metavar="DIR")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--watch", action="store_true", help="also remove the systemd unit of `cdi-hook watch`")
    p.add_argument("--systemd-dir", metavar="DIR", help="where it is (default /etc/systemd/system)")
    p.add_argument("--logrotate-dir", metavar="DIR", help="where the logrotate configuration is "
                   "(default /etc/logrotate.d)")
    p.add_argument("--no-logrotate", action="store_true", help="leave the logrotate configuration alone")

    p = with_specs(sub.add_parser("doctor", help="check this node's hook set-up: runtimes and their hooks dirs, "
                                                 "spec dirs, cache and watcher, policy; --probe starts test containers"))
    p.add_argument("--probe", action="store_true", help="start a Podman and a runc container through the installed "
                                                        "hooks with a throwaway spec (/dev/null) and check they get it")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--hooks-dir", action="append", metavar="DIR", help="also look for cdi-hook's hooks.d files here")
    p.add_argument("--config-root", metavar="DIR", help="read built-in paths (/etc, /usr/share, /run) under DIR "
                                                        "(for tests)")
    return parser


def dispatch(args: Any) -> int:  # argparse's Namespace, or HookArgs for a plain `hook` argv
    command = args.command
    if command in ("list", "validate", "show"):
        from cdi_hook.commands import specs

        return getattr(specs, "cmd_" + command)(args, _spec_dirs(args))
    if command == "hook":
        from cdi_hook.commands import hook

        return hook.run(args.stage, _spec_dirs(args), sys.stdin.buffer)
    if command == "precreate":
        from cdi_hook.commands import edit

        return edit.cmd_precreate(_spec_dirs(args), sys.stdin.buffer, sys.stdout.buffer)
    if command == "inject":
        from cdi_hook.commands import edit

        return edit.cmd_inject(args, _spec_dirs(args))
    if command == "watch":
        from cdi_hook.commands import watch

        if args.generate:
            from cdi_hook.commands import hotplug

            return hotplug.cmd_watch_generate(args)
        if args.output or args.dev_root != "/dev" or args.sys_root != "/sys" or args.rescan_interval != 60.0:
            from cdi_hook.errors import CdiError

            raise CdiError("watch: --output, --dev-root, --sys-root and --rescan-interval go with --generate FILE")
        if args.serve:
            print("cdi-hook: warning: watch --serve: the injection server was removed; watching only "
                  "(run `cdi-hook install --watch` again to rewrite the unit)", file=sys.stderr)
        return watch.cmd_watch(args, _spec_dirs(args))
    if command in ("policy", "explain"):
        from cdi_hook.commands import policy

        return policy.cmd_explain(args, _spec_dirs(args)) if command == "explain" else policy.cmd_policy_check(args)
    if command == "device-plugin":
        # Imports grpc: only this command does, never the hook.
        try:
            from cdi_hook.commands import device_plugin
        except ModuleNotFoundError as missing:
            if (missing.name or "").partition(".")[0] not in ("grpc", "google"):
                raise
            from cdi_hook.errors import CdiError

            raise CdiError(f"device-plugin needs the [kubernetes] extra (grpcio, protobuf; {missing.name} is "
                           "missing): pip install '/path/to/checkout[kubernetes]' into cdi-hook's venv") from None

        return device_plugin.cmd_device_plugin(args, _spec_dirs(args))
    if command == "generate":
        from cdi_hook.commands import generate

        return generate.cmd_generate(args)
    if command == "doctor":
        from cdi_hook.commands import doctor

        return doctor.cmd_doctor(args)
    if command in ("verify", "attach", "detach", "stale"):
        from cdi_hook.commands import running

        return getattr(running, "cmd_" + command)(args, _spec_dirs(args))
    if command in ("install", "uninstall"):
        from cdi_hook.commands import install

        return getattr(install, "cmd_" + command)(args)
    raise AssertionError(command)


def fast_hook_args(argv: list[str]) -> HookArgs | None:
    """The hook's usual argv (`hook [--stage S] [--spec-dir D]...`) without argparse.

    Every container start runs `cdi-hook hook`; argparse with its sub-parsers costs ~3 ms
    there (argparse, gettext, locale, shutil). Anything unusual returns None and goes
    through argparse, so help and error messages stay argparse's.
    """
    if not argv or argv[0] != "hook":
        return None
    stage, spec_dirs = "createRuntime", []
    rest = list(argv[1:])
    while rest:
        option = rest.pop(0)
        name, has_value, value = option.partition("=")
        if name not in ("--stage", "--spec-dir"):
            return None
        if not has_value:
            if not rest:
                return None
            value = rest.pop(0)
        if name == "--stage":
            if value not in STAGES:
                return None
            stage = value
        else:
            spec_dirs.append(value)
    return HookArgs(stage, spec_dirs or None)


class HookArgs:
    """What argparse gives for a plain `hook` argv (a class of its own: types.SimpleNamespace
    costs ~0.4 ms of import)."""

    command = "hook"
    version = False

    def __init__(self, stage: str, spec_dir: list[str] | None):
        self.stage = stage
        self.spec_dir = spec_dir


def main(argv: list[str] | None = None) -> int:
    args: argparse.Namespace | HookArgs | None
    args = fast_hook_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        args = build_parser().parse_args(argv)
    elif argv is None:  # the hook as a runtime runs it (not a caller's main([...]))
        return _hook_process(args)
    return run(args)


def _hook_process(args: HookArgs) -> int:
    """Every container start runs this: no cyclic garbage collection (the process lives for
    milliseconds, allocating mostly while it imports), and no interpreter finalization at
    the end (tearing down every module costs ~3-5 ms and does nothing the hook needs: its
    files are closed, its child reaped). Output is flushed before the exit."""
    import gc

    gc.disable()
    code = run(args)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run(args: Any) -> int:  # argparse's Namespace, or HookArgs for a plain `hook` argv
    from cdi_hook.errors import CdiError, printable

    if args.version:
        from cdi_hook import __version__

        print(__version__)
        return 0
    if not args.command:
        build_parser().print_help(sys.stderr)
        return 2
    try:
        config.current()  # every CDI_* variable read and checked once, before anything is done
        return dispatch(args)
    except CdiError as error:
        # The one line an operator sees: it can carry image file names and program output.
        print(f"cdi-hook: {printable(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`cdi-hook list | head -1`): not worth a traceback. Point
        # stdout at /dev/null so the interpreter's final flush cannot raise it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

