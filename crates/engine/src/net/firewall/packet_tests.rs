//! Packets through the rules, all inside throwaway namespaces: a "host"
//! namespace with two users' bridges and an uplink to an "outside"
//! namespace, and one namespace per guest joined to a bridge by a veth (a
//! stand-in for the TAP). Probes are TCP connects from a thread moved into
//! the guest's namespace: an answer (accepted or refused) means the packet
//! got through, a timeout means it was dropped.

use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use super::test_support::{guest, is_root, settings, user, TestNs};
use super::*;

/// Long enough for a local SYN/SYN-ACK on a loaded machine; a dropped SYN
/// costs this much.
const DROPPED_AFTER: Duration = Duration::from_millis(700);

/// Runs `f` on a thread inside the namespace (sockets it creates belong to
/// that namespace and keep working from any thread).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap();
        setns(&fd, CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// True when a TCP connect from `ns` to `to` is answered.
fn reaches(ns: &TestNs, to: &str) -> bool {
    let to: SocketAddrV4 = to.parse().unwrap();
    in_ns(&ns.name, move || {
        match TcpStream::connect_timeout(&to.into(), DROPPED_AFTER) {
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => true,
            Err(_) => false,
        }
    })
}

/// The guest's namespace, its veth `tap` on `bridge` in the host
/// namespace, its MAC and address, the gateway as default route.
fn add_guest_ns(host: &TestNs, g: &GuestEntry, gateway: Ipv4Addr) -> TestNs {
    let ns = TestNs::new("pg");
    host.ip(&[
        "link", "add", &g.tap, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    host.ip(&["link", "set", &g.tap, "master", &g.bridge, "up"]);
    ns.ip(&["link", "set", "eth0", "address", &g.mac, "up"]);
    ns.ip(&["addr", "add", &format!("{}/24", g.ip), "dev", "eth0"]);
    ns.ip(&["route", "add", "default", "via", &gateway.to_string()]);
    ns
}

#[tokio::test]
async fn packets_obey_the_policy() {
    if !is_root() {
        bhatti_testkit::skip(
            "packets_obey_the_policy",
            "needs root (network namespaces, nftables)",
        );
        return;
    }
    let host = TestNs::new("ph");
    let outside = TestNs::new("po");
    let (ua, ub) = (user(0, false), user(1, false));
    for u in [&ua, &ub] {
        host.ip(&["link", "add", &u.bridge, "type", "bridge"]);
        host.ip(&[
            "addr",
            "add",
            &format!("{}/24", u.gateway),
            "dev",
            &u.bridge,
        ]);
        host.ip(&["link", "set", &u.bridge, "up"]);
    }
    // The uplink; the outside knows the way back to the pool, so only the
    // firewall keeps it out of the guests.
    host.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &outside.name,
    ]);
    host.ip(&["addr", "add", "203.0.113.2/24", "dev", "up0"]);
    host.ip(&["link", "set", "up0", "up"]);
    outside.ip(&["addr", "add", "203.0.113.1/24", "dev", "eth0"]);
    outside.ip(&["link", "set", "eth0", "up"]);
    outside.ip(&["route", "add", "10.192.0.0/10", "via", "203.0.113.2"]);

    let g1 = guest(0, 2, "allow deny=203.0.113.1:81");
    let g2 = guest(0, 3, "allow");
    let g3 = guest(1, 2, "deny allow=203.0.113.1:80");
    let (n1, n2, n3) = (
        add_guest_ns(&host, &g1, ua.gateway),
        add_guest_ns(&host, &g2, ua.gateway),
        add_guest_ns(&host, &g3, ub.gateway),
    );
    let fw = Firewall::new(Some(host.name.clone()));
    fw.enable_forwarding().await.unwrap();

    // Without rules everything is reachable: what fails later is the
    // firewall's doing, not the topology's.
    assert!(reaches(&n1, "10.192.1.2:7"), "g1 -> g3 without rules");
    assert!(
        reaches(&n1, "10.192.1.1:22"),
        "g1 -> other gateway without rules"
    );
    assert!(
        reaches(&outside, "10.192.0.2:7"),
        "outside -> g1 without rules"
    );

    let state = FirewallState {
        settings: settings(),
        users: vec![ua.clone(), ub.clone()],
        guests: vec![g1.clone(), g2.clone(), g3.clone()],
    };
    fw.apply(&ruleset(&state)).await.unwrap();

    let listener = in_ns(&outside.name, || {
        TcpListener::bind("203.0.113.1:80").unwrap()
    });
    // Same user: allowed; other user: dropped both ways.
    assert!(reaches(&n1, "10.192.0.3:7"), "g1 -> g2");
    assert!(!reaches(&n1, "10.192.1.2:7"), "g1 -> g3");
    assert!(!reaches(&n3, "10.192.0.2:7"), "g3 -> g1");
    // The host: DNS on the own gateway only.
    assert!(reaches(&n1, "10.192.0.1:53"), "g1 -> own gateway DNS");
    assert!(!reaches(&n1, "10.192.0.1:22"), "g1 -> own gateway ssh");
    assert!(!reaches(&n1, "10.192.1.1:53"), "g1 -> other user's gateway");
    assert!(
        !reaches(&n1, "203.0.113.2:53"),
        "g1 -> the host's uplink address"
    );
    // Out: masqueraded, policy applied; nothing unsolicited comes in.
    assert!(reaches(&n1, "203.0.113.1:80"), "g1 -> outside");
    let peer = accept_one(&listener);
    assert_eq!(
        peer,
        "203.0.113.2".parse::<Ipv4Addr>().unwrap(),
        "masquerade"
    );
    assert!(!reaches(&n1, "203.0.113.1:81"), "g1 -> denied port");
    assert!(reaches(&n3, "203.0.113.1:80"), "g3 -> allowed port");
    accept_one(&listener);
    assert!(!reaches(&n3, "203.0.113.1:82"), "g3 -> default deny");
    assert!(!reaches(&outside, "10.192.0.2:7"), "outside -> g1");
    fw.flush_conntrack(g1.ip).await.unwrap();

    // A live policy change, then isolation.
    let g1_denied = guest(0, 2, "deny");
    fw.apply(&replace_guest(&g1, &g1_denied)).await.unwrap();
    assert!(!reaches(&n1, "203.0.113.1:80"), "g1 -> outside after deny");
    fw.apply(&replace_guest(&g1_denied, &g1)).await.unwrap();
    fw.apply(&set_user_isolated(&ua, &user(0, true)))
        .await
        .unwrap();
    assert!(!reaches(&n1, "10.192.0.3:7"), "g1 -> g2 isolated");
    assert!(!reaches(&n2, "10.192.0.2:7"), "g2 -> g1 isolated");
    assert!(
        reaches(&n1, "10.192.0.1:53"),
        "g1 -> own gateway DNS isolated"
    );
    fw.apply(&set_user_isolated(&user(0, true), &ua))
        .await
        .unwrap();
    assert!(reaches(&n1, "10.192.0.3:7"), "g1 -> g2 not isolated again");

    // Spoofing: a changed MAC, then a changed address.
    n2.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:99"]);
    assert!(!reaches(&n1, "10.192.0.3:7"), "g1 -> g2 with a foreign MAC");
    n2.ip(&["link", "set", "eth0", "address", &g2.mac]);
    assert!(reaches(&n1, "10.192.0.3:7"), "g1 -> g2 with its MAC back");
    n2.ip(&["addr", "del", "10.192.0.3/24", "dev", "eth0"]);
    n2.ip(&["addr", "add", "10.192.0.50/24", "dev", "eth0"]);
    assert!(
        !reaches(&n1, "10.192.0.50:7"),
        "g1 -> g2 with a foreign address"
    );
    n2.ip(&["route", "add", "default", "via", "10.192.0.1"]);
    assert!(
        !reaches(&n2, "203.0.113.1:80"),
        "g2 out with a foreign address"
    );

    // A guest that is gone is no longer let out.
    fw.apply(&remove_guest(&g1)).await.unwrap();
    assert!(!reaches(&n1, "203.0.113.1:80"), "g1 after removal");
}

/// Accepts the connection a probe just made and returns its source.
fn accept_one(listener: &TcpListener) -> Ipv4Addr {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((_, std::net::SocketAddr::V4(peer))) => return *peer.ip(),
            Ok((_, other)) => panic!("unexpected peer {other}"),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}
