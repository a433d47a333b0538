"""The man pages (man/*.md, go-md2man's markdown) cover every command and option, and render.

The commands and options come from the argparse parser itself (cli.build_parser), so a new
command without a page, or a new option its page does not name, fails here. The convention
each page follows (tests check the parts a reader relies on):

    man/cdi-hook-COMMAND.8.md, first line `% CDI-HOOK-COMMAND 8`
    sections # NAME, # SYNOPSIS, # DESCRIPTION, # OPTIONS, # EXIT STATUS, # EXAMPLES, # SEE ALSO
    each option on its own line, `**--option** *VALUE*` or `**--flag**`, followed by its
    description as a definition, `: text` (continuation lines indented two spaces), which
    go-md2man renders as an indented .TP paragraph

Rendering needs go-md2man and man (scripts/setup installs them): a missing one skips,
and fails under CI=true.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ci_rules import require
from cdi_hook.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES", "SEE ALSO")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option a reader can give, the nested subcommands' included (help hidden
    with SUPPRESS is not for readers: `watch --serve` is kept only for old units)."""
    options = set()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        options.update(o for o in action.option_strings if o.startswith("--"))
    for sub in _subparsers(parser).values():
        options |= _long_options(sub)
    return options


COMMANDS = _subparsers(build_parser())


def _page(command: str) -> Path:
    return MAN / f"cdi-hook-{command}.8.md"


def test_the_parser_lists_the_commands():
    # the dynamic list is not empty by accident (a parser change that hid the subparsers)
    assert {"hook", "install", "uninstall", "policy", "doctor"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_page_naming_each_long_option(command):
    page = _page(command)
    assert page.is_file(), f"{command} has no man page: write man/{page.name} (see tests/test_man.py for the form)"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"% CDI-HOOK-{command.upper()} 8\n"), f"{page.name}: first line must be " \
        f"'% CDI-HOOK-{command.upper()} 8'"
    headings = re.findall(r"^# (.+)$", text, re.M)
    for section in SECTIONS:
        assert section in headings, f"{page.name}: no '# {section}' section"
    assert f"**cdi-hook {command}" in text, f"{page.name}: the synopsis does not name `cdi-hook {command}`"
    options = text.split("\n# OPTIONS\n", 1)[1].split("\n# ", 1)[0]
    for option in sorted(_long_options(COMMANDS[command])):
        assert re.search(rf"^\*\*{re.escape(option)}\*\*", options, re.M), \
            f"{page.name}: option {option} is not described in # OPTIONS (a line starting **{option}**)"


def test_the_main_page_names_every_command_and_its_own_options():
    text = (MAN / "cdi-hook.8.md").read_text(encoding="utf-8")
    assert text.startswith("% CDI-HOOK 8\n")
    for command in COMMANDS:
        assert f"**cdi-hook-{command}**(8)" in text or f"**{command}**" in text, f"cdi-hook.8.md lacks {command}"
    for option in _long_options(build_parser()) - set().union(*(_long_options(p) for p in COMMANDS.values())):
        assert f"**{option}**" in text, f"cdi-hook.8.md: option {option}"


def test_the_policy_file_page_names_every_key():
    text = (MAN / "cdi-hook-policy.5.md").read_text(encoding="utf-8")
    assert text.startswith("% CDI-HOOK-POLICY 5\n")
    for key in ("version", "containerd.cdiAnnotations", "rules", "rules[].action", "rules[].sources",
                "rules[].namespaces", "rules[].devices", "exclusive"):
        assert f"**{key}**" in text, f"cdi-hook-policy.5.md: key {key}"


def test_every_page_is_a_command_or_the_policy_file():
    """No page for a command that is gone."""
    expected = {f"cdi-hook-{c}.8.md" for c in COMMANDS} | {"cdi-hook.8.md", "cdi-hook-policy.5.md"}
    assert {p.name for p in MAN.glob("*.md")} == expected


def test_every_page_renders_without_warnings(tmp_path):
    require(shutil.which("go-md2man") is not None, "go-md2man is not installed (scripts/setup)")
    require(shutil.which("man") is not None, "man is not installed (scripts/setup: man-db)")
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
    pages = sorted(MAN.glob("*.md"))
    assert pages
    for source in pages:
        out = tmp_path / source.stem
        subprocess.run(["go-md2man", "-in", str(source), "-out", str(out)], check=True)
        roff = out.read_text(encoding="utf-8")
        # a line of roff text that starts with blanks breaks the paragraph there: the sign of an
        # option's description indented instead of written as a definition (`: text`)
        indented = [line for line in roff.splitlines() if line[:1] in (" ", "\t")]
        # code blocks keep their blanks: .nf/.fi (go-md2man 2.0.2, Debian 12), .EX/.EE (later ones)
        literal = re.findall(r"^\.(?:nf|EX)\n(.*?)^\.(?:fi|EE)", roff, re.M | re.S)
        indented = [line for line in indented if not any(line in block for block in literal)]
        assert not indented, f"{source.name}: text lines starting with blanks (write descriptions as ': text'): " \
            f"{indented[:3]}"
        result = subprocess.run(["man", "--warnings", "-l", str(out)], capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{source.name}: man -l failed: {result.stderr}"
        assert result.stderr == "", f"{source.name}: warnings: {result.stderr}"
        assert "NAME" in result.stdout and "SEE ALSO" in result.stdout


def test_scripts_man_installs_where_man_finds_them_and_uninstall_removes_exactly_those(tmp_path):
    require(shutil.which("go-md2man") is not None, "go-md2man is not installed (scripts/setup)")
    require(shutil.which("man") is not None, "man is not installed (scripts/setup: man-db)")
    prefix = tmp_path / "prefix"
    other = prefix / "share" / "man" / "man8" / "someone-else.8"
    other.parent.mkdir(parents=True)
    other.write_text(".TH SOMEONE-ELSE 8\n")
    subprocess.run(["bash", str(ROOT / "scripts" / "man"), "--install", "--prefix", str(prefix)], check=True,
                   capture_output=True)
    installed = {p.relative_to(prefix / "share" / "man").as_posix() for p in (prefix / "share" / "man").rglob("*.[58]")}
    assert {f"man8/cdi-hook-{c}.8" for c in COMMANDS} | {"man8/cdi-hook.8", "man5/cdi-hook-policy.5"} <= installed
    found = subprocess.run(["man", "-M", str(prefix / "share" / "man"), "-w", "cdi-hook-install"],
                           capture_output=True, text=True)
    assert found.stdout.strip().endswith("man8/cdi-hook-install.8"), found
    subprocess.run(["bash", str(ROOT / "scripts" / "man"), "--uninstall", "--prefix", str(prefix)], check=True,
                   capture_output=True)
    left = sorted(p.relative_to(prefix).as_posix() for p in prefix.rglob("*") if p.is_file())
    assert left == ["share/man/man8/someone-else.8"]
