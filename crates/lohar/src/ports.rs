//! The guest's listening TCP ports, read from `/proc/net/tcp` and
//! `/proc/net/tcp6` (what `ss -ltn` shows, without needing `ss`).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use bhatti_protocol::message::{ListeningPort, Ports};

use crate::handlers::{io_error, Reply};

/// `st` of a listening socket in `/proc/net/tcp*`.
const TCP_LISTEN: &str = "0A";

pub async fn list() -> Reply {
    let mut found = BTreeSet::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        match tokio::fs::read_to_string(path).await {
            Ok(text) => found.extend(parse(&text, v6)),
            // A kernel without IPv6 has no tcp6.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && v6 => {}
            Err(e) => return Err(io_error(&format!("read {path}"), &e)),
        }
    }
    let ports = Ports {
        ports: found.into_iter().collect(),
    };
    serde_json::to_value(ports).map_err(|e| {
        bhatti_protocol::ErrorBody::new(bhatti_protocol::ErrorCode::Internal, e.to_string())
    })
}

/// The listening sockets of one `/proc/net/tcp*` table. Lines that do not
/// parse are skipped: the table is the kernel's, but be strict anyway.
fn parse(text: &str, v6: bool) -> Vec<ListeningPort> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            if state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let address = if v6 { v6_addr(addr)? } else { v4_addr(addr)? };
            Some(ListeningPort { port, address })
        })
        .collect()
}

/// The kernel prints the address as the in-memory `u32` in host order.
fn v4_addr(hex: &str) -> Option<String> {
    if hex.len() != 8 {
        return None;
    }
    let n = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(n.to_ne_bytes()).to_string())
}

/// Four host-order `u32`s.
fn v6_addr(hex: &str) -> Option<String> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let word = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Some(Ipv6Addr::from(bytes).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
";

    #[test]
    fn listening_sockets_only() {
        let v4 = parse(TCP, false);
        assert_eq!(
            v4,
            vec![
                ListeningPort {
                    port: 8080,
                    address: "0.0.0.0".into()
                },
                ListeningPort {
                    port: 3000,
                    address: "127.0.0.1".into()
                },
            ]
        );
        let v6 = parse(TCP6, true);
        assert_eq!(v6[0].port, 22);
        assert_eq!(v6[0].address, "::");
        assert_eq!(v6[1].port, 5000);
        assert_eq!(v6[1].address, "::1");
    }

    #[tokio::test]
    async fn reads_this_host() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let v = list().await.unwrap();
        let ports: Ports = serde_json::from_value(v).unwrap();
        assert!(
            ports
                .ports
                .iter()
                .any(|p| p.port == port && p.address == "127.0.0.1"),
            "{ports:?}"
        );
    }
}
