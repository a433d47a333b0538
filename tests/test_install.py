"""cdi-hook install / uninstall into a temporary hooks dir, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cdi_hook import settings
from cdi_hook.commands import install
from cdi_hook.cli import main
from cdi_hook.errors import CdiError


@pytest.fixture(autouse=True)
def no_carried_settings(monkeypatch):
    """The session's private cache/log settings (conftest) would be carried into the files."""
    from cdi_hook.hook_entry import CARRIED_SETTINGS

    for name in CARRIED_SETTINGS:
        monkeypatch.delenv(name, raising=False)


HOOK_FILES = sorted(install.HOOK_FILES.values())


def files(d) -> list[str]:
    return sorted(os.listdir(d))


def test_hooks_dir_defaults_to_live_hook_mode(tmp_path, capsys):
    assert main(["install", "--hooks-dir", str(tmp_path)]) == 0
    assert files(tmp_path) == HOOK_FILES
    definition = json.loads((tmp_path / "cdi-hook-createRuntime.json").read_text())
    assert definition["hook"]["path"] == os.path.abspath(sys.executable)
    assert os.access(definition["hook"]["path"], os.X_OK)
    assert definition["stages"] == ["createRuntime"]
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/cdi-hook-createRuntime.json" in out and '"version": "1.0.0"' in out
    assert oct((tmp_path / "cdi-hook-createRuntime.json").stat().st_mode & 0o777) == "0o644"


def test_precreate_mode_replaces_hook_mode_and_back(tmp_path, capsys):
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "hook"])
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "precreate"])
    assert files(tmp_path) == ["cdi-hook-precreate.json"]
    assert json.loads((tmp_path / "cdi-hook-precreate.json").read_text())["stages"] == ["precreate"]
    assert "removed" in capsys.readouterr().out
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "hook"])
    assert files(tmp_path) == HOOK_FILES


def test_reinstall_is_idempotent(tmp_path):
    main(["install", "--hooks-dir", str(tmp_path)])
    before = {n: (tmp_path / n).read_bytes() for n in files(tmp_path)}
    main(["install", "--hooks-dir", str(tmp_path)])
    assert {n: (tmp_path / n).read_bytes() for n in files(tmp_path)} == before


def test_dry_run_writes_nothing(tmp_path, capsys):
    target = tmp_path / "hooks.d"
    assert main(["install", "--hooks-dir", str(target), "--mode", "precreate", "--dry-run"]) == 0
    assert not target.exists()
    out = capsys.readouterr().out
    assert f"would write {target}/cdi-hook-precreate.json" in out and '"precreate"' in out


def test_dry_run_reports_removals_without_removing(tmp_path, capsys):
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "hook"])
    capsys.readouterr()
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "precreate", "--dry-run"])
    assert files(tmp_path) == HOOK_FILES
    assert "would remove" in capsys.readouterr().out
    main(["uninstall", "--hooks-dir", str(tmp_path), "--dry-run"])
    assert files(tmp_path) == HOOK_FILES


def test_podman_and_crio_targets(capsys, monkeypatch):
    monkeypatch.delenv("CDI_SPEC_DIRS", raising=False)
    main(["install", "--podman", "--dry-run"])
    out = capsys.readouterr().out
    assert "would write /usr/share/containers/oci/hooks.d/cdi-hook-precreate.json" in out
    main(["install", "--crio", "--dry-run"])
    out = capsys.readouterr().out
    assert "would write /usr/share/containers/oci/hooks.d/cdi-hook-createRuntime.json" in out
    assert "precreate.json:" not in out


def test_spec_dirs_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_SPEC_DIRS", "/etc/cdi:/srv/cdi")
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "precreate"])
    env = json.loads((tmp_path / "cdi-hook-precreate.json").read_text())["hook"]["env"]
    assert env == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "CDI_SPEC_DIRS=/etc/cdi:/srv/cdi"]
    monkeypatch.delenv("CDI_SPEC_DIRS")
    settings.use(None)  # read again
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "precreate"])
    env = json.loads((tmp_path / "cdi-hook-precreate.json").read_text())["hook"]["env"]
    assert env == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def test_uninstall_removes_exactly_our_files(tmp_path, capsys):
    (tmp_path / "other-hook.json").write_text('{"version": "1.0.0"}')
    main(["install", "--hooks-dir", str(tmp_path)])
    assert main(["uninstall", "--hooks-dir", str(tmp_path)]) == 0
    assert files(tmp_path) == ["other-hook.json"]
    assert capsys.readouterr().out.count("removed") == len(HOOK_FILES)
    main(["uninstall", "--hooks-dir", str(tmp_path)])
    assert "nothing of cdi-hook's" in capsys.readouterr().out


def test_foreign_file_with_our_name_is_never_touched(tmp_path, capsys):
    foreign = tmp_path / "cdi-hook-precreate.json"
    foreign.write_text('{"version": "1.0.0", "hook": {"path": "/usr/bin/someone-else"}}')
    # install of the other mode leaves it; uninstall leaves it
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "hook"])
    main(["uninstall", "--hooks-dir", str(tmp_path)])
    assert files(tmp_path) == ["cdi-hook-precreate.json"]
    assert "left" in capsys.readouterr().out
    # install of the same mode refuses to replace it, with a one-line error
    assert main(["install", "--hooks-dir", str(tmp_path), "--mode", "precreate"]) == 1
    err = capsys.readouterr().err
    assert "not written by cdi-hook" in err and err.count("\n") == 1
    assert "someone-else" in foreign.read_text()


def test_interpreter_that_cannot_import_us_is_refused(tmp_path):
    # Stands in for an interpreter without cdi_hook (the probe `-I -c "import cdi_hook"` fails).
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    hooks_dir = tmp_path / "hooks.d"
    with pytest.raises(CdiError, match="cannot import cdi_hook"):
        install.install(str(hooks_dir), "hook", python=str(fake))
    with pytest.raises(CdiError, match="not an executable file"):
        install.install(str(hooks_dir), "hook", python=str(tmp_path / "missing"))
    assert not hooks_dir.exists()


def test_installed_hook_command_runs_isolated(tmp_path):
    """The exact argv and env of the installed file start our CLI from any cwd."""
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "precreate"])
    hook = json.loads((tmp_path / "cdi-hook-precreate.json").read_text())["hook"]
    argv = [hook["args"][0], *hook["args"][1:-1], "--help"]  # "precreate" -> "--help"
    env = dict(e.split("=", 1) for e in hook["env"])
    result = subprocess.run(argv, executable=hook["path"], env=env, cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "precreate" in result.stdout


def test_installed_entry_is_dash_c_and_ignores_a_cdi_hook_package_in_cwd(tmp_path):
    """The entry is `-I -S -c ENTRY_CODE` (no runpy, no site: the paths written in); -I
    keeps the current directory off sys.path, so a cdi_hook package planted in the hook's
    cwd is not what runs."""
    from cdi_hook.hook_entry import entry_code, site_paths

    main(["install", "--hooks-dir", str(tmp_path / "hooks.d"), "--mode", "hook"])
    hook = json.loads((tmp_path / "hooks.d" / "cdi-hook-poststart.json").read_text())["hook"]
    assert hook["args"][1:5] == ["-I", "-S", "-c", entry_code(site_paths(hook["path"]))]
    decoy = tmp_path / "cwd" / "cdi_hook"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('decoy cdi_hook imported')\n")
    (decoy / "cli.py").write_text("raise SystemExit('decoy cdi_hook imported')\n")
    argv = [*hook["args"][:5], "--version"]
    env = dict(e.split("=", 1) for e in hook["env"])
    result = subprocess.run(argv, executable=hook["path"], env=env, cwd=decoy.parent, capture_output=True, text=True)
    assert result.returncode == 0 and "decoy" not in result.stderr, result.stderr
    from cdi_hook import __version__

    assert result.stdout.strip() == __version__


def test_files_an_older_version_wrote_with_dash_m_are_ours(tmp_path, capsys):
    """Installs before the -c entry wrote `-I -m cdi_hook`: uninstall removes those files and
    install replaces them."""
    main(["install", "--hooks-dir", str(tmp_path), "--mode", "hook"])
    for name in os.listdir(tmp_path):
        definition = json.loads((tmp_path / name).read_text())
        definition["hook"]["args"][1:5] = ["-I", "-m", "cdi_hook"]
        (tmp_path / name).write_text(json.dumps(definition))
        assert install.is_ours(str(tmp_path / name))
    assert main(["install", "--hooks-dir", str(tmp_path), "--mode", "hook"]) == 0
    assert all("-c" in json.loads((tmp_path / n).read_text())["hook"]["args"] for n in os.listdir(tmp_path))
    for name in os.listdir(tmp_path):
        definition = json.loads((tmp_path / name).read_text())
        definition["hook"]["args"][1:5] = ["-I", "-m", "cdi_hook"]
        (tmp_path / name).write_text(json.dumps(definition))
    assert main(["uninstall", "--hooks-dir", str(tmp_path)]) == 0
    assert files(tmp_path) == []


def test_settings_set_while_installing_are_carried_but_never_insecure_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_LOG", "/var/log/other.log")
    monkeypatch.setenv("CDI_HOOK_CACHE_DIR", "/run/other-cache")
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    from cdi_hook.hook_entry import live_hook_entry

    env = live_hook_entry("createRuntime", sys.executable, None)["env"]
    assert "CDI_HOOK_LOG=/var/log/other.log" in env and "CDI_HOOK_CACHE_DIR=/run/other-cache" in env
    assert not any(item.startswith("CDI_HOOK_INSECURE_SPECS") for item in env)


def _directives(text: str) -> set[str]:
    return {line for line in text.splitlines() if line and not line.startswith(("#", "["))}


def test_install_watch_writes_the_confined_unit_and_replaces_an_older_serving_one(tmp_path, capsys):
    """--watch writes the confined unit. The unconfined, serving unit of an older install (the
    resident server was removed, docs/development/performance.md) has the same file name and mark: install
    --watch replaces it, uninstall --watch removes it."""
    hooks, units = str(tmp_path / "hooks.d"), tmp_path / "systemd"
    assert main(["install", "--hooks-dir", hooks, "--watch", "--systemd-dir", str(units)]) == 0
    unit = units / install.WATCH_UNIT
    plain = unit.read_text()
    python = os.path.abspath(sys.executable)
    assert f"ExecStart={python} -I -m cdi_hook watch\n" in plain
    assert {"NoNewPrivileges=yes", "RestrictAddressFamilies=AF_UNIX", "ProtectSystem=strict", "ProtectHome=read-only",
            "PrivateTmp=yes", "PrivateNetwork=yes", "ProtectKernelTunables=yes",
            "ProtectControlGroups=yes"} <= _directives(plain)
    if os.path.exists("/usr/bin/systemd-analyze"):  # systemd's own parser: no unknown or bad setting
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    # What an older install wrote: its mark and file name, another body (unconfined).
    old = plain.replace("NoNewPrivileges=yes\n", "KillMode=process\n").replace("PrivateNetwork=yes\n", "")
    unit.write_text(old)
    assert main(["install", "--hooks-dir", hooks, "--watch", "--systemd-dir", str(units)]) == 0
    assert unit.read_text() == plain
    unit.write_text(old)
    capsys.readouterr()
    assert main(["uninstall", "--hooks-dir", hooks, "--watch", "--systemd-dir", str(units)]) == 0
    assert not unit.exists() and f"removed {unit}" in capsys.readouterr().out


def test_install_writes_the_logrotate_file_where_logrotate_is_and_uninstall_removes_it(tmp_path, capsys,
                                                                                      monkeypatch):
    from cdi_hook.cli import main as cli_main

    hooks, rotate_dir = tmp_path / "hooks", tmp_path / "logrotate.d"
    assert cli_main(["install", "--hooks-dir", str(hooks), "--logrotate-dir", str(rotate_dir)]) == 0
    assert not rotate_dir.exists()  # no logrotate on this node: nothing written
    rotate_dir.mkdir()
    monkeypatch.setenv("CDI_HOOK_LOG", "/var/log/cdi/hook.log")
    settings.use(None)
    assert cli_main(["install", "--hooks-dir", str(hooks), "--logrotate-dir", str(rotate_dir)]) == 0
    text = (rotate_dir / "cdi-hook").read_text()
    assert "\n/var/log/cdi/hook.log {\n" in text and "\n    create 0640 root root\n" in text
    assert "\n    copytruncate" not in text
    assert cli_main(["uninstall", "--hooks-dir", str(hooks), "--logrotate-dir", str(rotate_dir)]) == 0
    assert os.listdir(rotate_dir) == []
    (rotate_dir / "cdi-hook").write_text("/var/log/theirs.log {}\n")  # not ours: never touched
    assert cli_main(["install", "--hooks-dir", str(hooks), "--logrotate-dir", str(rotate_dir)]) == 0
    assert cli_main(["uninstall", "--hooks-dir", str(hooks), "--logrotate-dir", str(rotate_dir)]) == 0
    assert (rotate_dir / "cdi-hook").read_text() == "/var/log/theirs.log {}\n"
    assert "left" in capsys.readouterr().out


def test_the_debian_packages_logrotate_conffile_is_left_alone_and_said_so(tmp_path, capsys):
    from cdi_hook.cli import main as cli_main

    hooks, rotate_dir = tmp_path / "hooks", tmp_path / "logrotate.d"
    rotate_dir.mkdir()
    packaged = install.PACKAGE_LOGROTATE_MARK + "\n/var/log/cdi-hook.log {}\n"
    (rotate_dir / "cdi-hook").write_text(packaged)
    for command in ("install", "uninstall"):
        capsys.readouterr()
        assert cli_main([command, "--hooks-dir", str(hooks), "--logrotate-dir", str(rotate_dir)]) == 0
        assert (rotate_dir / "cdi-hook").read_text() == packaged
        assert f"left {rotate_dir}/cdi-hook alone: the cdi-hook package's (a conffile" in capsys.readouterr().out


def test_deploy_holds_the_logrotate_file_install_writes():
    from oci_env import REPO

    assert (REPO / "deploy" / "logrotate" / "cdi-hook").read_text() == install.logrotate_config("/var/log/cdi-hook.log")
    with pytest.raises(CdiError):
        install.logrotate_config("/var/log/two words.log")
