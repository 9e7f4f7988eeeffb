//! Making interval set elements disjoint: nft refuses a document whose
//! interval elements overlap ("conflicting intervals"), while a user's
//! rules may well nest (`10.0.0.0/8` and `10.1.0.0/16`) or share ports.
//! The output covers exactly the same (address, port) pairs.

use std::collections::{BTreeMap, BTreeSet};

use crate::net::egress::Cidr;

/// The CIDRs not contained in another of the list, sorted. Two CIDRs
/// either nest or are disjoint, so dropping the contained ones leaves a
/// disjoint list with the same union.
pub(super) fn disjoint_cidrs(cidrs: impl IntoIterator<Item = Cidr>) -> Vec<Cidr> {
    // Sorted by address then prefix: a container comes before everything
    // it contains, and contained networks follow it contiguously.
    let sorted: BTreeSet<Cidr> = cidrs.into_iter().collect();
    let mut out: Vec<Cidr> = Vec::with_capacity(sorted.len());
    for c in sorted {
        match out.last() {
            Some(last) if last.contains(c.addr) => {}
            _ => out.push(c),
        }
    }
    out
}

/// An inclusive port range; a reversed range is read as the same range.
fn ordered((a, b): (u16, u16)) -> (u16, u16) {
    (a.min(b), a.max(b))
}

/// Disjoint (network, port range) boxes covering the same pairs as
/// `rules`, sorted by network then ports.
///
/// The port axis is cut at every rule boundary into elementary ranges;
/// within one elementary range the covering networks are made disjoint
/// with [`disjoint_cidrs`], then each network's consecutive elementary
/// ranges are merged back. Two output boxes either have disjoint port
/// ranges or, where their ranges meet, networks that were made disjoint
/// there.
pub(super) fn disjoint_port_rules(rules: &[(Cidr, (u16, u16))]) -> Vec<(Cidr, (u16, u16))> {
    let rules: Vec<(Cidr, (u16, u16))> = rules.iter().map(|&(n, p)| (n, ordered(p))).collect();
    // Boundaries as u32: one past 65535 must be representable.
    let cuts: BTreeSet<u32> = rules
        .iter()
        .flat_map(|&(_, (lo, hi))| [u32::from(lo), u32::from(hi) + 1])
        .collect();
    let cuts: Vec<u32> = cuts.into_iter().collect();

    let mut open: BTreeMap<Cidr, (u32, u32)> = BTreeMap::new();
    let mut out: Vec<(Cidr, (u32, u32))> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let here = disjoint_cidrs(rules.iter().filter_map(|&(net, (rlo, rhi))| {
            (u32::from(rlo) <= lo && hi <= u32::from(rhi)).then_some(net)
        }));
        // Runs of networks absent from this range end at the previous one.
        let ended: Vec<Cidr> = open.keys().filter(|n| !here.contains(n)).copied().collect();
        for net in ended {
            if let Some(run) = open.remove(&net) {
                out.push((net, run));
            }
        }
        for net in here {
            open.entry(net)
                .and_modify(|run| run.1 = hi)
                .or_insert((lo, hi));
        }
    }
    out.extend(open);
    out.sort();
    out.into_iter()
        // Every bound came from a u16 (or is one less than a bound that
        // did), so the conversion cannot fail; filter_map keeps it total.
        .filter_map(|(net, (lo, hi))| {
            Some((net, (u16::try_from(lo).ok()?, u16::try_from(hi).ok()?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_cidrs_keep_the_outer_one() {
        let got = disjoint_cidrs([
            c("10.1.0.0/16"),
            c("192.168.0.0/16"),
            c("10.0.0.0/8"),
            c("10.1.2.3/32"),
            c("11.0.0.0/8"),
            c("10.0.0.0/8"),
        ]);
        assert_eq!(
            got,
            vec![c("10.0.0.0/8"), c("11.0.0.0/8"), c("192.168.0.0/16")]
        );
        assert_eq!(
            disjoint_cidrs([c("0.0.0.0/0"), c("1.2.3.4/32")]),
            vec![c("0.0.0.0/0")]
        );
        assert!(disjoint_cidrs([]).is_empty());
    }

    #[test]
    fn port_rules_are_split_and_merged() {
        let net = c("198.51.100.0/24");
        let host = c("198.51.100.7/32");
        // Partial overlap of a host inside a network: the host keeps only
        // the ports the network does not cover.
        assert_eq!(
            disjoint_port_rules(&[(net, (80, 90)), (host, (85, 100))]),
            vec![(net, (80, 90)), (host, (91, 100))]
        );
        // Same network, overlapping and adjacent ranges merge.
        assert_eq!(
            disjoint_port_rules(&[(net, (80, 90)), (net, (85, 100)), (net, (101, 101))]),
            vec![(net, (80, 101))]
        );
        // A gap is kept.
        assert_eq!(
            disjoint_port_rules(&[(net, (80, 80)), (net, (443, 443))]),
            vec![(net, (80, 80)), (net, (443, 443))]
        );
        // The full range, reversed input and the top port.
        assert_eq!(
            disjoint_port_rules(&[(host, (65535, 1)), (net, (65535, 65535))]),
            vec![(net, (65535, 65535)), (host, (1, 65534))]
        );
        assert!(disjoint_port_rules(&[]).is_empty());
    }

    /// Random rule lists: the output covers the same pairs and no pair is
    /// covered twice.
    #[test]
    fn port_rules_cover_the_same_pairs_disjointly() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u32| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 33) as u32) % n
        };
        for _ in 0..300 {
            let rules: Vec<(Cidr, (u16, u16))> = (0..1 + next(6))
                .map(|_| {
                    let prefix = [0u8, 8, 16, 24, 30, 32][next(6) as usize];
                    let addr = Ipv4Addr::new(10, next(2) as u8, 0, next(8) as u8);
                    let lo = next(40) as u16;
                    (Cidr::new(addr, prefix).unwrap(), (lo, lo + next(20) as u16))
                })
                .collect();
            let got = disjoint_port_rules(&rules);
            let covers = |set: &[(Cidr, (u16, u16))], ip: Ipv4Addr, port: u16| {
                set.iter()
                    .filter(|(n, (lo, hi))| n.contains(ip) && (*lo..=*hi).contains(&port))
                    .count()
            };
            for a in 0..2u8 {
                for d in 0..10u8 {
                    let ip = Ipv4Addr::new(10, a, 0, d);
                    for port in 0..62u16 {
                        let want = covers(&rules, ip, port) > 0;
                        let n = covers(&got, ip, port);
                        assert!(
                            n <= 1,
                            "{rules:?} -> {got:?}: {ip}:{port} covered {n} times"
                        );
                        assert_eq!(n == 1, want, "{rules:?} -> {got:?}: {ip}:{port}");
                    }
                }
            }
        }
    }
}
