//! `reidentify`: a guest restored from another sandbox's checkpoint (a fork)
//! still holds that sandbox's identity in memory. The host connects with the
//! old token and sends the new one: token (for future connections),
//! hostname, eth0's MAC/address/route, machine id, and fresh entropy.
//!
//! Only the token changes outside a VM (test mode, not PID 1): everything
//! else would reconfigure the host.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use bhatti_protocol::guest_config::NetworkConfig;
use bhatti_protocol::{ErrorBody, ErrorCode, ReidentifyDone, ReidentifyRequest};

use crate::handlers::Reply;
use crate::init;
use crate::server::Agent;

/// The interface a fork's network is moved on.
const IFACE: &str = "eth0";
/// Most entropy bytes accepted.
const MAX_ENTROPY: usize = 4096;
/// `_IOW('R', 0x03, int[2])`: add entropy and credit it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG at once.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub async fn reidentify(agent: &Agent, req: ReidentifyRequest) -> Reply {
    let bad = |m: String| ErrorBody::new(ErrorCode::BadRequest, m);
    if req.token.is_empty() || req.token.len() > 1024 {
        return Err(bad("the token must be 1 to 1024 bytes".into()));
    }
    if !init::valid_hostname(&req.hostname) {
        return Err(bad(format!("invalid hostname {:?}", req.hostname)));
    }
    let mac = req.mac.as_deref().map(parse_mac).transpose().map_err(bad)?;
    let entropy = match req.entropy.as_deref() {
        Some(h) => Some(decode_hex(h).map_err(bad)?),
        None => None,
    };
    if let Some(a) = &req.address {
        let n = NetworkConfig {
            address: a.clone(),
            gateway: req.gateway,
            interface: IFACE.into(),
        };
        if n.cidr().is_none() {
            return Err(bad(format!("invalid address {a:?}")));
        }
    }

    if let Some(env) = &req.env {
        let bad_var = env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'));
        if let Some((k, _)) = bad_var {
            return Err(bad(format!("invalid environment variable {k:?}")));
        }
    }

    agent.set_token(req.token.clone());
    let mut done = ReidentifyDone {
        applied: vec!["token".into()],
        failed: Vec::new(),
    };
    if let Some(env) = req.env.clone() {
        agent.set_sandbox_env(env);
        done.applied.push("env".into());
    }
    if std::process::id() != 1 {
        tracing::info!(sandbox = %req.sandbox_id, "reidentified (token only: not PID 1)");
        return Ok(serde_json::to_value(done).unwrap_or_default());
    }

    let mut step = |name: &str, r: io::Result<()>| match r {
        Ok(()) => done.applied.push(name.into()),
        Err(e) => {
            tracing::warn!("reidentify {name}: {e}");
            done.failed.push(format!("{name}: {e}"));
        }
    };
    init::apply_hostname(&req.hostname, init::Durable::No);
    step("hostname", Ok(()));
    if mac.is_some() || req.address.is_some() {
        step("network", renumber(mac, &req));
    }
    // Entropy first: a restored guest's RNG state is its snapshot's, the
    // same in every fork, until the host's bytes are mixed in and the
    // CRNG reseeded; the machine id mixes those bytes in as well.
    if let Some(bytes) = &entropy {
        step("entropy", add_entropy(bytes));
    }
    step("machine_id", new_machine_id_from(entropy.as_deref()));
    tracing::info!(sandbox = %req.sandbox_id, hostname = %req.hostname, "reidentified");
    Ok(serde_json::to_value(done).unwrap_or_default())
}

/// New MAC (live, else with the link down), new address/netmask, up,
/// default route.
fn renumber(mac: Option<[u8; 6]>, req: &ReidentifyRequest) -> io::Result<()> {
    let sock = init::inet_socket()?;
    if let Some(mac) = mac {
        // virtio-net changes its MAC while up; a driver that cannot says
        // EBUSY, and then the link goes down for it.
        if set_mac(&sock, mac).is_err() {
            set_link_up(&sock, false)?;
            set_mac(&sock, mac)?;
        }
    }
    match &req.address {
        Some(address) => init::configure_ipv4(
            &sock,
            &NetworkConfig {
                address: address.clone(),
                gateway: req.gateway,
                interface: IFACE.into(),
            },
        ),
        None => set_link_up(&sock, true),
    }
}

fn set_mac(sock: &OwnedFd, mac: [u8; 6]) -> io::Result<()> {
    let mut r = init::ifreq(IFACE)?;
    // SAFETY: ifru_hwaddr is the sockaddr member of the ifreq union,
    // plain data; we fill its family and first six data bytes.
    unsafe {
        r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *d = s as libc::c_char;
        }
    }
    init::ioctl(sock, libc::SIOCSIFHWADDR, &mut r)
}

fn set_link_up(sock: &OwnedFd, up: bool) -> io::Result<()> {
    if up {
        return init::link_up(sock, IFACE);
    }
    let mut r = init::ifreq(IFACE)?;
    init::ioctl(sock, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    r.ifr_ifru.ifru_flags = flags & !(libc::IFF_UP as libc::c_short);
    init::ioctl(sock, libc::SIOCSIFFLAGS, &mut r)
}

/// Gives the guest a machine id when it has none (the rootfs ships an empty
/// `/etc/machine-id`, so each sandbox's first boot makes its own); an
/// existing valid one is kept across reboots.
pub fn ensure_machine_id() -> io::Result<bool> {
    let current = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let id = current.trim();
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(false);
    }
    new_machine_id().map(|()| true)
}

fn new_machine_id() -> io::Result<()> {
    new_machine_id_from(None)
}

/// A new id from the guest's RNG, XORed with host bytes when given (so
/// forks of one snapshot differ even if their RNG state did not).
fn new_machine_id_from(host: Option<&[u8]>) -> io::Result<()> {
    let mut id = crate::server::random_id().into_bytes();
    if let Some(host) = host.filter(|h| !h.is_empty()) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, c) in id.iter_mut().enumerate() {
            let v = (*c as char).to_digit(16).unwrap_or(0) as u8 ^ (host[i % host.len()] & 0xf);
            *c = HEX[usize::from(v)];
        }
    }
    let id = String::from_utf8_lossy(&id).into_owned();
    // Not flushed: a boot makes a new id when the file is not a valid one.
    init::write_atomic_as(
        Path::new("/etc/machine-id"),
        format!("{id}\n").as_bytes(),
        0o444,
        init::Durable::No,
    )
}

/// Writes the bytes into the pool and credits them (`RNDADDENTROPY`).
fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    f.write_all(bytes)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len() + 3);
    let bits = i32::try_from(bytes.len() * 8).unwrap_or(i32::MAX);
    let size = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&size.to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(info.len().next_multiple_of(4), 0);
    ioctl_ptr(&f, RNDADDENTROPY, info.as_mut_ptr())?;
    // Reseed now, not at the CRNG's next scheduled reseed: forks of one
    // snapshot must not read the same bytes meanwhile.
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_ptr(f: &impl AsRawFd, request: libc::c_ulong, arg: *mut u8) -> io::Result<()> {
    // SAFETY: `arg` points to a rand_pool_info laid out as the kernel
    // expects (two ints then buf_size bytes), alive for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("invalid MAC {s:?}"));
    }
    for (d, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!("invalid MAC {s:?}"));
        }
        *d = u8::from_str_radix(p, 16).map_err(|_| format!("invalid MAC {s:?}"))?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("MAC {s:?} is a multicast address"));
    }
    Ok(mac)
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) || s.len() / 2 > MAX_ENTROPY {
        return Err(format!(
            "entropy must be an even number of hex digits, at most {MAX_ENTROPY} bytes"
        ));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| "entropy must be hex".to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_hex() {
        assert_eq!(
            parse_mac("02:aa:00:01:ff:10").unwrap(),
            [2, 0xaa, 0, 1, 0xff, 0x10]
        );
        for bad in [
            "",
            "02:aa:00:01:ff",
            "02:aa:00:01:ff:1g",
            "01:00:00:00:00:00",
            "002:a:00:01:ff:10",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(decode_hex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
        assert!(decode_hex("é1").is_err());
    }
}
