//! Who is asking. The control plane carries a bhatti API key in
//! `X-API-KEY` (or `Authorization: Bearer`); envd requests carry the
//! sandbox in `E2b-Sandbox-Id` and its envd access token in
//! `X-Access-Token` (handed out by create and connect, one per sandbox).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{Code, ConnectError, E2bError};
use crate::api::{AppStateRef, Caller};
use crate::auth::EffectiveCaps;
use crate::store::sandboxes::SandboxRow;

/// The user of a control-plane request.
#[derive(Debug, Clone)]
pub struct ApiKeyCaller(pub Caller);

impl FromRequestParts<AppStateRef> for ApiKeyCaller {
    type Rejection = E2bError;
    async fn from_request_parts(parts: &mut Parts, st: &AppStateRef) -> Result<Self, E2bError> {
        let h = &parts.headers;
        let key = h
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .or_else(|| {
                h.get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::auth::bearer_token)
            })
            .map(str::to_owned)
            .ok_or_else(E2bError::unauthorized)?;
        let user = st
            .store
            .read(move |c| crate::auth::authenticate(c, &key))
            .await?
            .ok_or_else(E2bError::unauthorized)?;
        tracing::Span::current().record("user", user.name.as_str());
        let caps = EffectiveCaps::resolve(&user.caps, &st.config.limits, &st.config.vm);
        Ok(ApiKeyCaller(Caller { user, caps }))
    }
}

/// The sandbox (and its owner) of an envd request.
#[derive(Debug, Clone)]
pub struct EnvdCaller {
    pub caller: Caller,
    pub sandbox: SandboxRow,
}

impl FromRequestParts<AppStateRef> for EnvdCaller {
    type Rejection = ConnectError;
    async fn from_request_parts(parts: &mut Parts, st: &AppStateRef) -> Result<Self, ConnectError> {
        let h = &parts.headers;
        let header = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let id = header("e2b-sandbox-id").ok_or_else(|| {
            ConnectError::invalid(
                "missing the E2b-Sandbox-Id header (set E2B_SANDBOX_URL to bhatti's /e2b)",
            )
        })?;
        let token = header("x-access-token");
        // As E2B's proxy words it: the SDK reads "was not found" with
        // `unavailable` as "the sandbox is gone", not as a missing file.
        let unknown =
            || ConnectError::new(Code::Unavailable, format!("The sandbox {id} was not found"));
        let (sid, tok) = (id.clone(), token.clone());
        let found = st
            .store
            .read(move |c| {
                let Some(e) = crate::store::e2b::get(c, &sid)? else {
                    return Ok(None);
                };
                let ok = tok
                    .as_deref()
                    .is_some_and(|t| token_matches(t, &e.token_sha256));
                if !ok {
                    return Ok(Some(None));
                }
                let Some(user) = crate::store::users::get(c, &e.owner)? else {
                    return Ok(None);
                };
                let Some(row) = crate::store::sandboxes::get_by_id(c, &sid)? else {
                    return Ok(None);
                };
                Ok(Some(Some((user, row))))
            })
            .await?;
        match found {
            None => Err(unknown()),
            Some(None) => Err(ConnectError::new(
                Code::Unauthenticated,
                "missing or wrong X-Access-Token for this sandbox",
            )),
            Some(Some((user, sandbox))) => {
                tracing::Span::current().record("user", user.name.as_str());
                let caps = EffectiveCaps::resolve(&user.caps, &st.config.limits, &st.config.vm);
                Ok(EnvdCaller {
                    caller: Caller { user, caps },
                    sandbox,
                })
            }
        }
    }
}

/// A new envd access token.
pub fn new_token() -> String {
    let mut b = [0u8; 24];
    rand::fill(&mut b);
    format!("e2bt_{}", hex::encode(b))
}

/// What the store keeps to check a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn token_matches(token: &str, stored_hex: &str) -> bool {
    token_hash(token)
        .as_bytes()
        .ct_eq(stored_hex.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_and_checked_by_hash() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(token_matches(&a, &token_hash(&a)));
        assert!(!token_matches(&b, &token_hash(&a)));
    }
}
