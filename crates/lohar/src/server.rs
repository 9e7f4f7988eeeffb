//! One agent, many connections: the handshake, then a multiplexer whose
//! channels are each served by their own task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bhatti_protocol::frame::FrameKind;
use bhatti_protocol::handshake::{parse_hello, read_frame, server_reply, MAX_HANDSHAKE_PAYLOAD};
use bhatti_protocol::mux::{Mux, MuxConfig, MuxEnd};
use bhatti_protocol::{ErrorBody, ErrorCode, HelloOk, PROTOCOL_VERSION};
use bytes::Bytes;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::activity::ActivityTracker;
use crate::config::AgentConfig;
use crate::sessions::SessionTable;

/// How long a new connection has to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every connection and channel.
#[derive(Debug)]
pub struct AgentState {
    pub config: AgentConfig,
    pub boot_id: String,
    pub activity: ActivityTracker,
    pub sessions: SessionTable,
    /// The token connections must present: `config.token` at start, then
    /// whatever a `reidentify` set (a guest restored into a new sandbox).
    token: std::sync::RwLock<String>,
    /// The sandbox-wide environment: `config.env` at start, then whatever
    /// a `reidentify` set (a pre-booted guest given its sandbox's env).
    sandbox_env: std::sync::RwLock<Arc<BTreeMap<String, String>>>,
}

pub type Agent = Arc<AgentState>;

impl AgentState {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(config: AgentConfig) -> Agent {
        let sessions = SessionTable::new(config.limits.clone());
        Arc::new(AgentState {
            boot_id: random_id(),
            activity: ActivityTracker::new(),
            sessions,
            token: std::sync::RwLock::new(config.token.clone()),
            sandbox_env: std::sync::RwLock::new(Arc::new(config.env.clone())),
            config,
        })
    }

    fn token_matches(&self, presented: &str) -> bool {
        let token = self.token.read().unwrap_or_else(|p| p.into_inner());
        let expected = token.as_bytes();
        // ct_eq on slices of different lengths is false without leaking
        // where they differ.
        bool::from(expected.ct_eq(presented.as_bytes())) && !expected.is_empty()
    }

    /// Replaces the token for connections opened from now on; open ones
    /// stay.
    pub fn set_token(&self, token: String) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// The environment every command gets under its own.
    pub fn sandbox_env(&self) -> Arc<BTreeMap<String, String>> {
        self.sandbox_env
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the sandbox-wide environment for commands started from now.
    pub fn set_sandbox_env(&self, env: BTreeMap<String, String>) {
        *self.sandbox_env.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(env);
    }
}

/// A random 128-bit id in hex, from the kernel's RNG.
pub fn random_id() -> String {
    let mut buf = [0u8; 16];
    if getrandom(&mut buf).is_err() {
        // Fall back to time and pid: unique enough for ids, never for secrets.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        buf = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Serves one connection (after any transport handshake) until it ends.
/// `first_hello` carries a `Hello` already read by a previous mux on the
/// same stream (virtio-serial after a restore).
pub async fn serve_connection<R, W>(
    agent: Agent,
    mut reader: R,
    mut writer: W,
    first_hello: Option<Bytes>,
) -> MuxEnd
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let hello = match first_hello {
        Some(payload) => Ok((FrameKind::Hello, payload)),
        None => match tokio::time::timeout(
            HELLO_TIMEOUT,
            read_frame(&mut reader, MAX_HANDSHAKE_PAYLOAD),
        )
        .await
        {
            Ok(Ok(f)) => Ok((f.kind, f.payload)),
            Ok(Err(e)) => Err(ErrorBody::new(ErrorCode::Protocol, e.to_string())),
            Err(_) => Err(ErrorBody::new(ErrorCode::Protocol, "no Hello within 10 s")),
        },
    };
    let verdict = hello.and_then(|(kind, payload)| {
        let hello = parse_hello(kind, &payload)?;
        if agent.token_matches(&hello.token) {
            Ok(())
        } else {
            Err(ErrorBody::new(ErrorCode::Unauthorized, "invalid token"))
        }
    });
    let ok = HelloOk {
        version: PROTOCOL_VERSION,
        agent: format!("lohar {}", env!("CARGO_PKG_VERSION")),
        boot_id: agent.boot_id.clone(),
    };
    match &verdict {
        Ok(()) => {
            if server_reply(&mut writer, Ok(&ok)).await.is_err() {
                return MuxEnd::Eof;
            }
        }
        Err(e) => {
            tracing::warn!("refused a connection: {e}");
            let _ = server_reply(&mut writer, Err(e)).await;
            return MuxEnd::Shutdown;
        }
    }

    let config = MuxConfig {
        max_channels: agent.config.limits.max_channels,
        ..MuxConfig::default()
    };
    let (mux, mut acceptor, reader_task) = Mux::server(reader, writer, config);
    while let Some((channel, request)) = acceptor.accept().await {
        let agent = agent.clone();
        tokio::spawn(crate::handlers::handle(agent, channel, request));
    }
    mux.shutdown();
    reader_task.await.unwrap_or(MuxEnd::Shutdown)
}
