//! Reaching the guest agent: connect through the VMM's transport,
//! authenticate, ping; retried until a deadline while the VMM lives.

use std::time::{Duration, Instant};

use bhatti_protocol::handshake::HandshakeError;
use bhatti_protocol::{AgentClient, ClientError, ErrorCode};
use bhatti_vmm::Vm;

/// Pause between attempts while the guest is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(25);
/// How often the VMM's liveness is checked during an attempt.
const ALIVE_POLL: Duration = Duration::from_millis(100);

/// Why the agent could not be reached.
#[derive(Debug)]
pub enum WaitError {
    /// The VMM process ended.
    VmmExited,
    /// The deadline passed; the last attempt's error, if any.
    Timeout(Duration, Option<String>),
    /// The agent answered but refused us (wrong token, bad version): no
    /// point retrying.
    Refused(ClientError),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::VmmExited => f.write_str("the VMM process exited"),
            WaitError::Timeout(d, None) => write!(f, "the agent did not answer within {d:?}"),
            WaitError::Timeout(d, Some(last)) => {
                write!(
                    f,
                    "the agent did not answer within {d:?} (last error: {last})"
                )
            }
            WaitError::Refused(e) => write!(f, "the agent refused the connection: {e}"),
        }
    }
}

/// Connects to the agent of `vm`, retrying until `timeout` has passed.
///
/// One attempt is: a transport stream from the VMM, the `Hello` exchange
/// and a ping. Over a virtio-serial chardev the stream connects before the
/// guest listens and the `Hello` simply waits in the socket, so an attempt
/// is allowed to run until the deadline; over vsock the connect is refused
/// until the guest listens, and we retry quickly.
pub async fn wait_for_agent(
    vm: &dyn Vm,
    token: &str,
    timeout: Duration,
) -> Result<AgentClient, WaitError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last: Option<String> = None;
    loop {
        if !vm.is_alive() {
            return Err(WaitError::VmmExited);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(WaitError::Timeout(timeout, last));
        }
        let attempt = async {
            let stream = vm.connect_agent().await.map_err(|e| e.to_string())?;
            let client = AgentClient::connect(stream, token)
                .await
                .map_err(Attempt::Client)?;
            client.ping().await.map_err(Attempt::Client)?;
            Ok::<_, Attempt>(client)
        };
        let dead = async {
            while vm.is_alive() {
                tokio::time::sleep(ALIVE_POLL).await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(remaining, attempt) => match r {
                Ok(Ok(client)) => {
                    tracing::debug!(ms = started.elapsed().as_millis() as u64, "agent connected");
                    return Ok(client);
                }
                Ok(Err(Attempt::Client(e))) if refused(&e) => return Err(WaitError::Refused(e)),
                Ok(Err(e)) => last = Some(e.to_string()),
                Err(_) => return Err(WaitError::Timeout(timeout, last)),
            },
            _ = dead => return Err(WaitError::VmmExited),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

enum Attempt {
    Transport(String),
    Client(ClientError),
}

impl From<String> for Attempt {
    fn from(s: String) -> Self {
        Attempt::Transport(s)
    }
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Transport(s) => f.write_str(s),
            Attempt::Client(e) => write!(f, "{e}"),
        }
    }
}

fn refused(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Handshake(HandshakeError::Refused(body))
            if matches!(body.code, ErrorCode::Unauthorized | ErrorCode::Unsupported)
    )
}
