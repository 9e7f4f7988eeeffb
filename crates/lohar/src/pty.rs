//! PTY exec: new sessions, attach/reattach by offset, list, kill.

use bhatti_protocol::mux::Channel;
use bhatti_protocol::{AttachRequest, ErrorBody, ErrorCode, PtyRequest};

use crate::handlers::Reply;
use crate::server::Agent;

pub async fn start(_agent: &Agent, _channel: Channel, _req: PtyRequest) -> Reply {
    Err(ErrorBody::new(
        ErrorCode::Unsupported,
        "pty: not implemented yet",
    ))
}

pub async fn attach(_agent: &Agent, _channel: Channel, _req: AttachRequest) -> Reply {
    Err(ErrorBody::new(
        ErrorCode::Unsupported,
        "attach: not implemented yet",
    ))
}

pub fn list(_agent: &Agent) -> Reply {
    Ok(serde_json::json!({"sessions": []}))
}

pub fn kill(_agent: &Agent, _id: &str, _signal: Option<i32>) -> Reply {
    Err(ErrorBody::new(ErrorCode::NotFound, "no such session"))
}
