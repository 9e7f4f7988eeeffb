//! Shared by the firewall tests: sample states, and throwaway network
//! namespaces so that nothing ever touches the host's own ruleset or
//! interfaces.

use std::net::Ipv4Addr;
use std::process::Command;

use serde_json::Value;

use super::{FirewallSettings, FirewallState, GuestEntry, UserNet};
use crate::net::egress::{default_blocked_ranges, Egress, EgressPolicy};

pub(super) fn settings() -> FirewallSettings {
    FirewallSettings {
        pool: "10.192.0.0/10".parse().unwrap(),
        blocked: default_blocked_ranges(),
        egress_interfaces: vec![],
        host_ports: vec![],
    }
}

pub(super) fn user(index: u32, isolated: bool) -> UserNet {
    UserNet {
        index,
        bridge: format!("bh{index}"),
        gateway: Ipv4Addr::new(10, 192, index as u8, 1),
        subnet: format!("10.192.{index}.0/24").parse().unwrap(),
        isolated,
    }
}

/// Guest `n` (2..) of user `u`; `policy` like `deny allow=a,b deny=c`.
pub(super) fn guest(u: u32, n: u8, policy: &str) -> GuestEntry {
    let mut egress = EgressPolicy::default();
    for word in policy.split_whitespace() {
        match word.split_once('=') {
            Some(("allow", rules)) => {
                egress.allow = rules.split(',').map(|r| r.parse().unwrap()).collect()
            }
            Some(("deny", rules)) => {
                egress.deny = rules.split(',').map(|r| r.parse().unwrap()).collect()
            }
            _ => egress.egress = word.parse::<Egress>().unwrap(),
        }
    }
    GuestEntry {
        bridge: format!("bh{u}"),
        tap: format!("bt{u}x{n}"),
        mac: format!("02:00:00:00:{u:02x}:{n:02x}"),
        ip: Ipv4Addr::new(10, 192, u as u8, n),
        egress,
    }
}

/// Two users (the second isolated), three guests: a default-allow one with
/// deny rules with and without ports, a plain one, and a default-deny one
/// with allow rules, nested and overlapping.
pub(super) fn two_users() -> FirewallState {
    FirewallState {
        settings: settings(),
        users: vec![user(0, false), user(1, true)],
        guests: vec![
            guest(
                0,
                2,
                "allow deny=198.51.100.0/24:80-90,198.51.100.7:85-100,203.0.113.0/24",
            ),
            guest(0, 3, "allow"),
            guest(
                1,
                2,
                "deny allow=0.0.0.0/0:443,203.0.113.0/24,203.0.113.128/25,192.0.2.1:53",
            ),
        ],
    }
}

pub(super) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a host tool, panicking with its stderr on failure.
pub(super) fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with a random name, deleted on drop (also when the
/// test panics), with everything it holds.
pub(super) struct TestNs {
    pub name: String,
}

impl TestNs {
    pub fn new(tag: &str) -> TestNs {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let name = format!("bhatti-fw-{tag}-{:08x}", random as u32);
        sh("ip", &["netns", "add", &name]);
        let ns = TestNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// `ip netns exec <ns> args…`
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// `nft -j args…` inside the namespace, parsed.
    pub fn nft_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["nft", "-j"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.exec(&full)).unwrap()
    }

    /// The elements of one set, as `a . b/24 . 80-90` strings, sorted.
    pub fn elements(&self, family: &str, set: &str) -> Vec<String> {
        let v = self.nft_json(&["list", "set", family, "bhatti", set]);
        let mut out: Vec<String> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("set"))
            .flat_map(|s| s["elem"].as_array().cloned().unwrap_or_default())
            .map(|e| json_elem(&e))
            .collect();
        out.sort();
        out
    }

    /// The rules of the tables called bhatti (as nft's JSON), and the
    /// names of all tables, sorted.
    pub fn rules_and_tables(&self) -> (Vec<String>, Vec<String>) {
        let v = self.nft_json(&["list", "ruleset"]);
        let objs = v["nftables"].as_array().unwrap();
        let mut tables: Vec<String> = objs
            .iter()
            .filter_map(|o| o.get("table"))
            .map(|t| {
                format!(
                    "{} {}",
                    t["family"].as_str().unwrap(),
                    t["name"].as_str().unwrap()
                )
            })
            .collect();
        tables.sort();
        let rules = objs
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| r["table"] == "bhatti")
            .map(|r| format!("{} {} {}", r["family"], r["chain"], r["expr"]))
            .collect();
        (rules, tables)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An element of `nft -j` output in the tests' text form: names and
/// addresses bare, prefixes `a/n`, ranges `lo-hi`, concatenations ` . `.
fn json_elem(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(c) = o.get("concat").and_then(Value::as_array) {
                c.iter().map(json_elem).collect::<Vec<_>>().join(" . ")
            } else if let Some(p) = o.get("prefix") {
                format!("{}/{}", json_elem(&p["addr"]), p["len"])
            } else if let Some(r) = o.get("range").and_then(Value::as_array) {
                format!("{}-{}", json_elem(&r[0]), json_elem(&r[1]))
            } else if let Some(e) = o.get("elem") {
                json_elem(&e["val"])
            } else {
                v.to_string()
            }
        }
        other => other.to_string(),
    }
}
