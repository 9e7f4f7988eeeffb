//! Latency part: TCP between two guests of one user over their bridge,
//! with bhatti's full ruleset ("rules on") and with no bhatti table in the
//! namespace ("rules off", the floor: the plain bridge).
//!
//! Guest B runs a python3 server (detached); guest A runs a python3 client
//! per sample that times, with `time.perf_counter`, K 1-byte round trips
//! on one TCP_NODELAY connection and then bulk transfers (A sends N bytes,
//! B answers one byte once it has read them all), and prints the numbers.
//! Samples alternate on/off, the order flipping every pair.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bhatti::engine::{new_sandbox_id, CreateSpec, Engine, EngineConfig};
use bhatti::net::egress::EgressPolicy;
use bhatti::net::firewall::{self, Firewall, FirewallState, GuestEntry};
use bhatti::net::tenants::{TenantSandbox, TenantSettings, TenantUser, Tenants};
use bhatti::net::{mac_for, tap_name};
use bhatti_bench::vm::{artifact_paths, bench_engine_config, Artifacts, Guard};
use bhatti_bench::{load_average, Recorder, Stats};
use bhatti_protocol::client::ExecOutput;
use bhatti_protocol::{AgentClient, ExecRequest, WriteFileRequest};
use bhatti_vmm::qemu::{Accel, QemuBackend, QemuConfig};
use bhatti_vmm::VmmBackend;
use bytes::Bytes;
use serde::Serialize;

use super::common::{human, nft, run, tenant_settings};
use super::Args;

const PORT: u16 = 7777;
const SERVER_PY: &str = "/tmp/nb_server.py";
const CLIENT_PY: &str = "/tmp/nb_client.py";
/// Unrecorded round trips at the start of each sample's connection.
const RTT_WARMUP: usize = 10;

/// Goals: throughput on/off ≥ this; latency on/off ≤ this (p50).
const THROUGHPUT_GOAL: f64 = 0.95;
const LATENCY_GOAL: f64 = 1.05;

const SERVER: &str = r#"
import socket, struct, sys, threading

def recvn(c, n):
    b = bytearray()
    while len(b) < n:
        k = c.recv(n - len(b))
        if not k:
            raise EOFError
        b += k
    return bytes(b)

def handle(c):
    try:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = recvn(c, 1)
        if mode == b'e':
            while True:
                b = c.recv(64)
                if not b:
                    break
                c.sendall(b)
        elif mode == b's':
            n = struct.unpack('!Q', recvn(c, 8))[0]
            buf = bytearray(1 << 20)
            mv = memoryview(buf)
            while n > 0:
                k = c.recv_into(mv, min(n, len(buf)))
                if not k:
                    raise EOFError
                n -= k
            c.sendall(b'k')
    except (EOFError, OSError):
        pass
    finally:
        c.close()

s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen(16)
print('listening', flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

const CLIENT: &str = r#"
import socket, struct, sys, time
host, port, k, warm, nbytes, transfers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
pc = time.perf_counter

def conn():
    for _ in range(100):
        try:
            s = socket.create_connection((host, port), timeout=60)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except ConnectionRefusedError:
            time.sleep(0.1)
    raise SystemExit('server not listening')

s = conn()
s.sendall(b'e')
rtts = []
one = b'x'
for i in range(warm + k):
    t = pc()
    s.send(one)
    b = s.recv(1)
    d = pc() - t
    if not b:
        raise SystemExit('echo closed')
    if i >= warm:
        rtts.append(d)
s.close()
print('rtt_ns', ' '.join(str(int(d * 1e9)) for d in rtts))
chunk = memoryview(bytes(1 << 18))
for _ in range(transfers):
    s = conn()
    s.sendall(b's' + struct.pack('!Q', nbytes))
    t = pc()
    left = nbytes
    while left > 0:
        m = min(left, len(chunk))
        s.sendall(chunk[:m])
        left -= m
    ack = s.recv(1)
    d = pc() - t
    if ack != b'k':
        raise SystemExit('no ack')
    s.close()
    print('bulk_ns', nbytes, int(d * 1e9))
"#;

#[derive(Debug, Serialize)]
pub struct LatencyReport {
    pub backend: String,
    pub guest_clocksource: String,
    pub perf_counter_resolution: String,
    /// Conntrack entries one warm-up sample created: [rules on, rules off].
    pub conntrack_entries_per_sample: [Option<usize>; 2],
    pub pairs: usize,
    pub rtts_per_sample: usize,
    pub transfer_bytes: usize,
    pub transfers_per_sample: usize,
    /// Every recorded 1-byte round trip (µs).
    pub rtt_on: Stats,
    pub rtt_off: Stats,
    /// on / off at p50, p95, p99.
    pub rtt_ratio: [f64; 3],
    /// Median over pairs of (pair's on p50 / pair's off p50).
    pub rtt_ratio_paired_median: f64,
    /// Time per transfer (µs).
    pub bulk_time_on: Stats,
    pub bulk_time_off: Stats,
    /// MiB/s at the p50, p95 and p99 of transfer time (the slow tail).
    pub throughput_on_mib_s: [f64; 3],
    pub throughput_off_mib_s: [f64; 3],
    /// on / off throughput at p50, p95 and p99 of transfer time.
    pub throughput_ratio: [f64; 3],
    pub throughput_ratio_paired_median: f64,
    pub latency_goal: String,
    pub latency_met: bool,
    pub throughput_goal: String,
    pub throughput_met: bool,
    pub notes: Vec<String>,
}

/// The kernel and rootfs, QEMU, root; or why not.
pub fn artifacts() -> Result<Artifacts, String> {
    let (kernel, rootfs) = artifact_paths();
    let mut missing = Vec::new();
    if bhatti_vmm::probe::probe().qemu.is_none() {
        missing.push("qemu-system-x86_64");
    }
    if kernel.is_none() {
        missing.push("kernel (BHATTI_KERNEL)");
    }
    if rootfs.is_none() {
        missing.push("rootfs with lohar (BHATTI_ROOTFS)");
    }
    match (kernel, rootfs) {
        (Some(kernel), Some(rootfs)) if missing.is_empty() => Ok(Artifacts { kernel, rootfs }),
        _ => Err(format!(
            "missing {} (eval \"$(scripts/artifacts.sh)\" sets the artifacts)",
            missing.join(", ")
        )),
    }
}

async fn exec_ok(c: &AgentClient, argv: &[&str]) -> anyhow::Result<ExecOutput> {
    let out = c
        .exec(
            ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                timeout_ms: Some(600_000),
                ..Default::default()
            },
            None,
        )
        .await?;
    ensure!(
        out.status.exit_code == 0,
        "{argv:?} exited {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn guest_entry(s: &TenantSettings, sb: &TenantSandbox) -> anyhow::Result<GuestEntry> {
    let net = s.user_net(sb.user.index, s.isolate_by_default)?;
    Ok(GuestEntry {
        bridge: net.bridge,
        tap: tap_name(&sb.id),
        mac: mac_for(&sb.id),
        ip: std::net::Ipv4Addr::from(u32::from(net.subnet.addr) + u32::from(sb.ip_host)),
        egress: sb.egress.clone(),
    })
}

/// `nft -j list ruleset` of the namespace, canonical: handles dropped,
/// set elements sorted (the kernel lists them in its own order).
async fn listing(ns: &str) -> anyhow::Result<serde_json::Value> {
    let out = nft(ns, &["-j", "list", "ruleset"]).await?;
    let mut v: serde_json::Value = serde_json::from_str(&out).context("nft -j output")?;
    canonical(&mut v);
    Ok(v)
}

fn canonical(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            m.remove("handle");
            m.remove("metainfo");
            for (k, x) in m.iter_mut() {
                canonical(x);
                if k == "elem" {
                    if let Value::Array(a) = x {
                        a.sort_by_key(|e| e.to_string());
                    }
                }
            }
        }
        Value::Array(a) => {
            a.retain(|x| x.get("metainfo").is_none());
            a.iter_mut().for_each(canonical);
        }
        _ => {}
    }
}

/// One sample's numbers from the client's stdout.
struct Sample {
    rtts: Vec<Duration>,
    bulk: Vec<Duration>,
    host: Duration,
    /// Conntrack entries the sample created (warm-up samples only).
    conntrack: Option<usize>,
}

fn parse_client(stdout: &str, want_rtts: usize, want_bulk: usize) -> anyhow::Result<Sample> {
    let mut rtts = Vec::new();
    let mut bulk = Vec::new();
    for line in stdout.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("rtt_ns") => {
                for x in w {
                    rtts.push(Duration::from_nanos(x.parse().context("rtt_ns value")?));
                }
            }
            Some("bulk_ns") => {
                let _bytes: u64 = w.next().context("bulk bytes")?.parse()?;
                let ns: u64 = w.next().context("bulk ns")?.parse()?;
                bulk.push(Duration::from_nanos(ns));
            }
            _ => {}
        }
    }
    ensure!(
        rtts.len() == want_rtts && bulk.len() == want_bulk,
        "client printed {} round trips and {} transfers, expected {want_rtts} and {want_bulk}:\n{stdout}",
        rtts.len(),
        bulk.len()
    );
    Ok(Sample {
        rtts,
        bulk,
        host: Duration::ZERO,
        conntrack: None,
    })
}

fn p50(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub async fn bench(args: &Args, art: &Artifacts, guard: &Guard) -> anyhow::Result<LatencyReport> {
    let ns = guard.ns.clone();
    let settings = tenant_settings(&ns)?;
    let tenants = Tenants::start(settings.clone(), vec![]).await?;
    let user = TenantUser {
        user_id: "u_nb".into(),
        index: 0,
        isolated: None,
    };
    let mk = |name: &str, host: u8| TenantSandbox {
        id: new_sandbox_id(),
        name: name.into(),
        user: user.clone(),
        ip_host: host,
        egress: EgressPolicy::default(),
    };
    let (sa, sb) = (mk("nb-a", 2), mk("nb-b", 3));

    let backend = QemuBackend::new(QemuConfig::default())?;
    let label = format!("qemu/{:?}", backend.accel()).to_lowercase();
    let tcg = backend.accel() == Accel::Tcg;
    let mut cfg = EngineConfig::new(
        guard.dir.path().join("engine"),
        &art.kernel,
        &art.rootfs,
        std::sync::Arc::new(backend) as std::sync::Arc<dyn VmmBackend>,
    );
    bench_engine_config(&mut cfg, &args.subnet, &ns);
    let engine = Engine::new(cfg).await?;
    let spec_defaults = CreateSpec::default();
    let r = run_guests(args, &engine, &tenants, &settings, &ns, &sa, &sb).await;
    // The VMs go whatever happened (the guard kills leftovers too).
    for s in [&sa, &sb] {
        if let Err(e) = engine.destroy(&s.id).await {
            eprintln!("[net-bench] destroying {}: {e}", s.id);
        }
        if let Err(e) = tenants.remove_sandbox(s).await {
            eprintln!("[net-bench] removing {}'s network: {e}", s.id);
        }
    }
    let mut rep = r?;
    rep.backend = label.clone();
    rep.notes.insert(
        0,
        format!(
            "{label}: two guests of one user ({} vCPU, {} MiB each, CreateSpec defaults) on \
             bridge bhatti-u0 in the bench's namespace; client in A, server in B; python3 \
             in both, timed in guest A with time.perf_counter{}",
            spec_defaults.cpus,
            spec_defaults.memory_mb,
            if tcg {
                "; no hardware KVM here: QEMU runs the guests under TCG (software emulation), \
                 so the guests are CPU-bound and every figure is dominated by emulated CPU \
                 time (virtio-net, the guest's TCP stack, python), not by the host's bridge \
                 and firewall"
            } else {
                ""
            }
        ),
    );
    Ok(rep)
}

async fn run_guests(
    args: &Args,
    engine: &Engine,
    tenants: &Tenants,
    settings: &TenantSettings,
    ns: &str,
    sa: &TenantSandbox,
    sb: &TenantSandbox,
) -> anyhow::Result<LatencyReport> {
    for s in [sa, sb] {
        tenants.add_sandbox(s).await?;
        let t = Instant::now();
        engine
            .create_as(
                s.id.clone(),
                CreateSpec {
                    name: Some(s.name.clone()),
                    network: Some(tenants.attach(s)?),
                    ..CreateSpec::default()
                },
            )
            .await?;
        eprintln!(
            "[net-bench] {} ({}) booted at {} in {:.1} s",
            s.name,
            s.id,
            tenants.address(s)?,
            t.elapsed().as_secs_f64()
        );
    }
    let ip_b = tenants.address(sb)?.to_string();
    let ca = engine.agent(&sa.id).await?;
    let cb = engine.agent(&sb.id).await?;
    let write = |c: AgentClient, path: &'static str, body: &'static str| async move {
        c.write_file(
            WriteFileRequest {
                path: path.into(),
                mode: Some(0o644),
                place: false,
            },
            Bytes::from_static(body.as_bytes()),
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    };
    write(cb.clone(), SERVER_PY, SERVER).await?;
    write(ca.clone(), CLIENT_PY, CLIENT).await?;
    let port = PORT.to_string();
    cb.exec_detached(ExecRequest {
        argv: vec!["python3".into(), SERVER_PY.into(), port.clone()],
        output_file: Some("/tmp/nb_server.log".into()),
        ..Default::default()
    })
    .await?;
    let clocksource = exec_ok(
        &ca,
        &[
            "cat",
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        ],
    )
    .await
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .unwrap_or_else(|e| format!("unknown ({e})"));
    let resolution = exec_ok(
        &ca,
        &[
            "python3",
            "-c",
            "import time; print(time.get_clock_info('perf_counter'))",
        ],
    )
    .await
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .unwrap_or_else(|e| format!("unknown ({e})"));
    eprintln!("[net-bench] guest clocksource {clocksource}; perf_counter: {resolution}");
    if clocksource.contains("jiffies") {
        bail!("the guest's clocksource is {clocksource} (4 ms steps): too coarse for round trips");
    }

    // Rules on = bhatti's full ruleset for this state, as Tenants installed
    // it; checked to be the very same ruleset.
    let fw = Firewall::new(Some(ns.to_owned()));
    let state = {
        let mut guests = vec![guest_entry(settings, sa)?, guest_entry(settings, sb)?];
        guests.sort_by(|a, b| a.tap.cmp(&b.tap));
        FirewallState {
            settings: settings.firewall.clone(),
            users: vec![settings.user_net(0, settings.isolate_by_default)?],
            guests,
        }
    };
    let doc_on = firewall::ruleset(&state);
    let installed = listing(ns).await?;
    fw.apply(&doc_on).await?;
    let ours = listing(ns).await?;
    ensure!(
        installed == ours,
        "the rules-on document differs from what Tenants installed:\n--- Tenants\n{installed}\n--- ours\n{ours}"
    );
    let text = ours.to_string();
    for s in [sa, sb] {
        ensure!(
            text.contains(&format!("\"{}\"", tap_name(&s.id))),
            "TAP of {} not registered in the ruleset",
            s.name
        );
    }
    fw.remove_all().await?;
    let off = listing(ns).await?;
    let tables = off
        .get("nftables")
        .and_then(|a| a.as_array())
        .map_or(0, Vec::len);
    ensure!(
        tables == 0,
        "rules off but the namespace has a ruleset:\n{off}"
    );

    let nbytes = args.transfer_mib.max(1) << 20;
    let k = args.rtts.max(1);
    let transfers = args.transfers.max(1);
    let argv_owned = [
        "python3".to_string(),
        CLIENT_PY.into(),
        ip_b.clone(),
        port.clone(),
        k.to_string(),
        RTT_WARMUP.to_string(),
        nbytes.to_string(),
        transfers.to_string(),
    ];
    let argv: Vec<&str> = argv_owned.iter().map(String::as_str).collect();
    // With `probe`, the namespace's conntrack table is flushed before the
    // client runs and counted after: does guest traffic pass conntrack?
    let sample = |on: bool, probe: bool| {
        let (fw, doc_on, ca, argv) = (&fw, &doc_on, &ca, &argv);
        async move {
            if on {
                fw.apply(doc_on).await?;
            } else {
                fw.remove_all().await?;
            }
            if probe {
                run("ip", &["netns", "exec", ns, "conntrack", "-F"], None).await?;
            }
            let t = Instant::now();
            let out = exec_ok(ca, argv).await?;
            let host = t.elapsed();
            let mut s = parse_client(&String::from_utf8_lossy(&out.stdout), k, transfers)?;
            s.host = host;
            if probe {
                let list = run("ip", &["netns", "exec", ns, "conntrack", "-L"], None).await?;
                s.conntrack = Some(list.lines().filter(|l| !l.trim().is_empty()).count());
            }
            Ok::<_, anyhow::Error>(s)
        }
    };
    let mut conntrack_probe: [Option<usize>; 2] = [None, None];

    let mut rtt = [
        Recorder::new("TCP RTT 1 B, rules on"),
        Recorder::new("TCP RTT 1 B, rules off (plain bridge)"),
    ];
    let mut bulk = [
        Recorder::new("bulk transfer time, rules on"),
        Recorder::new("bulk transfer time, rules off"),
    ];
    let mut paired_rtt = Vec::new();
    let mut paired_thr = Vec::new();
    let (mut guest_s, mut host_s) = (0.0, 0.0);
    let pairs = args.warmup_pairs + args.pairs.max(1);
    let t0 = Instant::now();
    for i in 0..pairs {
        let measured = i >= args.warmup_pairs;
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut got: [Option<Sample>; 2] = [None, None];
        for on in order {
            got[usize::from(!on)] = Some(sample(on, !measured).await?);
        }
        let [Some(mut s_on), Some(mut s_off)] = got else {
            bail!("a sample is missing");
        };
        if !measured {
            conntrack_probe = [s_on.conntrack, s_off.conntrack];
        }
        if measured {
            for (j, s) in [&s_on, &s_off].into_iter().enumerate() {
                for d in &s.rtts {
                    rtt[j].record(*d);
                }
                for d in &s.bulk {
                    bulk[j].record(*d);
                }
                guest_s += s
                    .rtts
                    .iter()
                    .chain(&s.bulk)
                    .map(Duration::as_secs_f64)
                    .sum::<f64>();
                host_s += s.host.as_secs_f64();
            }
            let r_on = p50(&mut s_on.rtts).as_secs_f64();
            let r_off = p50(&mut s_off.rtts).as_secs_f64();
            paired_rtt.push(r_on / r_off);
            let b_on = p50(&mut s_on.bulk).as_secs_f64();
            let b_off = p50(&mut s_off.bulk).as_secs_f64();
            paired_thr.push(b_off / b_on);
        }
        eprintln!(
            "[net-bench] pair {}/{pairs}{}: RTT p50 on {:.0} µs / off {:.0} µs; transfer p50 on {:.0} ms / off {:.0} ms ({:.0} s, load {})",
            i + 1,
            if measured { "" } else { " (warm-up)" },
            p50(&mut s_on.rtts).as_secs_f64() * 1e6,
            p50(&mut s_off.rtts).as_secs_f64() * 1e6,
            p50(&mut s_on.bulk).as_secs_f64() * 1e3,
            p50(&mut s_off.bulk).as_secs_f64() * 1e3,
            t0.elapsed().as_secs_f64(),
            load_average()
        );
    }
    // Leave the namespace as Tenants knows it.
    fw.apply(&doc_on).await?;

    let [rtt_on, rtt_off] = [rtt[0].stats(), rtt[1].stats()];
    let [bulk_on, bulk_off] = [bulk[0].stats(), bulk[1].stats()];
    let mib = nbytes as f64 / (1u64 << 20) as f64;
    let thr = |s: &Stats| {
        let t = |us: f64| if us > 0.0 { mib / (us / 1e6) } else { f64::NAN };
        [t(s.p50_us), t(s.p95_us), t(s.p99_us)]
    };
    let (thr_on, thr_off) = (thr(&bulk_on), thr(&bulk_off));
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let rtt_ratio = [
        r(rtt_on.p50_us, rtt_off.p50_us),
        r(rtt_on.p95_us, rtt_off.p95_us),
        r(rtt_on.p99_us, rtt_off.p99_us),
    ];
    let throughput_ratio = [
        r(thr_on[0], thr_off[0]),
        r(thr_on[1], thr_off[1]),
        r(thr_on[2], thr_off[2]),
    ];
    // /proc/sys/net shows the reader's namespace.
    let br_nf = run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "cat",
            "/proc/sys/net/bridge/bridge-nf-call-iptables",
        ],
        None,
    )
    .await
    .map(|v| format!("{} in the namespace", v.trim()))
    .unwrap_or_else(|_| "n/a: no br_netfilter".into());
    let notes = vec![
        format!(
            "rules on = bhatti's full ruleset (inet + bridge tables, this user and its two \
             sandboxes as elements; checked identical to what Tenants installed); rules off = \
             no bhatti table in the namespace (plain bridge). Switched before every sample; \
             {} pairs (+{} warm-up), order flipping each pair",
            args.pairs.max(1),
            args.warmup_pairs
        ),
        format!(
            "RTT: {k} 1-byte ping-pongs per sample on one TCP_NODELAY connection (after \
             {RTT_WARMUP} unrecorded), percentiles over all of them; bulk: {transfers} × \
             {mib:.0} MiB A→B per sample, timed from the first byte sent to B's 1-byte answer \
             after the last byte read; throughput = size / transfer time (its p95/p99 = the \
             slow tail)"
        ),
        format!(
            "this kernel has br_netfilter built in (bridge-nf-call-iptables = {}): bridged \
             guest↔guest IPv4 also passes the inet hooks. Conntrack entries one warm-up \
             sample created (table flushed first): rules on {}, rules off {}",
            br_nf,
            conntrack_probe[0].map_or("-".into(), |n| n.to_string()),
            conntrack_probe[1].map_or("-".into(), |n| n.to_string()),
        ),
        format!(
            "in-guest time summed to {guest_s:.1} s of {host_s:.1} s of client exec seen from \
             the host (python start-up and connection set-up are the rest)"
        ),
    ];
    Ok(LatencyReport {
        backend: String::new(),
        guest_clocksource: clocksource,
        perf_counter_resolution: resolution,
        conntrack_entries_per_sample: conntrack_probe,
        pairs: args.pairs.max(1),
        rtts_per_sample: k,
        transfer_bytes: nbytes,
        transfers_per_sample: transfers,
        rtt_ratio_paired_median: median(paired_rtt),
        throughput_ratio_paired_median: median(paired_thr),
        latency_goal: format!("on/off ≤ {LATENCY_GOAL} (p50)"),
        latency_met: rtt_ratio[0] <= LATENCY_GOAL,
        throughput_goal: format!("on/off ≥ {THROUGHPUT_GOAL} (p50)"),
        throughput_met: throughput_ratio[0] >= THROUGHPUT_GOAL,
        rtt_on,
        rtt_off,
        rtt_ratio,
        bulk_time_on: bulk_on,
        bulk_time_off: bulk_off,
        throughput_on_mib_s: thr_on,
        throughput_off_mib_s: thr_off,
        throughput_ratio,
        notes,
    })
}

impl LatencyReport {
    pub fn print(&self) {
        println!(
            "\nnet-bench guest↔guest TCP, {} ({} pairs; guest clocksource {})",
            self.backend, self.pairs, self.guest_clocksource
        );
        println!(
            "{:<30} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>17} | {:>8} | {:<20} met",
            "metric",
            "on p50",
            "p95",
            "p99",
            "off p50",
            "p95",
            "p99",
            "on/off p50/95/99",
            "paired",
            "goal"
        );
        println!(
            "{:<30} | {:>9.0} {:>9.0} {:>9.0} | {:>9.0} {:>9.0} {:>9.0} | {:>17} | {:>8.3} | {:<20} {}",
            "TCP RTT, 1 byte (µs)",
            self.rtt_on.p50_us,
            self.rtt_on.p95_us,
            self.rtt_on.p99_us,
            self.rtt_off.p50_us,
            self.rtt_off.p95_us,
            self.rtt_off.p99_us,
            format!(
                "{:.3}/{:.3}/{:.3}",
                self.rtt_ratio[0], self.rtt_ratio[1], self.rtt_ratio[2]
            ),
            self.rtt_ratio_paired_median,
            self.latency_goal,
            if self.latency_met { "yes" } else { "NO" }
        );
        let (on, off) = (&self.throughput_on_mib_s, &self.throughput_off_mib_s);
        println!(
            "{:<30} | {:>9.1} {:>9.1} {:>9.1} | {:>9.1} {:>9.1} {:>9.1} | {:>17} | {:>8.3} | {:<20} {}",
            format!("throughput {} MiB (MiB/s)", self.transfer_bytes >> 20),
            on[0],
            on[1],
            on[2],
            off[0],
            off[1],
            off[2],
            format!(
                "{:.3}/{:.3}/{:.3}",
                self.throughput_ratio[0], self.throughput_ratio[1], self.throughput_ratio[2]
            ),
            self.throughput_ratio_paired_median,
            self.throughput_goal,
            if self.throughput_met { "yes" } else { "NO" }
        );
        println!(
            "{:<30} | {:>9.1} {:>9.1} {:>9.1} | {:>9.1} {:>9.1} {:>9.1} |",
            "  (transfer time, ms)",
            self.bulk_time_on.p50_us / 1e3,
            self.bulk_time_on.p95_us / 1e3,
            self.bulk_time_on.p99_us / 1e3,
            self.bulk_time_off.p50_us / 1e3,
            self.bulk_time_off.p95_us / 1e3,
            self.bulk_time_off.p99_us / 1e3,
        );
        println!(
            "(throughput p95/p99 columns = MiB/s at the p95/p99 of transfer time: the slow tail; \
             paired = median over pairs of the pair's own on/off ratio; {} RTTs and {} transfers per side)",
            self.rtt_on.samples, self.bulk_time_on.samples
        );
        for n in &self.notes {
            println!("note: {n}");
        }
    }

    pub fn print_markdown(&self) {
        println!(
            "\n| Guest ↔ guest TCP ({}, same user bridge) | Rules on: p50 / p95 / p99 | Rules off (plain bridge, same run): p50 / p95 / p99 | On/off (p50) | Goal |",
            self.backend
        );
        println!("|---|---:|---:|---:|---|");
        println!(
            "| Round trip, 1 byte | {} / {} / {} | {} / {} / {} | ×{:.3} | ≤ ×{LATENCY_GOAL} {} |",
            human(self.rtt_on.p50_us),
            human(self.rtt_on.p95_us),
            human(self.rtt_on.p99_us),
            human(self.rtt_off.p50_us),
            human(self.rtt_off.p95_us),
            human(self.rtt_off.p99_us),
            self.rtt_ratio[0],
            if self.latency_met { "✓" } else { "✗" }
        );
        let (on, off) = (&self.throughput_on_mib_s, &self.throughput_off_mib_s);
        println!(
            "| Throughput, {} MiB transfers (MiB/s; p95/p99 = slow tail) | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | ×{:.3} | ≥ ×{THROUGHPUT_GOAL} {} |",
            self.transfer_bytes >> 20,
            on[0],
            on[1],
            on[2],
            off[0],
            off[1],
            off[2],
            self.throughput_ratio[0],
            if self.throughput_met { "✓" } else { "✗" }
        );
    }
}
