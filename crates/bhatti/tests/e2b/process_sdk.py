"""The official E2B Python SDK's commands and PTY API against bhatti (run
by tests/e2b_process.rs with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY
set), on a sandbox the test made: `<sandbox id> <envd token>`; the
Sandbox is built the way Sandbox.connect builds it."""

import sys

from e2b import CommandExitException, PtySize, Sandbox

from sdk_attach import attach, done

sid, token = sys.argv[1], sys.argv[2]
sbx = attach(Sandbox, sid, token)
c = sbx.commands

r = c.run("echo hi; echo oops >&2; echo $FOO")
assert (r.stdout, r.stderr, r.exit_code) == ("hi\nbar\n", "oops\n", 0), r
try:
    c.run("echo out; exit 3")
    raise AssertionError("exit 3 raised nothing")
except CommandExitException as e:
    assert (e.exit_code, e.stdout) == (3, "out\n"), e

# Much output, none of it lost.
r = c.run("seq 1 200000")
assert r.stdout == "".join(f"{i}\n" for i in range(1, 200001)), len(r.stdout)

chunks = []
c.run("echo a; echo b >&2", on_stdout=lambda s: chunks.append(s), on_stderr=lambda s: chunks.append("E" + s))
assert sorted(chunks) == ["Eb\n", "a\n"], chunks

# A background command: listed, fed, ended.
h = c.run("cat", background=True, stdin=True)
assert [(p.pid, p.cmd, p.args) for p in c.list() if p.pid == h.pid] == [
    (h.pid, "/bin/bash", ["-l", "-c", "cat"])
], c.list()
c.send_stdin(h.pid, "hello\n")
c.stream_input(h.pid, ["one\n", b"two\n"])
c.close_stdin(h.pid)
r = h.wait()
assert (r.stdout, r.exit_code) == ("hello\none\ntwo\n", 0), r

# Connect to a running command; kill.
h = c.run("for i in 1 2 3; do echo tick $i; sleep 0.2; done", background=True)
assert c.connect(h.pid).wait().stdout == "tick 1\ntick 2\ntick 3\n"
h = c.run("sleep 600", background=True)
assert c.kill(h.pid) is True
try:
    h.wait()
    raise AssertionError("a killed command exited cleanly")
except CommandExitException as e:
    assert e.exit_code == -1, e
assert c.kill(h.pid) is False
assert h.pid not in [p.pid for p in c.list()]

# A PTY: input, resize.
p = sbx.pty.create(PtySize(24, 80))
events = iter(p)


def until(want):
    seen = b""
    for _, _, chunk in events:
        seen += chunk or b""
        if want in seen:
            return
    raise AssertionError(f"the PTY ended before {want!r}: {seen!r}")


sbx.pty.send_stdin(p.pid, b"stty size\n")
until(b"24 80")
sbx.pty.resize(p.pid, PtySize(30, 100))
sbx.pty.send_stdin(p.pid, b"stty size\n")
until(b"30 100")
sbx.pty.send_stdin(p.pid, b"exit 0\n")
for _ in events:
    pass
assert p.wait().exit_code == 0
assert sbx.pty.kill(p.pid) is False
done("SDK OK")
