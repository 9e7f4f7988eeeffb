//! Secrets encrypted at rest with age (x25519).
//!
//! The daemon's identity lives in `<data_dir>/secrets.key` (mode 0600,
//! created on first start, never rewritten). Values are encrypted to its
//! recipient before they reach the database and decrypted only to inject them
//! into a sandbox's environment at create; no API returns a value, only names
//! and timestamps.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age::x25519::{Identity, Recipient};
use rusqlite::Connection;

use crate::api_types::ValidationError;
use crate::store::{self, StoreError};

/// The identity file's name under `data_dir`.
pub const IDENTITY_FILE: &str = "secrets.key";
/// Longest secret name.
pub use bhatti_api_types::MAX_SECRET_NAME_LEN as MAX_NAME_LEN;
/// Largest secret value (bytes).
pub const MAX_VALUE_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets identity {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets identity {path} is not an age X25519 identity")]
    BadIdentity { path: PathBuf },
    #[error("encrypting a secret failed: {0}")]
    Encrypt(String),
    #[error("decrypting a secret failed (was the identity file replaced?): {0}")]
    Decrypt(String),
    #[error("secret value is not UTF-8 text")]
    NotUtf8,
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a secret name (`[A-Z_][A-Z0-9_]*`, an environment variable name).
pub use bhatti_api_types::validate_secret_name as validate_name;

/// Checks a secret value: UTF-8 text (it becomes an environment value), no
/// NUL, at most 64 KiB.
pub fn validate_value(value: &str) -> Result<(), ValidationError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ValidationError::new(
            "value",
            format!("must be at most {MAX_VALUE_LEN} bytes"),
        ));
    }
    if value.contains('\0') {
        return Err(ValidationError::new("value", "must not contain NUL bytes"));
    }
    Ok(())
}

/// The daemon's age identity: encrypts and decrypts secret values.
pub struct SecretBox {
    identity: Identity,
    recipient: Recipient,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("recipient", &self.recipient.to_string())
            .finish()
    }
}

impl SecretBox {
    /// Loads `<data_dir>/secrets.key`, creating it (0600, exclusive create)
    /// when missing. An existing file readable by others is tightened to 0600.
    pub fn load_or_create(data_dir: &Path) -> Result<SecretBox, SecretsError> {
        let path = data_dir.join(IDENTITY_FILE);
        let io = |source| SecretsError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                let identity = Identity::generate();
                let text = identity.to_string();
                let mut body = String::from(
                    "# bhatti secrets identity: keep private; losing it loses every secret\n",
                );
                body.push_str(text.expose_secret());
                body.push('\n');
                f.write_all(body.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(io)?;
                let recipient = identity.to_public();
                return Ok(SecretBox {
                    identity,
                    recipient,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let meta = std::fs::metadata(&path).map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "secrets identity was readable by others; setting mode 0600");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        let text = std::fs::read_to_string(&path).map_err(io)?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| SecretsError::BadIdentity { path: path.clone() })?;
        let identity = Identity::from_str(line)
            .map_err(|_| SecretsError::BadIdentity { path: path.clone() })?;
        let recipient = identity.to_public();
        Ok(SecretBox {
            identity,
            recipient,
        })
    }

    /// Encrypts a value to the daemon's recipient.
    pub fn encrypt(&self, value: &[u8]) -> Result<Vec<u8>, SecretsError> {
        age::encrypt(&self.recipient, value).map_err(|e| SecretsError::Encrypt(e.to_string()))
    }

    /// Decrypts a value encrypted by [`SecretBox::encrypt`].
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, SecretsError> {
        age::decrypt(&self.identity, ciphertext).map_err(|e| SecretsError::Decrypt(e.to_string()))
    }

    /// Validates and stores the owner's secret; returns true when it is new.
    pub fn set(
        &self,
        c: &Connection,
        owner: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, SecretsError> {
        validate_name(name)?;
        validate_value(value)?;
        let ct = self.encrypt(value.as_bytes())?;
        Ok(store::secrets::upsert(c, owner, name, &ct)?)
    }

    /// The owner's secrets named in `names`, decrypted, as environment
    /// entries. A missing name is [`StoreError::NotFound`] naming it.
    pub fn resolve_env(
        &self,
        c: &Connection,
        owner: &str,
        names: &[String],
    ) -> Result<BTreeMap<String, String>, SecretsError> {
        let mut env = BTreeMap::new();
        for name in names {
            validate_name(name)?;
            let ct = store::secrets::ciphertext(c, owner, name)?
                .ok_or_else(|| StoreError::NotFound(format!("no secret '{name}'")))?;
            let plain = String::from_utf8(self.decrypt(&ct)?).map_err(|_| SecretsError::NotUtf8)?;
            env.insert(name.clone(), plain);
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    #[test]
    fn identity_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretBox::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let ct = a.encrypt(b"hunter2").unwrap();
        assert!(!ct.windows(7).any(|w| w == b"hunter2"));
        // A second load uses the same identity.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let b = SecretBox::load_or_create(dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(b.decrypt(&ct).unwrap(), b"hunter2");
        // Another identity cannot decrypt it.
        let other = tempfile::tempdir().unwrap();
        let c = SecretBox::load_or_create(other.path()).unwrap();
        assert!(matches!(c.decrypt(&ct), Err(SecretsError::Decrypt(_))));
        // A corrupt file is a clear error.
        std::fs::write(other.path().join(IDENTITY_FILE), "nope\n").unwrap();
        let e = SecretBox::load_or_create(other.path()).unwrap_err();
        assert!(e.to_string().contains("not an age"), "{e}");
        assert!(!format!("{a:?}").contains("AGE-SECRET-KEY"));
    }

    #[test]
    fn names_are_validated() {
        for ok in ["A", "_X", "API_KEY_2", &"A".repeat(128)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "a",
            "1ABC",
            "API-KEY",
            "API KEY",
            "ÄB",
            &"A".repeat(129),
        ] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.to_string().contains("[A-Z_][A-Z0-9_]*"), "{e}");
        }
        assert!(validate_value(&"x".repeat(MAX_VALUE_LEN + 1)).is_err());
        assert!(validate_value("a\0b").is_err());
    }

    #[test]
    fn set_and_resolve_are_encrypted_and_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let sb = SecretBox::load_or_create(dir.path()).unwrap();
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            let b = testutil::user(c, "bob");
            assert!(sb.set(c, &a, "TOKEN", "s3cret-value").unwrap());
            assert!(!sb.set(c, &a, "TOKEN", "s3cret-value2").unwrap());
            assert!(sb.set(c, &a, "bad", "x").is_err());
            // At rest: ciphertext only.
            let raw: Vec<u8> = c.query_row("SELECT ciphertext FROM secrets", [], |r| r.get(0))?;
            assert!(!raw.windows(12).any(|w| w == b"s3cret-value"));
            let env = sb.resolve_env(c, &a, &["TOKEN".to_string()]).unwrap();
            assert_eq!(env["TOKEN"], "s3cret-value2");
            let e = sb.resolve_env(c, &b, &["TOKEN".to_string()]).unwrap_err();
            assert!(matches!(e, SecretsError::Store(StoreError::NotFound(ref m)) if m.contains("TOKEN")), "{e}");
            Ok(())
        })
        .unwrap();
    }
}

/// The engine's [`crate::engine::SecretSource`]: the secrets a sandbox's row
/// names (`spec.secrets`), decrypted from the store for each boot.
#[derive(Debug)]
pub struct StoredSecrets {
    pub store: crate::store::Store,
    pub secrets: SecretBox,
}

impl crate::engine::SecretSource for StoredSecrets {
    fn env(&self, sandbox_id: &str) -> Result<BTreeMap<String, String>, String> {
        self.store
            .with(|c| {
                let Some(row) = store::sandboxes::get_by_id(c, sandbox_id)? else {
                    return Ok(Ok(BTreeMap::new()));
                };
                let names: Vec<String> = row
                    .spec
                    .get("secrets")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default();
                Ok(self
                    .secrets
                    .resolve_env(c, &row.owner, &names)
                    .map_err(|e| e.to_string()))
            })
            .map_err(|e| e.to_string())?
    }
}
