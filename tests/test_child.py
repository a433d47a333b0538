"""live/child.py: the one protocol between cdi-hook and the children it forks."""

from __future__ import annotations

import os
import time

import pytest

from cdi_hook.live import child


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # reaped already
    return False


def test_a_child_that_never_reports_hits_the_deadline_and_is_reaped():
    def run(_channel):
        time.sleep(60)
        return 0

    handle = child.fork(run, deadline_s=0.3, group=True, step="inject")
    started = time.monotonic()
    report = handle.read()
    assert time.monotonic() - started < 5
    assert (report.kind, report.ok) == (child.FAILED, False)
    assert report.error.startswith("inject: the worker in the container stopped answering for 0.3 s")
    assert "\n" not in report.error
    assert _gone(handle.pid)
    assert handle.read().kind == child.FAILED  # and stays failed, without a wait


def test_a_stopped_child_is_killed_too():
    def run(_channel):
        os.kill(os.getpid(), 19)  # SIGSTOP: as the container's root can stop a worker
        return 0

    handle = child.fork(run, deadline_s=0.3)
    assert "stopped answering" in handle.read().error
    assert _gone(handle.pid)


def test_reports_round_trip_with_their_records():
    mounts = [child.MountRecord("vendor.com/c=d", "/usr/lib/x.so", 812, 2049, 1234)]
    nodes = [child.NodeRecord("vendor.com/c=d", "/dev/x", "c", 10, 200, 0o660, 0, 44, True, "c 1:3 666 0:0")]

    def run(channel):
        channel.send(child.Report(child.READY, notes=["made"], mounts=mounts, nodes=nodes, steps_ms={"nodes": 1.5}))
        command = channel.command()
        channel.send(child.Report(child.FINISHED, problems=[command.decode()]))
        return 0

    handle = child.fork(run)
    ready = handle.read()
    assert (ready.kind, ready.ok, ready.notes, ready.steps_ms) == (child.READY, True, ["made"], {"nodes": 1.5})
    assert ready.mounts == mounts and ready.nodes == nodes
    assert isinstance(ready.mounts[0], child.MountRecord) and ready.nodes[0].replaced == "c 1:3 666 0:0"
    handle.send(child.COMMIT)
    final = handle.read()
    assert (final.kind, final.ok, final.problems) == (child.FINISHED, True, ["c"])
    handle.close()
    assert _gone(handle.pid)


def test_an_unknown_command_is_refused_by_the_child():
    def run(channel):
        channel.send(child.Report(child.READY))
        try:
            channel.command()
        except child.ProtocolError as error:
            channel.send(child.Report(child.FINISHED, problems=[str(error)]))
            return 1
        channel.send(child.Report(child.FINISHED))
        return 0

    handle = child.fork(run)
    assert handle.read().kind == child.READY
    os.write(handle._command_fd, b"x")  # past Child.send, which refuses it before it goes
    final = handle.read()
    assert final.problems == ["unknown command b'x' from the parent; refused"]
    handle.close()
    with pytest.raises(child.ProtocolError):
        handle.send(b"x")


def test_an_unknown_report_is_refused_by_the_parent():
    def run(channel):
        os.write(channel.report_fd, b'{"kind": "exfiltrate", "ok": true}\n')
        time.sleep(60)
        return 0

    handle = child.fork(run, deadline_s=5, step="attach")
    report = handle.read()
    assert (report.kind, report.ok) == (child.FAILED, False)
    assert report.error == "attach: the worker sent an unknown message 'exfiltrate'; refused"
    assert _gone(handle.pid)  # killed at once, not after its deadline


def test_the_parent_gone_means_undo():
    read_r, read_w = os.pipe()

    def run(channel):
        os.close(read_r)
        channel.send(child.Report(child.READY))
        os.write(read_w, channel.command())
        return 0

    handle = child.fork(run)
    os.close(read_w)
    assert handle.read().kind == child.READY
    handle.close()  # no command: end of file
    assert os.read(read_r, 1) == child.UNDO
    os.close(read_r)


def test_what_raises_in_a_child_is_one_failed_line():
    def run(_channel):
        raise KeyError("boom")

    handle = child.fork(run)
    report = handle.read()
    assert report.kind == child.FAILED and report.error.startswith("internal error: KeyError('boom') at run")
    handle.close()


def test_the_journal_undoes_newest_first_and_collects_problems():
    done = []
    journal = child.Journal()
    journal.add("nodes", lambda: done.append("nodes"), keep=lambda: done.append("keep nodes"))
    journal.add("mounts", lambda: done.append("mounts") or ["cannot unmount: busy"])

    def failing():
        done.append("cache")
        raise OSError(5, "Input/output error")

    journal.add("cache", failing)
    assert journal.undo() == ["cache: [Errno 5] Input/output error", "cannot unmount: busy"]
    assert done == ["cache", "mounts", "nodes"]
    assert journal.undo() == []  # each undo runs once


def test_the_journal_keeps_in_order_and_forgets():
    done = []
    journal = child.Journal()
    journal.add("a", lambda: done.append("undo a"), keep=lambda: done.append("keep a"))
    journal.add("b", lambda: done.append("undo b"), keep=lambda: done.append("keep b"))
    journal.keep()
    assert journal.undo() == [] and done == ["keep a", "keep b"]


def test_a_worker_that_fails_undoes_through_its_journal_in_reverse():
    """A child whose third step fails: what the first two did is undone newest first, and
    the one FAILED line says what failed and what the undo could not do."""
    read_r, read_w = os.pipe()

    def run(channel):
        os.close(read_r)
        journal = child.Journal()
        try:
            journal.add("first", lambda: os.write(read_w, b"1") and None)
            journal.add("second", lambda: os.write(read_w, b"2") and ["second: left a file"])
            raise child.ProtocolError("third step: refused")
        except BaseException as error:  # noqa: BLE001
            channel.send(child.failure(child.one_line(error) + child.undo_note(journal.undo())))
            return 1

    handle = child.fork(run)
    os.close(read_w)
    report = handle.read()
    handle.close()
    assert report.error == "third step: refused (undo incomplete: second: left a file)"
    assert os.read(read_r, 10) == b"21"
    os.close(read_r)
