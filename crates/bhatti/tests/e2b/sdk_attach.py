"""The SDK's Sandbox (sync or async) on a sandbox a Rust test made, with
its id and envd access token, built the way Sandbox.connect builds it but
without a control-plane call (imported by files_sdk.py and process_sdk.py;
not a pytest module)."""

from packaging.version import Version

from e2b.connection_config import ConnectionConfig


def attach(cls, sid, token):
    """`cls` is e2b.Sandbox or e2b.AsyncSandbox."""
    cc = ConnectionConfig(
        extra_sandbox_headers={"E2b-Sandbox-Id": sid, "X-Access-Token": token}
    )
    return cls(
        sandbox_id=sid,
        sandbox_domain=None,
        envd_version=Version("0.6.4"),
        envd_access_token=token,
        connection_config=cc,
    )


def done(last):
    """Prints the script's last line and exits 0 at once: what the test
    checks has run, and the interpreter's teardown of the SDK's clients
    and their threads is not what it tests."""
    import os
    import sys

    print(last, flush=True)
    sys.stderr.flush()
    os._exit(0)
