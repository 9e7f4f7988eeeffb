//! File operations: streamed read, atomic write, stat, list, mkdir, remove.

use bhatti_protocol::mux::Channel;
use bhatti_protocol::{ErrorBody, ErrorCode, ReadFileRequest, WriteFileRequest};

use crate::handlers::Reply;
use crate::server::Agent;

fn todo() -> Reply {
    Err(ErrorBody::new(
        ErrorCode::Unsupported,
        "files: not implemented yet",
    ))
}

pub async fn read(_agent: &Agent, _channel: Channel, _req: ReadFileRequest) -> Reply {
    todo()
}
pub async fn write(_agent: &Agent, _channel: Channel, _req: WriteFileRequest) -> Reply {
    todo()
}
pub async fn stat(_agent: &Agent, _path: &str) -> Reply {
    todo()
}
pub async fn list(_agent: &Agent, _path: &str, _limit: Option<u32>) -> Reply {
    todo()
}
pub async fn mkdir(_agent: &Agent, _path: &str) -> Reply {
    todo()
}
pub async fn remove(_agent: &Agent, _path: &str, _recursive: bool) -> Reply {
    todo()
}
