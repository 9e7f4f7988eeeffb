//! Pure address logic: the subnet, guest IP allocation, MAC addresses and
//! TAP names derived from sandbox ids.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// The bridge's address and prefix, e.g. `10.77.0.1/24`: the bridge is the
/// guests' gateway; guests get the other host addresses of the subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/n` (n from 8 to 30).
    pub fn parse(s: &str) -> Result<Subnet, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not address/prefix"))?;
        let gateway: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("prefix /{prefix} is out of range (8..=30)"));
        }
        let subnet = Subnet { gateway, prefix };
        if gateway == subnet.network() || gateway == subnet.broadcast() {
            return Err(format!("{gateway} is not a host address of its subnet"));
        }
        Ok(subnet)
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & u32::from(self.mask()))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !u32::from(self.mask()))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.network())
    }

    /// `10.77.0.1/24`
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.gateway, self.prefix)
    }

    /// The kernel's static configuration argument for a guest:
    /// `ip=<guest>::<gw>:<mask>::eth0:off`.
    pub fn kernel_ip_arg(&self, guest: Ipv4Addr) -> String {
        format!("ip={guest}::{}:{}::eth0:off", self.gateway, self.mask())
    }
}

/// Guest addresses in use, handed out round-robin so a freed address is
/// not reused at once (stale ARP entries in other guests).
#[derive(Debug, Clone)]
pub struct IpPool {
    subnet: Subnet,
    used: BTreeSet<Ipv4Addr>,
    /// The last address handed out; the search starts after it.
    cursor: u32,
}

impl IpPool {
    pub fn new(subnet: Subnet) -> IpPool {
        IpPool {
            subnet,
            used: BTreeSet::new(),
            cursor: u32::from(subnet.network()),
        }
    }

    /// Takes the next free host address (never the network, broadcast or
    /// gateway address).
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let first = u32::from(self.subnet.network()) + 1;
        let last = u32::from(self.subnet.broadcast()) - 1;
        let span = last - first + 1;
        for step in 1..=span {
            let candidate = first + (self.cursor.wrapping_sub(first).wrapping_add(step) % span);
            let ip = Ipv4Addr::from(candidate);
            if ip != self.subnet.gateway && !self.used.contains(&ip) {
                self.used.insert(ip);
                self.cursor = candidate;
                return Some(ip);
            }
        }
        None
    }

    /// Marks an address as in use (recovery); false if it is not a guest
    /// address of this subnet or is already taken.
    pub fn reserve(&mut self, ip: Ipv4Addr) -> bool {
        if !self.subnet.contains(ip)
            || ip == self.subnet.gateway
            || ip == self.subnet.network()
            || ip == self.subnet.broadcast()
        {
            return false;
        }
        self.used.insert(ip)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

/// FNV-1a, 64 bit: a small hash that is stable across builds (unlike std's
/// `DefaultHasher`), for names derived from ids.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The guest MAC for a sandbox: derived from its id, locally administered
/// and unicast (first octet `x2`, `x6`, `xA` or `xE`).
pub fn mac_for(id: &str) -> String {
    let h = fnv1a64(id.as_bytes()).to_be_bytes();
    let first = (h[0] & 0xfc) | 0x02;
    format!(
        "{first:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[1], h[2], h[3], h[4], h[5]
    )
}

/// The host TAP name for a sandbox: `bt` + 13 hex digits of a hash of the
/// id, 15 characters (the kernel's limit).
pub fn tap_name(id: &str) -> String {
    format!("bt{:013x}", fnv1a64(id.as_bytes()) >> 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parsing() {
        let s = Subnet::parse("10.77.0.1/24").unwrap();
        assert_eq!(s.network(), Ipv4Addr::new(10, 77, 0, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 77, 0, 255));
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.cidr(), "10.77.0.1/24");
        assert_eq!(
            s.kernel_ip_arg(Ipv4Addr::new(10, 77, 0, 2)),
            "ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off"
        );
        assert!(Subnet::parse("10.77.0.0/24").is_err());
        assert!(Subnet::parse("10.77.0.255/24").is_err());
        assert!(Subnet::parse("10.77.0.1/31").is_err());
        assert!(Subnet::parse("10.77.0.1").is_err());
        assert!(Subnet::parse("x/24").is_err());
    }

    #[test]
    fn allocation_skips_reserved_and_wraps() {
        let s = Subnet::parse("192.168.5.1/29").unwrap(); // hosts .1-.6
        let mut pool = IpPool::new(s);
        let got: Vec<_> = std::iter::from_fn(|| pool.allocate()).collect();
        assert_eq!(
            got,
            (2..=6)
                .map(|i| Ipv4Addr::new(192, 168, 5, i))
                .collect::<Vec<_>>()
        );
        assert_eq!(pool.allocate(), None);
        pool.release(Ipv4Addr::new(192, 168, 5, 3));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(192, 168, 5, 3)));
        pool.release(Ipv4Addr::new(192, 168, 5, 5));
        pool.release(Ipv4Addr::new(192, 168, 5, 2));
        // Round-robin: after .3 comes .5, then wrap to .2.
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(192, 168, 5, 5)));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(192, 168, 5, 2)));
    }

    #[test]
    fn gateway_in_the_middle() {
        let s = Subnet::parse("10.0.0.3/29").unwrap();
        let mut pool = IpPool::new(s);
        let got: Vec<_> = std::iter::from_fn(|| pool.allocate()).collect();
        assert_eq!(got.len(), 5);
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 0, 3)));
    }

    #[test]
    fn reserve_for_recovery() {
        let s = Subnet::parse("10.77.0.1/24").unwrap();
        let mut pool = IpPool::new(s);
        assert!(pool.reserve(Ipv4Addr::new(10, 77, 0, 2)));
        assert!(!pool.reserve(Ipv4Addr::new(10, 77, 0, 2)));
        assert!(!pool.reserve(Ipv4Addr::new(10, 77, 0, 1)));
        assert!(!pool.reserve(Ipv4Addr::new(10, 78, 0, 2)));
        assert_ne!(pool.allocate(), Some(Ipv4Addr::new(10, 77, 0, 2)));
        assert_eq!(pool.in_use(), 2);
    }

    #[test]
    fn macs_are_stable_local_unicast() {
        let a = mac_for("sb-0123456789ab");
        assert_eq!(a, mac_for("sb-0123456789ab"));
        assert_ne!(a, mac_for("sb-0123456789ac"));
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{a}");
        assert_eq!(a.len(), 17);
        // The FNV constants are part of the on-disk contract: pin one value.
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn tap_names_fit() {
        let t = tap_name("some-long-sandbox-id-that-goes-on");
        assert_eq!(t.len(), 15);
        assert!(t.starts_with("bt"));
        assert_ne!(tap_name("a"), tap_name("b"));
    }
}
