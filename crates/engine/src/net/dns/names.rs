//! The sibling-name table: every user's sandbox names and addresses.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Names of every user's sandboxes; shared by all servers, updated at once
/// on create/rename/destroy. Names are case-insensitive (kept lowercase).
#[derive(Debug, Default)]
pub struct DnsNames {
    /// Lowercase, without dots at either end; may be empty (bare names only).
    suffix: String,
    /// user id → name → address.
    users: RwLock<HashMap<String, HashMap<String, Ipv4Addr>>>,
}

/// How one user's server treats a query name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One of the user's sandboxes.
    Sibling(Ipv4Addr),
    /// The suffix itself (`sb.`): exists, holds no records.
    Apex,
    /// Ours but no sandbox of this user: a name under the suffix, or a
    /// single label. Answered NXDOMAIN, never forwarded.
    Missing,
    /// Everything else: for the upstreams.
    Upstream,
}

impl DnsNames {
    pub fn new(suffix: &str) -> DnsNames {
        DnsNames {
            suffix: suffix.trim_matches('.').to_ascii_lowercase(),
            users: RwLock::default(),
        }
    }

    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// Adds `name`, or moves it to `ip`.
    pub fn set(&self, user_id: &str, name: &str, ip: Ipv4Addr) {
        self.write()
            .entry(user_id.to_owned())
            .or_default()
            .insert(key(name), ip);
    }

    pub fn remove(&self, user_id: &str, name: &str) {
        let mut users = self.write();
        if let Some(names) = users.get_mut(user_id) {
            names.remove(&key(name));
            if names.is_empty() {
                users.remove(user_id);
            }
        }
    }

    /// Moves `old`'s address to `new`; nothing if `old` is unknown.
    pub fn rename(&self, user_id: &str, old: &str, new: &str) {
        let mut users = self.write();
        if let Some(names) = users.get_mut(user_id) {
            if let Some(ip) = names.remove(&key(old)) {
                names.insert(key(new), ip);
            }
        }
    }

    pub fn remove_user(&self, user_id: &str) {
        self.write().remove(user_id);
    }

    /// The address of `user_id`'s sandbox named by `qname`: `web`, `web.`,
    /// `web.<suffix>` or `web.<suffix>.`, in any case. Other users' names
    /// never match.
    pub fn lookup(&self, user_id: &str, qname: &str) -> Option<Ipv4Addr> {
        let q = normalize(qname);
        self.lookup_normalized(user_id, &q)
    }

    pub(crate) fn scope(&self, user_id: &str, qname: &str) -> Scope {
        let q = normalize(qname);
        if let Some(ip) = self.lookup_normalized(user_id, &q) {
            return Scope::Sibling(ip);
        }
        if q.is_empty() {
            // The root.
            return Scope::Upstream;
        }
        if !self.suffix.is_empty() {
            if q == self.suffix {
                return Scope::Apex;
            }
            if self.strip_suffix(&q).is_some() {
                return Scope::Missing;
            }
        }
        if q.contains('.') {
            Scope::Upstream
        } else {
            Scope::Missing
        }
    }

    fn lookup_normalized(&self, user_id: &str, q: &str) -> Option<Ipv4Addr> {
        let label = self.strip_suffix(q).unwrap_or(q);
        self.read().get(user_id)?.get(label).copied()
    }

    /// `web` of `web.<suffix>`.
    fn strip_suffix<'q>(&self, q: &'q str) -> Option<&'q str> {
        if self.suffix.is_empty() {
            return None;
        }
        q.strip_suffix(self.suffix.as_str())?
            .strip_suffix('.')
            .filter(|label| !label.is_empty())
    }

    // A panic elsewhere while holding the lock leaves a usable table (every
    // update is a single map operation), so poisoning is ignored.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, HashMap<String, Ipv4Addr>>> {
        self.users.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, HashMap<String, Ipv4Addr>>> {
        self.users.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Lowercase, without the one trailing dot of a fully qualified name.
fn normalize(qname: &str) -> String {
    qname
        .strip_suffix('.')
        .unwrap_or(qname)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: Ipv4Addr = Ipv4Addr::new(10, 192, 0, 2);
    const DB: Ipv4Addr = Ipv4Addr::new(10, 192, 0, 3);
    const SECRET: Ipv4Addr = Ipv4Addr::new(10, 192, 1, 2);

    fn table() -> DnsNames {
        let names = DnsNames::new("sb");
        names.set("a", "web", WEB);
        names.set("a", "db", DB);
        names.set("b", "secret", SECRET);
        names
    }

    #[test]
    fn every_spelling_of_a_sibling_resolves() {
        let names = table();
        for q in ["web", "web.", "web.sb", "web.sb.", "WEB.SB.", "Web.Sb"] {
            assert_eq!(names.lookup("a", q), Some(WEB), "{q}");
        }
        assert_eq!(names.lookup("a", "db.sb."), Some(DB));
        for q in [
            "web.sb.sb",
            "x.web.sb",
            "web.other",
            "sb",
            "",
            ".",
            "web.sb..",
        ] {
            assert_eq!(names.lookup("a", q), None, "{q:?}");
        }
    }

    #[test]
    fn other_users_names_never_resolve() {
        let names = table();
        for q in ["secret", "secret.sb."] {
            assert_eq!(names.lookup("a", q), None);
            assert_eq!(names.scope("a", q), Scope::Missing);
            assert_eq!(names.lookup("b", q), Some(SECRET));
        }
        assert_eq!(names.lookup("c", "web"), None);
    }

    #[test]
    fn set_rename_remove() {
        let names = table();
        names.set("a", "web", DB);
        assert_eq!(names.lookup("a", "web"), Some(DB));
        names.set("a", "web", WEB);

        names.rename("a", "WEB", "www");
        assert_eq!(names.lookup("a", "web"), None);
        assert_eq!(names.lookup("a", "www.sb"), Some(WEB));
        names.rename("a", "nope", "other");
        assert_eq!(names.lookup("a", "other"), None);
        names.rename("z", "www", "other");

        names.remove("a", "www");
        assert_eq!(names.lookup("a", "www"), None);
        assert_eq!(names.lookup("a", "db"), Some(DB));
        names.remove("a", "db");
        names.remove("a", "db");
        names.remove("z", "db");
        assert!(!names.read().contains_key("a"));

        names.remove_user("b");
        assert_eq!(names.lookup("b", "secret"), None);
    }

    #[test]
    fn scopes() {
        let names = table();
        assert_eq!(names.scope("a", "WEB.sb."), Scope::Sibling(WEB));
        assert_eq!(names.scope("a", "sb."), Scope::Apex);
        assert_eq!(names.scope("a", "SB"), Scope::Apex);
        assert_eq!(names.scope("a", "nope.sb."), Scope::Missing);
        assert_eq!(names.scope("a", "x.web.sb."), Scope::Missing);
        assert_eq!(names.scope("a", "nope."), Scope::Missing);
        assert_eq!(names.scope("a", "example.test."), Scope::Upstream);
        assert_eq!(names.scope("a", "web.sbx."), Scope::Upstream);
        assert_eq!(names.scope("a", "."), Scope::Upstream);
    }

    #[test]
    fn the_suffix_is_normalized_and_may_be_empty() {
        let names = DnsNames::new(".SB.");
        assert_eq!(names.suffix(), "sb");
        names.set("a", "Web.", WEB);
        assert_eq!(names.lookup("a", "web.sb."), Some(WEB));

        let bare = DnsNames::default();
        bare.set("a", "web", WEB);
        assert_eq!(bare.lookup("a", "web."), Some(WEB));
        assert_eq!(bare.lookup("a", "web.sb."), None);
        assert_eq!(bare.scope("a", "web.sb."), Scope::Upstream);
        assert_eq!(bare.scope("a", "nope."), Scope::Missing);
    }
}
