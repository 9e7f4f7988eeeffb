//! What both parts share: the tenant settings, a namespace guard, raw
//! `ip` / `nft` commands inside a namespace, and number formatting.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bhatti::net::egress::{default_blocked_ranges, Cidr};
use bhatti::net::firewall::FirewallSettings;
use bhatti::net::tenants::TenantSettings;
use bhatti_testkit::{delete_netns, netns_name};
use tokio::io::AsyncWriteExt;

/// The daemon's default pool.
pub const POOL: &str = "10.192.0.0/10";

/// `[network]` as the bench runs it: DNS on port 53 of each gateway, no
/// isolation by default, any non-bridge interface as a way out (there is
/// none in the namespace), no upstream resolvers.
pub fn tenant_settings(ns: &str) -> anyhow::Result<TenantSettings> {
    let pool: Cidr = POOL.parse().map_err(|e: String| anyhow!("pool: {e}"))?;
    Ok(TenantSettings {
        pool,
        netns: Some(ns.to_owned()),
        firewall: FirewallSettings {
            pool,
            blocked: default_blocked_ranges(),
            egress_interfaces: vec![],
            host_ports: vec![],
        },
        dns_suffix: "sb".into(),
        dns_port: 53,
        upstreams: vec![],
        isolate_by_default: false,
    })
}

/// A namespace name of the bench's (`bhatti-nb-<8 hex>`); the namespace
/// (made by whoever uses the name) and everything in it is deleted on drop.
pub struct NsGuard {
    pub name: String,
}

impl NsGuard {
    pub fn new() -> NsGuard {
        NsGuard {
            name: netns_name("bhatti-nb"),
        }
    }

    /// Creates the namespace (lo up) now.
    pub async fn create(&self) -> anyhow::Result<()> {
        run("ip", &["netns", "add", &self.name], None).await?;
        run("ip", &["-n", &self.name, "link", "set", "lo", "up"], None).await?;
        Ok(())
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if Path::new("/run/netns").join(&self.name).exists() {
            delete_netns(&self.name);
            if Path::new("/run/netns").join(&self.name).exists() {
                eprintln!("[net-bench] could not delete netns {}", self.name);
            } else {
                eprintln!("[net-bench] deleted netns {}", self.name);
            }
        }
    }
}

/// Runs `program args…` with `stdin` (tokio's process API, as bhatti's own
/// `cmd::run` and firewall do); its stdout, or an error with its stderr.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let line = || format!("{program} {}", args.join(" "));
    let mut child = cmd.spawn().with_context(line)?;
    let input = child.stdin.take();
    let write = async move {
        if let (Some(mut pipe), Some(doc)) = (input, stdin) {
            pipe.write_all(doc.as_bytes()).await?;
            pipe.shutdown().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let (written, out) = tokio::join!(write, child.wait_with_output());
    let out = out.with_context(line)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            line(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    written.with_context(line)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n <ns> args…`
pub async fn ip(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full, None).await
}

/// `ip netns exec <ns> nft -f -` with `doc` on stdin (what bhatti's
/// `Firewall::apply` runs).
pub async fn nft_doc(ns: &str, doc: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "exec", ns, "nft", "-f", "-"], Some(doc)).await?;
    Ok(())
}

/// `ip netns exec <ns> nft args…`
pub async fn nft(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", ns, "nft"];
    full.extend_from_slice(args);
    run("ip", &full, None).await
}

/// `conntrack -D -s ip` and `-d ip` in the namespace, as
/// `Firewall::flush_conntrack` runs them (nothing found is fine).
pub async fn conntrack_flush(ns: &str, ip: &str) -> anyhow::Result<()> {
    for dir in ["-s", "-d"] {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, "conntrack", "-D", dir, ip])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .context("conntrack")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let nothing = out.status.code() == Some(1) && stderr.contains(" 0 flow entries");
        if !out.status.success() && !nothing {
            bail!("conntrack -D {dir} {ip}: {}", stderr.trim());
        }
    }
    Ok(())
}

/// Times one awaited step.
pub async fn timed<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Duration)> {
    let t = Instant::now();
    let v = f.await?;
    Ok((v, t.elapsed()))
}

/// µs → a short human string (µs, ms or s).
pub fn human(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.0} µs")
    }
}
