//! The `init` session of a sandbox: lohar runs a sandbox's `init` script
//! once, at its first boot, as the kept session `init`. A create looks at
//! it (or waits for it to end); a template build waits for it and keeps
//! its output's tail.

use std::time::Duration;

use bhatti_protocol::client::{AgentClient, PtyEvent};
use bhatti_protocol::guest_config::INIT_SESSION;
use bhatti_protocol::{AttachRequest, ErrorCode, ExitStatus, PtyEnd};

use crate::api_types::InitView;

/// How far `init` got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    /// It ended; the last bytes of its output (stdout and stderr as they
    /// came), up to what was asked for.
    Exited { status: ExitStatus, tail: Vec<u8> },
    /// Still running (a look, not a wait).
    Running,
    /// Still running when the wait ended.
    TimedOut,
    /// No such session (it did not start) or the agent failed.
    Unknown(String),
}

impl InitOutcome {
    pub fn view(&self) -> InitView {
        let (state, exit_code, error) = match self {
            InitOutcome::Exited { status, .. } if status.exit_code == 0 => {
                ("succeeded", Some(0), None)
            }
            InitOutcome::Exited { status, .. } => ("failed", Some(status.exit_code), None),
            InitOutcome::Running => ("running", None, None),
            InitOutcome::TimedOut => ("timed_out", None, None),
            InitOutcome::Unknown(e) => ("failed", None, Some(e.clone())),
        };
        InitView {
            state: state.into(),
            exit_code,
            error,
        }
    }
}

/// Where `init` is now, without waiting.
pub async fn look(client: &AgentClient, timeout: Duration) -> InitOutcome {
    match tokio::time::timeout(timeout, client.sessions()).await {
        Err(_) => InitOutcome::Unknown("listing the sessions timed out".into()),
        Ok(Err(e)) => InitOutcome::Unknown(format!("listing the sessions: {e}")),
        Ok(Ok(list)) => match list.into_iter().find(|s| s.id == INIT_SESSION) {
            None => InitOutcome::Unknown(not_started()),
            Some(s) => match s.exit {
                Some(status) => InitOutcome::Exited {
                    status,
                    tail: Vec::new(),
                },
                None => InitOutcome::Running,
            },
        },
    }
}

/// Waits up to `timeout` for `init` to end, keeping the last `keep` bytes
/// of its output. Attached from the oldest output held, so an `init` that
/// already ended answers at once.
pub async fn wait(client: &AgentClient, timeout: Duration, keep: usize) -> InitOutcome {
    let attach = client.attach(AttachRequest {
        session: INIT_SESSION.into(),
        offset: None,
    });
    let mut pty = match tokio::time::timeout(timeout, attach).await {
        Err(_) => return InitOutcome::TimedOut,
        Ok(Err(e)) if e.code() == Some(ErrorCode::NotFound) => {
            return InitOutcome::Unknown(not_started())
        }
        Ok(Err(e)) => return InitOutcome::Unknown(format!("attaching to init: {e}")),
        Ok(Ok(p)) => p,
    };
    let mut tail: Vec<u8> = Vec::new();
    let read = async {
        loop {
            match pty.next().await {
                Ok(PtyEvent::Output(b) | PtyEvent::Stderr(b)) => {
                    tail.extend_from_slice(&b);
                    let over = tail.len().saturating_sub(keep);
                    tail.drain(..over);
                }
                Ok(PtyEvent::Gap(_)) => {}
                Ok(PtyEvent::End(PtyEnd::Exited { status, .. })) => return Ok(status),
                Ok(PtyEvent::End(PtyEnd::Detached { .. })) => {
                    return Err("the agent detached from init".to_string())
                }
                Err(e) => return Err(format!("reading init's session: {e}")),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(status)) => InitOutcome::Exited { status, tail },
        Ok(Err(e)) => InitOutcome::Unknown(e),
        Err(_) => {
            // Detach: init runs on.
            let _ = pty.sender.cancel();
            InitOutcome::TimedOut
        }
    }
}

fn not_started() -> String {
    format!("no session {INIT_SESSION:?}: init did not start (see the console log)")
}
