"""Fixtures for the E2B SDK suite (crates/bhatti/tests/e2b.rs runs it).

The SDK is configured only by the environment the harness sets:
E2B_API_KEY (a bhatti key), E2B_API_URL and E2B_SANDBOX_URL (both
http://127.0.0.1:PORT/e2b), and BHATTI_E2B_OTHER_KEY, a second user's key.
"""

import os
import time

import pytest

from e2b import Sandbox

# VMs boot in seconds under TCG and commands take up to ~0.4 s: generous
# timeouts everywhere, in seconds.
SANDBOX_TIMEOUT = 600
REQUEST_TIMEOUT = 120


def _require(var):
    value = os.environ.get(var)
    if not value:
        pytest.fail(f"{var} is not set (run this suite through crates/bhatti/tests/e2b.rs)")
    return value


@pytest.fixture(scope="session", autouse=True)
def e2b_env():
    for var in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "BHATTI_E2B_OTHER_KEY"):
        _require(var)


@pytest.fixture(scope="session")
def other_key():
    """The second user's key: none of the first user's sandboxes are theirs."""
    return _require("BHATTI_E2B_OTHER_KEY")


@pytest.fixture(scope="module")
def sbx():
    """One sandbox shared by a module's tests (a VM is slow to boot)."""
    sandbox = Sandbox.create(timeout=SANDBOX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    try:
        yield sandbox
    finally:
        try:
            Sandbox.kill(sandbox.sandbox_id, request_timeout=REQUEST_TIMEOUT)
        except Exception:
            pass


def wait_for(what, check, timeout=60.0, interval=0.1):
    """Polls `check` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
