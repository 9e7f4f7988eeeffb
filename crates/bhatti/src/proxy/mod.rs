//! Reaching the ports of guests over HTTP.
//!
//! - [`upstream`]: hyper's pooled client whose connections are port
//!   forwards through the guest agent (no guest network needed).
//! - [`Proxy::relay`]: one request to a guest port: bodies stream both ways
//!   (never buffered whole), request bodies are capped, WebSocket and other
//!   upgrades are relayed as byte streams, and a connection that moves no
//!   byte for `idle_timeout_secs` is closed.
//! - The authenticated route `ANY /sandboxes/{id}/proxy/{port}/…` lives in
//!   the API (`api::ports`); [`public`] is the listener that serves
//!   published ports to anyone, by host and by path, with per-client and
//!   per-alias token buckets and a bound on cold wakes in flight.
//! - [`alias`]: the names published ports go by.

pub mod alias;
pub mod public;
pub mod upstream;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use governor::clock::{Clock, DefaultClock};
use governor::DefaultKeyedRateLimiter;
use tokio_util::sync::CancellationToken;

use crate::api::ApiError;
use crate::config::ProxyConfig;
use crate::thermal::ThermalHandle;
use upstream::{ConnectError, UpstreamClient};

/// Headers that describe one hop and are never passed on (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Who asked, for the `X-Forwarded-*` headers the guest sees.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    pub client: Option<IpAddr>,
    pub proto: &'static str,
    pub host: Option<String>,
    /// The path the guest's root is mounted at (`/<alias>` on the public
    /// listener, `/sandboxes/<id>/proxy/<port>` through the API), as
    /// `X-Forwarded-Prefix`.
    pub prefix: Option<String>,
}

/// The proxy's shared parts: the upstream client, limits, wakes in flight.
pub struct Proxy {
    client: UpstreamClient,
    pub config: ProxyConfig,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_alias: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
    /// Cold sandboxes the public listener is waking.
    wakes: WakeGate,
    /// Ends relayed upgrades (WebSockets) at shutdown.
    pub stop: CancellationToken,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.config)
            .finish()
    }
}

impl Proxy {
    pub fn new(thermal: ThermalHandle, config: &ProxyConfig) -> Proxy {
        let idle = Duration::from_secs(config.idle_timeout_secs.max(1));
        Proxy {
            client: upstream::client(thermal, idle),
            per_ip: crate::auth::quota(config.per_ip_per_second, config.per_ip_burst, false)
                .map(governor::RateLimiter::keyed),
            per_alias: crate::auth::quota(
                config.per_alias_per_second,
                config.per_alias_burst,
                false,
            )
            .map(governor::RateLimiter::keyed),
            clock: DefaultClock::default(),
            wakes: WakeGate::new(config.max_cold_wakes as usize),
            stop: CancellationToken::new(),
            config: config.clone(),
        }
    }

    /// The public URL of an alias, when there is a public listener.
    pub fn url_of(&self, alias: &str) -> Option<String> {
        UrlConfig(&self.config).url(alias)
    }

    /// One token of a client's bucket, or a 429.
    pub fn rate_client(&self, ip: Option<IpAddr>) -> Result<(), ApiError> {
        match (&self.per_ip, ip) {
            (Some(l), Some(ip)) => l
                .check_key(&ip)
                .map_err(|n| too_many("client", n.wait_time_from(self.clock.now()))),
            _ => Ok(()),
        }
    }

    /// One token of a published alias's bucket, or a 429.
    pub fn rate_alias(&self, alias: &str) -> Result<(), ApiError> {
        match &self.per_alias {
            Some(l) => l
                .check_key(&alias.to_owned())
                .map_err(|n| too_many("address", n.wait_time_from(self.clock.now()))),
            None => Ok(()),
        }
    }

    /// Drops the buckets of clients and aliases that are full again.
    pub fn retain_recent(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
        }
        if let Some(l) = &self.per_alias {
            l.retain_recent();
        }
    }

    /// Admits the wake of a cold sandbox (see [`WakeGate::admit`]).
    pub fn admit_wake(&self, sandbox_id: &str) -> Result<WakeSlot<'_>, ApiError> {
        self.wakes.admit(sandbox_id)
    }

    /// Sends `req` to `port` of sandbox `sandbox_id` (already woken and
    /// authorized by the caller) as `path_and_query`, and answers with the
    /// guest's response, streamed.
    pub async fn relay(
        &self,
        sandbox_id: &str,
        port: u16,
        path_and_query: &str,
        mut req: Request<Body>,
        fwd: Forwarded,
    ) -> Result<Response<Body>, ApiError> {
        let max = self.config.max_body_bytes;
        if content_length(req.headers()).is_some_and(|n| n > max) {
            return Err(ApiError::TooLarge(format!(
                "the request body is larger than {max} bytes"
            )));
        }
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let uri = upstream::target(sandbox_id, port, path_and_query)
            .map_err(|e| ApiError::BadRequest(format!("bad path: {e}")))?;
        let mut up = Request::builder()
            .method(parts.method)
            .uri(uri)
            .version(axum::http::Version::HTTP_11)
            .body(Body::new(http_body_util::Limited::new(body, max as usize)))
            .map_err(|e| ApiError::BadRequest(format!("bad request: {e}")))?;
        *up.headers_mut() = forward_headers(parts.headers, upgrade, &fwd);

        let idle = Duration::from_secs(self.config.idle_timeout_secs);
        let resp = match tokio::time::timeout(idle, self.client.request(up)).await {
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "port {port} sent no response within {idle:?}"
                )))
            }
            Ok(Err(e)) => return Err(upstream_error(e, port, max)),
            Ok(Ok(r)) => r,
        };
        let (mut rparts, rbody) = resp.into_parts();
        if rparts.status == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ApiError::BadGateway(format!(
                    "port {port} switched protocols without being asked"
                )));
            };
            let guest_upgrade = hyper::upgrade::on(Response::from_parts(rparts.clone(), rbody));
            let stop = self.stop.clone();
            tokio::spawn(async move {
                let (Ok(guest), Ok(client)) = (guest_upgrade.await, client_upgrade.await) else {
                    return;
                };
                let guest = hyper_util::rt::TokioIo::new(guest);
                let client = hyper_util::rt::TokioIo::new(client);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = splice(client, guest) => {}
                }
            });
            return Ok(Response::from_parts(rparts, Body::empty()));
        }
        strip_hop_by_hop(&mut rparts.headers);
        // Our side of the connection speaks HTTP/1.1 whatever the guest does.
        rparts.version = axum::http::Version::HTTP_11;
        Ok(Response::from_parts(rparts, Body::new(rbody)))
    }
}

/// Where published ports are served, from `[proxy]`.
struct UrlConfig<'a>(&'a ProxyConfig);

impl UrlConfig<'_> {
    fn url(&self, alias: &str) -> Option<String> {
        let c = &self.0;
        let scheme = if c.tls_cert.is_empty() {
            "http"
        } else {
            "https"
        };
        if !c.public_url.is_empty() {
            let base = c.public_url.trim_end_matches('/');
            if !c.zone.is_empty() {
                // `https://sb.example.com` → `https://<alias>.sb.example.com/`
                if let Some((s, rest)) = base.split_once("://") {
                    return Some(format!("{s}://{alias}.{rest}/"));
                }
            }
            return Some(format!("{base}/{alias}/"));
        }
        let listen = c.listen?;
        if !c.zone.is_empty() {
            let port = match (scheme, listen.port()) {
                ("http", 80) | ("https", 443) => String::new(),
                (_, p) => format!(":{p}"),
            };
            return Some(format!("{scheme}://{alias}.{}{port}/", c.zone));
        }
        let host = if listen.ip().is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], listen.port()))
        } else {
            listen
        };
        Some(format!("{scheme}://{host}/{alias}/"))
    }
}

fn too_many(who: &str, wait: Duration) -> ApiError {
    ApiError::TooMany {
        message: format!(
            "rate limit of this {who} exceeded; retry in {} ms",
            wait.as_millis()
        ),
        retry_after: Some(wait),
    }
}

/// How long one direction of a relayed upgrade may stay open after the
/// other has ended: a client that never closes its half must not hold the
/// guest's forward (and so its sandbox hot) for ever.
const HALF_CLOSED_GRACE: Duration = Duration::from_secs(5);

/// Copies both ways until both directions end, or one has ended and the
/// other has not within [`HALF_CLOSED_GRACE`].
async fn splice<A, B>(a: A, b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let a_to_b = async {
        let r = tokio::io::copy(&mut ar, &mut bw).await;
        let _ = bw.shutdown().await;
        r
    };
    let b_to_a = async {
        let r = tokio::io::copy(&mut br, &mut aw).await;
        let _ = aw.shutdown().await;
        r
    };
    tokio::pin!(a_to_b, b_to_a);
    tokio::select! {
        _ = &mut a_to_b => {
            let _ = tokio::time::timeout(HALF_CLOSED_GRACE, b_to_a).await;
        }
        _ = &mut b_to_a => {
            let _ = tokio::time::timeout(HALF_CLOSED_GRACE, a_to_b).await;
        }
    }
}

/// Bounds the cold sandboxes being woken at once. Requests for a sandbox
/// already being woken join that wake; a new one needs a free slot, else
/// 503 with `Retry-After`. The slot is freed when its [`WakeSlot`] drops.
pub struct WakeGate {
    max: usize,
    waking: Mutex<HashSet<String>>,
}

impl WakeGate {
    pub fn new(max: usize) -> Self {
        WakeGate {
            max: max.max(1),
            waking: Mutex::new(HashSet::new()),
        }
    }

    pub fn admit(&self, sandbox_id: &str) -> Result<WakeSlot<'_>, ApiError> {
        let mut w = self.waking.lock().unwrap_or_else(|p| p.into_inner());
        if w.contains(sandbox_id) {
            return Ok(WakeSlot {
                gate: self,
                id: None,
            });
        }
        if w.len() >= self.max {
            return Err(ApiError::Unavailable {
                message: "too many sandboxes are waking up; retry shortly".into(),
                retry_after: Duration::from_secs(1),
            });
        }
        w.insert(sandbox_id.to_owned());
        Ok(WakeSlot {
            gate: self,
            id: Some(sandbox_id.to_owned()),
        })
    }
}

/// A slot of [`WakeGate::admit`]; frees it when dropped.
pub struct WakeSlot<'a> {
    gate: &'a WakeGate,
    id: Option<String>,
}

impl Drop for WakeSlot<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut w = self.gate.waking.lock().unwrap_or_else(|p| p.into_inner());
            w.remove(&id);
        }
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// `Connection: upgrade` with an `Upgrade` header.
fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers, including those `Connection` names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(named.iter()) {
        h.remove(n);
    }
}

/// The headers the guest sees: the client's, minus hop-by-hop ones (but
/// an upgrade's own), minus bhatti's API key, plus `X-Forwarded-*`.
fn forward_headers(mut h: HeaderMap, upgrade: bool, fwd: &Forwarded) -> HeaderMap {
    let upgrade_to = h.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut h);
    if let (true, Some(u)) = (upgrade, upgrade_to) {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
    // The bearer key is bhatti's, never the guest's business.
    if h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token)
        .is_some_and(|t| t.starts_with("bht_"))
    {
        h.remove(header::AUTHORIZATION);
    }
    if let Some(ip) = fwd.client {
        let prior = h
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(|s| format!("{s}, {ip}"));
        if let Ok(v) = HeaderValue::from_str(&prior.unwrap_or_else(|| ip.to_string())) {
            h.insert("x-forwarded-for", v);
        }
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(fwd.proto));
    if let Some(v) = fwd
        .host
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        h.insert("x-forwarded-host", v);
    }
    if let Some(v) = fwd
        .prefix
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        h.insert("x-forwarded-prefix", v);
    }
    h
}

/// What went wrong sending to the guest, as the client should hear it.
fn upstream_error(e: hyper_util::client::legacy::Error, port: u16, max: u64) -> ApiError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = src {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return ApiError::BadGateway(c.to_string());
        }
        if s.is::<http_body_util::LengthLimitError>() {
            return ApiError::TooLarge(format!("the request body is larger than {max} bytes"));
        }
        src = s.source();
    }
    ApiError::BadGateway(format!("port {port}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn cold_wakes_are_bounded_per_sandbox() {
        let gate = WakeGate::new(2);
        let a = gate.admit("a").expect("first sandbox");
        // More requests for a sandbox already waking join it.
        let a2 = gate.admit("a").expect("joins a's wake");
        let b = gate.admit("b").expect("second sandbox");
        match gate.admit("c") {
            Err(e @ ApiError::Unavailable { .. }) => {
                assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
                let resp = axum::response::IntoResponse::into_response(e);
                assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
            }
            other => panic!("a third wake was admitted: {:?}", other.is_ok()),
        }
        // A joined request leaving frees nothing; the owner leaving does.
        drop(a2);
        assert!(gate.admit("c").is_err());
        drop(a);
        let _c = gate.admit("c").expect("a's slot is free");
        drop(b);
    }

    #[test]
    fn hop_by_hop_headers_and_the_api_key_stay_here() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer bht_abc"),
        );
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let fwd = Forwarded {
            client: Some([192, 0, 2, 7].into()),
            proto: "https",
            host: Some("web.sb.test".into()),
            prefix: Some("/web".into()),
        };
        let out = forward_headers(h, false, &fwd);
        for gone in ["connection", "x-secret", "keep-alive", "authorization"] {
            assert!(!out.contains_key(gone), "{gone} passed on");
        }
        assert_eq!(out[header::COOKIE], "a=b");
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "web.sb.test");
        assert_eq!(out["x-forwarded-prefix"], "/web");
        // An app's own Authorization is passed on; an upgrade keeps its headers.
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpw"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        let out = forward_headers(h, true, &Forwarded::default());
        assert_eq!(out[header::AUTHORIZATION], "Basic dTpw");
        assert_eq!(out[header::UPGRADE], "websocket");
        assert_eq!(out[header::CONNECTION], "upgrade");
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_splice_ends_after_the_grace() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (guest, mut guest_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(client, guest));
        client_peer.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        guest_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        // The guest closes; the client never does: the splice still ends.
        drop(guest_peer);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        tokio::time::advance(HALF_CLOSED_GRACE + Duration::from_secs(1)).await;
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the splice ended")
            .unwrap();
    }

    #[test]
    fn public_urls() {
        let url = |c: &ProxyConfig| UrlConfig(c).url("web");
        let mut c = ProxyConfig::default();
        assert_eq!(url(&c), None);
        c.listen = Some("0.0.0.0:8443".parse().unwrap());
        assert_eq!(url(&c).as_deref(), Some("http://127.0.0.1:8443/web/"));
        c.zone = "sb.example.com".into();
        assert_eq!(url(&c).as_deref(), Some("http://web.sb.example.com:8443/"));
        c.listen = Some("0.0.0.0:443".parse().unwrap());
        c.tls_cert = "c.pem".into();
        c.tls_key = "k.pem".into();
        assert_eq!(url(&c).as_deref(), Some("https://web.sb.example.com/"));
        c.public_url = "https://sb.example.com".into();
        assert_eq!(url(&c).as_deref(), Some("https://web.sb.example.com/"));
        c.zone.clear();
        c.public_url = "https://example.com/p/".into();
        assert_eq!(url(&c).as_deref(), Some("https://example.com/p/web/"));
    }
}
