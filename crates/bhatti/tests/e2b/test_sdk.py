"""The official E2B Python SDK (sync client) against bhatti's /e2b API.

One sandbox is shared by the tests of this module (`sbx`, conftest.py);
pause/connect and kill each use a sandbox of their own.
"""

import io
import time
import uuid

import pytest

from e2b import (
    CommandExitException,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxQuery,
    SandboxState,
)

from conftest import REQUEST_TIMEOUT, SANDBOX_TIMEOUT, wait_for


def unique(prefix):
    return f"/tmp/{prefix}-{uuid.uuid4().hex[:8]}"


# ---- sandboxes (control plane) ----


def test_create_returns_a_running_sandbox(sbx):
    assert sbx.sandbox_id
    assert sbx.is_running(request_timeout=REQUEST_TIMEOUT)


def test_get_info(sbx):
    info = sbx.get_info(request_timeout=REQUEST_TIMEOUT)
    assert info.sandbox_id == sbx.sandbox_id
    assert str(getattr(info.state, "value", info.state)) == "running"
    assert info.cpu_count >= 1
    assert info.memory_mb >= 64
    assert info.envd_version
    assert info.started_at <= info.end_at


def test_create_with_metadata_and_envs_then_list():
    tag = uuid.uuid4().hex
    s = Sandbox.create(
        timeout=SANDBOX_TIMEOUT,
        metadata={"suite": "e2b-sdk", "tag": tag},
        envs={"E2B_SUITE_VAR": tag},
        request_timeout=REQUEST_TIMEOUT,
    )
    try:
        assert s.get_info().metadata.get("tag") == tag
        # Sandbox-wide env vars reach commands.
        assert s.commands.run("echo $E2B_SUITE_VAR").stdout.strip() == tag

        ids = [i.sandbox_id for i in Sandbox.list().next_items()]
        assert s.sandbox_id in ids

        found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert [i.sandbox_id for i in found] == [s.sandbox_id]
        assert found[0].metadata.get("suite") == "e2b-sdk"

        none = Sandbox.list(query=SandboxQuery(metadata={"tag": "no-such-" + tag})).next_items()
        assert none == []
    finally:
        s.kill()


def test_set_timeout_moves_end_at(sbx):
    sbx.set_timeout(300, request_timeout=REQUEST_TIMEOUT)
    end = sbx.get_info().end_at.timestamp()
    assert 250 <= end - time.time() <= 310, end - time.time()
    sbx.set_timeout(SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    end = sbx.get_info().end_at.timestamp()
    assert SANDBOX_TIMEOUT - 50 <= end - time.time() <= SANDBOX_TIMEOUT + 10


def test_connect_by_id(sbx):
    path = unique("connect")
    sbx.files.write(path, "from the first handle")
    other = Sandbox.connect(sbx.sandbox_id, timeout=SANDBOX_TIMEOUT)
    assert other.sandbox_id == sbx.sandbox_id
    assert other.files.read(path) == "from the first handle"
    assert other.commands.run(f"cat {path}").stdout == "from the first handle"


def test_connect_to_unknown_sandbox_is_not_found():
    with pytest.raises(NotFoundException):
        Sandbox.connect("nosuchsandbox0000", request_timeout=REQUEST_TIMEOUT)
    assert Sandbox.kill("nosuchsandbox0000") is False


# ---- commands ----


def test_run_stdout_stderr_exit_code(sbx):
    r = sbx.commands.run("echo out; echo err >&2", timeout=REQUEST_TIMEOUT)
    assert r.exit_code == 0
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"


def test_run_streams_to_callbacks(sbx):
    out, err = [], []
    r = sbx.commands.run(
        "printf a; printf b >&2; printf c",
        on_stdout=out.append,
        on_stderr=err.append,
        timeout=REQUEST_TIMEOUT,
    )
    assert "".join(out) == "ac" == r.stdout
    assert "".join(err) == "b" == r.stderr


def test_run_with_cwd_and_envs(sbx):
    r = sbx.commands.run("pwd; echo $FOO", cwd="/tmp", envs={"FOO": "bar baz"})
    assert r.stdout == "/tmp\nbar baz\n"


def test_non_zero_exit_raises(sbx):
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo partial; echo oops >&2; exit 3", timeout=REQUEST_TIMEOUT)
    assert e.value.exit_code == 3
    assert e.value.stdout == "partial\n"
    assert e.value.stderr == "oops\n"


def test_background_send_stdin(sbx):
    h = sbx.commands.run("head -n 1", background=True, stdin=True, timeout=REQUEST_TIMEOUT)
    assert h.pid > 0
    sbx.commands.send_stdin(h.pid, "hello stdin\n")
    r = h.wait()
    assert r.exit_code == 0
    assert r.stdout == "hello stdin\n"


def test_background_list_and_kill(sbx):
    marker = uuid.uuid4().hex[:8]
    h = sbx.commands.run(f"sleep 600 # {marker}", background=True, timeout=0)
    procs = sbx.commands.list()
    mine = [p for p in procs if p.pid == h.pid]
    assert len(mine) == 1, procs
    assert marker in " ".join([mine[0].cmd, *mine[0].args])

    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()
    wait_for(
        "the killed command to leave commands.list()",
        lambda: all(p.pid != h.pid for p in sbx.commands.list()),
    )
    # Gone: killing it again finds nothing.
    assert sbx.commands.kill(h.pid) is False


def test_handle_kill(sbx):
    h = sbx.commands.run("sleep 600", background=True, timeout=0)
    assert h.kill() is True
    with pytest.raises(CommandExitException):
        h.wait()


# ---- pty ----


def _read_pty_until(it, buf, needle, what):
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while needle not in buf:
        assert time.monotonic() < deadline, f"no {what} in pty output: {bytes(buf)!r}"
        _, _, chunk = next(it)
        if chunk is not None:
            buf.extend(chunk)


def test_pty_create_input_resize(sbx):
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=REQUEST_TIMEOUT)
    assert h.pid > 0
    it = iter(h)
    buf = bytearray()

    sbx.pty.send_stdin(h.pid, b"stty size\n")
    _read_pty_until(it, buf, b"24 80", "initial size")

    sbx.pty.resize(h.pid, PtySize(rows=40, cols=100))
    del buf[:]
    sbx.pty.send_stdin(h.pid, b"stty size\n")
    _read_pty_until(it, buf, b"40 100", "new size")

    del buf[:]
    sbx.pty.send_stdin(h.pid, b"echo $((6*7))\n")
    _read_pty_until(it, buf, b"42", "command output")

    sbx.pty.send_stdin(h.pid, b"exit 0\n")
    r = h.wait(on_pty=buf.extend)
    assert r.exit_code == 0


# ---- files ----


def test_files_write_str_bytes_fileobj_and_read(sbx):
    d = unique("files")
    text = "héllo\nwörld\n"
    info = sbx.files.write(f"{d}/a.txt", text)
    assert info.path == f"{d}/a.txt"
    assert info.name == "a.txt"
    assert sbx.files.read(f"{d}/a.txt") == text

    blob = bytes(range(256)) * 64
    sbx.files.write(f"{d}/b.bin", blob)
    assert sbx.files.read(f"{d}/b.bin", format="bytes") == blob

    sbx.files.write(f"{d}/c.bin", io.BytesIO(b"from a file object"))
    assert bytes(sbx.files.read(f"{d}/c.bin", format="bytes")) == b"from a file object"

    # The guest sees what the SDK wrote.
    assert sbx.commands.run(f"cat {d}/a.txt").stdout == text
    assert sbx.commands.run(f"wc -c < {d}/b.bin").stdout.strip() == str(len(blob))


def test_files_read_missing_is_not_found(sbx):
    with pytest.raises(NotFoundException):
        sbx.files.read(unique("missing"))


def test_files_list_exists_make_dir(sbx):
    d = unique("dir")
    assert sbx.files.exists(d) is False
    assert sbx.files.make_dir(d) is True
    assert sbx.files.make_dir(d) is False
    assert sbx.files.exists(d) is True
    sbx.files.write(f"{d}/one.txt", "1")
    sbx.files.write(f"{d}/two.txt", "22")
    assert sbx.files.make_dir(f"{d}/sub") is True

    entries = {e.name: e for e in sbx.files.list(d)}
    assert set(entries) == {"one.txt", "two.txt", "sub"}
    assert entries["two.txt"].type == FileType.FILE
    assert entries["two.txt"].size == 2
    assert entries["two.txt"].path == f"{d}/two.txt"
    assert entries["sub"].type == FileType.DIR


def test_files_get_info(sbx):
    d = unique("info")
    sbx.files.write(f"{d}/f.txt", "12345")
    info = sbx.files.get_info(f"{d}/f.txt")
    assert info.name == "f.txt"
    assert info.path == f"{d}/f.txt"
    assert info.type == FileType.FILE
    assert info.size == 5
    assert sbx.files.get_info(d).type == FileType.DIR
    with pytest.raises(NotFoundException):
        sbx.files.get_info(f"{d}/nope")


def test_files_rename_and_remove(sbx):
    d = unique("mv")
    sbx.files.write(f"{d}/old.txt", "moved")
    info = sbx.files.rename(f"{d}/old.txt", f"{d}/new.txt")
    assert info.path == f"{d}/new.txt"
    assert sbx.files.exists(f"{d}/old.txt") is False
    assert sbx.files.read(f"{d}/new.txt") == "moved"

    sbx.files.remove(f"{d}/new.txt")
    assert sbx.files.exists(f"{d}/new.txt") is False
    sbx.files.remove(d)
    assert sbx.files.exists(d) is False


# ---- other users ----


def test_other_user_cannot_reach_the_sandbox(sbx, other_key):
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id, api_key=other_key, request_timeout=REQUEST_TIMEOUT)
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id, api_key=other_key)
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(sbx.sandbox_id, 10, api_key=other_key)
    assert Sandbox.kill(sbx.sandbox_id, api_key=other_key) is False
    listed = Sandbox.list(api_key=other_key).next_items()
    assert sbx.sandbox_id not in [i.sandbox_id for i in listed]
    # ... and it is untouched.
    assert sbx.is_running()
    assert sbx.commands.run("echo still here").stdout == "still here\n"


# ---- pause / connect / kill (sandboxes of their own) ----


def test_pause_then_connect_keeps_state():
    s = Sandbox.create(timeout=SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    try:
        path = unique("paused")
        s.files.write(path, "written before pause")
        bg = s.commands.run("sleep 3600", background=True, timeout=0)

        assert s.pause(request_timeout=REQUEST_TIMEOUT) is True
        state = Sandbox.get_info(s.sandbox_id).state
        assert str(getattr(state, "value", state)) == "paused"
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert s.sandbox_id in [i.sandbox_id for i in paused]

        back = Sandbox.connect(s.sandbox_id, timeout=SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
        state = back.get_info().state
        assert str(getattr(state, "value", state)) == "running"
        assert back.files.read(path) == "written before pause"
        assert back.commands.run(f"cat {path}").stdout == "written before pause"
        # Memory came back too: the background command still runs.
        assert bg.pid in [p.pid for p in back.commands.list()]
    finally:
        Sandbox.kill(s.sandbox_id)


def test_kill():
    s = Sandbox.create(timeout=SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    assert s.commands.run("true").exit_code == 0
    assert s.kill() is True
    with pytest.raises(NotFoundException):
        Sandbox.get_info(s.sandbox_id)
    assert s.sandbox_id not in [i.sandbox_id for i in Sandbox.list().next_items()]
    assert Sandbox.kill(s.sandbox_id) is False
