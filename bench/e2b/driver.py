"""The Python side of e2b-bench (bench/src/bin/e2b-bench.rs runs it).

One sandbox, created through the SDK; then, alternating in each
iteration so drift touches both alike:

- `sandbox.commands.run("true")` through the official SDK (envd Connect
  RPC `process.Process/Start`, a server stream; the SDK runs
  `/bin/bash -l -c true` in the guest);
- bhatti's own `POST /sandboxes/{id}/exec` with the same guest command
  (`["/bin/bash", "-l", "-c", "true"]`): the floor;
- `POST /sandboxes/{id}/exec` `{"cmd": ["true"]}`: how much of either is
  the login shell.

The two REST calls go through the SDK's own HTTP stack (the pooled
transport `e2b.api.client_sync.get_transport` returns, under an
`httpx.Client`), to the same TCP listener, HTTP/1.1 kept alive: the
difference is the E2B layer, not the client.

Environment: E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL (the SDK's own),
BHATTI_URL (the daemon's API root), BHATTI_KEY, BENCH_SAMPLES,
BENCH_WARMUP. Prints one JSON object: durations in nanoseconds.
"""

import json
import os
import sys
import time

import httpx

from e2b import Sandbox


def client_transport():
    try:
        from e2b.api.client_sync import get_transport
        from e2b.connection_config import ConnectionConfig

        return get_transport(ConnectionConfig()), "the SDK's pooled transport"
    except Exception as e:  # an SDK without it: plain httpx, said so
        return httpx.HTTPTransport(), f"plain httpx ({e.__class__.__name__})"


def main():
    samples = int(os.environ.get("BENCH_SAMPLES", "200"))
    warmup = int(os.environ.get("BENCH_WARMUP", "20"))
    root = os.environ["BHATTI_URL"]
    key = os.environ["BHATTI_KEY"]

    t = time.perf_counter_ns()
    sbx = Sandbox.create(timeout=3600, request_timeout=300)
    create_ns = time.perf_counter_ns() - t
    transport, transport_name = client_transport()
    rest = httpx.Client(
        base_url=root,
        transport=transport,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    exec_path = f"/sandboxes/{sbx.sandbox_id}/exec"

    def sdk():
        r = sbx.commands.run("true", timeout=120)
        assert r.exit_code == 0, r

    def bhatti(cmd):
        def call():
            r = rest.post(exec_path, json={"cmd": cmd})
            assert r.status_code == 200, (r.status_code, r.text)
            assert r.json()["exit_code"] == 0, r.text

        return call

    ops = {
        "sdk": sdk,
        "exec_bash": bhatti(["/bin/bash", "-l", "-c", "true"]),
        "exec_true": bhatti(["true"]),
    }
    names = list(ops)
    try:
        for _ in range(warmup):
            for name in names:
                ops[name]()
        out = {name: [] for name in names}
        for i in range(samples):
            # Rotate the order each iteration.
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t = time.perf_counter_ns()
                ops[name]()
                out[name].append(time.perf_counter_ns() - t)
    finally:
        rest.close()
        sbx.kill()
    json.dump(
        {
            "create_ns": create_ns,
            "transport": transport_name,
            "samples": out,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
