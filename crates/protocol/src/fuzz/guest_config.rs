//! Target `guest-config`: what the guest parses from the host at boot, the
//! config drive's JSON (with base64 file contents and network CIDR) and the
//! kernel command line's agent transport.
//!
//! Asserted: no panic; a config that parses serializes and parses back to
//! the same value.

use serde_json::{json, Value};

use super::gen::{self, Rng};
use super::Target;
use crate::guest_config::{base64_bytes, AgentTransport, GuestConfig};

#[derive(Default)]
pub struct GuestConfigs;

fn base64(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => base64_bytes::encode(&rng.bytes_upto(40)),
        1 => String::from_utf8_lossy(&rng.bytes_upto(12)).into_owned(),
        _ => {
            let mut s = base64_bytes::encode(&rng.bytes_upto(10)).into_bytes();
            gen::mutate(rng, &mut s);
            String::from_utf8_lossy(&s).into_owned()
        }
    }
}

fn config(rng: &mut Rng) -> Value {
    let mut v = json!({
        "sandbox_id": gen::text(rng), "hostname": gen::text(rng), "token": gen::text(rng),
        "env": {gen::text(rng): gen::text(rng)},
        "files": [{"path": gen::path(rng), "mode": rng.edgy_u64() as u32, "content": base64(rng)}],
        "init": gen::text(rng),
        "dns": [*rng.pick(&["1.1.1.1", "::1", "300.0.0.1", ""])],
        "dns_search": [gen::text(rng)],
        "agent": *rng.pick(&[json!({"kind": "vsock", "port": 1024}), json!({"kind": "serial", "name": "x"}),
                             json!({"kind": "vsock", "port": -1}), json!({"kind": "tcp"})]),
        "network": {"address": *rng.pick(&["10.0.0.2/24", "10.0.0.2/99", "x/1", "/", "1.2.3.4/"]),
                    "gateway": *rng.pick(&["10.0.0.1", "bad"])},
        "user": gen::text(rng), "workdir": gen::path(rng),
        "mounts": [{"serial": gen::text(rng), "path": gen::path(rng), "read_only": rng.one_in(2)}],
    });
    if let Value::Object(m) = &mut v {
        for _ in 0..rng.index(3) {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            if rng.one_in(2) {
                m.remove(&k);
            } else {
                m.insert(k, gen::any_value(rng, 0));
            }
        }
    }
    v
}

impl Target for GuestConfigs {
    fn name(&self) -> &'static str {
        "guest-config"
    }

    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        if rng.one_in(8) {
            // A kernel command line argument, tagged by a leading 0 byte.
            let mut s = vec![0u8];
            s.extend(
                rng.pick(&[
                    "vsock:",
                    "serial:",
                    "vsock:1024",
                    "serial:a/b",
                    ":",
                    "tcp:1",
                    "",
                ])
                .as_bytes(),
            );
            s.extend(gen::text(rng).into_bytes());
            return s;
        }
        let mut b = serde_json::to_vec(&config(rng)).unwrap_or_default();
        if rng.one_in(3) {
            gen::mutate(rng, &mut b);
        }
        b
    }

    fn run(&mut self, input: &[u8]) {
        if let Some(rest) = input.strip_prefix(&[0u8]) {
            let _ = AgentTransport::parse_cmdline(&String::from_utf8_lossy(rest));
            return;
        }
        if let Ok(c) = GuestConfig::from_json(input) {
            if let Some(n) = &c.network {
                let _ = n.cidr();
            }
            let again = c.to_json().expect("serialize a parsed config");
            let back = GuestConfig::from_json(&again).expect("reparse a config");
            assert_eq!(back, c, "config round trip");
        }
    }

    fn alloc_limit(&self, input: &[u8]) -> usize {
        4 * input.len() + 64 * 1024
    }
}
