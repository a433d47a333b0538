"""The state layer (cdi_hook/state.py), as root: what is refused is refused with one line
naming the path, what is missing is None, and a failed write leaves the old file and no
temp file."""

from __future__ import annotations

import os

import pytest

from cdi_hook import state
from cdi_hook.state import StateError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the rules are root's: owners are changed")

OTHER_UID = 65534


@pytest.fixture
def folder(tmp_path):
    """A private folder of root's, and its fd."""
    path = tmp_path / "records"
    fd = state.open_private_dir(str(path), create=True)
    yield path, fd
    os.close(fd)


def refused(call, path) -> str:
    with pytest.raises(StateError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_record_written_is_read_back(folder):
    path, fd = folder
    state.write_record(fd, "c1.json", {"container": "c1", "n": [1, 2]})
    assert state.read_record(fd, "c1.json", str(path / "c1.json")) == {"container": "c1", "n": [1, 2]}
    assert os.stat(path / "c1.json").st_mode & 0o777 == 0o600
    assert sorted(os.listdir(path)) == ["c1.json"]


def test_a_missing_record_is_none(folder):
    path, fd = folder
    assert state.read_record(fd, "none.json", str(path / "none.json")) is None
    assert state.read_trusted(fd, "none.json", str(path / "none.json")) is None
    assert state.open_private_dir(str(path / "absent")) is None


def test_a_symlinked_record_is_refused(folder, tmp_path):
    path, fd = folder
    target = tmp_path / "elsewhere.json"
    target.write_bytes(state.encode_record({"x": 1}))
    os.chmod(target, 0o600)
    os.symlink(target, path / "r.json")
    refused(lambda: state.read_record(fd, "r.json", str(path / "r.json")), path / "r.json")


def test_a_record_owned_by_another_uid_is_refused(folder):
    path, fd = folder
    state.write_record(fd, "r.json", {"x": 1})
    os.chown(path / "r.json", OTHER_UID, OTHER_UID)
    message = refused(lambda: state.read_record(fd, "r.json", str(path / "r.json")), path / "r.json")
    assert f"owner {OTHER_UID}" in message


def test_a_record_others_may_read_is_refused(folder):
    path, fd = folder
    state.write_record(fd, "r.json", {"x": 1})
    os.chmod(path / "r.json", 0o644)
    assert "mode 644" in refused(lambda: state.read_record(fd, "r.json", str(path / "r.json")), path / "r.json")


@pytest.mark.parametrize("how", ["mode 0755", "another uid"])
def test_a_folder_not_private_is_refused(tmp_path, how):
    path = tmp_path / "records"
    path.mkdir(mode=0o700)
    if how == "mode 0755":
        os.chmod(path, 0o755)
    else:
        os.chown(path, OTHER_UID, OTHER_UID)
    refused(lambda: state.open_private_dir(str(path)), path)
    refused(lambda: state.open_private_dir(str(path), create=True), path)


def test_a_symlinked_folder_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "records")
    refused(lambda: state.open_private_dir(str(tmp_path / "records")), tmp_path / "records")


def test_a_relative_folder_is_refused():
    refused(lambda: state.open_private_dir("records"), "records")


def test_an_oversized_record_is_refused(folder):
    path, fd = folder
    state.write_atomic_at(fd, "big.json", b"x" * 5000)
    message = refused(lambda: state.read_trusted(fd, "big.json", str(path / "big.json"), max_size=4096),
                      path / "big.json")
    assert "5000 bytes" in message


def test_a_damaged_checksum_is_refused(folder):
    path, fd = folder
    state.write_record(fd, "r.json", {"pid": 1})
    data = (path / "r.json").read_bytes()
    (path / "r.json").write_bytes(data.replace(b'"pid":1', b'"pid":2').replace(b'"pid": 1', b'"pid": 2'))
    assert (path / "r.json").read_bytes() != data
    assert "checksum" in refused(lambda: state.read_record(fd, "r.json", str(path / "r.json")), path / "r.json")


def test_a_record_without_a_checksum_line_only_where_plain_json_is_allowed(folder):
    """Records of the cdi-hook before state.py: believed only by callers that read them on
    purpose (an upgrade must not strand what they describe)."""
    path, fd = folder
    state.write_atomic_at(fd, "old.json", b'{"netns": [1, 2], "devices": {}}')
    refused(lambda: state.read_record(fd, "old.json", str(path / "old.json")), path / "old.json")
    assert state.read_record(fd, "old.json", str(path / "old.json"), plain_json=True) == {"netns": [1, 2],
                                                                                         "devices": {}}
    state.write_atomic_at(fd, "torn.json", b'{"netns": [1,')
    refused(lambda: state.read_record(fd, "torn.json", str(path / "torn.json"), plain_json=True), path / "torn.json")


def test_file_name_escapes_and_refuses():
    assert state.file_name("a/b%c") == "a%2Fb%25c"
    for key in ("", ".", ".."):
        with pytest.raises(StateError):
            state.file_name(key)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    """A read-only folder (a read-only bind mount: root ignores mode bits) refuses the temp
    file; the old file stays as it was and nothing else appears."""
    import subprocess

    path = tmp_path / "ro"
    path.mkdir()
    (path / "config.json").write_bytes(b"old")
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        with pytest.raises(OSError):
            state.write_atomic(str(path / "config.json"), b"new")
        assert os.listdir(path) == ["config.json"] and (path / "config.json").read_bytes() == b"old"
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_failed_rename_leaves_the_old_file_and_no_temp_file(folder, monkeypatch):
    path, fd = folder
    state.write_atomic_at(fd, "f", b"old")

    def failing_rename(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space"):
        state.write_atomic_at(fd, "f", b"new")
    assert os.listdir(path) == ["f"] and (path / "f").read_bytes() == b"old"


def test_write_atomic_sets_mode_and_owner_whatever_the_umask(tmp_path):
    old = os.umask(0o277)
    try:
        state.write_atomic(str(tmp_path / "hooks.json"), b"{}", 0o644, owner=(OTHER_UID, OTHER_UID))
    finally:
        os.umask(old)
    st = os.stat(tmp_path / "hooks.json")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, OTHER_UID, OTHER_UID)


def test_a_pending_record_is_in_place_only_once_committed(folder):
    """PendingRecord: the new version waits beside the old one (a reader still gets the old)
    until commit; discard drops it; a removal's empty probe file goes either way."""
    path, fd = folder
    state.write_record(fd, "c1.json", {"n": 1})
    pending = state.PendingRecord(fd, "c1.json", {"n": 2})
    assert state.read_record(fd, "c1.json", "c1") == {"n": 1}
    pending.commit()
    assert state.read_record(fd, "c1.json", "c1") == {"n": 2}
    state.PendingRecord(fd, "c1.json", {"n": 3}).discard()
    assert state.read_record(fd, "c1.json", "c1") == {"n": 2}
    removal = state.PendingRecord(fd, "c1.json", None)
    assert state.read_record(fd, "c1.json", "c1") == {"n": 2}
    removal.commit()
    removal.discard()  # after a commit: nothing
    assert sorted(os.listdir(path)) == []
    state.PendingRecord(fd, "c1.json", None).discard()
    assert sorted(os.listdir(path)) == []


def test_a_pending_record_that_cannot_be_written_leaves_no_temp_file(folder, monkeypatch):
    path, fd = folder
    state.write_record(fd, "c1.json", {"n": 1})

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        state.PendingRecord(fd, "c1.json", {"n": 2})
    monkeypatch.undo()
    assert os.listdir(path) == ["c1.json"] and state.read_record(fd, "c1.json", "c1") == {"n": 1}
