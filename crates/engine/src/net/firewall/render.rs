//! Rendering the nft documents: the full ruleset and the element-only
//! incremental changes. Pure string generation; `apply` runs them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

use super::intervals::{disjoint_cidrs, disjoint_port_rules};
use super::{check_ifname, check_mac, FirewallSettings, FirewallState, GuestEntry, UserNet};
use crate::net::egress::{Cidr, Egress, EgressRule};

/// Both tables are called this; the family tells them apart.
pub(super) const TABLE: &str = "bhatti";

/// One part of a set element. Ordered structurally (addresses
/// numerically), which keeps the documents deterministic and readable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Atom {
    Name(String),
    Ip(Ipv4Addr),
    Net(Cidr),
    Ports(u16, u16),
    Mac(String),
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A name nft cannot safely carry becomes the empty string,
            // which nft refuses ("Empty string is not allowed"): the whole
            // transaction fails instead of filtering the wrong interface
            // or letting a quote end the string early.
            Atom::Name(n) if check_ifname(n).is_ok() => write!(f, "\"{n}\""),
            Atom::Name(_) => f.write_str("\"\""),
            Atom::Ip(ip) => write!(f, "{ip}"),
            Atom::Net(c) => write!(f, "{c}"),
            Atom::Ports(lo, hi) if lo == hi => write!(f, "{lo}"),
            Atom::Ports(lo, hi) => write!(f, "{lo}-{hi}"),
            // Likewise refused ("Invalid LL address").
            Atom::Mac(m) if check_mac(m).is_ok() => f.write_str(&m.to_ascii_lowercase()),
            Atom::Mac(_) => f.write_str("\"\""),
        }
    }
}

/// A set element: its atoms joined by ` . ` (a concatenation).
type Elem = Vec<Atom>;

fn render_elem(e: &[Atom]) -> String {
    e.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" . ")
}

/// bhatti's named sets, in document order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Set {
    // inet bhatti
    Bridges,
    Gateways,
    SameBridge,
    HostTcpPorts,
    EgressIfaces,
    GuestSources,
    Blocked,
    DenyNets,
    DenyPorts,
    AllowNets,
    AllowPorts,
    EgressDefaultDeny,
    // bridge bhatti
    GuestTaps,
    GuestMacs,
    GuestAddrs,
    IsolatedSubnets,
}

const INET_SETS: [Set; 12] = [
    Set::Bridges,
    Set::Gateways,
    Set::SameBridge,
    Set::HostTcpPorts,
    Set::EgressIfaces,
    Set::GuestSources,
    Set::Blocked,
    Set::DenyNets,
    Set::DenyPorts,
    Set::AllowNets,
    Set::AllowPorts,
    Set::EgressDefaultDeny,
];

const BRIDGE_SETS: [Set; 4] = [
    Set::GuestTaps,
    Set::GuestMacs,
    Set::GuestAddrs,
    Set::IsolatedSubnets,
];

impl Set {
    fn family(self) -> &'static str {
        if BRIDGE_SETS.contains(&self) {
            "bridge"
        } else {
            "inet"
        }
    }

    fn name(self) -> &'static str {
        match self {
            Set::Bridges => "bridges",
            Set::Gateways => "gateways",
            Set::SameBridge => "same_bridge",
            Set::HostTcpPorts => "host_tcp_ports",
            Set::EgressIfaces => "egress_ifaces",
            Set::GuestSources => "guest_sources",
            Set::Blocked => "blocked",
            Set::DenyNets => "deny_nets",
            Set::DenyPorts => "deny_ports",
            Set::AllowNets => "allow_nets",
            Set::AllowPorts => "allow_ports",
            Set::EgressDefaultDeny => "egress_default_deny",
            Set::GuestTaps => "guest_taps",
            Set::GuestMacs => "guest_macs",
            Set::GuestAddrs => "guest_addrs",
            Set::IsolatedSubnets => "isolated_subnets",
        }
    }

    /// `type …` and, for interval sets, `flags interval`.
    fn declaration(self) -> &'static str {
        match self {
            Set::Bridges | Set::EgressIfaces | Set::GuestTaps => "type ifname",
            Set::Gateways | Set::GuestSources => "type ifname . ipv4_addr",
            Set::SameBridge => "type ifname . ifname",
            Set::HostTcpPorts => "type inet_service",
            Set::Blocked | Set::IsolatedSubnets => "type ipv4_addr\n\t\tflags interval",
            Set::DenyNets | Set::AllowNets => "type ipv4_addr . ipv4_addr\n\t\tflags interval",
            Set::DenyPorts | Set::AllowPorts => {
                "type ipv4_addr . ipv4_addr . inet_service\n\t\tflags interval"
            }
            Set::EgressDefaultDeny => "type ipv4_addr",
            Set::GuestMacs => "type ifname . ether_addr",
            Set::GuestAddrs => "type ifname . ether_addr . ipv4_addr",
        }
    }

    fn comment(self) -> &'static str {
        match self {
            Set::Bridges => "Every user's bridge: the chains act only on traffic to or from these.",
            Set::Gateways => "bridge . its gateway address: where guests may ask for DNS.",
            Set::SameBridge => {
                "bridge . bridge for users that are not isolated: may forward to itself."
            }
            Set::HostTcpPorts => "TCP ports on the gateway address guests may reach besides DNS.",
            Set::EgressIfaces => "Where guest traffic may leave; empty: any non-bridge interface.",
            Set::GuestSources => "bridge . guest address: the only sources routed from a bridge.",
            Set::Blocked => {
                "Never reachable from guests (with the pool itself), whatever the policy."
            }
            Set::DenyNets => "guest . network it may not reach (any protocol).",
            Set::DenyPorts => "guest . network . TCP/UDP ports it may not reach.",
            Set::AllowNets => "guest . network it may reach (any protocol).",
            Set::AllowPorts => "guest . network . TCP/UDP ports it may reach.",
            Set::EgressDefaultDeny => "Guests whose egress is deny unless allowed.",
            Set::GuestTaps => {
                "Registered guest TAPs: the prerouting chain acts on frames from these."
            }
            Set::GuestMacs => "tap . the guest's MAC.",
            Set::GuestAddrs => "tap . the guest's MAC . the guest's address.",
            Set::IsolatedSubnets => "Subnets of isolated users: no frames between their guests.",
        }
    }
}

/// Elements for some sets, sorted and without duplicates.
type Elements = BTreeMap<Set, BTreeSet<Elem>>;

fn push(map: &mut Elements, set: Set, e: Elem) {
    map.entry(set).or_default().insert(e);
}

/// The elements a user has in its current state.
fn user_elements(u: &UserNet) -> Elements {
    let mut m = Elements::new();
    let br = Atom::Name(u.bridge.clone());
    push(&mut m, Set::Bridges, vec![br.clone()]);
    push(&mut m, Set::Gateways, vec![br.clone(), Atom::Ip(u.gateway)]);
    if u.isolated {
        push(&mut m, Set::IsolatedSubnets, vec![Atom::Net(u.subnet)]);
    } else {
        push(&mut m, Set::SameBridge, vec![br.clone(), br]);
    }
    m
}

/// Every element a user may own in either isolation state.
fn user_owned(u: &UserNet) -> Elements {
    let mut m = user_elements(u);
    let br = Atom::Name(u.bridge.clone());
    push(&mut m, Set::IsolatedSubnets, vec![Atom::Net(u.subnet)]);
    push(&mut m, Set::SameBridge, vec![br.clone(), br]);
    m
}

/// A guest's egress rules as elements of a `… . ipv4_addr` and a
/// `… . inet_service` interval set, disjoint within the guest. Elements of
/// different guests never overlap: the source address leads the key.
fn rule_elements(m: &mut Elements, ip: Ipv4Addr, rules: &[EgressRule], nets: Set, ports: Set) {
    let src = Atom::Ip(ip);
    for net in disjoint_cidrs(rules.iter().filter(|r| r.ports.is_none()).map(|r| r.net)) {
        push(m, nets, vec![src.clone(), Atom::Net(net)]);
    }
    let with_ports: Vec<(Cidr, (u16, u16))> = rules
        .iter()
        .filter_map(|r| r.ports.map(|p| (r.net, p)))
        .collect();
    for (net, (lo, hi)) in disjoint_port_rules(&with_ports) {
        push(
            m,
            ports,
            vec![src.clone(), Atom::Net(net), Atom::Ports(lo, hi)],
        );
    }
}

/// The elements a guest has with its current policy.
fn guest_elements(g: &GuestEntry) -> Elements {
    let mut m = Elements::new();
    let tap = Atom::Name(g.tap.clone());
    let mac = Atom::Mac(g.mac.clone());
    push(&mut m, Set::GuestTaps, vec![tap.clone()]);
    push(&mut m, Set::GuestMacs, vec![tap.clone(), mac.clone()]);
    push(&mut m, Set::GuestAddrs, vec![tap, mac, Atom::Ip(g.ip)]);
    push(
        &mut m,
        Set::GuestSources,
        vec![Atom::Name(g.bridge.clone()), Atom::Ip(g.ip)],
    );
    rule_elements(&mut m, g.ip, &g.egress.deny, Set::DenyNets, Set::DenyPorts);
    rule_elements(
        &mut m,
        g.ip,
        &g.egress.allow,
        Set::AllowNets,
        Set::AllowPorts,
    );
    if g.egress.egress == Egress::Deny {
        push(&mut m, Set::EgressDefaultDeny, vec![Atom::Ip(g.ip)]);
    }
    m
}

/// Every element a guest may own, whatever its default verdict.
fn guest_owned(g: &GuestEntry) -> Elements {
    let mut m = guest_elements(g);
    push(&mut m, Set::EgressDefaultDeny, vec![Atom::Ip(g.ip)]);
    m
}

/// The whole ruleset as one nft document that atomically replaces bhatti's
/// own tables (declare, delete, define: one transaction whether or not
/// they exist; no other table is touched). Deterministic: elements are
/// sorted, so it can be compared with checked-in documents.
pub fn ruleset(state: &FirewallState) -> String {
    let s = &state.settings;
    let mut m = Elements::new();
    for u in &state.users {
        for (set, elems) in user_elements(u) {
            m.entry(set).or_default().extend(elems);
        }
    }
    for g in &state.guests {
        for (set, elems) in guest_elements(g) {
            m.entry(set).or_default().extend(elems);
        }
    }
    // Interval elements may not overlap; users' subnets should not, but a
    // bad state must not make the whole ruleset unloadable.
    let isolated = m.remove(&Set::IsolatedSubnets).unwrap_or_default();
    let isolated = disjoint_cidrs(isolated.into_iter().flat_map(|e| match e.as_slice() {
        [Atom::Net(c)] => Some(*c),
        _ => None,
    }));
    for c in isolated {
        push(&mut m, Set::IsolatedSubnets, vec![Atom::Net(c)]);
    }
    // The pool is blocked too: guests reach other guests over their own
    // bridge only, never through the uplink.
    for c in disjoint_cidrs(s.blocked.iter().copied().chain([s.pool])) {
        push(&mut m, Set::Blocked, vec![Atom::Net(c)]);
    }
    for i in &s.egress_interfaces {
        push(&mut m, Set::EgressIfaces, vec![Atom::Name(i.clone())]);
    }
    for p in &s.host_ports {
        push(&mut m, Set::HostTcpPorts, vec![Atom::Ports(*p, *p)]);
    }

    let mut doc = String::new();
    doc.push_str(HEADER);
    let _ = writeln!(
        doc,
        "# {} users, {} sandboxes.\n",
        state.users.len(),
        state.guests.len()
    );
    doc.push_str(REPLACE);
    doc.push_str("\ntable inet bhatti {\n");
    for set in INET_SETS {
        render_set(&mut doc, set, m.get(&set));
    }
    doc.push_str(&inet_chains(s));
    doc.push_str("}\n\ntable bridge bhatti {\n");
    for set in BRIDGE_SETS {
        render_set(&mut doc, set, m.get(&set));
    }
    doc.push_str(BRIDGE_CHAINS);
    doc.push_str("}\n");
    doc
}

const HEADER: &str = "\
# Generated by bhatti, the sandbox firewall. Do not edit: bhatti replaces
# its tables `inet bhatti` and `bridge bhatti` as a whole with a document
# like this one (a single transaction), and in between only adds and
# deletes set elements. No other table is touched.
";

/// Declaring a table before deleting it makes the delete succeed whether
/// or not it exists, so the replace is one transaction either way.
const REPLACE: &str = "\
table inet bhatti
delete table inet bhatti
table bridge bhatti
delete table bridge bhatti
";

fn render_set(doc: &mut String, set: Set, elems: Option<&BTreeSet<Elem>>) {
    let _ = write!(
        doc,
        "\t# {}\n\tset {} {{\n\t\t{}\n",
        set.comment(),
        set.name(),
        set.declaration()
    );
    if let Some(elems) = elems.filter(|e| !e.is_empty()) {
        doc.push_str("\t\telements = {\n");
        for e in elems {
            let _ = writeln!(doc, "\t\t\t{},", render_elem(e));
        }
        doc.push_str("\t\t}\n");
    }
    doc.push_str("\t}\n\n");
}

fn inet_chains(s: &FirewallSettings) -> String {
    let pool = s.pool;
    // Without a list of egress interfaces, anything that is not a bhatti
    // bridge is a way out.
    let (egress_only, masquerade) = if s.egress_interfaces.is_empty() {
        (
            String::new(),
            format!("ip saddr {pool} oifname != @bridges masquerade"),
        )
    } else {
        (
            "\t\toifname != @egress_ifaces drop\n".to_string(),
            format!("ip saddr {pool} oifname @egress_ifaces masquerade"),
        )
    };
    format!(
        "\
\t# Guests reach the host only for DNS (and host_tcp_ports) on their own
\t# bridge's gateway address: not other users' gateways, not services on
\t# 0.0.0.0 or the host's other addresses, not over IPv6.
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname != @bridges return
\t\tct state established,related accept
\t\tmeta l4proto {{ tcp, udp }} th dport 53 iifname . ip daddr @gateways accept
\t\ttcp dport @host_tcp_ports iifname . ip daddr @gateways accept
\t\tdrop
\t}}

\t# Routed traffic to or from a bridge: replies pass; between bridges
\t# only a non-isolated user's own bridge; nothing unsolicited into a
\t# bridge; outwards the blocked ranges, then the guest's policy: deny
\t# rules, allow rules, its default verdict.
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname != @bridges oifname != @bridges return
\t\tmeta nfproto ipv6 drop
\t\tct state established,related accept
\t\tct state invalid drop
\t\tiifname @bridges iifname . ip saddr != @guest_sources drop
\t\tiifname . oifname @same_bridge accept
\t\toifname @bridges drop
{egress_only}\
\t\tip daddr @blocked drop
\t\tip saddr . ip daddr @deny_nets drop
\t\tmeta l4proto {{ tcp, udp }} ip saddr . ip daddr . th dport @deny_ports drop
\t\tip saddr . ip daddr @allow_nets accept
\t\tmeta l4proto {{ tcp, udp }} ip saddr . ip daddr . th dport @allow_ports accept
\t\tip saddr @egress_default_deny drop
\t}}

\t# Guests leave with the egress interface's address; never between bridges.
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\t{masquerade}
\t}}
"
    )
}

const BRIDGE_CHAINS: &str = "\
\t# A frame from a guest TAP carries the guest's own MAC, and its own
\t# address as ARP sender or IPv4 source; IPv6 and other ethertypes are
\t# dropped (guests are IPv4-only).
\tchain prerouting {
\t\ttype filter hook prerouting priority filter; policy accept;
\t\tiifname != @guest_taps return
\t\tiifname . ether saddr != @guest_macs drop
\t\tarp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp saddr ether . arp saddr ip @guest_addrs accept
\t\tiifname . ether saddr . ip saddr @guest_addrs accept
\t\tdrop
\t}

\t# Isolated users' guests do not reach each other over their bridge. The
\t# source address says whose guest it is: prerouting has checked it.
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname @guest_taps ip saddr @isolated_subnets drop
\t\tiifname @guest_taps arp saddr ip @isolated_subnets drop
\t}
";

/// `add element` lines for every set of `m`.
fn add_lines(doc: &mut String, m: &Elements) {
    element_lines(doc, "add", m);
}

/// Removing without failing when an element is absent: nft refuses to
/// delete a missing element, so each is added first, in the same
/// transaction. A retry or a replay after a restart is therefore harmless.
fn remove_lines(doc: &mut String, m: &Elements) {
    element_lines(doc, "add", m);
    element_lines(doc, "delete", m);
}

fn element_lines(doc: &mut String, verb: &str, m: &Elements) {
    for (set, elems) in m {
        if elems.is_empty() {
            continue;
        }
        let list: Vec<String> = elems.iter().map(|e| render_elem(e)).collect();
        let _ = writeln!(
            doc,
            "{verb} element {} {TABLE} {} {{ {} }}",
            set.family(),
            set.name(),
            list.join(", ")
        );
    }
}

/// Adds a user (idempotent; also moves a user already present to the
/// isolation state of `u`). `settings` is not needed today: everything
/// per user is in `u`.
pub fn add_user(_settings: &FirewallSettings, u: &UserNet) -> String {
    let mut doc = format!("# bhatti: add user {}\n", u.index);
    // Clear the other isolation state first, so this is an upsert.
    let mut other = user_owned(u);
    for (set, elems) in user_elements(u) {
        if let Some(o) = other.get_mut(&set) {
            o.retain(|e| !elems.contains(e));
        }
    }
    remove_lines(&mut doc, &other);
    add_lines(&mut doc, &user_elements(u));
    doc
}

/// Removes a user's elements (absent ones are fine). Its guests should be
/// removed first.
pub fn remove_user(_settings: &FirewallSettings, u: &UserNet) -> String {
    let mut doc = format!("# bhatti: remove user {}\n", u.index);
    remove_lines(&mut doc, &user_owned(u));
    doc
}

/// Switches a user between isolated and not (or any other change of its
/// network): the old elements go, the new ones come, in one transaction.
pub fn set_user_isolated(u_old: &UserNet, u_new: &UserNet) -> String {
    let mut doc = format!(
        "# bhatti: user {} isolated: {} -> {}\n",
        u_new.index, u_old.isolated, u_new.isolated
    );
    remove_lines(&mut doc, &user_owned(u_old));
    add_lines(&mut doc, &user_elements(u_new));
    doc
}

/// Adds a guest (idempotent for the same entry).
pub fn add_guest(g: &GuestEntry) -> String {
    let mut doc = format!("# bhatti: add guest {}\n", g.ip);
    if g.egress.egress == Egress::Allow {
        // An earlier deny-by-default entry for this address must go.
        let mut m = Elements::new();
        push(&mut m, Set::EgressDefaultDeny, vec![Atom::Ip(g.ip)]);
        remove_lines(&mut doc, &m);
    }
    add_lines(&mut doc, &guest_elements(g));
    doc
}

/// Removes a guest's elements (absent ones are fine). `g` must be the
/// entry as added (its policy names the interval elements to delete).
pub fn remove_guest(g: &GuestEntry) -> String {
    let mut doc = format!("# bhatti: remove guest {}\n", g.ip);
    remove_lines(&mut doc, &guest_owned(g));
    doc
}

/// Replaces a guest's entry, e.g. a live egress policy change: the old
/// elements go and the new ones come in one transaction, so there is no
/// moment without a policy.
pub fn replace_guest(old: &GuestEntry, new: &GuestEntry) -> String {
    let mut doc = format!("# bhatti: replace guest {} -> {}\n", old.ip, new.ip);
    remove_lines(&mut doc, &guest_owned(old));
    add_lines(&mut doc, &guest_elements(new));
    doc
}
