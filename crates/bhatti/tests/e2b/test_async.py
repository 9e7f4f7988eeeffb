"""The SDK's async client (`AsyncSandbox`) for a subset: create, run,
write/read, concurrent commands, another user, kill."""

import asyncio
import uuid

import pytest
import pytest_asyncio

from e2b import AsyncSandbox, CommandExitException, NotFoundException

from conftest import REQUEST_TIMEOUT, SANDBOX_TIMEOUT

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def asbx():
    s = await AsyncSandbox.create(timeout=SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    try:
        yield s
    finally:
        try:
            await AsyncSandbox.kill(s.sandbox_id)
        except Exception:
            pass


async def test_create_and_run(asbx):
    assert await asbx.is_running()
    r = await asbx.commands.run("echo out; echo err >&2")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "out\n", "err\n")
    with pytest.raises(CommandExitException) as e:
        await asbx.commands.run("exit 7")
    assert e.value.exit_code == 7


async def test_concurrent_commands(asbx):
    rs = await asyncio.gather(*(asbx.commands.run(f"echo {i}") for i in range(8)))
    assert [r.stdout for r in rs] == [f"{i}\n" for i in range(8)]


async def test_write_read(asbx):
    path = f"/tmp/async-{uuid.uuid4().hex[:8]}"
    await asbx.files.write(path, "async text")
    assert await asbx.files.read(path) == "async text"
    blob = bytes(range(256))
    await asbx.files.write(path + ".bin", blob)
    assert await asbx.files.read(path + ".bin", format="bytes") == blob
    assert await asbx.files.exists(path) is True


async def test_background_stdin(asbx):
    h = await asbx.commands.run("head -n 1", background=True, stdin=True)
    await asbx.commands.send_stdin(h.pid, "async stdin\n")
    r = await h.wait()
    assert r.stdout == "async stdin\n"


async def test_other_user(asbx, other_key):
    with pytest.raises(NotFoundException):
        await AsyncSandbox.connect(asbx.sandbox_id, api_key=other_key)
    assert await AsyncSandbox.kill(asbx.sandbox_id, api_key=other_key) is False
    assert await asbx.is_running()


async def test_kill():
    s = await AsyncSandbox.create(timeout=SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    assert (await s.commands.run("true")).exit_code == 0
    assert await s.kill() is True
    with pytest.raises(NotFoundException):
        await AsyncSandbox.get_info(s.sandbox_id)
