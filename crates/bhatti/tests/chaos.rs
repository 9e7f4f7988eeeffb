//! Chaos: the daemon (`bhatti serve`, a child process) is SIGKILLed at
//! random (seeded, printed) moments while its sandboxes are busy — an
//! exec/files loop writing checksummed files, a streaming exec over
//! WebSocket, an attached shell, one sandbox cycling hot → warm → cold on
//! short thermal timers — and restarted. After each restart: every sandbox
//! answers an exec (the recovery time, from the restart to the last
//! answer, is printed), every acknowledged write reads back with its
//! checksum, the exec stream and the shell reattach where they were cut,
//! exactly one VMM runs per sandbox with a live VM, and no TAP, mount, run
//! dir or sandbox dir is left without an owner.
//!
//! A second test SIGKILLs one sandbox's VMM: the sandbox reports it (an
//! exec gets a clear error, not a hang; GET shows it stopped with the
//! reason) and `POST /sandboxes/{id}/start` boots it again from its disk.
//!
//! CI form: 4 sandboxes, 2 kills (`BHATTI_CHAOS_SANDBOXES`,
//! `BHATTI_CHAOS_KILLS`, `BHATTI_CHAOS_SEED` override); the larger form is
//! `bench/src/bin/chaos-bench.rs`.

mod api_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_support::*;
use bhatti::store::users::UserCaps;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

/// Acknowledged writes: (sandbox, guest path) → sha256 hex.
type Acked = Arc<Mutex<BTreeMap<(String, String), String>>>;

/// splitmix64: a seeded sequence, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn range_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Writes files into `sb` until aborted, alternating the files API and an
/// exec; records each write the daemon acknowledged.
async fn write_loop(c: Client, sb: String, round: u32, acked: Acked) {
    let mut k = 0u32;
    loop {
        k += 1;
        let path = format!("/home/lohar/chaos/r{round}-{k}");
        let content = format!(
            "{sb} round {round} file {k} {}\n",
            "x".repeat(k as usize % 64)
        );
        let ok = if k.is_multiple_of(2) {
            c.try_send(
                hyper::Method::PUT,
                &format!("/sandboxes/{sb}/files?path={path}"),
                &[],
                bytes::Bytes::from(content.clone()),
            )
            .await
            .is_ok_and(|r| r.status == 200)
        } else {
            let script = format!("mkdir -p /home/lohar/chaos && printf '%s' '{content}' > {path}");
            c.try_send(
                hyper::Method::POST,
                &format!("/sandboxes/{sb}/exec"),
                &[("content-type", "application/json")],
                bytes::Bytes::from(json!({"cmd": ["sh", "-c", script]}).to_string()),
            )
            .await
            .is_ok_and(|r| {
                r.status == 200
                    && serde_json::from_slice::<Value>(&r.body)
                        .is_ok_and(|v| v["exit_code"].as_i64() == Some(0))
            })
        };
        if ok {
            acked
                .lock()
                .expect("acked")
                .insert((sb.clone(), path), sha_hex(content.as_bytes()));
        } else {
            // The daemon is down: try again shortly, acknowledging nothing.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A streaming exec (`/exec/ws`) printing a counter, reattached after
/// each restart from the last offset seen.
#[derive(Default)]
struct Stream {
    session: Option<String>,
    end: u64,
    text: String,
}

impl Stream {
    /// Connects (or reattaches) and reads until the socket breaks: when
    /// the daemon dies.
    async fn run(me: Arc<Mutex<Stream>>, c: Client, sb: String) {
        let Ok(mut ws) = c.ws(&format!("/sandboxes/{sb}/exec/ws")).await else {
            return;
        };
        let first = {
            let s = me.lock().expect("stream");
            match &s.session {
                None => json!({"cmd": ["sh", "-c",
                    "i=0; while true; do echo $i; i=$((i+1)); sleep 0.3; done"]}),
                Some(id) => json!({"attach": id, "offset": s.end}),
            }
        };
        if ws
            .send(Message::Text(first.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            let mut s = me.lock().expect("stream");
            match v["type"].as_str() {
                Some("started") => {
                    assert!(
                        v["gap"].is_null(),
                        "exec stream: output lost on reattach: {v}"
                    );
                    let off = v["offset"].as_u64().expect("offset");
                    if s.session.is_some() {
                        assert_eq!(off, s.end, "exec stream: reattached elsewhere: {v}");
                    }
                    s.session = v["session"].as_str().map(str::to_owned);
                    s.end = off;
                }
                Some("stdout") => {
                    assert_eq!(v["offset"].as_u64(), Some(s.end), "exec stream: {v}");
                    s.text.push_str(v["data"].as_str().unwrap_or_default());
                    s.end = v["end"].as_u64().expect("end");
                }
                other => panic!("exec stream: unexpected {other:?}: {v}"),
            }
        }
    }

    /// The counter is whole: 0, 1, 2, … with nothing lost or repeated.
    fn lines(&self) -> usize {
        let mut n = 0;
        for (i, l) in self.text.lines().enumerate() {
            assert_eq!(l, i.to_string(), "exec stream: {:?}", self.text);
            n += 1;
        }
        n
    }
}

/// An interactive shell (`/ws`), kept attached; after each restart it is
/// reattached where it was cut and must run a command.
#[derive(Default)]
struct Shell {
    session: Option<String>,
    seen: u64,
    out: Vec<u8>,
}

impl Shell {
    async fn run(me: Arc<Mutex<Shell>>, c: Client, sb: String, round: u32) {
        let path = {
            let s = me.lock().expect("shell");
            match &s.session {
                None => format!("/sandboxes/{sb}/ws?rows=24&cols=80"),
                Some(id) => format!("/sandboxes/{sb}/ws?session={id}&offset={}", s.seen),
            }
        };
        let Ok(mut ws) = c.ws(&path).await else {
            return;
        };
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).expect("JSON");
                    if v["type"] != "session" {
                        continue;
                    }
                    {
                        let mut s = me.lock().expect("shell");
                        assert!(v["gap"].is_null(), "shell: output lost: {v}");
                        let off = v["offset"].as_u64().expect("offset");
                        if s.session.is_some() {
                            assert_eq!(off, s.seen, "shell: reattached elsewhere: {v}");
                        }
                        s.session = v["id"].as_str().map(str::to_owned);
                        s.seen = off;
                    }
                    let cmd = format!("echo shell-$(({round}*1000+7))\n");
                    if ws.send(Message::Binary(cmd.into())).await.is_err() {
                        return;
                    }
                }
                Message::Binary(b) => {
                    let mut s = me.lock().expect("shell");
                    s.seen += b.len() as u64;
                    s.out.extend_from_slice(&b);
                }
                _ => {}
            }
        }
    }

    fn answered(&self, round: u32) -> bool {
        String::from_utf8_lossy(&self.out).contains(&format!("shell-{}", round * 1000 + 7))
    }
}

/// Starts the stream and shell readers (reattaching) and waits until both
/// work: the shell ran this round's command, the stream grew.
async fn attach(
    c: &Client,
    sbs: &[String],
    stream: &Arc<Mutex<Stream>>,
    shell: &Arc<Mutex<Shell>>,
    round: u32,
) -> Vec<tokio::task::JoinHandle<()>> {
    let had = stream.lock().expect("stream").lines();
    let tasks = vec![
        tokio::spawn(Stream::run(stream.clone(), c.clone(), sbs[0].clone())),
        tokio::spawn(Shell::run(shell.clone(), c.clone(), sbs[1].clone(), round)),
    ];
    eventually(
        &format!("round {round}: the exec stream and the shell answer"),
        Duration::from_secs(120),
        || async {
            assert!(
                !tasks.iter().any(|t| t.is_finished()),
                "round {round}: a reader ended early"
            );
            let grew = stream.lock().expect("stream").lines() > had + 2;
            let shell_ok = shell.lock().expect("shell").answered(round);
            (grew && shell_ok).then_some(())
        },
    )
    .await;
    tasks
}

/// Mount points under the data dir.
fn mounts(env: &Env) -> BTreeSet<String> {
    let dir = env.data_dir().display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

/// TAP devices in the test's network namespace.
fn taps(env: &Env) -> BTreeSet<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", &env.ns, "-o", "link", "show", "type", "tun"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// Exactly one VMM per sandbox with a live VM (not cold), none else;
/// no run dir, sandbox dir or TAP without a sandbox.
async fn no_orphans(env: &Env, c: &Client, when: &str) {
    let (ids, live) = eventually(
        &format!("one VMM per live sandbox {when}"),
        Duration::from_secs(60),
        || async {
            let list = c.get("/sandboxes").await.expect(200);
            let sbs = list["sandboxes"].as_array().cloned().unwrap_or_default();
            let live = sbs.iter().filter(|s| s["thermal"] != "cold").count();
            let ids: BTreeSet<String> = sbs
                .iter()
                .filter_map(|s| s["id"].as_str().map(str::to_owned))
                .collect();
            (env.vmm_pids().len() == live).then_some((ids, live))
        },
    )
    .await;
    println!("chaos: {when}: {} sandboxes, {live} VMMs", ids.len());
    for d in dir_entries(&env.data_dir().join("run")) {
        assert!(ids.contains(&d), "{when}: run dir {d} has no sandbox");
    }
    for d in dir_entries(&env.data_dir().join("sandboxes")) {
        assert!(ids.contains(&d), "{when}: sandbox dir {d} has no sandbox");
    }
    let known: BTreeSet<String> = ids.iter().map(|i| bhatti::net::tap_name(i)).collect();
    for t in taps(env) {
        assert!(known.contains(&t), "{when}: TAP {t} has no sandbox");
    }
}

/// Every acknowledged write reads back with its checksum.
async fn check_writes(c: &Client, sbs: &[String], acked: &Acked, when: &str) -> usize {
    let want = acked.lock().expect("acked").clone();
    for sb in sbs {
        let (code, out, err) = c
            .sh(
                sb,
                "cd /home/lohar/chaos 2>/dev/null && sha256sum * || true",
            )
            .await;
        assert_eq!(code, 0, "{when}: {sb}: {err}");
        let have: BTreeMap<String, String> = out
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, f)| (format!("/home/lohar/chaos/{f}"), h.to_owned()))
            .collect();
        for ((s, path), sum) in want.iter().filter(|((s, _), _)| s == sb) {
            assert_eq!(
                have.get(path),
                Some(sum),
                "{when}: {s}: acknowledged write {path} lost or corrupt"
            );
        }
    }
    want.len()
}

/// From the daemon's (re)start until every sandbox answered an exec.
async fn all_answer(c: &Client, sbs: &[String], since: Instant) -> Duration {
    let mut slowest = Duration::ZERO;
    let polls = sbs.iter().map(|sb| async move {
        eventually(
            &format!("{sb} answers an exec"),
            Duration::from_secs(180),
            || async {
                let r = c
                    .try_send(
                        hyper::Method::POST,
                        &format!("/sandboxes/{sb}/exec"),
                        &[("content-type", "application/json")],
                        bytes::Bytes::from(json!({"cmd": ["echo", "ok"]}).to_string()),
                    )
                    .await
                    .ok()?;
                (r.status == 200 && r.json()["stdout"] == "ok\n").then(|| since.elapsed())
            },
        )
        .await
    });
    for d in futures_util::future::join_all(polls).await {
        slowest = slowest.max(d);
    }
    slowest
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sigkill_under_load_recovers() {
    let Some(art) = artifacts("daemon_sigkill_under_load_recovers") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let n_sb = env_num("BHATTI_CHAOS_SANDBOXES", 4).max(3) as usize;
    let kills = env_num("BHATTI_CHAOS_KILLS", 2) as u32;
    let seed = env_num(
        "BHATTI_CHAOS_SEED",
        u64::from_str_radix(&bhatti::engine::random_hex(8), 16).unwrap_or(1),
    );
    println!(
        "chaos: seed {seed} (BHATTI_CHAOS_SEED={seed} replays), {n_sb} sandboxes, {kills} kills"
    );
    let mut rng = Rng(seed);

    let env = Env::new(art);
    let mut cfg = env.config();
    // Short timers: the idle sandbox cycles hot → warm → cold and back.
    cfg.thermal.warm_after_secs = 3;
    cfg.thermal.cold_after_secs = 8;
    cfg.thermal.sweep_interval_ms = 250;
    env.write_config(&cfg);
    let key = env.user("alice", UserCaps::default());
    let c = env.client(Some(&key));
    let mut n = 1;
    let mut daemon = Proc::spawn(&env, n);
    ready(&env, &mut daemon, n).await;

    let sbs: Vec<String> = (0..n_sb).map(|i| format!("c{i}")).collect();
    for sb in &sbs {
        c.post("/sandboxes", json!({"name": sb})).await.expect(201);
    }
    // c0: the exec stream, c1: the shell, the last: idle (thermal cycles);
    // every other one, and c0 and c1, write files.
    let writers = &sbs[..n_sb - 1];
    let idle = sbs[n_sb - 1].clone();
    let base_mounts = mounts(&env);
    let acked: Acked = Arc::default();
    let stream: Arc<Mutex<Stream>> = Arc::default();
    let shell: Arc<Mutex<Shell>> = Arc::default();
    let mut recoveries = Vec::new();

    for round in 1..=kills {
        let writes: Vec<_> = writers
            .iter()
            .map(|sb| tokio::spawn(write_loop(c.clone(), sb.clone(), round, acked.clone())))
            .collect();
        let readers = attach(&c, &sbs, &stream, &shell, round).await;
        let wait = rng.range_ms(500, 10_000);
        println!("chaos: round {round}: SIGKILL in {wait:?}");
        tokio::time::sleep(wait).await;
        let idle_was = c.get(&format!("/sandboxes/{idle}")).await.json()["thermal"].clone();

        daemon.signal(nix::sys::signal::Signal::SIGKILL);
        daemon.wait_exit(Duration::from_secs(10)).await;
        for w in writes {
            w.abort();
        }
        // Their sockets break with the daemon: the readers end.
        for r in readers {
            tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .expect("a reader ends with the daemon")
                .expect("reader");
        }

        let t0 = Instant::now();
        n += 1;
        daemon = Proc::spawn(&env, n);
        ready(&env, &mut daemon, n).await;
        // Before anything wakes them: a cold sandbox has no VMM, a hot or
        // warm one exactly one (re-adopted, not started twice).
        no_orphans(&env, &c, &format!("right after restart {round}")).await;
        let took = all_answer(&c, &sbs, t0).await;
        println!(
            "chaos: round {round}: every sandbox answered {took:?} after the restart (idle one was {idle_was})"
        );
        recoveries.push(took);

        let when = format!("after kill {round}");
        let checked = check_writes(&c, &sbs, &acked, &when).await;
        assert!(checked > 0, "{when}: no write was acknowledged");
        no_orphans(&env, &c, &when).await;
        assert_eq!(mounts(&env), base_mounts, "{when}: mounts changed");
        println!("chaos: {when}: {checked} acknowledged writes intact");
    }
    // The stream and the shell reattach after the last kill too.
    for r in attach(&c, &sbs, &stream, &shell, kills + 1).await {
        r.abort();
    }
    println!(
        "chaos: the exec stream counted to {} across {kills} kills",
        stream.lock().expect("stream").lines()
    );

    let mut sorted = recoveries.clone();
    sorted.sort();
    println!(
        "chaos: recovery p50 {:?} max {:?} over {} kills (seed {seed})",
        percentile(&sorted, 0.5),
        sorted.last().copied().unwrap_or_default(),
        sorted.len()
    );
    for sb in &sbs {
        c.delete(&format!("/sandboxes/{sb}")).await.expect(204);
    }
    no_orphans(&env, &c, "after the deletes").await;
}

fn proc_gone(pid: u32) -> bool {
    // A zombie (killed, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_sigkill_is_reported_and_start_recovers() {
    let Some(art) = artifacts("vmm_sigkill_is_reported_and_start_recovers") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    env.write_config(&env.config());
    let key = env.user("alice", UserCaps::default());
    let c = env.client(Some(&key));
    let mut daemon = Proc::spawn(&env, 1);
    ready(&env, &mut daemon, 1).await;

    let v = c.post("/sandboxes", json!({"name": "v"})).await.expect(201);
    let id = v["id"].as_str().expect("id").to_owned();
    c.post("/sandboxes", json!({"name": "bystander"}))
        .await
        .expect(201);
    c.put("/sandboxes/v/files?path=/home/lohar/before.txt", "before\n")
        .await
        .expect(200);
    assert_eq!(c.sh("v", "sync && echo synced").await.1, "synced\n");
    let pid: u32 = std::fs::read_to_string(env.data_dir().join("run").join(&id).join("vmm.pid"))
        .expect("vmm.pid")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(env.vmm_pids().len(), 2);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the VMM");
    eventually("the VMM is gone", Duration::from_secs(10), || async {
        proc_gone(pid).then_some(())
    })
    .await;

    // GET notices by itself: failed, with the reason.
    let seen = eventually(
        "GET shows the VMM's death",
        Duration::from_secs(30),
        || async {
            let v = c.get("/sandboxes/v").await.expect(200);
            (v["status"] != "running").then_some(v)
        },
    )
    .await;
    assert_eq!(seen["status"], "failed", "{seen}");
    let why = seen["error"].as_str().unwrap_or_default();
    assert!(why.contains("VMM process exited"), "GET: {seen}");

    // An exec answers at once with a clear error, not a hang; it does not
    // boot the sandbox again behind the user's back (its memory is lost).
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        c.try_send(
            hyper::Method::POST,
            "/sandboxes/v/exec",
            &[("content-type", "application/json")],
            bytes::Bytes::from(json!({"cmd": ["true"]}).to_string()),
        ),
    )
    .await
    .expect("the exec answers within 30 s")
    .expect("exec");
    println!(
        "chaos: exec on a sandbox whose VMM died: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let e = r.expect_err(409);
    assert!(
        e.contains("VMM process exited") && e.contains("start"),
        "{e}"
    );

    // The other sandbox is untouched; no VMM runs for the dead one.
    assert_eq!(c.sh("bystander", "echo ok").await.1, "ok\n");
    assert_eq!(env.vmm_pids().len(), 1);

    // Start boots it again from its disk: the synced file is there.
    let v = c.post("/sandboxes/v/start", json!({})).await.expect(200);
    assert_eq!(v["status"], "running", "{v}");
    assert_eq!(c.sh("v", "cat /home/lohar/before.txt").await.1, "before\n");
    no_orphans(&env, &c, "after the VMM's restart").await;
    for sb in ["v", "bystander"] {
        c.delete(&format!("/sandboxes/{sb}")).await.expect(204);
    }
}
