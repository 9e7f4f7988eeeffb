//! API keys, users, per-user caps and rate limits.
//!
//! - A key is `bht_` followed by 43 base62 characters encoding 32 random bytes
//!   (256 bits). Only its SHA-256 (lower-case hex) is stored; a request's key
//!   is hashed, looked up by hash (an index lookup, whose timing depends only
//!   on the hash, which an attacker cannot steer), and the stored hash is then
//!   compared in constant time.
//! - User management (`bhatti user create|list|delete|rotate-key`) is plain
//!   library functions over a connection; the key is returned once and never
//!   again.
//! - Caps: [`EffectiveCaps`] resolves a user's overrides against the config;
//!   [`CapError::status`] gives 429 for counts and 400 for sizes.
//! - Rate limits: [`RateLimits`] keeps one keyed GCRA limiter (governor) per
//!   [`RequestClass`], keyed by user id; call [`RateLimits::retain_recent`]
//!   periodically to drop idle users' state.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rusqlite::Connection;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api_types::{validate_user_name, ValidationError};
use crate::config::{LimitsConfig, RateConfig, VmConfig};
use crate::store::users::{self, NewUser, User, UserCaps};
use crate::store::StoreError;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "bht_";
/// Characters after the prefix.
pub const KEY_BODY_LEN: usize = 43;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A fresh API key: `bht_` + 32 random bytes in base62 (43 characters).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_BODY_LEN);
    key.push_str(KEY_PREFIX);
    key.push_str(&base62_fixed(bytes));
    key
}

/// Base62 of a 256-bit big-endian number, zero-padded to 43 digits
/// (62^43 > 2^256, so it always fits).
fn base62_fixed(mut n: [u8; 32]) -> String {
    let mut digits = [0u8; KEY_BODY_LEN];
    for d in digits.iter_mut().rev() {
        let mut rem: u32 = 0;
        for b in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*b);
            *b = (acc / 62) as u8;
            rem = acc % 62;
        }
        *d = BASE62[rem as usize];
    }
    debug_assert!(n.iter().all(|&b| b == 0));
    String::from_utf8(digits.to_vec()).expect("base62 is ASCII")
}

/// Whether `key` has the shape of a bhatti key (cheap check before hashing).
pub fn is_well_formed(key: &str) -> bool {
    key.strip_prefix(KEY_PREFIX)
        .is_some_and(|b| b.len() == KEY_BODY_LEN && b.bytes().all(|c| c.is_ascii_alphanumeric()))
}

/// Lower-case hex SHA-256 of a key: what the store keeps.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Whether `key` hashes to `stored_hex`, compared in constant time.
pub fn key_matches(key: &str, stored_hex: &str) -> bool {
    let computed = Sha256::digest(key.as_bytes());
    match hex::decode(stored_hex) {
        Ok(stored) if stored.len() == computed.len() => computed.as_slice().ct_eq(&stored).into(),
        _ => false,
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// The user owning `key`, or `None` (malformed, unknown or revoked key).
pub fn authenticate(c: &Connection, key: &str) -> Result<Option<User>, StoreError> {
    if !is_well_formed(key) {
        return Ok(None);
    }
    let Some(user) = users::get_by_key_hash(c, &hash_key(key))? else {
        return Ok(None);
    };
    Ok(key_matches(key, &user.key_sha256).then_some(user))
}

/// Errors from user management.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A user just created (or re-keyed), with the key shown this once.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    pub user: User,
    pub api_key: String,
}

/// `bhatti user create`: a new user with a fresh key.
pub fn create_user(c: &Connection, name: &str, caps: UserCaps) -> Result<IssuedKey, UserError> {
    validate_user_name(name)?;
    let api_key = generate_key();
    let user = users::insert(
        c,
        &NewUser {
            name: name.to_string(),
            key_sha256: hash_key(&api_key),
            caps,
        },
    )?;
    Ok(IssuedKey { user, api_key })
}

/// `bhatti user list`.
pub fn list_users(c: &Connection) -> Result<Vec<User>, UserError> {
    Ok(users::list(c)?)
}

/// `bhatti user delete`: refused while the user has sandboxes or checkpoints.
pub fn delete_user(c: &Connection, name: &str) -> Result<(), UserError> {
    Ok(users::delete(c, name)?)
}

/// `bhatti user rotate-key`: a new key; the old one stops working at once.
pub fn rotate_key(c: &Connection, name: &str) -> Result<IssuedKey, UserError> {
    let api_key = generate_key();
    users::set_key_hash(c, name, &hash_key(&api_key))?;
    let user = users::get_by_name(c, name)?
        .ok_or_else(|| StoreError::NotFound(format!("no user named '{name}'")))?;
    Ok(IssuedKey { user, api_key })
}

/// A user's caps with the config's defaults filled in, and per-sandbox sizes
/// never above the `[vm]` hard maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveCaps {
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u32,
    pub max_snapshots: u32,
}

impl EffectiveCaps {
    pub fn resolve(user: &UserCaps, limits: &LimitsConfig, vm: &VmConfig) -> EffectiveCaps {
        EffectiveCaps {
            max_sandboxes: user.max_sandboxes.unwrap_or(limits.max_sandboxes),
            max_cpus: user.max_cpus.unwrap_or(limits.max_cpus).min(vm.max_cpus),
            max_memory_mb: user
                .max_memory_mb
                .unwrap_or(limits.max_memory_mb)
                .min(vm.max_memory_mb),
            max_snapshots: user.max_snapshots.unwrap_or(limits.max_snapshots),
        }
    }

    /// 429 when the user already has `current` ≥ `max_sandboxes` sandboxes.
    pub fn check_sandbox_count(&self, current: u32) -> Result<(), CapError> {
        if current >= self.max_sandboxes {
            return Err(CapError::TooManySandboxes {
                max: self.max_sandboxes,
            });
        }
        Ok(())
    }

    /// 429 when the user already keeps `current` ≥ `max_snapshots` checkpoints.
    pub fn check_snapshot_count(&self, current: u32) -> Result<(), CapError> {
        if current >= self.max_snapshots {
            return Err(CapError::TooManySnapshots {
                max: self.max_snapshots,
            });
        }
        Ok(())
    }

    /// 400 when one sandbox asks for more cpus or memory than allowed.
    pub fn check_sandbox_size(&self, cpus: u32, memory_mb: u32) -> Result<(), CapError> {
        if cpus > self.max_cpus {
            return Err(CapError::TooManyCpus {
                requested: cpus,
                max: self.max_cpus,
            });
        }
        if memory_mb > self.max_memory_mb {
            return Err(CapError::TooMuchMemory {
                requested: memory_mb,
                max: self.max_memory_mb,
            });
        }
        Ok(())
    }
}

/// A request past a user's caps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    #[error("sandbox limit reached: this user may have at most {max} sandboxes")]
    TooManySandboxes { max: u32 },
    #[error("checkpoint limit reached: this user may keep at most {max} checkpoints")]
    TooManySnapshots { max: u32 },
    #[error("cpus: {requested} is more than this user's limit of {max} per sandbox")]
    TooManyCpus { requested: u32, max: u32 },
    #[error("memory_mb: {requested} is more than this user's limit of {max} per sandbox")]
    TooMuchMemory { requested: u32, max: u32 },
}

impl CapError {
    /// HTTP status: 429 for counts, 400 for per-sandbox sizes.
    pub fn status(&self) -> u16 {
        match self {
            CapError::TooManySandboxes { .. } | CapError::TooManySnapshots { .. } => 429,
            CapError::TooManyCpus { .. } | CapError::TooMuchMemory { .. } => 400,
        }
    }
}

/// Which token bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestClass {
    /// Create, start, stop, checkpoint, resume, destroy.
    Create,
    /// Exec, shell, file writes, anything else touching the guest.
    Exec,
    /// List, get, file reads.
    Read,
}

/// Per-user, per-class rate limiters. A class whose configured rate is 0 is
/// unlimited.
#[derive(Debug)]
pub struct RateLimits {
    create: Option<DefaultKeyedRateLimiter<String>>,
    exec: Option<DefaultKeyedRateLimiter<String>>,
    read: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

fn limiter(quota: Option<Quota>) -> Option<DefaultKeyedRateLimiter<String>> {
    quota.map(RateLimiter::keyed)
}

pub(crate) fn quota(rate: u32, burst: u32, per_minute: bool) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    let q = if per_minute {
        Quota::per_minute(rate)
    } else {
        Quota::per_second(rate)
    };
    Some(q.allow_burst(burst))
}

impl RateLimits {
    pub fn new(cfg: &RateConfig) -> RateLimits {
        RateLimits {
            create: limiter(quota(cfg.create_per_minute, cfg.create_burst, true)),
            exec: limiter(quota(cfg.exec_per_second, cfg.exec_burst, false)),
            read: limiter(quota(cfg.read_per_second, cfg.read_burst, false)),
            clock: DefaultClock::default(),
        }
    }

    fn get(&self, class: RequestClass) -> Option<&DefaultKeyedRateLimiter<String>> {
        match class {
            RequestClass::Create => self.create.as_ref(),
            RequestClass::Exec => self.exec.as_ref(),
            RequestClass::Read => self.read.as_ref(),
        }
    }

    /// Takes one token from `user_id`'s `class` bucket, or says how long until
    /// one is available (for a 429 with `Retry-After`).
    pub fn check(&self, user_id: &str, class: RequestClass) -> Result<(), Duration> {
        let Some(l) = self.get(class) else {
            return Ok(());
        };
        // Avoid allocating the key in the common case is not possible with
        // governor's `&K` API; a short String per request is cheap.
        l.check_key(&user_id.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops state of users whose buckets are full again; call periodically
    /// (e.g. every minute) so the maps do not grow without bound.
    pub fn retain_recent(&self) {
        for l in [&self.create, &self.exec, &self.read].into_iter().flatten() {
            l.retain_recent();
        }
    }

    /// How many (user, class) buckets are tracked.
    pub fn len(&self) -> usize {
        [&self.create, &self.exec, &self.read]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    #[test]
    fn keys_have_the_documented_shape() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 43);
        assert!(is_well_formed(&a), "{a}");
        assert!(!is_well_formed("bht_short"));
        assert!(!is_well_formed(&a.replace("bht_", "xyz_")));
        assert!(!is_well_formed(&format!("{a}!")));
        assert_eq!(base62_fixed([0; 32]), "0".repeat(43));
        // 2^256 - 1 in base62 starts with a small digit and fits in 43.
        let max = base62_fixed([0xff; 32]);
        assert_eq!(max.len(), 43);
        let mut one = [0u8; 32];
        one[31] = 61;
        assert!(base62_fixed(one).ends_with('z'));
    }

    #[test]
    fn hashing_and_constant_time_match() {
        let k = generate_key();
        let h = hash_key(&k);
        assert_eq!(h.len(), 64);
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(key_matches(&k, &h));
        assert!(!key_matches(&generate_key(), &h));
        assert!(!key_matches(&k, "zz"));
        assert!(!key_matches(&k, &h[..62]));
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token("Bearer bht_x"), Some("bht_x"));
        assert_eq!(bearer_token("bearer   bht_x "), Some("bht_x"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn user_lifecycle_and_authentication() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let issued = create_user(
                c,
                "alice",
                UserCaps {
                    max_sandboxes: Some(1),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(is_well_formed(&issued.api_key));
            // Only the hash is stored.
            let stored: String = c.query_row(
                "SELECT key_sha256 FROM users WHERE name = 'alice'",
                [],
                |r| r.get(0),
            )?;
            assert_eq!(stored, hash_key(&issued.api_key));
            assert!(!stored.contains(&issued.api_key[4..]));

            assert_eq!(authenticate(c, &issued.api_key)?.unwrap().name, "alice");
            assert!(authenticate(c, &generate_key())?.is_none());
            assert!(authenticate(c, "garbage")?.is_none());

            assert!(matches!(
                create_user(c, "alice", UserCaps::default()),
                Err(UserError::Store(StoreError::Conflict(_)))
            ));
            let e = create_user(c, "Bad Name", UserCaps::default()).unwrap_err();
            assert!(matches!(e, UserError::Invalid(_)), "{e}");

            let rotated = rotate_key(c, "alice").unwrap();
            assert_ne!(rotated.api_key, issued.api_key);
            assert!(authenticate(c, &issued.api_key)?.is_none());
            assert_eq!(
                authenticate(c, &rotated.api_key)?.unwrap().id,
                issued.user.id
            );
            assert!(matches!(
                rotate_key(c, "nobody"),
                Err(UserError::Store(StoreError::NotFound(_)))
            ));

            assert_eq!(list_users(c).unwrap().len(), 1);
            delete_user(c, "alice").unwrap();
            assert!(authenticate(c, &rotated.api_key)?.is_none());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn caps_resolve_and_map_to_statuses() {
        let limits = LimitsConfig::default();
        let vm = VmConfig::default();
        let caps = EffectiveCaps::resolve(&UserCaps::default(), &limits, &vm);
        assert_eq!(caps.max_sandboxes, limits.max_sandboxes);
        let caps = EffectiveCaps::resolve(
            &UserCaps {
                max_sandboxes: Some(2),
                max_cpus: Some(1000),
                max_memory_mb: Some(256),
                max_snapshots: None,
            },
            &limits,
            &vm,
        );
        assert_eq!(caps.max_cpus, vm.max_cpus, "clipped to the hard maximum");
        assert!(caps.check_sandbox_count(1).is_ok());
        let e = caps.check_sandbox_count(2).unwrap_err();
        assert_eq!(e.status(), 429);
        assert!(e.to_string().contains("at most 2"));
        assert!(caps.check_sandbox_size(2, 256).is_ok());
        let e = caps.check_sandbox_size(1, 512).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().starts_with("memory_mb"));
        assert_eq!(
            caps.check_sandbox_size(vm.max_cpus + 1, 1)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            caps.check_snapshot_count(caps.max_snapshots)
                .unwrap_err()
                .status(),
            429
        );
    }

    #[test]
    fn rate_limits_per_user_and_class() {
        let cfg = RateConfig {
            create_per_minute: 1,
            create_burst: 2,
            exec_per_second: 0,
            exec_burst: 0,
            read_per_second: 1000,
            read_burst: 5,
        };
        let rl = RateLimits::new(&cfg);
        assert!(rl.check("u1", RequestClass::Create).is_ok());
        assert!(rl.check("u1", RequestClass::Create).is_ok());
        let wait = rl.check("u1", RequestClass::Create).unwrap_err();
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        // Another user has their own bucket; exec is unlimited.
        assert!(rl.check("u2", RequestClass::Create).is_ok());
        for _ in 0..10_000 {
            assert!(rl.check("u1", RequestClass::Exec).is_ok());
        }
        for _ in 0..5 {
            assert!(rl.check("u1", RequestClass::Read).is_ok());
        }
        assert!(rl.check("u1", RequestClass::Read).is_err());
        assert_eq!(rl.len(), 3);
        // Read refills within milliseconds; retain_recent drops full buckets.
        std::thread::sleep(Duration::from_millis(20));
        rl.retain_recent();
        assert_eq!(rl.len(), 2, "the read bucket refilled and was dropped");
        assert!(!rl.is_empty());
    }
}
