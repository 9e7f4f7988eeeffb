//! Control part: adding and removing a user's network and a sandbox's
//! rules with 1 and with N (1000) users already up, and `Tenants::start`
//! of 1 and N users, each beside the raw commands in the same namespace.
//!
//! Two namespaces live side by side, one per scale; every iteration runs
//! the same sequence in both (the order flipping each time), so drift in
//! the machine's load touches both scales alike. A sequence is:
//!
//! - ours: `add_sandbox` of a new user's first sandbox, `add_sandbox` of a
//!   second sandbox of user 0, `remove_sandbox` of that one, then of the new
//!   user's (their network goes): the baseline is restored.
//! - raw minimal (the floor): the commands such an operation needs at the
//!   least: `ip link add … type bridge`, `ip addr replace`, `ip link set
//!   up`, one `nft -f` with the user's and the sandbox's elements; one
//!   `nft -f` per sandbox added or removed; one `nft -f` + `ip link del`
//!   for the last one.
//! - raw, same steps as ours: every command bhatti issues, one by one
//!   (link existence checks, one document per change, conntrack flushes,
//!   the DNS server), each timed on its own: the step breakdown.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bhatti::net::dns::{DnsNames, DnsServer, Upstreams};
use bhatti::net::egress::EgressPolicy;
use bhatti::net::firewall::{self, FirewallState, GuestEntry, UserNet};
use bhatti::net::tenants::{TenantSandbox, TenantSettings, TenantUser, Tenants};
use bhatti::net::{mac_for, tap_name};
use bhatti_bench::{Recorder, Stats};
use serde::Serialize;

use super::common::{
    conntrack_flush, human, ip, nft, nft_doc, run, tenant_settings, timed, NsGuard,
};
use super::Args;

/// The operations, in sequence order.
const OPS: [&str; 4] = [
    "add_sandbox, new user (bridge+rules+DNS)",
    "add_sandbox, 2nd of a user (rules)",
    "remove_sandbox, not the last (rules)",
    "remove_sandbox, last (network down)",
];

/// Goal: ours with N users ≤ this × ours with 1 user, at p50.
const SCALE_GOAL: f64 = 1.2;

#[derive(Debug, Serialize)]
pub struct ControlReport {
    pub users_small: u32,
    pub users_big: u32,
    pub samples: usize,
    pub rows: Vec<OpRow>,
    pub steps: Vec<StepRow>,
    pub start: Vec<StartRow>,
    pub notes: Vec<String>,
}

/// One operation at both scales, beside its raw floors at both scales.
#[derive(Debug, Serialize)]
pub struct OpRow {
    pub op: String,
    pub ours_small: Stats,
    pub ours_big: Stats,
    /// ours big / ours small at p50, p95, p99.
    pub scale_ratio: [f64; 3],
    pub floor_small: Stats,
    pub floor_big: Stats,
    pub floor_scale_ratio: [f64; 3],
    /// The same commands as ours, issued one by one (sum per sample).
    pub same_steps_small: Stats,
    pub same_steps_big: Stats,
    /// ours / raw minimal at p50, per scale.
    pub ours_over_floor_p50: [f64; 2],
    pub goal: String,
    pub met: bool,
}

/// One raw command at both scales.
#[derive(Debug, Serialize)]
pub struct StepRow {
    pub step: String,
    pub small: Stats,
    pub big: Stats,
    pub scale_ratio_p50: f64,
}

/// `Tenants::start` beside `ip -batch` + one `nft -f` of the same ruleset.
#[derive(Debug, Serialize)]
pub struct StartRow {
    pub users: u32,
    pub ours_ms: f64,
    pub raw_ip_batch_ms: f64,
    pub raw_nft_ms: f64,
    pub raw_total_ms: f64,
    pub ruleset_bytes: usize,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn ratios(a: &Stats, b: &Stats) -> [f64; 3] {
    [
        ratio(a.p50_us, b.p50_us),
        ratio(a.p95_us, b.p95_us),
        ratio(a.p99_us, b.p99_us),
    ]
}

/// A sandbox of user `index` (user id `u<index>`).
fn sandbox(id: &str, index: u32, ip_host: u8) -> TenantSandbox {
    TenantSandbox {
        id: id.into(),
        name: id.into(),
        user: TenantUser {
            user_id: format!("u{index:05}"),
            index,
            isolated: None,
        },
        ip_host,
        egress: EgressPolicy::default(),
    }
}

/// The firewall entry of a sandbox, as `Tenants` computes it.
fn entry(s: &TenantSettings, sb: &TenantSandbox) -> anyhow::Result<(UserNet, GuestEntry)> {
    let net = s.user_net(sb.user.index, s.isolate_by_default)?;
    let ip = Ipv4Addr::from(u32::from(net.subnet.addr) + u32::from(sb.ip_host));
    let g = GuestEntry {
        bridge: net.bridge.clone(),
        tap: tap_name(&sb.id),
        mac: mac_for(&sb.id),
        ip,
        egress: sb.egress.clone(),
    };
    Ok((net, g))
}

/// The documents and names one raw sequence uses.
struct RawPlan {
    net: UserNet,
    new_guest: GuestEntry,
    second: GuestEntry,
    cidr: String,
}

impl RawPlan {
    fn new(
        s: &TenantSettings,
        index: u32,
        new_id: &str,
        second_id: &str,
        host: u8,
    ) -> anyhow::Result<RawPlan> {
        let (net, new_guest) = entry(s, &sandbox(new_id, index, 2))?;
        let (_, second) = entry(s, &sandbox(second_id, 0, host))?;
        Ok(RawPlan {
            cidr: format!("{}/24", net.gateway),
            net,
            new_guest,
            second,
        })
    }
}

/// Recorders of one scale.
struct Recs {
    ours: Vec<Recorder>,
    floor: Vec<Recorder>,
    same: Vec<Recorder>,
    steps: BTreeMap<&'static str, Recorder>,
}

impl Recs {
    fn new(label: &str) -> Recs {
        let named = |what: &str| {
            OPS.iter()
                .map(|op| Recorder::new(format!("{op} [{what}, {label}]")))
                .collect()
        };
        Recs {
            ours: named("ours"),
            floor: named("raw minimal"),
            same: named("raw same steps"),
            steps: BTreeMap::new(),
        }
    }

    fn step(&mut self, name: &'static str, d: Duration, measured: bool) -> Duration {
        if measured {
            self.steps
                .entry(name)
                .or_insert_with(|| Recorder::new(name))
                .record(d);
        }
        d
    }
}

/// One scale: its namespace, its tenants and what was measured there.
struct Scale {
    users: u32,
    ns: NsGuard,
    settings: TenantSettings,
    tenants: Tenants,
    recs: Recs,
    start: Duration,
    new_sb: TenantSandbox,
    second_sb: TenantSandbox,
    min: RawPlan,
    same: RawPlan,
    names: Arc<DnsNames>,
    upstreams: Arc<Upstreams>,
}

impl Scale {
    /// A fresh namespace with `users` users of one sandbox each, up.
    async fn up(users: u32, new_index: u32) -> anyhow::Result<Scale> {
        let ns = NsGuard::new();
        ns.create().await?;
        let settings = tenant_settings(&ns.name)?;
        let sandboxes: Vec<TenantSandbox> = (0..users)
            .map(|i| sandbox(&format!("nb-u{i}"), i, 2))
            .collect();
        let t = Instant::now();
        let tenants = Tenants::start(settings.clone(), sandboxes).await?;
        let start = t.elapsed();
        eprintln!(
            "[net-bench] Tenants::start of {users} user(s) in {}: {:.2} s",
            ns.name,
            start.as_secs_f64()
        );
        let min = RawPlan::new(&settings, new_index + 1, "nb-fmin-new", "nb-fmin-2", 4)?;
        let same = RawPlan::new(&settings, new_index + 2, "nb-fsame-new", "nb-fsame-2", 5)?;
        let upstreams = Arc::new(Upstreams::new(vec![], Some(ns.name.clone())));
        let s = Scale {
            users,
            recs: Recs::new(&format!("{users} user(s)")),
            new_sb: sandbox("nb-new", new_index, 2),
            second_sb: sandbox("nb-second", 0, 3),
            names: Arc::new(DnsNames::new(&settings.dns_suffix)),
            upstreams,
            min,
            same,
            settings,
            tenants,
            start,
            ns,
        };
        s.check_baseline().await?;
        Ok(s)
    }

    /// `users` bridges and as many registered TAPs: the baseline.
    async fn check_baseline(&self) -> anyhow::Result<()> {
        let bridges = count_bridges(&self.ns.name).await?;
        let taps = count_elements(&self.ns.name, "bridge", "guest_taps").await?;
        let gateways = count_elements(&self.ns.name, "inet", "gateways").await?;
        let status = self.tenants.status().await;
        let dns = status.iter().filter(|u| u.dns.is_some()).count();
        ensure!(
            bridges == self.users as usize
                && taps == bridges
                && gateways == bridges
                && status.len() == bridges
                && dns == bridges,
            "{}: {bridges} user bridges, {taps} guest TAPs, {gateways} gateways, {} user \
             networks, {dns} DNS servers; expected {} each",
            self.ns.name,
            status.len(),
            self.users
        );
        Ok(())
    }

    /// One sequence: ours, raw minimal, raw same steps.
    async fn iteration(&mut self, measured: bool) -> anyhow::Result<()> {
        // Ours.
        let t = &self.tenants;
        let (_, d0) = timed(async { Ok(t.add_sandbox(&self.new_sb).await?) }).await?;
        let (_, d1) = timed(async { Ok(t.add_sandbox(&self.second_sb).await?) }).await?;
        let (_, d2) = timed(async { Ok(t.remove_sandbox(&self.second_sb).await?) }).await?;
        let (_, d3) = timed(async { Ok(t.remove_sandbox(&self.new_sb).await?) }).await?;
        let floor = self.raw_minimal(measured).await?;
        let same = self.raw_same_steps(measured).await?;
        if measured {
            for (i, d) in [d0, d1, d2, d3].into_iter().enumerate() {
                self.recs.ours[i].record(d);
                self.recs.floor[i].record(floor[i]);
                self.recs.same[i].record(same[i]);
            }
        }
        Ok(())
    }

    /// The least the four operations need, as raw commands.
    async fn raw_minimal(&mut self, measured: bool) -> anyhow::Result<[Duration; 4]> {
        let ns = self.ns.name.clone();
        let p = &self.min;
        let fw = &self.settings.firewall;
        let br = p.net.bridge.as_str();
        // Element changes only: bhatti's documents also add-then-delete
        // (see `pure_add`); the deletes undo exactly the adds.
        let add_doc = pure_add(&format!(
            "{}{}",
            firewall::add_user(fw, &p.net),
            firewall::add_guest(&p.new_guest)
        ));
        let rm_doc = as_delete(&add_doc);
        let add2 = pure_add(&firewall::add_guest(&p.second));
        let rm2 = as_delete(&add2);
        let r = &mut self.recs;
        let mut d0 = Duration::ZERO;
        let (_, d) = timed(ip(&ns, &["link", "add", "name", br, "type", "bridge"])).await?;
        d0 += r.step("ip link add … type bridge", d, measured);
        let (_, d) = timed(ip(&ns, &["addr", "replace", &p.cidr, "dev", br])).await?;
        d0 += r.step("ip addr replace", d, measured);
        let (_, d) = timed(ip(&ns, &["link", "set", br, "up"])).await?;
        d0 += r.step("ip link set up", d, measured);
        let (_, d) = timed(nft_doc(&ns, &add_doc)).await?;
        d0 += r.step("nft -f add user+guest elements (1 doc)", d, measured);
        let (_, d1) = timed(nft_doc(&ns, &add2)).await?;
        r.step("nft -f add guest elements", d1, measured);
        let (_, d2) = timed(nft_doc(&ns, &rm2)).await?;
        r.step("nft -f delete guest elements", d2, measured);
        // The same two documents with nft entered into the namespace by
        // nsenter instead of `ip netns exec` (which also makes a mount
        // namespace and remounts /sys): what that wrapper costs.
        let net = format!("--net=/run/netns/{ns}");
        let (_, d) = timed(run("nsenter", &[&net, "nft", "-f", "-"], Some(&add2))).await?;
        r.step("nft -f add guest elements via nsenter", d, measured);
        let (_, d) = timed(run("nsenter", &[&net, "nft", "-f", "-"], Some(&rm2))).await?;
        r.step("nft -f delete guest elements via nsenter", d, measured);
        let mut d3 = Duration::ZERO;
        let (_, d) = timed(nft_doc(&ns, &rm_doc)).await?;
        d3 += r.step("nft -f delete guest+user elements (1 doc)", d, measured);
        let (_, d) = timed(ip(&ns, &["link", "del", "dev", br])).await?;
        d3 += r.step("ip link del (bridge)", d, measured);
        Ok([d0, d1, d2, d3])
    }

    /// Every command bhatti issues for the four operations, one by one.
    async fn raw_same_steps(&mut self, measured: bool) -> anyhow::Result<[Duration; 4]> {
        let ns = self.ns.name.clone();
        let p = &self.same;
        let fw = &self.settings.firewall;
        let br = p.net.bridge.as_str();
        let new_ip = p.new_guest.ip.to_string();
        let second_ip = p.second.ip.to_string();
        let docs = [
            firewall::add_user(fw, &p.net),
            firewall::add_guest(&p.new_guest),
            firewall::add_guest(&p.second),
            firewall::remove_guest(&p.second),
            firewall::remove_guest(&p.new_guest),
            firewall::remove_user(fw, &p.net),
        ];
        let dns_addr = SocketAddr::from((p.net.gateway, self.settings.dns_port));
        let (names, upstreams) = (self.names.clone(), self.upstreams.clone());
        let r = &mut self.recs;
        let mut d0 = Duration::ZERO;
        // add_sandbox, new user: bridge_up, add_user, DNS, conntrack, add_guest.
        let t = Instant::now();
        let exists = ip(&ns, &["link", "show", "dev", br]).await.is_ok();
        ensure!(!exists, "{br} exists before the raw sequence");
        d0 += r.step("ip link show dev (missing)", t.elapsed(), measured);
        let (_, d) = timed(ip(&ns, &["link", "add", "name", br, "type", "bridge"])).await?;
        d0 += r.step("ip link add … type bridge", d, measured);
        let (_, d) = timed(ip(&ns, &["addr", "replace", &p.cidr, "dev", br])).await?;
        d0 += r.step("ip addr replace", d, measured);
        let (_, d) = timed(ip(&ns, &["link", "set", br, "up"])).await?;
        d0 += r.step("ip link set up", d, measured);
        let (_, d) = timed(nft_doc(&ns, &docs[0])).await?;
        d0 += r.step("nft -f add_user", d, measured);
        let nsn = Some(ns.clone());
        let (dns, d) = timed(async {
            Ok(DnsServer::spawn(dns_addr, nsn, "u-raw".into(), names, upstreams).await?)
        })
        .await?;
        d0 += r.step("DnsServer::spawn (bind UDP+TCP in ns)", d, measured);
        let (_, d) = timed(conntrack_flush(&ns, &new_ip)).await?;
        d0 += r.step("conntrack -D -s, -d (2 runs)", d, measured);
        let (_, d) = timed(nft_doc(&ns, &docs[1])).await?;
        d0 += r.step("nft -f add_guest", d, measured);
        // add_sandbox, second of user 0: conntrack, add_guest.
        let mut d1 = Duration::ZERO;
        let (_, d) = timed(conntrack_flush(&ns, &second_ip)).await?;
        d1 += r.step("conntrack -D -s, -d (2 runs)", d, measured);
        let (_, d) = timed(nft_doc(&ns, &docs[2])).await?;
        d1 += r.step("nft -f add_guest", d, measured);
        // remove_sandbox, not the last: remove_guest, conntrack.
        let mut d2 = Duration::ZERO;
        let (_, d) = timed(nft_doc(&ns, &docs[3])).await?;
        d2 += r.step("nft -f remove_guest", d, measured);
        let (_, d) = timed(conntrack_flush(&ns, &second_ip)).await?;
        d2 += r.step("conntrack -D -s, -d (2 runs)", d, measured);
        // remove_sandbox, last: remove_guest, conntrack, DNS down,
        // remove_user, remove_link (exists? then del).
        let mut d3 = Duration::ZERO;
        let (_, d) = timed(nft_doc(&ns, &docs[4])).await?;
        d3 += r.step("nft -f remove_guest", d, measured);
        let (_, d) = timed(conntrack_flush(&ns, &new_ip)).await?;
        d3 += r.step("conntrack -D -s, -d (2 runs)", d, measured);
        let (_, d) = timed(async {
            dns.shutdown().await;
            Ok(())
        })
        .await?;
        d3 += r.step("DnsServer::shutdown", d, measured);
        let (_, d) = timed(nft_doc(&ns, &docs[5])).await?;
        d3 += r.step("nft -f remove_user", d, measured);
        let (_, d) = timed(ip(&ns, &["link", "show", "dev", br])).await?;
        d3 += r.step("ip link show dev (present)", d, measured);
        let (_, d) = timed(ip(&ns, &["link", "del", "dev", br])).await?;
        d3 += r.step("ip link del (bridge)", d, measured);
        // What any command in the namespace costs at least.
        let (_, d) = timed(run("ip", &["netns", "exec", &ns, "true"], None)).await?;
        r.step("ip netns exec true (spawn floor)", d, measured);
        Ok([d0, d1, d2, d3])
    }
}

/// The `add element` lines of one of bhatti's add documents that change
/// something: those of sets the document does not also delete from
/// (bhatti's add documents are upserts: they first add-then-delete the
/// elements of the other state, e.g. `egress_default_deny` for an
/// allow-by-default guest).
fn pure_add(doc: &str) -> String {
    let set_of = |l: &str| {
        l.split_whitespace()
            .skip(2)
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let deleted: Vec<String> = doc
        .lines()
        .filter(|l| l.starts_with("delete element"))
        .map(set_of)
        .collect();
    doc.lines()
        .filter(|l| l.starts_with("add element") && !deleted.contains(&set_of(l)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The same elements deleted (bhatti's remove documents add each first, so
/// that a missing one is no error).
fn as_delete(add: &str) -> String {
    add.lines()
        .filter_map(|l| l.strip_prefix("add element"))
        .map(|rest| format!("delete element{rest}\n"))
        .collect()
}

/// Bridges named like user bridges in the namespace.
async fn count_bridges(ns: &str) -> anyhow::Result<usize> {
    let out = ip(ns, &["-o", "link", "show", "type", "bridge"]).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with(bhatti::net::tenants::BRIDGE_PREFIX))
        .count())
}

/// Elements of one of bhatti's sets.
async fn count_elements(ns: &str, family: &str, set: &str) -> anyhow::Result<usize> {
    let out = nft(ns, &["-j", "list", "set", family, "bhatti", set]).await?;
    let v: serde_json::Value = serde_json::from_str(&out).context("nft -j output")?;
    let n = v
        .get("nftables")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"))
        .filter_map(|s| s.get("elem"))
        .filter_map(|e| e.as_array())
        .map(Vec::len)
        .sum();
    Ok(n)
}

/// Raw floor of `Tenants::start` for `users` users of one sandbox: in a
/// scratch namespace, `ip -batch` (link add, addr replace, link set up per
/// user) and one `nft -f` of the same full ruleset.
async fn raw_start(users: u32) -> anyhow::Result<StartRow> {
    let ns = NsGuard::new();
    ns.create().await?;
    let s = tenant_settings(&ns.name)?;
    let mut batch = String::new();
    let mut state = FirewallState {
        settings: s.firewall.clone(),
        users: Vec::new(),
        guests: Vec::new(),
    };
    for i in 0..users {
        let (net, g) = entry(&s, &sandbox(&format!("nb-u{i}"), i, 2))?;
        batch.push_str(&format!(
            "link add name {br} type bridge\naddr replace {gw}/24 dev {br}\nlink set {br} up\n",
            br = net.bridge,
            gw = net.gateway
        ));
        state.users.push(net);
        state.guests.push(g);
    }
    state.guests.sort_by(|a, b| a.tap.cmp(&b.tap));
    let doc = firewall::ruleset(&state);
    let batch_file = tempfile::NamedTempFile::new()?;
    std::fs::write(batch_file.path(), &batch)?;
    let path = batch_file.path().to_string_lossy().into_owned();
    let (_, d_ip) = timed(run("ip", &["-n", &ns.name, "-batch", &path], None)).await?;
    let (_, d_nft) = timed(nft_doc(&ns.name, &doc)).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(StartRow {
        users,
        ours_ms: 0.0,
        raw_ip_batch_ms: ms(d_ip),
        raw_nft_ms: ms(d_nft),
        raw_total_ms: ms(d_ip + d_nft),
        ruleset_bytes: doc.len(),
    })
}

pub async fn bench(args: &Args) -> anyhow::Result<ControlReport> {
    let big_n = args.users.max(2);
    let new_index = big_n;
    let mut small = Scale::up(1, new_index).await?;
    let mut big = Scale::up(big_n, new_index).await?;
    let mut start = Vec::new();
    for sc in [&small, &big] {
        let mut row = raw_start(sc.users).await?;
        row.ours_ms = sc.start.as_secs_f64() * 1e3;
        start.push(row);
    }
    let total = args.warmup + args.samples.max(1);
    let t0 = Instant::now();
    for i in 0..total {
        let measured = i >= args.warmup;
        if i % 2 == 0 {
            small.iteration(measured).await?;
            big.iteration(measured).await?;
        } else {
            big.iteration(measured).await?;
            small.iteration(measured).await?;
        }
        if (i + 1) % 20 == 0 || i + 1 == total {
            eprintln!(
                "[net-bench] control {}/{total} ({:.0} s)",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    small.check_baseline().await?;
    big.check_baseline().await?;

    let mut rows = Vec::new();
    for (i, op) in OPS.iter().enumerate() {
        let (os, ob) = (small.recs.ours[i].stats(), big.recs.ours[i].stats());
        let (fs, fb) = (small.recs.floor[i].stats(), big.recs.floor[i].stats());
        let scale_ratio = ratios(&ob, &os);
        rows.push(OpRow {
            op: op.to_string(),
            scale_ratio,
            floor_scale_ratio: ratios(&fb, &fs),
            ours_over_floor_p50: [ratio(os.p50_us, fs.p50_us), ratio(ob.p50_us, fb.p50_us)],
            same_steps_small: small.recs.same[i].stats(),
            same_steps_big: big.recs.same[i].stats(),
            goal: format!("{big_n} users / 1 user ≤ {SCALE_GOAL}× (p50)"),
            met: scale_ratio[0] <= SCALE_GOAL,
            ours_small: os,
            ours_big: ob,
            floor_small: fs,
            floor_big: fb,
        });
    }
    let mut steps = Vec::new();
    for (name, rec) in &small.recs.steps {
        let Some(b) = big.recs.steps.get(name) else {
            continue;
        };
        let (s, b) = (rec.stats(), b.stats());
        steps.push(StepRow {
            step: name.to_string(),
            scale_ratio_p50: ratio(b.p50_us, s.p50_us),
            small: s,
            big: b,
        });
    }
    let notes = vec![
        format!(
            "two namespaces side by side: 1 user and {big_n} users, each user with one \
             sandbox (bridge bhatti-u<i>, its elements, a DNS server on <gateway>:53); every \
             iteration runs the same sequence in both, order flipping; the baseline is \
             restored after each sequence and checked at the end"
        ),
        "ours = Tenants::add_sandbox / remove_sandbox (no VM); raw minimal (the floor) = \
         ip link add + ip addr replace + ip link set up + one nft -f adding the user's and \
         the sandbox's elements for a new user; one nft -f adding (deleting) a sandbox's \
         elements; one nft -f deleting the last sandbox's and the user's elements + ip link \
         del; raw same steps = every command bhatti issues, one at a time (link checks, its \
         own documents, conntrack -D -s/-d, the DNS server)"
            .into(),
        "bhatti's add documents are upserts: they add-then-delete the elements of the other \
         state (egress_default_deny for an allow-by-default guest; isolated_subnets for a \
         non-isolated user) and its remove documents add-then-delete; on this kernel a \
         transaction that deletes any element costs ~10 ms more than one that only adds \
         (compare the `nft -f add_guest` and `nft -f add guest elements` steps)"
            .into(),
        "every command runs inside the namespace (ip -n / ip netns exec), spawned with \
         tokio's process API as bhatti does"
            .into(),
    ];
    Ok(ControlReport {
        users_small: 1,
        users_big: big_n,
        samples: args.samples.max(1),
        rows,
        steps,
        start,
        notes,
    })
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1e3)
}

impl ControlReport {
    pub fn print(&self) {
        let n = self.users_big;
        println!(
            "\nnet-bench control plane: 1 user vs {n} users already up ({} samples each; ms)",
            self.samples
        );
        println!(
            "{:<42} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>11} | {:>15} {:>9} | {:>15} | {:<18} met",
            "operation (ours)",
            "1u p50",
            "p95",
            "p99",
            format!("{n}u p50"),
            "p95",
            "p99",
            "N/1 p50/p99",
            "raw min 1u/Nu",
            "N/1 p50",
            "raw same 1u/Nu",
            "goal"
        );
        for r in &self.rows {
            println!(
                "{:<42} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>11} | {:>15} {:>9} | {:>15} | {:<18} {}",
                r.op,
                ms(r.ours_small.p50_us),
                ms(r.ours_small.p95_us),
                ms(r.ours_small.p99_us),
                ms(r.ours_big.p50_us),
                ms(r.ours_big.p95_us),
                ms(r.ours_big.p99_us),
                format!("{:.2}/{:.2}", r.scale_ratio[0], r.scale_ratio[2]),
                format!("{}/{}", ms(r.floor_small.p50_us), ms(r.floor_big.p50_us)),
                format!("{:.2}", r.floor_scale_ratio[0]),
                format!(
                    "{}/{}",
                    ms(r.same_steps_small.p50_us),
                    ms(r.same_steps_big.p50_us)
                ),
                format!("N/1 ≤ {SCALE_GOAL}×"),
                if r.met { "yes" } else { "NO" }
            );
        }
        println!("\nraw steps (each command timed alone; ms)");
        println!(
            "{:<42} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7}",
            "step",
            "1u p50",
            "p95",
            "p99",
            format!("{n}u p50"),
            "p95",
            "p99",
            "N/1 p50"
        );
        for s in &self.steps {
            println!(
                "{:<42} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7.2}",
                s.step,
                ms(s.small.p50_us),
                ms(s.small.p95_us),
                ms(s.small.p99_us),
                ms(s.big.p50_us),
                ms(s.big.p95_us),
                ms(s.big.p99_us),
                s.scale_ratio_p50
            );
        }
        println!(
            "\nTenants::start (one sample each) beside ip -batch + one nft -f of the same ruleset"
        );
        for s in &self.start {
            println!(
                "{:>5} user(s): Tenants::start {:>9.1} ms | raw {:>8.1} ms (ip -batch {:.1} + nft -f {:.1}; ruleset {} KiB) | ×{:.1}",
                s.users,
                s.ours_ms,
                s.raw_total_ms,
                s.raw_ip_batch_ms,
                s.raw_nft_ms,
                s.ruleset_bytes / 1024,
                ratio(s.ours_ms, s.raw_total_ms)
            );
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }

    pub fn print_markdown(&self) {
        let n = self.users_big;
        println!(
            "\n| Control plane (no VM) | 1 user: p50 / p95 / p99 | {n} users: p50 / p95 / p99 | {n}/1 (p50) | Raw floor, same run (p50, 1 / {n} users) | Goal |"
        );
        println!("|---|---:|---:|---:|---:|---|");
        for r in &self.rows {
            println!(
                "| `{}` | {} / {} / {} | {} / {} / {} | ×{:.2} | {} / {} | ≤ ×{SCALE_GOAL} {} |",
                r.op,
                human(r.ours_small.p50_us),
                human(r.ours_small.p95_us),
                human(r.ours_small.p99_us),
                human(r.ours_big.p50_us),
                human(r.ours_big.p95_us),
                human(r.ours_big.p99_us),
                r.scale_ratio[0],
                human(r.floor_small.p50_us),
                human(r.floor_big.p50_us),
                if r.met { "✓" } else { "✗" }
            );
        }
        println!(
            "\n| Start-up (1 sample each) | `Tenants::start` | Raw floor, same run: `ip -batch` + one `nft -f` | Ratio |"
        );
        println!("|---|---:|---:|---:|");
        for s in &self.start {
            println!(
                "| {} user(s), one sandbox each | {} | {} | ×{:.1} |",
                s.users,
                human(s.ours_ms * 1e3),
                human(s.raw_total_ms * 1e3),
                ratio(s.ours_ms, s.raw_total_ms)
            );
        }
    }
}
