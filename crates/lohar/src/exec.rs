//! Piped exec: argv, env, cwd, streamed stdin, stdout/stderr kept apart,
//! exit status, timeout, process-group kill on cancel/disconnect, detach.

use bhatti_protocol::mux::Channel;
use bhatti_protocol::{ErrorBody, ErrorCode, ExecRequest};

use crate::handlers::Reply;
use crate::server::Agent;

pub async fn run(_agent: &Agent, _channel: Channel, _req: ExecRequest) -> Reply {
    Err(ErrorBody::new(
        ErrorCode::Unsupported,
        "exec: not implemented yet",
    ))
}
