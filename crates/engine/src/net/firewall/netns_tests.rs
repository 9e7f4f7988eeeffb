//! The documents applied by the real nft, each test in a network namespace
//! of its own (deleted afterwards, also on failure). Needs root; otherwise
//! each test prints one SKIP line.

use super::test_support::{guest, is_root, two_users, user, TestNs};
use super::*;

/// The rules of the ruleset: constant whatever the users and sandboxes.
const RULES: usize = 26;

fn skip(test: &str) -> bool {
    if !is_root() {
        bhatti_testkit::skip(test, "needs root (network namespaces, nftables)");
        return true;
    }
    false
}

fn strs(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// True when no element of any bhatti set mentions `needle`.
fn nowhere(ns: &TestNs, needle: &str) -> bool {
    [
        ("inet", "bridges"),
        ("inet", "gateways"),
        ("inet", "same_bridge"),
        ("inet", "guest_sources"),
        ("inet", "deny_nets"),
        ("inet", "deny_ports"),
        ("inet", "allow_nets"),
        ("inet", "allow_ports"),
        ("inet", "egress_default_deny"),
        ("bridge", "guest_taps"),
        ("bridge", "guest_macs"),
        ("bridge", "guest_addrs"),
        ("bridge", "isolated_subnets"),
    ]
    .iter()
    .all(|(f, s)| !ns.elements(f, s).iter().any(|e| e.contains(needle)))
}

#[tokio::test]
async fn ruleset_and_incremental_changes() {
    if skip("ruleset_and_incremental_changes") {
        return;
    }
    let ns = TestNs::new("inc");
    let fw = Firewall::new(Some(ns.name.clone()));
    // Someone else's table, which no document may touch.
    fw.apply(
        "table inet other {\n\
         \tset keep { type ipv4_addr; elements = { 192.0.2.1 } }\n\
         \tchain c { type filter hook input priority 10; policy accept; tcp dport 9 accept; }\n\
         }\n",
    )
    .await
    .unwrap();
    let other = ns.exec(&["nft", "list", "table", "inet", "other"]);

    let state = two_users();
    let s = &state.settings;
    // Twice: the replace is idempotent, also when the tables exist.
    fw.apply(&ruleset(&state)).await.unwrap();
    fw.apply(&ruleset(&state)).await.unwrap();
    let (rules, tables) = ns.rules_and_tables();
    assert_eq!(rules.len(), RULES, "{rules:#?}");
    assert_eq!(
        tables,
        strs(&["inet other", "inet bhatti", "bridge bhatti"])
    );
    assert_eq!(ns.elements("inet", "bridges"), strs(&["bh0", "bh1"]));
    assert_eq!(ns.elements("inet", "same_bridge"), strs(&["bh0 . bh0"]));
    assert_eq!(
        ns.elements("inet", "gateways"),
        strs(&["bh0 . 10.192.0.1", "bh1 . 10.192.1.1"])
    );
    assert_eq!(
        ns.elements("bridge", "isolated_subnets"),
        strs(&["10.192.1.0/24"])
    );
    assert_eq!(
        ns.elements("bridge", "guest_addrs"),
        strs(&[
            "bt0x2 . 02:00:00:00:00:02 . 10.192.0.2",
            "bt0x3 . 02:00:00:00:00:03 . 10.192.0.3",
            "bt1x2 . 02:00:00:00:01:02 . 10.192.1.2",
        ])
    );
    assert_eq!(
        ns.elements("inet", "deny_ports"),
        strs(&[
            "10.192.0.2 . 198.51.100.0/24 . 80-90",
            "10.192.0.2 . 198.51.100.7 . 91-100",
        ])
    );
    assert_eq!(
        ns.elements("inet", "allow_nets"),
        strs(&["10.192.1.2 . 203.0.113.0/24"])
    );
    assert_eq!(
        ns.elements("inet", "allow_ports"),
        strs(&[
            "10.192.1.2 . 0.0.0.0/0 . 443",
            "10.192.1.2 . 192.0.2.1 . 53"
        ])
    );
    assert_eq!(
        ns.elements("inet", "egress_default_deny"),
        strs(&["10.192.1.2"])
    );
    // The default blocked ranges; the pool lies within 10.0.0.0/8.
    assert_eq!(ns.elements("inet", "blocked").len(), 9);
    assert!(ns.elements("inet", "egress_ifaces").is_empty());

    // A third user and a guest of it; each document applied twice.
    let u2 = user(2, false);
    for _ in 0..2 {
        fw.apply(&add_user(s, &u2)).await.unwrap();
    }
    assert!(ns
        .elements("inet", "same_bridge")
        .contains(&"bh2 . bh2".to_string()));
    let g = guest(2, 2, "deny allow=203.0.113.0/24:443");
    for _ in 0..2 {
        fw.apply(&add_guest(&g)).await.unwrap();
    }
    assert!(ns
        .elements("inet", "allow_ports")
        .contains(&"10.192.2.2 . 203.0.113.0/24 . 443".to_string()));
    assert!(ns
        .elements("inet", "egress_default_deny")
        .contains(&"10.192.2.2".to_string()));

    // A live policy change: the old elements go, the new ones come.
    let g_new = guest(2, 2, "allow deny=203.0.113.0/24:440-450");
    fw.apply(&replace_guest(&g, &g_new)).await.unwrap();
    assert!(!ns
        .elements("inet", "allow_ports")
        .iter()
        .any(|e| e.starts_with("10.192.2.2 ")));
    assert!(ns
        .elements("inet", "deny_ports")
        .contains(&"10.192.2.2 . 203.0.113.0/24 . 440-450".to_string()));
    assert!(!ns
        .elements("inet", "egress_default_deny")
        .contains(&"10.192.2.2".to_string()));
    // Replacing with itself (overlapping old and new intervals) is fine.
    fw.apply(&replace_guest(&g_new, &g_new)).await.unwrap();

    // Removal, then removal of what is already gone.
    for _ in 0..2 {
        fw.apply(&remove_guest(&g_new)).await.unwrap();
    }
    assert!(nowhere(&ns, "10.192.2.2"));
    assert!(nowhere(&ns, "bt2x2"));

    fw.apply(&set_user_isolated(&u2, &user(2, true)))
        .await
        .unwrap();
    assert!(ns
        .elements("bridge", "isolated_subnets")
        .contains(&"10.192.2.0/24".to_string()));
    assert!(!ns
        .elements("inet", "same_bridge")
        .contains(&"bh2 . bh2".to_string()));
    for _ in 0..2 {
        fw.apply(&remove_user(s, &user(2, true))).await.unwrap();
    }
    assert!(nowhere(&ns, "bh2"));
    assert!(nowhere(&ns, "10.192.2."));
    fw.apply(&remove_user(s, &user(7, false))).await.unwrap();

    // A guest from the full ruleset.
    fw.apply(&remove_guest(&state.guests[1])).await.unwrap();
    assert!(nowhere(&ns, "10.192.0.3"));

    // The rules never changed; the full ruleset restores the elements.
    assert_eq!(ns.rules_and_tables().0, rules);
    fw.apply(&ruleset(&state)).await.unwrap();
    assert_eq!(
        ns.elements("bridge", "guest_taps"),
        strs(&["bt0x2", "bt0x3", "bt1x2"])
    );
    assert_eq!(ns.exec(&["nft", "list", "table", "inet", "other"]), other);

    for _ in 0..2 {
        fw.remove_all().await.unwrap();
    }
    assert_eq!(ns.rules_and_tables(), (vec![], strs(&["inet other"])));
}

/// The checked-in documents are real nft: each loads, twice.
#[tokio::test]
async fn checked_in_documents_load() {
    if skip("checked_in_documents_load") {
        return;
    }
    let ns = TestNs::new("docs");
    let fw = Firewall::new(Some(ns.name.clone()));
    for doc in [
        include_str!("testdata/empty.nft"),
        include_str!("testdata/one_guest.nft"),
        include_str!("testdata/two_users.nft"),
        include_str!("testdata/egress_interfaces.nft"),
    ] {
        fw.apply(doc).await.unwrap();
        fw.apply(doc).await.unwrap();
    }
    let (rules, _) = ns.rules_and_tables();
    // One more with egress_interfaces: guests may not leave by others.
    assert_eq!(rules.len(), RULES + 1);
    assert_eq!(ns.elements("inet", "egress_ifaces"), strs(&["eth0", "wg0"]));
    assert_eq!(ns.elements("inet", "host_tcp_ports"), strs(&["22", "8080"]));
}

#[tokio::test]
async fn nft_errors_are_reported() {
    if skip("nft_errors_are_reported") {
        return;
    }
    let ns = TestNs::new("err");
    let fw = Firewall::new(Some(ns.name.clone()));
    let err = fw.apply("table inet bhatti { bogus }\n").await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("nft -f -") && msg.contains("syntax error"),
        "{msg}"
    );
    assert!(msg.contains(&ns.name), "{msg}");

    // An unusable interface name fails the whole transaction.
    fw.apply(&ruleset(&two_users())).await.unwrap();
    let mut g = guest(0, 9, "allow");
    g.tap = "bad\"name".into();
    let msg = fw.apply(&add_guest(&g)).await.unwrap_err().to_string();
    assert!(msg.contains("Empty string"), "{msg}");
    assert!(nowhere(&ns, "10.192.0.9"));

    let gone = Firewall::new(Some(format!("{}-missing", ns.name)));
    assert!(gone.apply(&ruleset(&two_users())).await.is_err());
}

#[tokio::test]
async fn conntrack_and_forwarding() {
    if skip("conntrack_and_forwarding") {
        return;
    }
    let ns = TestNs::new("ct");
    let fw = Firewall::new(Some(ns.name.clone()));
    fw.flush_conntrack("10.192.0.2".parse().unwrap())
        .await
        .unwrap();
    // A new namespace may inherit forwarding from the host's: start from off.
    ns.exec(&["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(
        ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "0"
    );
    fw.enable_forwarding().await.unwrap();
    assert_eq!(
        ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
}
