//! Guest networking.
//!
//! - [`Network`] (this file): TAPs and bridges for the engine, optionally
//!   inside a named network namespace. A sandbox's NIC goes on the bridge
//!   its [`NetAttach`] names (the daemon: its owner's bridge), or on the
//!   engine's default bridge when it has none (engine-only use, tests).
//! - [`tenants`]: per-user networks for the daemon: a bridge and /24 per
//!   user, the firewall, sibling DNS.
//! - [`firewall`]: the nftables ruleset (sets keep the rule count constant).
//! - [`dns`]: the resolver on each user's gateway.
//! - [`egress`]: per-sandbox egress policies.
//! - [`netns`]: sockets inside a namespace.
//!
//! Links are managed with iproute2 (`ip -n <ns> …`) rather than rtnetlink
//! plus `TUNSETIFF` ioctls: the kernel refuses TAP creation over netlink,
//! and creating a TAP inside another namespace with ioctls means `setns` on
//! a dedicated thread; `ip -n <ns> tuntap add` does exactly that for us,
//! with clear error messages, and each call costs a few milliseconds next
//! to a VM boot. Setup is idempotent: the bridge is created only when
//! missing and left in place when the engine stops.

mod addr;
pub mod dns;
pub mod egress;
pub mod firewall;
pub mod netns;
pub mod tenants;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cmd::{run, CmdError};
pub use addr::{fnv1a64, mac_for, tap_name, IpPool, Subnet};

use std::net::IpAddr;

/// Network settings of the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSettings {
    /// Bridge name, e.g. `bhatti0`.
    pub bridge: String,
    /// The bridge's address with prefix, e.g. `10.77.0.1/24`; guests get
    /// the other addresses of the subnet.
    pub subnet: String,
    /// Network namespace (a name under `/run/netns`) holding the bridge,
    /// the TAPs and the VMM processes; created when missing.
    #[serde(default)]
    pub netns: Option<String>,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings {
            bridge: "bhatti0".into(),
            subnet: "10.77.0.1/24".into(),
            netns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network settings: {0}")]
    Config(String),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("no free guest address left in {0}")]
    Exhausted(String),
}

pub type Result<T> = std::result::Result<T, NetError>;

/// A sandbox's network identity, persisted with the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// The bridge its TAP joins; empty: the engine's default bridge (and
    /// then the address is from the engine's own pool).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bridge: String,
    /// Name servers and search domains for the guest; empty: the engine's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
}

impl GuestNet {
    /// The kernel's static `ip=` argument for this guest.
    pub fn kernel_ip_arg(&self) -> String {
        Subnet {
            gateway: self.gateway,
            prefix: self.prefix,
        }
        .kernel_ip_arg(self.ip)
    }

    /// On the engine's default bridge, with an address from its pool.
    pub fn on_default_bridge(&self) -> bool {
        self.bridge.is_empty()
    }
}

/// Where a caller puts a new sandbox's NIC: a bridge that exists and an
/// address the caller allocated (the daemon: the owner's network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAttach {
    pub bridge: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    #[serde(default)]
    pub dns_search: Vec<String>,
}

/// The bridge, the address pool and TAP management.
#[derive(Debug)]
pub struct Network {
    settings: NetSettings,
    subnet: Subnet,
    pool: Mutex<IpPool>,
}

impl Network {
    /// Validates the settings and makes sure the namespace and the bridge
    /// (with its address, up) exist.
    pub async fn setup(settings: NetSettings) -> Result<Network> {
        let subnet = Subnet::parse(&settings.subnet).map_err(NetError::Config)?;
        if settings.bridge.is_empty() || settings.bridge.len() > 15 {
            return Err(NetError::Config(format!(
                "bridge name {:?} must be 1 to 15 characters",
                settings.bridge
            )));
        }
        let net = Network {
            pool: Mutex::new(IpPool::new(subnet)),
            settings,
            subnet,
        };
        if let Some(ns) = &net.settings.netns {
            if !Path::new("/run/netns").join(ns).exists() {
                run("ip", ["netns", "add", ns]).await?;
                net.ip(&["link", "set", "lo", "up"]).await?;
            }
        }
        tracing::info!(netns = ?net.settings.netns, "guest network ready");
        Ok(net)
    }

    pub fn settings(&self) -> &NetSettings {
        &self.settings
    }

    pub fn netns(&self) -> Option<&str> {
        self.settings.netns.as_deref()
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The network identity of a new sandbox: on the caller's bridge with
    /// the caller's address, else from the engine's default pool.
    pub fn identity(&self, id: &str, attach: Option<&NetAttach>) -> Result<GuestNet> {
        let Some(a) = attach else {
            return self.allocate(id);
        };
        if a.bridge.is_empty() || a.bridge.len() > 15 {
            return Err(NetError::Config(format!(
                "invalid bridge name {:?}",
                a.bridge
            )));
        }
        Ok(GuestNet {
            tap: tap_name(id),
            mac: mac_for(id),
            ip: a.ip,
            gateway: a.gateway,
            prefix: a.prefix,
            bridge: a.bridge.clone(),
            dns: a.dns.clone(),
            dns_search: a.dns_search.clone(),
        })
    }

    /// Picks the network identity of a new sandbox on the default bridge.
    pub fn allocate(&self, id: &str) -> Result<GuestNet> {
        let ip = self
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .allocate()
            .ok_or_else(|| NetError::Exhausted(self.subnet.cidr()))?;
        Ok(GuestNet {
            tap: tap_name(id),
            mac: mac_for(id),
            ip,
            gateway: self.subnet.gateway,
            prefix: self.subnet.prefix,
            bridge: String::new(),
            dns: Vec::new(),
            dns_search: Vec::new(),
        })
    }

    /// Marks a recovered sandbox's address as taken; false if it does not
    /// fit this subnet or is already taken. Addresses on other bridges
    /// belong to their caller's pools: always true.
    pub fn reserve(&self, net: &GuestNet) -> bool {
        !net.on_default_bridge()
            || self
                .pool
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reserve(net.ip)
    }

    pub fn release(&self, net: &GuestNet) {
        if net.on_default_bridge() {
            self.pool
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .release(net.ip)
        }
    }

    /// Makes sure the TAP exists, is attached to its bridge and is up. The
    /// default bridge is created on first use; another bridge must exist.
    pub async fn ensure_tap(&self, net: &GuestNet) -> Result<()> {
        let bridge = if net.on_default_bridge() {
            self.ensure_default_bridge().await?;
            self.settings.bridge.as_str()
        } else {
            net.bridge.as_str()
        };
        let tap = net.tap.as_str();
        // The usual case, a new TAP, in one process (creates and restores
        // pay for each `ip` spawned); anything else step by step.
        if self.new_tap_batch(tap, bridge).await {
            return Ok(());
        }
        if !self.link_exists(tap).await {
            self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])
                .await?;
            self.no_ipv6_addresses(tap).await;
        }
        self.ip(&["link", "set", tap, "master", bridge]).await?;
        self.ip(&["link", "set", tap, "up"]).await?;
        Ok(())
    }

    /// Creates `tap` on `bridge`, up, with one `ip -batch`; false when that
    /// did not work (the TAP exists already, say).
    async fn new_tap_batch(&self, tap: &str, bridge: &str) -> bool {
        let batch = format!(
            "tuntap add dev {tap} mode tap\n\
             link set {tap} addrgenmode none\n\
             link set {tap} master {bridge} up\n"
        );
        let mut cmd = tokio::process::Command::new("ip");
        if let Some(ns) = &self.settings.netns {
            cmd.args(["-n", ns.as_str()]);
        }
        cmd.args(["-batch", "-"]);
        match crate::cmd::output_with_input(cmd, &batch).await {
            Ok(out) if out.status.success() => true,
            Ok(out) => {
                let why = String::from_utf8_lossy(&out.stderr);
                tracing::debug!(
                    tap,
                    "one-batch TAP setup failed ({}); step by step",
                    why.trim()
                );
                false
            }
            Err(e) => {
                tracing::debug!(tap, "one-batch TAP setup failed ({e}); step by step");
                false
            }
        }
    }

    async fn ensure_default_bridge(&self) -> Result<()> {
        let bridge = self.settings.bridge.as_str();
        if self.link_exists(bridge).await {
            return Ok(());
        }
        self.ensure_bridge(bridge, &self.subnet.cidr()).await
    }

    /// Creates a bridge with its address (`a.b.c.d/n`), up; idempotent.
    pub async fn ensure_bridge(&self, bridge: &str, cidr: &str) -> Result<()> {
        if !self.link_exists(bridge).await {
            match self
                .ip(&["link", "add", "name", bridge, "type", "bridge"])
                .await
            {
                Ok(_) => {}
                // Raced with another creator: fine if it is there now.
                Err(_) if self.link_exists(bridge).await => {}
                Err(e) => return Err(e.into()),
            }
            self.no_ipv6_addresses(bridge).await;
        }
        self.ip(&["addr", "replace", cidr, "dev", bridge]).await?;
        self.ip(&["link", "set", bridge, "up"]).await?;
        Ok(())
    }

    /// Guests are IPv4-only: no link-local IPv6 address (and its routes) on
    /// bhatti's links. With a thousand bridges those routes made every
    /// `ip link set up/down` slower (net-bench). Best effort: a kernel
    /// without IPv6 has nothing to turn off.
    async fn no_ipv6_addresses(&self, link: &str) {
        if let Err(e) = self.ip(&["link", "set", link, "addrgenmode", "none"]).await {
            tracing::debug!(link, "addrgenmode none: {e}");
        }
    }

    /// [`Network::ensure_bridge`] for many bridges with one `ip -batch`
    /// (start-up with thousands of users: one process, not four each).
    pub async fn ensure_bridges(&self, bridges: &[(String, String)]) -> Result<()> {
        if bridges.is_empty() {
            return Ok(());
        }
        let existing: std::collections::HashSet<String> = self.links().await?.into_iter().collect();
        let mut batch = String::new();
        for (bridge, cidr) in bridges {
            if !existing.contains(bridge) {
                batch.push_str(&format!(
                    "link add name {bridge} type bridge\nlink set {bridge} addrgenmode none\n"
                ));
            }
            batch.push_str(&format!(
                "addr replace {cidr} dev {bridge}\nlink set {bridge} up\n"
            ));
        }
        let mut cmd = tokio::process::Command::new("ip");
        if let Some(ns) = &self.settings.netns {
            cmd.args(["-n", ns.as_str()]);
        }
        // -force: one failing line (an IPv6-less kernel's addrgenmode) does
        // not stop the rest; each bridge is checked below.
        cmd.args(["-force", "-batch", "-"]);
        let out = crate::cmd::output_with_input(cmd, &batch)
            .await
            .map_err(|e| CmdError {
                command: "ip -batch -".into(),
                message: e.to_string(),
                code: None,
            })?;
        let now: std::collections::HashSet<String> = self.links().await?.into_iter().collect();
        if let Some((missing, _)) = bridges.iter().find(|(b, _)| !now.contains(b)) {
            return Err(CmdError {
                command: "ip -batch -".into(),
                message: format!(
                    "bridge {missing} was not created: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                code: out.status.code(),
            }
            .into());
        }
        Ok(())
    }

    /// Deletes a link (bridge or TAP); a missing one is fine.
    pub async fn remove_link(&self, name: &str) -> Result<()> {
        self.remove_tap(name).await
    }

    /// Names of the namespace's links.
    pub async fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"]).await?;
        // `3: name@peer: <...>` or `3: name: <...>`
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect())
    }

    /// Deletes the TAP; a missing one is fine.
    pub async fn remove_tap(&self, tap: &str) -> Result<()> {
        if !self.link_exists(tap).await {
            return Ok(());
        }
        match self.ip(&["link", "del", "dev", tap]).await {
            Ok(_) => Ok(()),
            Err(_) if !self.link_exists(tap).await => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn link_exists(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).await.is_ok()
    }

    /// `ip [-n <ns>] args…`
    async fn ip(&self, args: &[&str]) -> std::result::Result<String, CmdError> {
        let mut full: Vec<&str> = Vec::with_capacity(args.len() + 2);
        if let Some(ns) = &self.settings.netns {
            full.extend(["-n", ns.as_str()]);
        }
        full.extend_from_slice(args);
        run("ip", full).await
    }
}
