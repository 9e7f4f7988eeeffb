//! The sandbox firewall: nftables rules that keep guests apart from each
//! other, from the host and from private networks, and apply each
//! sandbox's egress policy.
//!
//! bhatti owns two tables, `inet bhatti` and `bridge bhatti`, and never
//! touches any other. [`ruleset`] renders both as one nft document that
//! replaces them in a single transaction (start-up, recovery); after that
//! users and sandboxes come and go with the incremental documents
//! ([`add_user`], [`add_guest`], …), which only add and delete set
//! elements. The rules themselves are a constant handful whatever the
//! number of users and sandboxes: every per-user and per-sandbox fact is a
//! set element, so a change costs one small transaction and lookups stay
//! hash or interval-tree lookups.
//!
//! Chain layout (all base chains `policy accept`, acting only on bhatti's
//! bridges and TAPs so the host's other traffic is untouched):
//!
//! - `bridge bhatti prerouting`: frames from a registered guest TAP must
//!   carry the guest's own MAC; ARP must name the guest's own MAC and IPv4
//!   as sender; IPv4 must come from the guest's own MAC and address;
//!   everything else (IPv6, other ethertypes, VLAN tags) is dropped.
//! - `bridge bhatti forward`: frames between ports of an isolated user's
//!   bridge are dropped (keyed by the user's subnet, see below).
//! - `inet bhatti input`: from a bhatti bridge the host accepts replies
//!   and DNS (plus `host_ports`) to that bridge's own gateway address;
//!   nothing else.
//! - `inet bhatti forward`: replies pass; bridge to bridge only within one
//!   non-isolated user; nothing unsolicited into a bridge; from a bridge
//!   outwards: blocked ranges, then the sandbox's deny rules, allow rules
//!   and default verdict (keyed by the guest's source address).
//! - `inet bhatti postrouting`: masquerade the pool leaving by an egress
//!   interface.
//!
//! The kernel this runs on may lack `CONFIG_NFT_BRIDGE_META`, so the bridge
//! table cannot ask which bridge a frame is on (`meta ibrname`); it keys on
//! TAP names, and isolation keys on the source address (guaranteed by the
//! anti-spoofing chain to lie in the user's subnet).
//!
//! Ordering contract for callers: [`add_guest`] before the guest's VM
//! starts (a TAP not yet registered is not filtered by the bridge table),
//! [`remove_guest`] after it stopped; remove a user's guests before
//! [`remove_user`]. After narrowing a guest's policy or isolating a user,
//! [`Firewall::flush_conntrack`] its addresses so established flows obey
//! the new rules.

mod apply;
mod intervals;
mod render;

#[cfg(test)]
mod netns_tests;
#[cfg(test)]
mod packet_tests;
#[cfg(test)]
mod render_tests;
#[cfg(test)]
mod test_support;

use std::net::Ipv4Addr;

use super::egress::{Cidr, EgressPolicy};

pub use apply::{Firewall, FirewallError};
pub use render::{
    add_guest, add_user, remove_guest, remove_user, replace_guest, ruleset, set_user_isolated,
};

/// Host-wide firewall settings; changing them means re-applying [`ruleset`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSettings {
    /// The pool all user subnets are carved from (e.g. 10.192.0.0/10): the NAT source.
    pub pool: Cidr,
    /// Destinations guests may never reach (default_blocked_ranges()); an allow rule cannot override them.
    pub blocked: Vec<Cidr>,
    /// Interface(s) guest traffic may leave by and is masqueraded on. Empty: any interface that is not a bhatti bridge.
    pub egress_interfaces: Vec<String>,
    /// TCP ports on a user's gateway address guests may reach besides DNS (udp+tcp 53). Usually empty.
    pub host_ports: Vec<u16>,
}

/// One user's network: a bridge whose address is the guests' gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNet {
    pub index: u32,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub subnet: Cidr,
    /// sandboxes of this user cannot reach each other
    pub isolated: bool,
}

/// One sandbox's network identity and egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestEntry {
    pub bridge: String,
    pub tap: String,
    /// `02:ab:cd:ef:01:23`, lower-case.
    pub mac: String,
    pub ip: Ipv4Addr,
    pub egress: EgressPolicy,
}

/// Everything [`ruleset`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallState {
    pub settings: FirewallSettings,
    pub users: Vec<UserNet>,
    pub guests: Vec<GuestEntry>,
}

/// Checks a name before it goes into an nft document: 1 to 15 bytes of
/// letters, digits and `-_.@+`. Stricter than the kernel, which also
/// allows quotes and other bytes nft cannot quote.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "interface name {name:?} must be 1 to 15 letters, digits or -_.@+"
        ))
    }
}

/// Checks a MAC address: six pairs of hex digits separated by `:`.
pub fn check_mac(mac: &str) -> Result<(), String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
    }
}

impl FirewallSettings {
    /// Interface names the documents can carry. Invalid names are also
    /// rendered so that nft refuses the document (see `render`), but
    /// checking at configuration time gives the better message.
    pub fn validate(&self) -> Result<(), String> {
        self.egress_interfaces
            .iter()
            .try_for_each(|i| check_ifname(i))
    }
}

impl UserNet {
    pub fn validate(&self) -> Result<(), String> {
        check_ifname(&self.bridge)
    }
}

impl GuestEntry {
    pub fn validate(&self) -> Result<(), String> {
        check_ifname(&self.bridge)?;
        check_ifname(&self.tap)?;
        check_mac(&self.mac)
    }
}

impl FirewallState {
    pub fn validate(&self) -> Result<(), String> {
        self.settings.validate()?;
        self.users.iter().try_for_each(UserNet::validate)?;
        self.guests.iter().try_for_each(GuestEntry::validate)
    }
}
