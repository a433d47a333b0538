"""cdi_hook.start, what an installed entry runs first: a post stage with nothing recorded
for it returns there, importing nothing of cdi-hook's but that module; anything else (an
older container without a record or note, any doubt about the note) goes the full way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import oci_env
from cdi_hook import hook_entry, record, settings, start, state
from cdi_hook.containers import process_start_time


@pytest.fixture
def records(tmp_path, root_only, monkeypatch):
    before = settings.current()
    monkeypatch.setenv("CDI_HOOK_STATE_DIR", str(tmp_path / "state" / "held"))  # what start reads
    settings.use(before._replace(state_dir=str(tmp_path / "state" / "held")))  # what record writes by
    yield tmp_path / "state" / "containers"
    settings.use(before)


def _container(tmp_path, cid="c1", work=(), pid=None):
    bundle = tmp_path / f"bundle-{cid.replace('/', '_')}"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"},
                                                     "annotations": {"cdi.k8s.io/x": "vendor.com/c=d"}}))
    pid = pid or os.getpid()
    found = record.Record(cid, pid, process_start_time(pid), str(bundle), ["vendor.com/c=d"], {}, {"holds": []},
                          list(work), record.config_identity(str(bundle)))
    record.save(found)
    state_doc = {"ociVersion": "1.0.2", "id": cid, "pid": pid, "bundle": str(bundle), "status": "running"}
    return found, json.dumps(state_doc).encode()


def test_constants_agree_with_the_modules_they_mirror():
    from cdi_hook import oci

    assert start.POST_STAGES == record.POST_STAGES and start.NOTE_SUFFIX == record.NOTE_SUFFIX
    assert start.NOTE_VERSION == record.NOTE_VERSION and start.MAX_STATE_SIZE == oci.MAX_STATE_SIZE
    assert start.DEFAULT_STATE_DIR.decode() == settings.DEFAULT_STATE_DIR
    assert start.RECORDS == b"/" + record.FOLDER.encode()


def test_idle_stages_return_at_once_and_poststop_removes_note_and_record(records, tmp_path):
    _, data = _container(tmp_path)
    assert sorted(os.listdir(records)) == ["c1.idle", "c1.json"]
    assert start.idle("poststart", data)
    assert sorted(os.listdir(records)) == ["c1.idle", "c1.json"]
    assert start.idle("poststop", data)
    assert os.listdir(records) == []


def test_a_stage_with_work_has_no_note_for_it(records, tmp_path):
    _, data = _container(tmp_path, work=["poststop"])
    assert start.idle("poststart", data)
    assert not start.idle("poststop", data)
    assert sorted(os.listdir(records)) == ["c1.idle", "c1.json"]  # the full way removes them
    _, data = _container(tmp_path, "c2", work=["poststart", "poststop"])
    assert "c2.idle" not in os.listdir(records)
    assert not start.idle("poststart", data) and not start.idle("poststop", data)


def test_remove_takes_the_note_first(records, tmp_path):
    _container(tmp_path)
    record.remove("c1")
    assert os.listdir(records) == []


def test_no_record_means_the_full_way(records, tmp_path):
    """A container started by an older cdi-hook has no record and no note."""
    records.mkdir(parents=True, mode=0o700)
    data = json.dumps({"id": "old", "pid": os.getpid(), "bundle": str(tmp_path)}).encode()
    assert not start.idle("poststop", data) and not start.idle("poststart", data)


@pytest.mark.parametrize("spoil", ["note mode", "record mode", "folder mode", "note symlink", "record rewritten",
                                   "config rewritten", "other pid", "other bundle", "torn note", "bad state"])
def test_any_doubt_goes_the_full_way(records, tmp_path, spoil):
    found, data = _container(tmp_path)
    note, saved = records / "c1.idle", records / "c1.json"
    if spoil == "note mode":
        note.chmod(0o644)
    elif spoil == "record mode":
        saved.chmod(0o640)
    elif spoil == "folder mode":
        records.chmod(0o755)
    elif spoil == "note symlink":
        (tmp_path / "elsewhere").write_bytes(note.read_bytes())
        os.chmod(tmp_path / "elsewhere", 0o600)
        note.unlink()
        note.symlink_to(tmp_path / "elsewhere")
    elif spoil == "record rewritten":  # attach wrote it again, with work: the note is older
        fd = state.open_private_dir(str(records))
        state.write_record(fd, "c1.json", {"version": record.VERSION, **found._replace(devices=["x"])._asdict()})
        os.close(fd)
    elif spoil == "config rewritten":  # another container under the same id and bundle
        config = tmp_path / "bundle-c1" / "config.json"
        config.write_text(config.read_text() + " ")
    elif spoil == "other pid":
        data = data.replace(str(os.getpid()).encode(), str(os.getppid()).encode())
    elif spoil == "other bundle":
        data = data.replace(b"bundle-c1", b"bundle-c1/.")
    elif spoil == "torn note":
        note.write_bytes(note.read_bytes()[:20])
    elif spoil == "bad state":
        data = data[:-1]
    stages = ["poststart"] if spoil == "other pid" else ["poststart", "poststop"]
    for stage in stages:
        assert not start.idle(stage, data), stage
    assert saved.exists()


@pytest.mark.parametrize("cid", ["a/b", "a%2Fb", "tab\tid", "é"])
def test_an_id_that_is_not_its_own_file_name_goes_the_full_way(records, tmp_path, cid):
    _, data = _container(tmp_path, cid)
    assert not start.idle("poststop", data)
    assert (records / (state.file_name(cid) + ".json")).exists()


def test_plain_names():
    assert [n for n in ("", ".", "..", "../x", "x/..", "%", "a\0b", 7, None) if start._plain_name(n)] == []
    assert start._plain_name("...") and start._plain_name("k8s_pod-1.2:3@x")


def test_file_checks_agree_with_the_state_layer(records, tmp_path):
    _container(tmp_path)
    fd = os.open(records, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for mode in (0o600, 0o400, 0o640, 0o604, 0o660, 0o700, 0o1600):
            os.chmod(records / "c1.idle", mode)
            trusted = state.is_private_file(os.stat(records / "c1.idle"))
            try:
                start._read_private(fd, "c1.idle", 10)
                believed = True
            except ValueError:
                believed = False
            assert believed == trusted, oct(mode)
    finally:
        os.close(fd)


def _entry(tmp_path, stage, *extra):
    env = {"CDI_HOOK_STATE_DIR": str(tmp_path / "state" / "held"), "CDI_HOOK_LOG": str(tmp_path / "log"),
           "CDI_SPEC_DIRS": str(tmp_path / "cdi"), "CDI_HOOK_INSECURE_SPECS": "1"}
    args = hook_entry.argv(os.path.abspath(sys.executable), "hook", "--stage", stage)
    return [args[0], *extra, *args[1:]], env


def test_installed_entry_imports_nothing_of_cdi_hook_but_start_for_an_idle_stage(records, tmp_path):
    _, data = _container(tmp_path)
    argv, env = _entry(tmp_path, "poststop", "-X", "importtime")
    assert argv[3:5] == ["-I", "-S"]  # no site: the paths are written into the entry
    result = subprocess.run(argv, input=data, env=env, capture_output=True, cwd="/")
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert {m for m in imported if m.startswith("cdi_hook")} == {"cdi_hook", "cdi_hook.start"}, imported
    assert not {"os", "site", "json", "collections"} & imported, imported
    assert os.listdir(records) == []


def test_an_older_container_without_a_record_still_gets_its_poststop(tmp_path, root_only):
    """Through the installed entry: no record, no note, so the full way re-resolves the
    specs and runs the spec's poststop hook with the same state on its stdin."""
    spec_dir = tmp_path / "cdi"
    marker = tmp_path / "poststop.out"
    oci_env.write_spec(spec_dir, "s.json", {"cdiVersion": "0.6.0", "kind": "vendor.com/c", "devices": [
        {"name": "d", "containerEdits": {"deviceNodes": [{"path": "/dev/null"}], "hooks": [
            {"hookName": "poststop", "path": "/bin/sh", "args": ["sh", "-c", f"cat > {marker}"]}]}}]})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"},
                                                     "annotations": {"cdi.k8s.io/x": "vendor.com/c=d"}}))
    data = json.dumps({"id": "old", "bundle": str(bundle), "status": "stopped"}).encode()
    argv, env = _entry(tmp_path, "poststop")
    result = subprocess.run(argv, input=data, env=env, capture_output=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert marker.read_bytes() == data
