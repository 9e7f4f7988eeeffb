//! A sandbox's egress policy: what its guest may reach beyond its own
//! user's network. Pure types, parsing and validation; the firewall turns
//! them into set elements.
//!
//! Wire form (API, store, CLI):
//!
//! ```json
//! {"egress": "deny", "allow": ["203.0.113.0/24:443", "198.51.100.7"], "deny": []}
//! ```
//!
//! A rule is `CIDR`, `ADDR` (a /32), `CIDR:PORT` or `CIDR:LO-HI`; a rule
//! with a port matches TCP and UDP to that port, one without matches every
//! protocol. `deny` rules win over `allow` rules, and the private and special
//! ranges of `[network] blocked_ranges` are never reachable, whatever the
//! policy says.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// At most this many rules in `allow` plus `deny`.
pub const MAX_RULES: usize = 64;

/// What a guest may reach when no rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Everything outside the blocked ranges, less `deny`.
    #[default]
    Allow,
    /// Nothing, but `allow`.
    Deny,
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Egress::Allow => "allow",
            Egress::Deny => "deny",
        })
    }
}

impl FromStr for Egress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Egress::Allow),
            "deny" => Ok(Egress::Deny),
            other => Err(format!(
                "egress must be \"allow\" or \"deny\", not {other:?}"
            )),
        }
    }
}

/// An IPv4 network, kept normalized (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// `addr/prefix` with the host bits cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, String> {
        if prefix > 32 {
            return Err(format!("prefix /{prefix} is longer than 32"));
        }
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// The first and last address.
    pub fn range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let lo = u32::from(self.addr);
        (Ipv4Addr::from(lo), Ipv4Addr::from(lo | !mask(self.prefix)))
    }

    /// True when the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// `a.b.c.d/n` or a bare address (/32). Host bits must be zero, so a
    /// typo like `10.1.2.3/8` is refused instead of silently widened.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (
                ip,
                p.parse::<u8>()
                    .map_err(|_| format!("{p:?} is not a prefix length"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let c = Cidr::new(addr, prefix)?;
        if c.addr != addr {
            return Err(format!(
                "{s:?} has host bits set (the network is {})",
                Cidr::new(addr, prefix)?
            ));
        }
        Ok(c)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One allow or deny rule: a network and, optionally, a port range (TCP
/// and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressRule {
    pub net: Cidr,
    /// Inclusive; `None` matches every protocol and port.
    pub ports: Option<(u16, u16)>,
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        match self.ports {
            None => Ok(()),
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}"),
            Some((lo, hi)) => write!(f, ":{lo}-{hi}"),
        }
    }
}

impl FromStr for EgressRule {
    type Err = String;
    fn from_str(s: &str) -> Result<EgressRule, String> {
        let s = s.trim();
        let (net, ports) = match s.split_once(':') {
            None => (s, None),
            Some((net, ports)) => {
                let port = |p: &str| {
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
                };
                let (lo, hi) = match ports.split_once('-') {
                    Some((lo, hi)) => (port(lo)?, port(hi)?),
                    None => (port(ports)?, port(ports)?),
                };
                if lo > hi {
                    return Err(format!("port range {lo}-{hi} is backwards"));
                }
                (net, Some((lo, hi)))
            }
        };
        Ok(EgressRule {
            net: net.parse().map_err(|e| format!("rule {s:?}: {e}"))?,
            ports,
        })
    }
}

impl Serialize for EgressRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A sandbox's egress policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    #[serde(default)]
    pub egress: Egress,
    #[serde(default)]
    pub allow: Vec<EgressRule>,
    #[serde(default)]
    pub deny: Vec<EgressRule>,
}

impl EgressPolicy {
    pub fn deny_all() -> EgressPolicy {
        EgressPolicy {
            egress: Egress::Deny,
            ..Default::default()
        }
    }

    /// Rule count within [`MAX_RULES`]; duplicates removed, rules sorted
    /// (so equal policies compare and render equal).
    pub fn normalized(mut self) -> Result<EgressPolicy, String> {
        for v in [&mut self.allow, &mut self.deny] {
            v.sort();
            v.dedup();
        }
        if self.allow.len() + self.deny.len() > MAX_RULES {
            return Err(format!(
                "at most {MAX_RULES} allow and deny rules together, not {}",
                self.allow.len() + self.deny.len()
            ));
        }
        Ok(self)
    }

    /// One line for tables: `allow`, `deny +2 allowed`, `allow -1 denied`.
    pub fn summary(&self) -> String {
        let mut s = self.egress.to_string();
        if !self.allow.is_empty() {
            s.push_str(&format!(
                " allow {}",
                self.allow
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        if !self.deny.is_empty() {
            s.push_str(&format!(
                " deny {}",
                self.deny
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        s
    }
}

/// The ranges guests may never reach by default: RFC 1918, CGNAT,
/// link-local (with the cloud metadata address), loopback, "this network",
/// multicast and the reserved/broadcast block.
pub fn default_blocked_ranges() -> Vec<Cidr> {
    [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ]
    .iter()
    .map(|s| s.parse().expect("valid built-in range"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "10.192.0.0/10".parse().unwrap();
        assert_eq!(c.to_string(), "10.192.0.0/10");
        assert!(c.contains(Ipv4Addr::new(10, 255, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 128, 0, 0)));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().range().1,
            Ipv4Addr::BROADCAST
        );
        for bad in [
            "10.1.2.3/8",
            "10.0.0.0/33",
            "x/8",
            "10.0.0/8",
            "",
            "10.0.0.0/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(a.overlaps(&"10.5.0.0/16".parse().unwrap()));
        assert!(!a.overlaps(&"11.0.0.0/8".parse().unwrap()));
    }

    #[test]
    fn rule_parsing_round_trips() {
        for (s, ports) in [
            ("203.0.113.0/24", None),
            ("203.0.113.7/32:443", Some((443, 443))),
            ("0.0.0.0/0:8000-8100", Some((8000, 8100))),
        ] {
            let r: EgressRule = s.parse().unwrap();
            assert_eq!(r.ports, ports);
            assert_eq!(r.to_string(), s);
        }
        assert_eq!(
            "198.51.100.7:53".parse::<EgressRule>().unwrap().to_string(),
            "198.51.100.7/32:53"
        );
        for bad in [
            "1.2.3.4:0",
            "1.2.3.4:70000",
            "1.2.3.4:9-8",
            "1.2.3.4:",
            "host:80",
        ] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_json() {
        let p: EgressPolicy = serde_json::from_str(
            r#"{"egress":"deny","allow":["203.0.113.0/24:443","203.0.113.0/24:443"]}"#,
        )
        .unwrap();
        let p = p.normalized().unwrap();
        assert_eq!(p.egress, Egress::Deny);
        assert_eq!(p.allow.len(), 1);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"egress":"deny","allow":["203.0.113.0/24:443"],"deny":[]}"#
        );
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"egress":"maybe"}"#).is_err());
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"allow":["10.1.1.1/8"]}"#).is_err());
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"other":1}"#).is_err());
        let many = EgressPolicy {
            allow: (0..=MAX_RULES as u32)
                .map(|i| EgressRule {
                    net: Cidr::new(Ipv4Addr::from(i << 8), 24).unwrap(),
                    ports: None,
                })
                .collect(),
            ..Default::default()
        };
        assert!(many.normalized().is_err());
    }

    #[test]
    fn blocked_ranges_cover_metadata_and_private() {
        let b = default_blocked_ranges();
        for ip in [
            [169, 254, 169, 254],
            [10, 192, 0, 1],
            [172, 31, 0, 1],
            [192, 168, 1, 1],
            [127, 0, 0, 1],
            [100, 64, 0, 1],
            [224, 0, 0, 1],
        ] {
            assert!(b.iter().any(|c| c.contains(Ipv4Addr::from(ip))), "{ip:?}");
        }
        assert!(!b.iter().any(|c| c.contains(Ipv4Addr::new(203, 0, 113, 1))));
    }
}
