//! The generated documents, compared with checked-in ones under
//! `testdata/`. After an intended change, regenerate them with
//!
//! ```sh
//! BHATTI_BLESS=1 cargo test -p bhatti-engine --lib net::firewall
//! ```
//!
//! and review the diff (the real tests in `netns_tests` load them).

use super::test_support::{guest, settings, two_users, user};
use super::*;

/// Compares `got` with `testdata/<name>.nft` (embedded at build time), or
/// rewrites the file when BHATTI_BLESS is set.
fn golden(name: &str, expected: &str, got: &str) {
    if std::env::var_os("BHATTI_BLESS").is_some() {
        let path = format!(
            "{}/src/net/firewall/testdata/{name}.nft",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::write(&path, got).unwrap();
        return;
    }
    if expected != got {
        let first = expected
            .lines()
            .zip(got.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(got.lines().count()));
        panic!(
            "testdata/{name}.nft differs from the generated document at line {} \
             (BHATTI_BLESS=1 rewrites it):\n{got}",
            first + 1
        );
    }
}

#[test]
fn empty_state() {
    let state = FirewallState {
        settings: settings(),
        users: vec![],
        guests: vec![],
    };
    golden(
        "empty",
        include_str!("testdata/empty.nft"),
        &ruleset(&state),
    );
}

#[test]
fn one_user_one_guest() {
    let state = FirewallState {
        settings: settings(),
        users: vec![user(0, false)],
        guests: vec![guest(0, 2, "allow")],
    };
    golden(
        "one_guest",
        include_str!("testdata/one_guest.nft"),
        &ruleset(&state),
    );
}

#[test]
fn two_users_with_policies() {
    golden(
        "two_users",
        include_str!("testdata/two_users.nft"),
        &ruleset(&two_users()),
    );
}

#[test]
fn egress_interfaces_and_host_ports() {
    let mut state = two_users();
    state.settings.egress_interfaces = vec!["eth0".into(), "wg0".into()];
    state.settings.host_ports = vec![8080, 22];
    golden(
        "egress_interfaces",
        include_str!("testdata/egress_interfaces.nft"),
        &ruleset(&state),
    );
}

#[test]
fn ruleset_is_independent_of_input_order() {
    let mut state = two_users();
    let a = ruleset(&state);
    state.users.reverse();
    state.guests.reverse();
    for g in &mut state.guests {
        g.egress.allow.reverse();
        g.egress.deny.reverse();
    }
    assert_eq!(a, ruleset(&state));
}

/// The incremental documents: every line is a comment or an element
/// operation on one of bhatti's tables, never a rule, chain or table.
fn assert_elements_only(doc: &str) {
    assert!(doc.starts_with("# bhatti: "), "{doc}");
    for line in doc.lines().filter(|l| !l.starts_with('#')) {
        let ok = [
            "add element inet bhatti ",
            "delete element inet bhatti ",
            "add element bridge bhatti ",
            "delete element bridge bhatti ",
        ]
        .iter()
        .any(|p| line.starts_with(p));
        assert!(ok, "not an element operation: {line}");
        assert!(line.ends_with(" }"), "{line}");
    }
}

fn incremental_docs() -> Vec<String> {
    let s = settings();
    let st = two_users();
    let (g0, g2) = (&st.guests[0], &st.guests[2]);
    vec![
        add_user(&s, &user(0, false)),
        add_user(&s, &user(1, true)),
        remove_user(&s, &user(1, true)),
        set_user_isolated(&user(0, false), &user(0, true)),
        add_guest(g0),
        add_guest(g2),
        remove_guest(g0),
        replace_guest(g0, g2),
    ]
}

#[test]
fn incremental_documents_touch_only_elements() {
    for doc in incremental_docs() {
        assert_elements_only(&doc);
    }
}

#[test]
fn removal_adds_before_deleting() {
    let g = &two_users().guests[0];
    let doc = remove_guest(g);
    let adds: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("add element "))
        .collect();
    let deletes: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("delete element "))
        .collect();
    assert_eq!(adds, deletes);
    // Every set a guest may own, including the default-deny one it is not in.
    for set in [
        "guest_taps",
        "guest_macs",
        "guest_addrs",
        "guest_sources",
        "deny_nets",
        "deny_ports",
        "egress_default_deny",
    ] {
        assert!(
            deletes.iter().any(|l| l.contains(&format!(" {set} {{"))),
            "{set}: {doc}"
        );
    }
    // The last add comes before the first delete.
    let last_add = doc.rfind("add element").unwrap();
    assert!(last_add < doc.find("delete element").unwrap());
}

#[test]
fn add_guest_clears_a_stale_default_deny() {
    let allow = guest(0, 2, "allow");
    let doc = add_guest(&allow);
    assert!(
        doc.contains("delete element inet bhatti egress_default_deny { 10.192.0.2 }"),
        "{doc}"
    );
    let deny = guest(0, 2, "deny");
    let doc = add_guest(&deny);
    assert!(!doc.contains("delete element"), "{doc}");
    assert!(
        doc.contains("add element inet bhatti egress_default_deny { 10.192.0.2 }"),
        "{doc}"
    );
}

#[test]
fn add_user_is_an_upsert_of_the_isolation_state() {
    let s = settings();
    let doc = add_user(&s, &user(3, true));
    assert!(
        doc.contains("delete element inet bhatti same_bridge { \"bh3\" . \"bh3\" }"),
        "{doc}"
    );
    assert!(
        doc.contains("add element bridge bhatti isolated_subnets { 10.192.3.0/24 }"),
        "{doc}"
    );
    assert!(!doc.contains("delete element bridge"), "{doc}");
    let doc = add_user(&s, &user(3, false));
    assert!(
        doc.contains("delete element bridge bhatti isolated_subnets { 10.192.3.0/24 }"),
        "{doc}"
    );
    assert!(
        doc.ends_with("add element inet bhatti same_bridge { \"bh3\" . \"bh3\" }\n"),
        "{doc}"
    );
}

#[test]
fn guest_rules_become_disjoint_elements() {
    let g = guest(
        0,
        2,
        "deny deny=10.0.0.0/8,10.1.0.0/16 allow=198.51.100.0/24:80-90,198.51.100.7:85-100,198.51.100.7:1-2",
    );
    let doc = add_guest(&g);
    assert!(
        doc.contains("add element inet bhatti deny_nets { 10.192.0.2 . 10.0.0.0/8 }\n"),
        "{doc}"
    );
    assert!(
        doc.contains(
            "add element inet bhatti allow_ports { 10.192.0.2 . 198.51.100.0/24 . 80-90, \
             10.192.0.2 . 198.51.100.7/32 . 1-2, 10.192.0.2 . 198.51.100.7/32 . 91-100 }\n"
        ),
        "{doc}"
    );
}

#[test]
fn invalid_names_make_nft_refuse_the_document() {
    let mut g = guest(0, 2, "allow");
    g.tap = "evil\" }\nflush ruleset".into();
    g.mac = "02:00:00:00:00:zz".into();
    assert!(g.validate().is_err());
    let doc = add_guest(&g);
    assert!(!doc.contains("flush"), "{doc}");
    assert!(
        doc.contains("add element bridge bhatti guest_addrs { \"\" . \"\" . 10.192.0.2 }"),
        "{doc}"
    );
    let mut state = two_users();
    state.settings.egress_interfaces = vec!["eth 0".into()];
    assert!(state.validate().is_err());
    assert!(ruleset(&state).contains("\t\t\t\"\",\n"));
    assert!(two_users().validate().is_ok());
    for bad in ["", "a/b", "x".repeat(16).as_str(), "a b", "a\"b", "ä"] {
        assert!(check_ifname(bad).is_err(), "{bad:?}");
    }
    for good in ["eth0", "bh12", "wg-0", "br.100", "x".repeat(15).as_str()] {
        assert!(check_ifname(good).is_ok(), "{good:?}");
    }
    for bad in [
        "02:00:00:00:00",
        "02:00:00:00:00:0",
        "02-00-00-00-00-00",
        "02:00:00:00:00:00:00",
    ] {
        assert!(check_mac(bad).is_err(), "{bad:?}");
    }
    assert!(check_mac("02:AB:cd:00:00:01").is_ok());
}

#[test]
fn mac_addresses_are_lower_case() {
    let mut g = guest(0, 2, "allow");
    g.mac = "02:AB:CD:00:00:01".into();
    assert!(add_guest(&g).contains("\"bt0x2\" . 02:ab:cd:00:00:01 . 10.192.0.2"));
}
