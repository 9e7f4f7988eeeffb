//! Per-user networks for the daemon.
//!
//! Every user owns one /24 of the pool (`[network] pool`, by default
//! 10.192.0.0/10: 16 384 of them), picked by the subnet index stored with
//! the user. While the user has at least one sandbox, their network is up:
//!
//! - a bridge `bhatti-u<index>` with the gateway `.1` (created with their
//!   first sandbox, removed with their last);
//! - set elements in bhatti's nftables tables (isolation, anti-spoofing,
//!   egress policy, NAT: see [`super::firewall`]);
//! - a DNS server on the gateway answering their sandboxes' names.
//!
//! [`Tenants`] is the one place that changes any of it. Its lock is held
//! only for the few milliseconds of `ip`/`nft` calls, never for a boot.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use super::dns::{DnsNames, DnsServer, Upstreams};
use super::egress::{Cidr, EgressPolicy};
use super::firewall::{self, Firewall, FirewallSettings, FirewallState, GuestEntry, UserNet};
use super::{mac_for, tap_name, NetAttach, NetError, NetSettings, Network, Result};

/// Bridges of user networks are named this plus the subnet index; bhatti
/// removes links with this prefix that no user network accounts for.
pub const BRIDGE_PREFIX: &str = "bhatti-u";
/// TAPs are `bt` + 13 hex digits (see [`tap_name`]).
const TAP_PREFIX: &str = "bt";

/// What the daemon's `[network]` config says.
#[derive(Debug, Clone)]
pub struct TenantSettings {
    /// Split into /24s, one per user.
    pub pool: Cidr,
    /// Namespace of bridges, TAPs, rules and DNS listeners.
    pub netns: Option<String>,
    pub firewall: FirewallSettings,
    /// Sibling names resolve as `<name>` and `<name>.<suffix>`.
    pub dns_suffix: String,
    /// Port of the DNS servers on the gateways (53; tests may differ).
    pub dns_port: u16,
    pub upstreams: Vec<SocketAddr>,
    /// A user's sandboxes cannot reach each other unless the user says
    /// otherwise.
    pub isolate_by_default: bool,
}

/// A user as the network sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantUser {
    pub user_id: String,
    pub index: u32,
    /// `None`: [`TenantSettings::isolate_by_default`].
    pub isolated: Option<bool>,
}

/// A sandbox as the network sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSandbox {
    pub id: String,
    pub name: String,
    pub user: TenantUser,
    /// Host number in the user's /24.
    pub ip_host: u8,
    pub egress: EgressPolicy,
}

/// One user network, for `admin status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserNetStatus {
    pub user_id: String,
    pub index: u32,
    pub bridge: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub isolated: bool,
    pub sandboxes: usize,
    pub dns: Option<SocketAddr>,
}

struct UserState {
    net: UserNet,
    guests: BTreeMap<String, GuestEntry>,
    dns: Option<DnsServer>,
    /// Kept up with no sandbox on it (the user has pre-booted snapshots).
    kept: bool,
}

/// The per-user networks of one daemon.
pub struct Tenants {
    settings: TenantSettings,
    links: Network,
    firewall: Firewall,
    names: Arc<DnsNames>,
    upstreams: Arc<Upstreams>,
    users: tokio::sync::Mutex<HashMap<String, UserState>>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants")
            .field("pool", &self.settings.pool)
            .field("netns", &self.settings.netns)
            .finish_non_exhaustive()
    }
}

/// The bridge, /24 and gateway of subnet index `index` of `pool`; `None`
/// when the pool has no such /24.
pub fn user_network(pool: Cidr, index: u32) -> Option<(String, Cidr, Ipv4Addr)> {
    if pool.prefix > 24 || u64::from(index) >= 1u64 << (24 - u32::from(pool.prefix)) {
        return None;
    }
    let base = u32::from(pool.addr) + (index << 8);
    Some((
        format!("{BRIDGE_PREFIX}{index}"),
        Cidr::new(Ipv4Addr::from(base), 24).ok()?,
        Ipv4Addr::from(base + 1),
    ))
}

impl TenantSettings {
    /// How many user networks the pool holds.
    pub fn capacity(&self) -> u32 {
        if self.pool.prefix > 24 {
            0
        } else {
            1u32 << (24 - u32::from(self.pool.prefix))
        }
    }

    /// The network of subnet index `index` (no I/O).
    pub fn user_net(&self, index: u32, isolated: bool) -> Result<UserNet> {
        if index >= self.capacity() {
            return Err(NetError::Exhausted(format!(
                "{} (user network {index} of {})",
                self.pool,
                self.capacity()
            )));
        }
        let (bridge, subnet, gateway) = user_network(self.pool, index)
            .ok_or_else(|| NetError::Config(format!("no /24 {index} in {}", self.pool)))?;
        Ok(UserNet {
            index,
            bridge,
            gateway,
            subnet,
            isolated,
        })
    }

    fn isolated(&self, u: &TenantUser) -> bool {
        u.isolated.unwrap_or(self.isolate_by_default)
    }

    fn guest(&self, sb: &TenantSandbox) -> Result<(UserNet, GuestEntry)> {
        let net = self.user_net(sb.user.index, self.isolated(&sb.user))?;
        if !(2..=254).contains(&sb.ip_host) {
            return Err(NetError::Config(format!(
                "host number {} is not a guest address",
                sb.ip_host
            )));
        }
        let ip = Ipv4Addr::from(u32::from(net.subnet.addr) + u32::from(sb.ip_host));
        let guest = GuestEntry {
            bridge: net.bridge.clone(),
            tap: tap_name(&sb.id),
            mac: mac_for(&sb.id),
            ip,
            egress: sb.egress.clone(),
        };
        Ok((net, guest))
    }

    /// Where the engine puts the sandbox's NIC.
    pub fn attach(&self, sb: &TenantSandbox) -> Result<NetAttach> {
        let (net, guest) = self.guest(sb)?;
        Ok(NetAttach {
            bridge: net.bridge,
            ip: guest.ip,
            gateway: net.gateway,
            prefix: 24,
            dns: vec![IpAddr::V4(net.gateway)],
            dns_search: vec![self.dns_suffix.clone()],
        })
    }
}

impl Tenants {
    /// Brings up the networks of users that have sandboxes, replaces
    /// bhatti's nftables tables with the full ruleset (one transaction:
    /// running guests' connections and NAT mappings carry on), and starts
    /// their DNS servers. Call before the engine re-adopts VMs, so their
    /// bridges exist.
    pub async fn start(settings: TenantSettings, sandboxes: Vec<TenantSandbox>) -> Result<Tenants> {
        if settings.capacity() == 0 {
            return Err(NetError::Config(format!(
                "network pool {} is smaller than a /24",
                settings.pool
            )));
        }
        let links = Network::setup(NetSettings {
            netns: settings.netns.clone(),
            ..NetSettings::default()
        })
        .await?;
        let firewall = Firewall::new(settings.netns.clone());
        firewall
            .enable_forwarding()
            .await
            .map_err(|e| NetError::Config(e.to_string()))?;
        let names = Arc::new(DnsNames::new(&settings.dns_suffix));
        let upstreams = Arc::new(Upstreams::new(
            settings.upstreams.clone(),
            settings.netns.clone(),
        ));
        let mut users: HashMap<String, UserState> = HashMap::new();
        for sb in &sandboxes {
            let (net, guest) = match settings.guest(sb) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(id = %sb.id, "no network for this sandbox: {e}");
                    continue;
                }
            };
            names.set(&sb.user.user_id, &sb.name, guest.ip);
            users
                .entry(sb.user.user_id.clone())
                .or_insert_with(|| UserState {
                    net,
                    guests: BTreeMap::new(),
                    dns: None,
                    kept: false,
                })
                .guests
                .insert(sb.id.clone(), guest);
        }
        let t = Tenants {
            settings,
            links,
            firewall,
            names,
            upstreams,
            users: tokio::sync::Mutex::new(HashMap::new()),
        };
        let bridges: Vec<(String, String)> = users
            .values()
            .map(|st| (st.net.bridge.clone(), format!("{}/24", st.net.gateway)))
            .collect();
        t.links.ensure_bridges(&bridges).await?;
        t.apply(&firewall::ruleset(&t.state_of(&users))).await?;
        for (user_id, st) in users.iter_mut() {
            st.dns = t.dns_up(user_id, &st.net).await;
        }
        t.remove_orphan_bridges(&users).await;
        tracing::info!(
            users = users.len(),
            sandboxes = sandboxes.len(),
            pool = %t.settings.pool,
            "user networks up"
        );
        *t.users.lock().await = users;
        Ok(t)
    }

    pub fn settings(&self) -> &TenantSettings {
        &self.settings
    }

    /// Where the engine puts the sandbox's NIC.
    pub fn attach(&self, sb: &TenantSandbox) -> Result<NetAttach> {
        self.settings.attach(sb)
    }

    /// The sandbox's address (no I/O).
    pub fn address(&self, sb: &TenantSandbox) -> Result<Ipv4Addr> {
        Ok(self.settings.guest(sb)?.1.ip)
    }

    /// Whether the user's network (bridge, rules, DNS) is up already.
    pub async fn has_user(&self, user_id: &str) -> bool {
        self.users.lock().await.contains_key(user_id)
    }

    /// Keeps a user's network up while they have no sandbox (`keep`), or
    /// lets it go with their last sandbox again. A user with pre-booted
    /// snapshots is kept: an instant create then restores into a network
    /// that is there, instead of waiting for a bridge, rules and DNS.
    pub async fn keep_user(&self, user: &TenantUser, keep: bool) -> Result<()> {
        let net = self
            .settings
            .user_net(user.index, self.settings.isolated(user))?;
        let mut users = self.users.lock().await;
        if keep {
            self.user_up(&mut users, &user.user_id, &net).await?;
            if let Some(st) = users.get_mut(&user.user_id) {
                st.kept = true;
            }
            return Ok(());
        }
        let idle = match users.get_mut(&user.user_id) {
            Some(st) => {
                st.kept = false;
                st.guests.is_empty()
            }
            None => false,
        };
        if idle {
            self.user_down(&mut users, &user.user_id, net).await?;
        }
        Ok(())
    }

    /// Before the engine creates (or forks) the sandbox: the user's network
    /// up (bridge, rules, DNS) and the sandbox's own elements and name.
    /// Stale conntrack entries of its address (a destroyed sandbox's, or a
    /// fork's origin's) are flushed.
    pub async fn add_sandbox(&self, sb: &TenantSandbox) -> Result<()> {
        let (net, guest) = self.settings.guest(sb)?;
        let mut users = self.users.lock().await;
        self.user_up(&mut users, &sb.user.user_id, &net).await?;
        // A user's isolation switch is read with each create (the host's
        // `bhatti user` edits the store, not this daemon).
        if let Some(st) = users.get_mut(&sb.user.user_id) {
            if st.net.isolated != net.isolated {
                self.apply(&firewall::set_user_isolated(&st.net, &net))
                    .await?;
                st.net.isolated = net.isolated;
                for g in st.guests.values() {
                    self.flush_conntrack(g.ip).await;
                }
            }
        }
        self.flush_conntrack(guest.ip).await;
        self.apply(&firewall::add_guest(&guest)).await?;
        self.names.set(&sb.user.user_id, &sb.name, guest.ip);
        if let Some(st) = users.get_mut(&sb.user.user_id) {
            st.guests.insert(sb.id.clone(), guest);
        }
        Ok(())
    }

    /// After the engine destroyed the sandbox (or its create failed): its
    /// elements and name go; with the user's last sandbox, their network
    /// goes too. Idempotent.
    pub async fn remove_sandbox(&self, sb: &TenantSandbox) -> Result<()> {
        let (net, computed) = self.settings.guest(sb)?;
        let mut users = self.users.lock().await;
        // The elements exactly as they were added (the policy may have
        // changed since the row was read).
        let guest = users
            .get(&sb.user.user_id)
            .and_then(|st| st.guests.get(&sb.id))
            .cloned()
            .unwrap_or(computed);
        self.names.remove(&sb.user.user_id, &sb.name);
        self.apply(&firewall::remove_guest(&guest)).await?;
        self.flush_conntrack(guest.ip).await;
        let last = match users.get_mut(&sb.user.user_id) {
            Some(st) => {
                st.guests.remove(&sb.id);
                st.guests.is_empty() && !st.kept
            }
            None => true,
        };
        if last {
            self.user_down(&mut users, &sb.user.user_id, net).await?;
        }
        Ok(())
    }

    /// The user's bridge, rules and DNS server, unless they are up.
    async fn user_up(
        &self,
        users: &mut HashMap<String, UserState>,
        user_id: &str,
        net: &UserNet,
    ) -> Result<()> {
        if users.contains_key(user_id) {
            return Ok(());
        }
        self.bridge_up(net).await?;
        self.apply(&firewall::add_user(&self.settings.firewall, net))
            .await?;
        let dns = self.dns_up(user_id, net).await;
        users.insert(
            user_id.to_owned(),
            UserState {
                net: net.clone(),
                guests: BTreeMap::new(),
                dns,
                kept: false,
            },
        );
        Ok(())
    }

    /// Takes the user's network down (`net` when it was not up).
    async fn user_down(
        &self,
        users: &mut HashMap<String, UserState>,
        user_id: &str,
        net: UserNet,
    ) -> Result<()> {
        let st = users.remove(user_id);
        let net = st.as_ref().map(|s| s.net.clone()).unwrap_or(net);
        if let Some(dns) = st.and_then(|s| s.dns) {
            dns.shutdown().await;
        }
        self.names.remove_user(user_id);
        self.apply(&firewall::remove_user(&self.settings.firewall, &net))
            .await?;
        self.links.remove_link(&net.bridge).await?;
        tracing::info!(bridge = %net.bridge, "user network removed (no sandbox, no pre-booted snapshot)");
        Ok(())
    }

    /// Applies a new egress policy to a sandbox at once; its connections
    /// are re-checked against it (conntrack entries flushed).
    pub async fn set_egress(&self, sb: &TenantSandbox, policy: &EgressPolicy) -> Result<()> {
        let (_, old) = self.settings.guest(sb)?;
        let mut new = old.clone();
        new.egress = policy.clone();
        let mut users = self.users.lock().await;
        let current = users
            .get(&sb.user.user_id)
            .and_then(|st| st.guests.get(&sb.id))
            .cloned()
            .unwrap_or(old);
        self.apply(&firewall::replace_guest(&current, &new)).await?;
        self.flush_conntrack(new.ip).await;
        if let Some(st) = users.get_mut(&sb.user.user_id) {
            st.guests.insert(sb.id.clone(), new);
        }
        Ok(())
    }

    /// A renamed sandbox answers to its new name at once.
    pub fn rename(&self, user_id: &str, old: &str, new: &str) {
        self.names.rename(user_id, old, new);
    }

    /// Turns isolation between one user's sandboxes on or off, live.
    pub async fn set_isolated(&self, user_id: &str, isolated: bool) -> Result<()> {
        let mut users = self.users.lock().await;
        let Some(st) = users.get_mut(user_id) else {
            return Ok(());
        };
        let mut net = st.net.clone();
        net.isolated = isolated;
        self.apply(&firewall::set_user_isolated(&st.net, &net))
            .await?;
        st.net = net;
        // Connections between them are re-checked.
        for g in st.guests.values() {
            self.flush_conntrack(g.ip).await;
        }
        Ok(())
    }

    /// Deletes TAPs that look like bhatti's (`bt` + 13 hex digits) and that
    /// no sandbox owns (`known`): leftovers of a crash mid-destroy.
    pub async fn remove_orphan_taps(&self, known: &std::collections::HashSet<String>) {
        let Ok(links) = self.links.links().await else {
            return;
        };
        for l in links {
            let ours = l.len() == 15
                && l.starts_with(TAP_PREFIX)
                && l[TAP_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit());
            if ours && !known.contains(&l) {
                tracing::warn!(tap = %l, "removing an orphaned TAP");
                if let Err(e) = self.links.remove_link(&l).await {
                    tracing::warn!(tap = %l, "{e}");
                }
            }
        }
    }

    /// Every user network that is up.
    pub async fn status(&self) -> Vec<UserNetStatus> {
        let users = self.users.lock().await;
        let mut v: Vec<UserNetStatus> = users
            .iter()
            .map(|(id, st)| UserNetStatus {
                user_id: id.clone(),
                index: st.net.index,
                bridge: st.net.bridge.clone(),
                subnet: st.net.subnet.to_string(),
                gateway: st.net.gateway,
                isolated: st.net.isolated,
                sandboxes: st.guests.len(),
                dns: st.dns.as_ref().map(|d| d.udp_addr()),
            })
            .collect();
        v.sort_by_key(|s| s.index);
        v
    }

    /// The sibling-name table (tests, the API's inspect).
    pub fn names(&self) -> &DnsNames {
        &self.names
    }

    fn state_of(&self, users: &HashMap<String, UserState>) -> FirewallState {
        let mut u: Vec<UserNet> = users.values().map(|s| s.net.clone()).collect();
        u.sort_by_key(|n| n.index);
        let mut g: Vec<GuestEntry> = users
            .values()
            .flat_map(|s| s.guests.values().cloned())
            .collect();
        g.sort_by(|a, b| a.tap.cmp(&b.tap));
        FirewallState {
            settings: self.settings.firewall.clone(),
            users: u,
            guests: g,
        }
    }

    async fn apply(&self, doc: &str) -> Result<()> {
        self.firewall
            .apply(doc)
            .await
            .map_err(|e| NetError::Config(format!("nftables: {e}")))
    }

    async fn flush_conntrack(&self, ip: Ipv4Addr) {
        if let Err(e) = self.firewall.flush_conntrack(ip).await {
            tracing::warn!(%ip, "flushing conntrack entries: {e}");
        }
    }

    async fn bridge_up(&self, net: &UserNet) -> Result<()> {
        let cidr = format!("{}/24", net.gateway);
        self.links.ensure_bridge(&net.bridge, &cidr).await
    }

    /// The user's DNS server; a failure is logged, not fatal (guests then
    /// resolve nothing, everything else works).
    async fn dns_up(&self, user_id: &str, net: &UserNet) -> Option<DnsServer> {
        let addr = SocketAddr::from((net.gateway, self.settings.dns_port));
        match DnsServer::spawn(
            addr,
            self.settings.netns.clone(),
            user_id.to_owned(),
            self.names.clone(),
            self.upstreams.clone(),
        )
        .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(%addr, bridge = %net.bridge, "sibling DNS did not start: {e}");
                None
            }
        }
    }

    async fn remove_orphan_bridges(&self, users: &HashMap<String, UserState>) {
        let Ok(links) = self.links.links().await else {
            return;
        };
        for l in links {
            let ours = l
                .strip_prefix(BRIDGE_PREFIX)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if ours && !users.values().any(|s| s.net.bridge == l) {
                tracing::warn!(bridge = %l, "removing a user bridge no sandbox uses");
                if let Err(e) = self.links.remove_link(&l).await {
                    tracing::warn!(bridge = %l, "{e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TenantSettings {
        TenantSettings {
            pool: "10.192.0.0/10".parse().unwrap(),
            netns: None,
            firewall: FirewallSettings {
                pool: "10.192.0.0/10".parse().unwrap(),
                blocked: super::super::egress::default_blocked_ranges(),
                egress_interfaces: vec![],
                host_ports: vec![],
            },
            dns_suffix: "sb".into(),
            dns_port: 53,
            upstreams: vec![],
            isolate_by_default: false,
        }
    }

    #[test]
    fn user_networks_are_carved_from_the_pool() {
        let s = settings();
        assert_eq!(s.capacity(), 16384);
        let n = s.user_net(0, false).unwrap();
        assert_eq!(n.bridge, "bhatti-u0");
        assert_eq!(n.gateway, Ipv4Addr::new(10, 192, 0, 1));
        assert_eq!(n.subnet.to_string(), "10.192.0.0/24");
        let last = s.user_net(16383, true).unwrap();
        assert_eq!(last.bridge, "bhatti-u16383");
        assert!(last.bridge.len() <= 15);
        assert_eq!(last.gateway, Ipv4Addr::new(10, 255, 255, 1));
        assert!(last.isolated);
        assert!(s.user_net(16384, false).is_err());
    }

    #[test]
    fn attach_for_a_sandbox() {
        let s = settings();
        let sb = TenantSandbox {
            id: "sb-1".into(),
            name: "web".into(),
            user: TenantUser {
                user_id: "u_a".into(),
                index: 3,
                isolated: None,
            },
            ip_host: 7,
            egress: EgressPolicy::default(),
        };
        let a = s.attach(&sb).unwrap();
        assert_eq!(a.bridge, "bhatti-u3");
        assert_eq!(a.ip, Ipv4Addr::new(10, 192, 3, 7));
        assert_eq!(a.gateway, Ipv4Addr::new(10, 192, 3, 1));
        assert_eq!(a.dns, vec![IpAddr::from([10, 192, 3, 1])]);
        assert_eq!(a.dns_search, vec!["sb".to_string()]);
        let bad = TenantSandbox {
            ip_host: 1,
            ..sb.clone()
        };
        assert!(s.attach(&bad).is_err());
        let small = TenantSettings {
            pool: "10.0.0.0/25".parse().unwrap(),
            ..settings()
        };
        assert_eq!(small.capacity(), 0);
    }
}
