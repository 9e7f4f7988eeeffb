//! The public listener (`[proxy] listen`): published ports, without auth.
//!
//! A request names its alias by host (`<alias>.<zone>`, when a zone is
//! configured) or by the first path segment (`/<alias>/…`, the rest is the
//! guest's path). Then, in this order: the client's token bucket, the
//! alias lookup (unknown: 404), the alias's bucket, the wake of a cold
//! sandbox (at most `max_cold_wakes` sandboxes at once; past it 503 with
//! `Retry-After`; requests for a sandbox already waking join its wake),
//! and the relay. Warm and cold sandboxes are woken and the request is
//! answered, as if they had been running.
//!
//! Served by its own accept loop (plain TCP or TLS with rustls), so the
//! client's address is known for rate limiting; HTTP/1.1 with upgrades.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::{alias, Forwarded};
use crate::api::{ApiError, AppStateRef};
use crate::thermal::{thermal_of, ThermalState};

/// The client's address, put in each request's extensions by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Longest time a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

pub fn router(st: AppStateRef) -> Router {
    Router::new().fallback(handle).with_state(st)
}

async fn handle(State(st): State<AppStateRef>, req: Request<Body>) -> Response<Body> {
    match route(&st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(st: &AppStateRef, req: Request<Body>) -> Result<Response<Body>, ApiError> {
    let proxy = &st.proxy;
    let peer = req.extensions().get::<Peer>().map(|p| p.0.ip());
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(str::to_owned);
    let path = req.uri().path().to_owned();
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let by_host = host
        .as_deref()
        .and_then(|h| alias::from_host(h, &proxy.config.zone))
        .map(str::to_owned);
    let (alias, guest_path, prefix) = match by_host {
        Some(a) => (a, format!("{path}{query}"), None),
        None => {
            let rest = path.trim_start_matches('/');
            let (a, tail) = rest.split_once('/').unwrap_or((rest, ""));
            if a.is_empty() {
                return Err(ApiError::NotFound(
                    "nothing is published here: use /<alias>/".into(),
                ));
            }
            if !path[1..].contains('/') {
                // `/<alias>` → `/<alias>/`, so the page's relative links work.
                return Ok(Response::builder()
                    .status(StatusCode::PERMANENT_REDIRECT)
                    .header(header::LOCATION, format!("/{a}/{query}"))
                    .body(Body::empty())
                    .unwrap_or_default());
            }
            (
                a.to_owned(),
                format!("/{tail}{query}"),
                Some(format!("/{a}")),
            )
        }
    };
    if alias::validate(&alias).is_err() {
        return Err(unknown(&alias));
    }
    proxy.rate_client(peer)?;
    let a = alias.clone();
    let published = st
        .store
        .read(move |c| crate::store::published::by_alias(c, &a))
        .await?
        .ok_or_else(|| unknown(&alias))?;
    proxy.rate_alias(&alias)?;
    let sid = published.sandbox_id.clone();
    let row = st
        .store
        .read(move |c| crate::store::sandboxes::get_by_id(c, &sid))
        .await?
        .ok_or_else(|| unknown(&alias))?;
    let cold = st
        .engine
        .get(&row.id)
        .map(|s| thermal_of(s.state) == ThermalState::Cold)
        .unwrap_or(true);
    {
        let _slot = if cold {
            Some(proxy.admit_wake(&row.id)?)
        } else {
            None
        };
        st.agent(&row).await?;
    }
    let fwd = Forwarded {
        client: peer,
        proto: if proxy.config.tls_cert.is_empty() {
            "http"
        } else {
            "https"
        },
        host,
        prefix,
    };
    proxy
        .relay(&row.id, published.port, &guest_path, req, fwd)
        .await
}

fn unknown(alias: &str) -> ApiError {
    ApiError::NotFound(format!("no published port is called '{alias}'"))
}

/// TLS settings from PEM files, or `None` for plain HTTP.
pub fn tls_config(
    cert: &str,
    key: &str,
) -> Result<Option<Arc<tokio_rustls::rustls::ServerConfig>>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if cert.is_empty() {
        return Ok(None);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect())
        .map_err(|e| format!("reading the certificate {cert}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{cert} holds no certificate"));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("reading the key {key}: {e}"))?;
    // ring, not aws-lc-rs: no C build beyond what `cc` does.
    #[allow(deprecated)]
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(cfg)))
}

/// Serves `app` on `listener` until `stop` fires; connections still open
/// then are asked to finish (graceful shutdown) and ended after `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    stop: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    // Connections watch `closing` and finish their request in flight when
    // it fires; `tasks` says when they all have.
    let closing = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off briefly.
                    tracing::warn!("public listener: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            app.clone().oneshot(req.map(Body::new))
        });
        let acceptor = acceptor.clone();
        let closing = closing.clone();
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            // A client that never finishes its headers (slowloris) is cut off.
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let r = match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    until_closing(conn.with_upgrades(), &closing).await
                }
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "TLS handshake: {e}");
                                return;
                            }
                            Err(_) => return,
                        };
                    let conn = builder.serve_connection(TokioIo::new(tls), svc);
                    until_closing(conn.with_upgrades(), &closing).await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, "public connection: {e}");
            }
        });
    }
    closing.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("public connections still open after {grace:?}");
    }
}

/// Serves a connection; once `closing` fires, it finishes the request in
/// flight and ends.
async fn until_closing<I, S>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    closing: &tokio_util::sync::CancellationToken,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio_rustls::rustls;

    /// A router that answers with the client's address, as [`serve`] saw it.
    fn peer_echo() -> Router {
        Router::new().fallback(|req: Request<Body>| async move {
            req.extensions()
                .get::<Peer>()
                .map(|p| p.0.ip().to_string())
                .unwrap_or_default()
        })
    }

    #[tokio::test]
    async fn tls_is_terminated_and_the_peer_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["web.sb.test".to_string()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
        let tls = tls_config(&cert_s, &key_s).unwrap().expect("TLS");
        // Bad files are refused with a reason.
        assert!(tls_config(&cert_s, &cert_s).unwrap_err().contains("key"));
        assert!(tls_config("/nonexistent.pem", &key_s)
            .unwrap_err()
            .contains("/nonexistent.pem"));
        assert!(tls_config("", "").unwrap().is_none());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            peer_echo(),
            Some(tls),
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(5),
        ));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("web.sb.test").unwrap();
        let tls = connector.connect(name, tcp).await.expect("TLS handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..2 {
            let req = Request::builder()
                .uri("/")
                .header(header::HOST, "web.sb.test")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"127.0.0.1");
        }
        // Plain HTTP on the TLS port gets no answer.
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await;
        assert!(!buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");

        // Stopping ends the accept loop and the kept-alive connection.
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve ended")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            peer_echo(),
            None,
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(5),
        ));
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut buf = Vec::new();
        tokio::time::timeout(HEADER_TIMEOUT * 2, slow.read_to_end(&mut buf))
            .await
            .expect("the connection was closed")
            .ok();
        assert!(
            started.elapsed() >= HEADER_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(!buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");
        let _ = stop_tx.send(());
        server.await.unwrap();
    }
}
