//! Routes each opened channel to the module that serves its request.
//! Every handler ends its channel with exactly one `Close`; errors become
//! `Outcome::Error` here, at the boundary.

use bhatti_protocol::mux::{Channel, Inbound};
use bhatti_protocol::{ErrorBody, ErrorCode, Outcome, Request};
use bytes::Bytes;

use crate::server::Agent;

/// A handler's result: the JSON reply, or an error body.
pub type Reply = Result<serde_json::Value, ErrorBody>;

/// Decodes an `Open` frame's body.
pub fn parse_request(body: &[u8]) -> Result<Request, ErrorBody> {
    serde_json::from_slice(body)
        .map_err(|e| ErrorBody::new(ErrorCode::BadRequest, format!("malformed request: {e}")))
}

pub async fn handle(agent: Agent, channel: Channel, request: Bytes) {
    let request = match parse_request(&request) {
        Ok(r) => r,
        Err(e) => {
            let _ = channel.sender.close(&Outcome::Error(e));
            return;
        }
    };
    let sender = channel.sender.clone();
    let reply = match request {
        Request::Ping => Ok(serde_json::json!({})),
        Request::Exec(req) => crate::exec::run(&agent, channel, req).await,
        Request::Pty(req) => crate::pty::start(&agent, channel, req).await,
        Request::Attach(req) => crate::pty::attach(&agent, channel, req).await,
        Request::Sessions => crate::pty::list(&agent),
        Request::KillSession { id, signal } => crate::pty::kill(&agent, &id, signal),
        Request::ReadFile(req) => crate::files::read(&agent, channel, req).await,
        Request::WriteFile(req) => crate::files::write(&agent, channel, req).await,
        Request::Stat { path } => crate::files::stat(&agent, &path).await,
        Request::List { path, limit } => crate::files::list(&agent, &path, limit).await,
        Request::Mkdir { path } => crate::files::mkdir(&agent, &path).await,
        Request::Remove { path, recursive } => crate::files::remove(&agent, &path, recursive).await,
        Request::Forward { port } => crate::forward::run(&agent, channel, port).await,
        Request::Activity => Ok(agent.activity.snapshot(&agent)),
        Request::Ports => crate::ports::list().await,
        Request::Sync => crate::init::sync().await,
        Request::Shutdown => crate::init::request_poweroff(),
        Request::Reidentify(req) => crate::identity::reidentify(&agent, req).await,
    };
    let outcome = match reply {
        Ok(v) => Outcome::Ok(v),
        Err(e) => Outcome::Error(e),
    };
    // The channel may already be closed by a protocol error: fine.
    let _ = sender.close(&outcome);
}

/// Waits for the client to cancel (`Close`) or vanish, ignoring other
/// frames. Used by handlers that have nothing else to read.
pub async fn cancelled(rx: &mut bhatti_protocol::mux::ChannelReceiver) {
    loop {
        match rx.recv().await {
            Some(Inbound::Close(_)) | None => return,
            Some(_) => {}
        }
    }
}

/// Maps an I/O error to the protocol's codes.
pub fn io_error(context: &str, e: &std::io::Error) -> ErrorBody {
    use std::io::ErrorKind::*;
    let code = match e.kind() {
        NotFound => ErrorCode::NotFound,
        PermissionDenied => ErrorCode::PermissionDenied,
        AlreadyExists => ErrorCode::AlreadyExists,
        InvalidInput => ErrorCode::BadRequest,
        NotADirectory => ErrorCode::NotADirectory,
        IsADirectory => ErrorCode::NotAFile,
        _ => ErrorCode::Io,
    };
    ErrorBody::new(code, format!("{context}: {e}"))
}
