"""The official E2B Python SDK's file API against bhatti (run by
tests/e2b_files.rs with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY set).
With `create`, the sandbox comes from Sandbox.create (bhatti's control
plane); with `<sandbox id> <envd token>`, the Sandbox is built the way
Sandbox.connect builds it, from a sandbox the test made."""

import sys
import time

from e2b import Sandbox, FileType
from e2b.exceptions import FileNotFoundException
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType

from sdk_attach import attach, done

if sys.argv[1] == "create":
    # Through bhatti's control plane, as an SDK user does it.
    sbx = Sandbox.create(timeout=600)
    sid, token = sbx.sandbox_id, None
else:
    sid, token = sys.argv[1], sys.argv[2]
    sbx = attach(Sandbox, sid, token)
f = sbx.files

info = f.write("/tmp/sdk/a", "x")
assert info.path == "/tmp/sdk/a" and info.type == FileType.FILE, info
assert f.read("/tmp/sdk/a") == "x"
assert f.read("/tmp/sdk/a", format="bytes") == bytearray(b"x")
assert b"".join(f.read("/tmp/sdk/a", format="stream")) == b"x"

# gzip (octet-stream), multipart with several files, relative paths.
f.write("/tmp/sdk/g", "gz" * 1000, gzip=True)
assert f.read("/tmp/sdk/g") == "gz" * 1000
assert f.read("/tmp/sdk/g", gzip=True) == "gz" * 1000
infos = f.write_files(
    [{"path": "/tmp/sdk/m1", "data": "one"}, {"path": "/tmp/sdk/m2", "data": b"two"}],
    use_octet_stream=False,
)
assert [i.path for i in infos] == ["/tmp/sdk/m1", "/tmp/sdk/m2"], infos
assert f.read("/tmp/sdk/m2") == "two"
f.write("rel.txt", "home")
assert f.read("/home/lohar/rel.txt") == "home"

names = sorted(e.name for e in f.list("/tmp/sdk"))
assert names == ["a", "g", "m1", "m2"], names
assert f.exists("/tmp/sdk/a") and not f.exists("/tmp/sdk/nope")
assert f.make_dir("/tmp/sdk/d") is True
assert f.make_dir("/tmp/sdk/d") is False
moved = f.rename("/tmp/sdk/a", "/tmp/sdk/d/b")
assert moved.path == "/tmp/sdk/d/b" and not f.exists("/tmp/sdk/a"), moved
st = f.get_info("/tmp/sdk/d/b")
assert st.size == 1 and st.type == FileType.FILE and st.permissions == "-rw-r--r--", st
assert f.get_info("/tmp/sdk/d").type == FileType.DIR
deep = sorted(e.path for e in f.list("/tmp/sdk", depth=2))
assert "/tmp/sdk/d/b" in deep, deep
f.remove("/tmp/sdk/d")
assert not f.exists("/tmp/sdk/d")
try:
    f.read("/tmp/sdk/nope")
    raise AssertionError("read of a missing file succeeded")
except FileNotFoundException:
    pass
try:
    f.get_info("/tmp/sdk/nope")
    raise AssertionError("stat of a missing file succeeded")
except FileNotFoundException:
    pass

# watch_dir (the polling watcher).
f.make_dir("/tmp/sdk/w")
h = f.watch_dir("/tmp/sdk/w", include_entry=True)
f.write("/tmp/sdk/w/new", "n")
deadline = time.time() + 30
seen = []
while time.time() < deadline:
    seen += h.get_new_events()
    if any(e.name == "new" and e.type == FilesystemEventType.CREATE for e in seen):
        break
    time.sleep(0.2)
else:
    raise AssertionError(f"no create event: {seen}")
h.stop()
print("SDK OK", flush=True)

# The async SDK's watch_dir is the WatchDir server stream.
import asyncio

from e2b import AsyncSandbox


async def watch_stream():
    if token is None:
        asbx = await AsyncSandbox.connect(sid)
    else:
        asbx = attach(AsyncSandbox, sid, token)
    got = asyncio.Event()
    events = []

    def on_event(e):
        events.append(e)
        if e.name == "s" and e.type == FilesystemEventType.CREATE:
            got.set()

    h = await asbx.files.watch_dir("/tmp/sdk/w", on_event, recursive=True)
    await asbx.files.write("/tmp/sdk/w/s", "s")
    await asyncio.wait_for(got.wait(), 30)
    await h.stop()
    # Recursive: a file in a new subdirectory.
    got2 = asyncio.Event()

    def on_sub(e):
        if e.name == "sub/t" and e.type == FilesystemEventType.CREATE:
            got2.set()

    h = await asbx.files.watch_dir("/tmp/sdk/w", on_sub, recursive=True)
    await asbx.files.write("/tmp/sdk/w/sub/t", "t")
    await asyncio.wait_for(got2.wait(), 30)
    await h.stop()


asyncio.run(watch_stream())
print("SDK STREAM OK", flush=True)
if token is None:
    sbx.kill()
    done("SDK KILLED")
done("SDK DONE")
