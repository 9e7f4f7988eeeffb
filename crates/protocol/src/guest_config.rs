//! The config drive: what the host tells a guest at boot.
//!
//! The host writes one [`GuestConfig`] as JSON to `/config.json` at the root
//! of a small read-only ext4 image labelled [`CONFIG_LABEL`], attached as the
//! VM's second virtio disk (`/dev/vdb` unless the kernel command line says
//! `bhatti.config=<dev>`). lohar (PID 1) mounts it read-only, applies it and
//! unmounts it again, so nothing in the guest can read the token later.
//!
//! File contents are always base64 (standard alphabet, with padding) in the
//! JSON, so binary files and text survive alike; in Rust they are plain
//! bytes. Unknown fields are rejected: a host newer than its guest image
//! should fail loudly, not half-apply a config.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Filesystem label of the config drive.
pub const CONFIG_LABEL: &str = "bhatti-config";
/// Path of the config inside the drive.
pub const CONFIG_FILE: &str = "config.json";
/// The guest's default vsock port for the agent.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;
/// The default virtio-serial port name for the agent.
pub const DEFAULT_SERIAL_NAME: &str = "bhatti.agent";
/// The id of the session the init script runs as (its output is that
/// session's output, like any other session's).
pub const INIT_SESSION: &str = "init";

/// Everything the host hands a guest at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    pub sandbox_id: String,
    pub hostname: String,
    /// The per-sandbox secret every agent connection must present.
    pub token: String,
    /// Sandbox-wide environment for every command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files placed before the agent starts (secrets, dotfiles, …). The
    /// host gives them on a sandbox's first boot only.
    #[serde(default)]
    pub files: Vec<GuestFile>,
    /// A script run as the user with `/bin/sh -c`, as the session
    /// [`INIT_SESSION`] (kept after it exits). The host gives it on a
    /// sandbox's first boot only.
    #[serde(default)]
    pub init: Option<String>,
    /// Name servers for `/etc/resolv.conf`.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// Search domains for `/etc/resolv.conf` (e.g. `sb`, so sibling
    /// sandboxes resolve by bare name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
    /// Where the agent listens. The kernel command line's `bhatti.agent=`
    /// overrides it.
    #[serde(default)]
    pub agent: AgentTransport,
    /// Static network setup for eth0, when the kernel's `ip=` argument did
    /// not configure it.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// The user commands run as, as an image config says it (`name`,
    /// `uid`, `name:group`, `uid:gid`), resolved from the guest's
    /// `/etc/passwd` and `/etc/group`; absent: `lohar` (1000:1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Working directory of commands that name none; absent: the user's
    /// home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Volumes to mount at boot, before files are placed and init starts.
    /// Left out when empty, so a guest older than volumes still accepts
    /// the config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<GuestMount>,
}

/// One volume: an ext4 block device the guest finds by its serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMount {
    /// The virtio-blk serial (`/sys/block/vdX/serial`).
    pub serial: String,
    /// Absolute mount point; created if missing (owned by the user).
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// One file to place in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFile {
    /// Absolute path. Files under the user's home or `/workspace` are owned
    /// by the user; anywhere else by root.
    pub path: String,
    /// Permission bits; default 0644.
    #[serde(default)]
    pub mode: Option<u32>,
    /// The file's bytes, base64 in the JSON.
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
}

/// The byte stream the agent serves on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentTransport {
    /// AF_VSOCK, listening on any CID (Firecracker, QEMU vhost-vsock).
    Vsock { port: u32 },
    /// A named virtio-serial port (QEMU `virtserialport,name=…`).
    Serial { name: String },
}

impl Default for AgentTransport {
    fn default() -> Self {
        AgentTransport::Vsock {
            port: DEFAULT_VSOCK_PORT,
        }
    }
}

impl AgentTransport {
    /// Parses the kernel command line form: `vsock:<port>` or
    /// `serial:<name>`.
    pub fn parse_cmdline(s: &str) -> Option<AgentTransport> {
        let (kind, arg) = s.split_once(':')?;
        match kind {
            "vsock" => arg.parse().ok().map(|port| AgentTransport::Vsock { port }),
            "serial" if !arg.is_empty() && !arg.contains('/') => Some(AgentTransport::Serial {
                name: arg.to_owned(),
            }),
            _ => None,
        }
    }
}

/// A static IPv4 setup for one interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Address with prefix length, e.g. `10.0.3.2/24`.
    pub address: String,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Default `eth0`.
    #[serde(default = "default_interface")]
    pub interface: String,
}

fn default_interface() -> String {
    "eth0".into()
}

impl NetworkConfig {
    /// The address and prefix length of `address`.
    pub fn cidr(&self) -> Option<(std::net::Ipv4Addr, u8)> {
        let (ip, prefix) = self.address.split_once('/')?;
        let prefix: u8 = prefix.parse().ok()?;
        (prefix <= 32).then_some(())?;
        Some((ip.parse().ok()?, prefix))
    }
}

impl GuestConfig {
    pub fn from_json(bytes: &[u8]) -> Result<GuestConfig, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec_pretty(self)
    }
}

/// Standard base64 with padding, small enough not to need a dependency.
pub mod base64_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        let s = s.as_bytes();
        if !s.len().is_multiple_of(4) {
            return Err("base64 length is not a multiple of 4".into());
        }
        let mut out = Vec::with_capacity(s.len() / 4 * 3);
        for (ci, quad) in s.chunks(4).enumerate() {
            let last = ci + 1 == s.len() / 4;
            let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return Err("misplaced base64 padding".into());
            }
            let mut n = 0u32;
            for &c in &quad[..4 - pad] {
                let v = match c {
                    b'A'..=b'Z' => c - b'A',
                    b'a'..=b'z' => c - b'a' + 26,
                    b'0'..=b'9' => c - b'0' + 52,
                    b'+' => 62,
                    b'/' => 63,
                    _ => return Err(format!("invalid base64 character {:?}", c as char)),
                };
                n = (n << 6) | u32::from(v);
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Ok(out)
    }

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for len in 0..40usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base64_bytes::encode(&data);
            assert_eq!(base64_bytes::decode(&enc).unwrap(), data, "len {len}");
        }
        assert_eq!(base64_bytes::encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_bytes::decode("aGk=").unwrap(), b"hi");
        assert!(base64_bytes::decode("aGk").is_err());
        assert!(base64_bytes::decode("a=Gk").is_err());
        assert!(base64_bytes::decode("aG!k").is_err());
    }

    #[test]
    fn wire_shape() {
        let json = r#"{
            "sandbox_id": "sb-1", "hostname": "box", "token": "t",
            "env": {"A": "1"},
            "files": [{"path": "/home/lohar/x", "mode": 384, "content": "aGVsbG8="}],
            "init": "echo hi", "dns": ["1.1.1.1"],
            "agent": {"kind": "serial", "name": "bhatti.agent"},
            "network": {"address": "10.0.0.2/24", "gateway": "10.0.0.1"}
        }"#;
        let c = GuestConfig::from_json(json.as_bytes()).unwrap();
        assert_eq!(c.files[0].content, b"hello");
        assert_eq!(
            c.agent,
            AgentTransport::Serial {
                name: "bhatti.agent".into()
            }
        );
        let net = c.network.as_ref().unwrap();
        assert_eq!(net.interface, "eth0");
        assert_eq!(net.cidr(), Some(("10.0.0.2".parse().unwrap(), 24)));
        let back = GuestConfig::from_json(&c.to_json().unwrap()).unwrap();
        assert_eq!(back, c);
        // No volumes: no `mounts` key, so older guests accept the config.
        assert!(!String::from_utf8(c.to_json().unwrap())
            .unwrap()
            .contains("mounts"));
        let with: GuestConfig = GuestConfig::from_json(
            br#"{"sandbox_id":"a","hostname":"b","token":"c",
                "mounts":[{"serial":"vol0","path":"/data","read_only":true}]}"#,
        )
        .unwrap();
        assert_eq!(
            with.mounts,
            [GuestMount {
                serial: "vol0".into(),
                path: "/data".into(),
                read_only: true
            }]
        );

        let minimal: GuestConfig =
            GuestConfig::from_json(br#"{"sandbox_id":"a","hostname":"b","token":"c"}"#).unwrap();
        assert_eq!(minimal.agent, AgentTransport::default());
        assert!(
            GuestConfig::from_json(br#"{"sandbox_id":"a","hostname":"b","token":"c","x":1}"#)
                .is_err()
        );
    }

    #[test]
    fn cmdline_transport() {
        assert_eq!(
            AgentTransport::parse_cmdline("vsock:52"),
            Some(AgentTransport::Vsock { port: 52 })
        );
        assert_eq!(
            AgentTransport::parse_cmdline("serial:bhatti.agent"),
            Some(AgentTransport::Serial {
                name: "bhatti.agent".into()
            })
        );
        assert_eq!(AgentTransport::parse_cmdline("vsock:x"), None);
        assert_eq!(AgentTransport::parse_cmdline("serial:../x"), None);
        assert_eq!(AgentTransport::parse_cmdline("tcp:1"), None);
    }
}
