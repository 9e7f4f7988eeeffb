//! Public aliases of published ports: one DNS label each, since the public
//! listener routes `<alias>.<zone>` by host as well as `/<alias>/…` by path.

use crate::api_types::ValidationError;

/// Longest alias (a DNS label is at most 63 bytes).
pub const MAX_ALIAS: usize = 63;

/// Names the public listener or a zone's operator may need for themselves.
const RESERVED: &[&str] = &[
    "_shell",
    "admin",
    "api",
    "app",
    "assets",
    "auth",
    "bhatti",
    "dashboard",
    "docs",
    "ftp",
    "health",
    "imap",
    "localhost",
    "login",
    "mail",
    "ns",
    "ns1",
    "ns2",
    "openapi",
    "pop",
    "proxy",
    "root",
    "sandboxes",
    "smtp",
    "static",
    "status",
    "www",
];

/// A valid, unreserved alias: lowercase letters, digits and `-`, not at
/// either end, at most [`MAX_ALIAS`] bytes.
pub fn validate(alias: &str) -> Result<(), ValidationError> {
    let bad = |m: &str| Err(ValidationError::new("alias", m.to_string()));
    if alias.is_empty() || alias.len() > MAX_ALIAS {
        return bad(&format!("must be 1 to {MAX_ALIAS} characters"));
    }
    if !alias
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("may contain only lowercase letters, digits and '-'");
    }
    if alias.starts_with('-') || alias.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    if is_reserved(alias) {
        return bad(&format!("'{alias}' is reserved"));
    }
    Ok(())
}

/// Names the daemon keeps for itself.
pub fn is_reserved(alias: &str) -> bool {
    RESERVED.contains(&alias)
}

/// The alias a port gets when none is asked for: `<name>-<port>`, the name
/// lowercased with other characters as `-` (so it follows a rename).
pub fn derived(sandbox_name: &str, port: u16) -> String {
    let mut s: String = sandbox_name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let suffix = format!("-{port}");
    s.truncate(MAX_ALIAS - suffix.len());
    let s = s.trim_matches('-');
    if s.is_empty() {
        format!("port{suffix}")
    } else {
        format!("{s}{suffix}")
    }
}

/// A DNS zone such as `sb.example.com`: labels of letters, digits and `-`.
pub fn validate_zone(zone: &str) -> Result<(), ValidationError> {
    let ok = !zone.is_empty()
        && zone.len() <= 253
        && zone.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "zone",
            "must be a DNS name".to_string(),
        ))
    }
}

/// The alias a request's `Host` names under `zone`, if any
/// (`web-8000.sb.example.com[:443]` → `web-8000`).
pub fn from_host<'a>(host: &'a str, zone: &str) -> Option<&'a str> {
    if zone.is_empty() {
        return None;
    }
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let label = host
        .get(..host.len().checked_sub(zone.len() + 1)?)
        .filter(|_| {
            host.len() > zone.len()
                && host[host.len() - zone.len()..].eq_ignore_ascii_case(zone)
                && host.as_bytes()[host.len() - zone.len() - 1] == b'.'
        })?;
    (!label.contains('.')).then_some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        for ok in ["web", "web-8000", "a", "x1-2-3", &"a".repeat(63)] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "Web",
            "we_b",
            "we.b",
            "api",
            "www",
            "_shell",
            "é",
            &"a".repeat(64),
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_aliases_are_valid() {
        assert_eq!(derived("web", 8000), "web-8000");
        assert_eq!(derived("My_App.v2", 3000), "my-app-v2-3000");
        assert_eq!(derived("___", 80), "port-80");
        let long = derived(&"x".repeat(100), 65535);
        assert_eq!(long.len(), MAX_ALIAS);
        for name in ["web", "My_App.v2", "___", "-a-", &"y".repeat(80)] {
            assert!(validate(&derived(name, 1)).is_ok(), "{name}");
        }
    }

    #[test]
    fn hosts() {
        let z = "sb.example.com";
        assert_eq!(from_host("web-8000.sb.example.com", z), Some("web-8000"));
        assert_eq!(
            from_host("web-8000.SB.example.com:8443", z),
            Some("web-8000")
        );
        assert_eq!(from_host("web-8000.sb.example.com.", z), Some("web-8000"));
        assert_eq!(from_host("sb.example.com", z), None);
        assert_eq!(from_host("a.b.sb.example.com", z), None);
        assert_eq!(from_host("web.xsb.example.com", z), None);
        assert_eq!(from_host("web.sb.example.com", ""), None);
        assert_eq!(from_host("127.0.0.1:8080", z), None);
        assert!(validate_zone(z).is_ok());
        assert!(validate_zone("localhost").is_ok());
        assert!(validate_zone("bad..zone").is_err());
        assert!(validate_zone("a b").is_err());
    }
}
