//! Port forward: a byte stream to 127.0.0.1:<port> in the guest.

use bhatti_protocol::mux::Channel;
use bhatti_protocol::{ErrorBody, ErrorCode};

use crate::handlers::Reply;
use crate::server::Agent;

pub async fn run(_agent: &Agent, _channel: Channel, _port: u16) -> Reply {
    Err(ErrorBody::new(
        ErrorCode::Unsupported,
        "forward: not implemented yet",
    ))
}
