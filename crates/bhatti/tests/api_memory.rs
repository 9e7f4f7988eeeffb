//! The daemon's memory per request is bounded whatever a guest prints or
//! stores. The daemon runs as a `bhatti serve` child so that its memory is
//! its own; each case resets its peak RSS (`clear_refs` 5), runs, and
//! checks that the peak (`VmHWM`) grew by less than [`BOUND_MIB`] over the
//! RSS before: a command printing 1 GiB through buffered exec (cut at the
//! limit, exit code intact), 1 GiB files read whole and by lines, 1 GiB of
//! NDJSON exec output to a client that stops reading, and a WebSocket
//! message over the 1 MiB limit (the socket is closed with code 1009; the
//! daemon goes on serving).

mod api_support;

use std::time::{Duration, Instant};

use api_support::*;
use bhatti::store::users::UserCaps;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Most a single request may add to the daemon's peak RSS.
const BOUND_MIB: u64 = 64;
const GIB: u64 = 1 << 30;

fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The daemon's memory over one case.
struct Watch {
    pid: u32,
    what: &'static str,
    rss_before_kib: u64,
    started: Instant,
}

impl Watch {
    fn start(pid: u32, what: &'static str) -> Watch {
        // "5" resets VmHWM (the peak) to the current RSS.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
        Watch {
            pid,
            what,
            rss_before_kib: status_kib(pid, "VmRSS:"),
            started: Instant::now(),
        }
    }

    #[track_caller]
    fn check(self) {
        let peak = status_kib(self.pid, "VmHWM:");
        let grew = peak.saturating_sub(self.rss_before_kib);
        eprintln!(
            "{}: daemon RSS before {} KiB, peak after {} KiB (+{} KiB), {:.1} s",
            self.what,
            self.rss_before_kib,
            peak,
            grew,
            self.started.elapsed().as_secs_f64()
        );
        assert!(
            grew < BOUND_MIB << 10,
            "{}: the daemon's peak RSS grew by {grew} KiB",
            self.what
        );
    }
}

/// A streamed GET of a file: (X-Truncated, Content-Length, bytes received).
async fn read_counted(c: &Client, query: &str) -> (String, u64, u64) {
    let path = format!("/sandboxes/mem/files?{query}");
    let resp = c
        .open(Method::GET, &path, &[], Bytes::new())
        .await
        .expect("GET files");
    assert_eq!(resp.status(), 200, "{path}");
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("x-file-size"), GIB.to_string(), "{path}");
    let truncated = header("x-truncated");
    let length = header("content-length")
        .parse::<u64>()
        .expect("Content-Length");
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body").into_data() {
            got += data.len() as u64;
        }
    }
    (truncated, length, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_memory_per_request_is_bounded() {
    let Some(art) = artifacts("daemon_memory_per_request_is_bounded") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let env = Env::new(art);
    let key = env.user("alice", UserCaps::default());
    env.write_config(&env.config());
    let mut p = Proc::spawn(&env, 1);
    ready(&env, &mut p, 1).await;
    let pid = p.child.id();
    let a = env.client(Some(&key));
    a.post("/sandboxes", json!({"name": "mem"}))
        .await
        .expect(201);
    // Warm up: the first exec and read set up the agent connection.
    assert_eq!(a.sh("mem", "echo ok").await.1, "ok\n");

    // Buffered exec: 1 GiB of NULs (JSON-escaped, six times that) on
    // stdout, a line on stderr, exit 7. The daemon keeps 10 MiB of stdout,
    // drains the rest, and reports the exit code.
    let w = Watch::start(pid, "buffered exec printing 1 GiB");
    let v = a
        .post(
            "/sandboxes/mem/exec",
            json!({"cmd": ["sh", "-c", "head -c 1G /dev/zero; echo done >&2; exit 7"]}),
        )
        .await
        .expect(200);
    w.check();
    assert_eq!(v["exit_code"], 7);
    assert_eq!(v["stdout"].as_str().map(str::len), Some(10 << 20));
    assert_eq!(v["stdout_truncated"], true);
    assert_eq!(v["stderr"], "done\n");
    assert_eq!(v.get("stderr_truncated"), None);

    // A 1 GiB file (sparse): "first\n", zeros, "\nlast\n".
    let (code, out, err) = a
        .sh(
            "mem",
            "printf 'first\\n' > /tmp/big && truncate -s 1073741818 /tmp/big \
             && printf '\\nlast\\n' >> /tmp/big && stat -c %s /tmp/big",
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "1073741824\n"), "{err}");

    let w = Watch::start(pid, "whole read of a 1 GiB file");
    let (truncated, length, got) = read_counted(&a, "path=/tmp/big").await;
    w.check();
    assert_eq!((truncated.as_str(), length, got), ("false", GIB, GIB));

    // Line 1 is the 1 GiB of zeros: skipped into, and cut off before
    // "last" — the kind of read that was buffered whole.
    let w = Watch::start(pid, "read of a 1 GiB line by offset/limit");
    let (truncated, length, got) = read_counted(&a, "path=/tmp/big&offset=1&limit=1").await;
    w.check();
    let line = GIB - 6 - 5; // without "first\n" and "last\n"
    assert_eq!((truncated.as_str(), length, got), ("true", line, line));

    let w = Watch::start(pid, "read of 1 GiB less a byte by max_bytes");
    let (truncated, length, got) =
        read_counted(&a, &format!("path=/tmp/big&max_bytes={}", GIB - 1)).await;
    w.check();
    assert_eq!(
        (truncated.as_str(), length, got),
        ("true", GIB - 1, GIB - 1)
    );

    // NDJSON: a client that reads a little, then stops. The command is
    // held back by flow control, not buffered by the daemon; closing the
    // connection kills it.
    let w = Watch::start(pid, "NDJSON exec of 1 GiB to a stalled client");
    let body = json!({"cmd": ["head", "-c", "1G", "/dev/zero"]}).to_string();
    let resp = a
        .open(
            Method::POST,
            "/sandboxes/mem/exec",
            &[
                ("content-type", "application/json"),
                ("accept", "application/x-ndjson"),
            ],
            Bytes::from(body),
        )
        .await
        .expect("NDJSON exec");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    while got < 1 << 20 {
        let frame = body.frame().await.expect("more NDJSON").expect("NDJSON");
        got += frame.into_data().map(|d| d.len()).unwrap_or(0);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    w.check();
    drop(body);
    eventually(
        "the stalled command killed",
        Duration::from_secs(30),
        || async {
            let (_, out, _) = a.sh("mem", "pgrep -x head || true").await;
            out.trim().is_empty().then_some(())
        },
    )
    .await;

    // WebSocket: a 2 MiB message closes the socket with 1009 and a reason.
    let w = Watch::start(pid, "WebSocket message of 2 MiB");
    let cmd = "%5B%22cat%22%5D"; // ["cat"]
    let ws = a
        .ws(&format!("/sandboxes/mem/ws?cmd={cmd}"))
        .await
        .expect("ws");
    let (mut sink, mut stream) = ws.split();
    let first = stream.next().await.expect("first").expect("first");
    let first: Value = serde_json::from_str(first.to_text().expect("text")).expect("JSON");
    assert_eq!(first["type"], "session");
    // The daemon stops reading at the frame header, so this write may
    // never finish: it runs beside the read.
    let big = tokio::spawn(async move {
        let _ = sink.send(Message::binary(vec![b'x'; 2 << 20])).await;
        sink
    });
    let close = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("the socket closes")
    .expect("a close frame with a reason");
    w.check();
    big.abort();
    assert_eq!(close.code, CloseCode::Size);
    assert!(
        close.reason.contains("over the limit of 1048576"),
        "{}",
        close.reason
    );
    // The daemon goes on serving; the session was detached, not killed.
    a.get("/health").await.expect(200);
    let sessions = a.get("/sandboxes/mem/sessions").await.expect(200);
    let id = first["id"].as_str().expect("session id");
    assert!(
        sessions["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["id"] == id && x["exit"].is_null())),
        "{sessions}"
    );
    assert_eq!(a.sh("mem", "echo still").await.1, "still\n");

    a.delete("/sandboxes/mem").await.expect(204);
    p.signal(nix::sys::signal::Signal::SIGTERM);
    p.wait_exit(Duration::from_secs(30)).await;
}
