//! Real VMs: the time to first byte of a published URL whose sandbox is
//! cold (stopped: memory snapshot on disk, VMM gone), beside a cold exec
//! (`POST /exec` on a stopped sandbox), interleaved in the same run.
//!
//! A daemon over the backend `[vm]` picks with its public listener; one
//! sandbox runs `python3 -m http.server 8000` (a detached exec), published
//! as [`ALIAS`]. Each sample: `POST /stop`, wait until it is cold, then
//! either the public `GET /<alias>/` (clock from the request's first byte
//! written on an open TCP connection to the response's first byte read) or
//! `POST /exec {"cmd":["true"]}` (clock around the whole request).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti_bench::{Recorder, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon::{create_sandbox, create_user, Daemon};
use crate::http::Conn;
use crate::vm_env::{backend_label, wait_thermal, Artifacts, VmEnv};
use crate::{with_public_listener, Args};

const ALIAS: &str = "cold-bench";
const GUEST_PORT: u16 = 8000;

pub struct Cold {
    pub backend: String,
    pub ttfb: Stats,
    pub exec: Stats,
    pub notes: Vec<String>,
}

pub async fn run(args: &Args, art: &Artifacts) -> anyhow::Result<Cold> {
    let env = VmEnv::new("bhatti-proxy-bench-vm.", art)?;
    let mut config = env.config.clone();
    // Nothing pauses or stops the sandbox but us.
    config.thermal.warm_after_secs = 0;
    config.thermal.cold_after_secs = 0;
    let public = with_public_listener(&mut config)?;
    let backend = bhatti::daemon::backend(&config)?;
    let label = backend_label(&backend);
    let key = create_user(&config, "bench")?;
    let daemon = Daemon::start(config.clone(), backend).await?;
    let measured = sandbox(args, &config.listen_unix, &key, public).await;
    let stopped = daemon.stop().await;
    let (ttfb, exec) = measured?;
    stopped?;
    let notes = vec![format!(
        "cold part: {label}, one {} MiB sandbox, 1 vCPU, running python3 -m http.server {GUEST_PORT} published as \
         /{ALIAS}/; each sample is POST /stop (polled until thermal=cold), then either the public GET /{ALIAS}/ \
         (time to the response's first byte; a fresh TCP connection, opened before the clock starts) or \
         POST /exec true (whole request), alternating",
        args.memory_mb
    )];
    Ok(Cold {
        backend: label,
        ttfb,
        exec,
        notes,
    })
}

async fn sandbox(
    args: &Args,
    sock: &Path,
    key: &str,
    public: SocketAddr,
) -> anyhow::Result<(Stats, Stats)> {
    let mut c = Conn::new(sock, Some(key));
    let t = Instant::now();
    let id = create_sandbox(
        &mut c,
        serde_json::json!({"name": "cold", "cpus": 1, "memory_mb": args.memory_mb}),
    )
    .await?;
    let r = async {
        c.exec_true(&id).await?;
        eprintln!(
            "[proxy-bench] cold: sandbox up in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        measure(args, &mut c, &id, public).await
    }
    .await;
    if let Err(e) = c.delete(&format!("/sandboxes/{id}")).await {
        eprintln!("[proxy-bench] cold: deleting {id}: {e}");
    }
    r
}

async fn measure(
    args: &Args,
    c: &mut Conn,
    id: &str,
    public: SocketAddr,
) -> anyhow::Result<(Stats, Stats)> {
    let port = GUEST_PORT.to_string();
    c.post(
        &format!("/sandboxes/{id}/exec"),
        serde_json::json!({
            "cmd": ["python3", "-m", "http.server", port, "--bind", "127.0.0.1", "--directory", "/"],
            "detach": true
        }),
    )
    .await?
    .ok("exec python3 -m http.server (detached)", 200)?;
    // Until it answers through the authenticated proxy.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .get(&format!("/sandboxes/{id}/proxy/{GUEST_PORT}/"))
            .await?;
        if r.status.is_success() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the guest's http.server does not answer after 60 s: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.post(
        &format!("/sandboxes/{id}/publish"),
        serde_json::json!({"port": GUEST_PORT, "alias": ALIAS}),
    )
    .await?
    .ok("publish", 201)?;
    let path = format!("/{ALIAS}/");
    // Once hot, unmeasured: the path works.
    ttfb(public, &path).await?;

    let (mut first_byte, mut exec) = (
        Recorder::new("public GET /<alias>/, cold: first byte"),
        Recorder::new("POST /exec true, cold"),
    );
    for i in 0..args.cold_samples.max(1) {
        for url in [i % 2 == 0, i % 2 != 0] {
            c.post(&format!("/sandboxes/{id}/stop"), serde_json::json!({}))
                .await?
                .ok("stop", 200)?;
            wait_thermal(c, id, "cold", Duration::from_secs(30)).await?;
            let took = if url {
                let took = ttfb(public, &path).await?;
                first_byte.record(took);
                took
            } else {
                let t = Instant::now();
                c.exec_true(id).await?;
                let took = t.elapsed();
                exec.record(took);
                took
            };
            eprintln!(
                "[proxy-bench] cold {i}: {} {:.1} ms",
                if url { "TTFB" } else { "exec" },
                took.as_secs_f64() * 1e3
            );
        }
    }
    Ok((first_byte.stats(), exec.stats()))
}

/// `GET path` on a fresh connection to the public listener: the time from
/// writing the request to reading the response's first byte; the response
/// must be a 200.
async fn ttfb(public: SocketAddr, path: &str) -> anyhow::Result<Duration> {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(public)
            .await
            .with_context(|| format!("connecting to {public}"))?;
        s.set_nodelay(true)?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {public}\r\nConnection: close\r\n\r\n");
        let t = Instant::now();
        s.write_all(req.as_bytes()).await?;
        let mut first = [0u8; 1];
        anyhow::ensure!(s.read(&mut first).await? == 1, "GET {path}: no response");
        let took = t.elapsed();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        let head = format!(
            "{}{}",
            first[0] as char,
            String::from_utf8_lossy(&rest[..rest.len().min(200)])
        );
        // (http.server answers HTTP/1.0; the relay keeps its version.)
        anyhow::ensure!(
            head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200"),
            "GET {path}: {head}"
        );
        Ok(took)
    };
    tokio::time::timeout(Duration::from_secs(120), go)
        .await
        .with_context(|| format!("GET {path}: no answer within 120 s"))?
}
