//! The host ↔ guest protocol of bhatti.
//!
//! - [`frame`]: the frame layout and its codec;
//! - [`message`]: JSON bodies (requests, events, outcomes, errors);
//! - [`handshake`]: the `Hello` exchange and token check;
//! - [`mux`]: one connection, many flow-controlled channels (both ends);
//! - [`client`]: the host's typed client;
//! - [`forward_io`]: a port forward as `AsyncRead` + `AsyncWrite`;
//! - [`guest_config`]: the config drive the host writes and the guest reads;
//! - [`transport`]: unix socket, Firecracker vsock, TCP;
//! - `fuzz`: the fuzzing harness of the tests and `fuzz-bench` (hidden).
//!
//! The wire format is specified in `docs/protocol.md`.

pub mod client;
pub mod forward_io;
pub mod frame;
#[doc(hidden)]
pub mod fuzz;
pub mod guest_config;
pub mod handshake;
pub mod message;
pub mod mux;
pub mod transport;

pub use client::{AgentClient, ClientError};
pub use message::*;
