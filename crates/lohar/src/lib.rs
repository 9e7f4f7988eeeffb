//! The guest agent as a library: `main.rs` is its PID 1 / test-mode entry,
//! and the fuzz tests and `fuzz-bench` reach the request handling here.

pub mod activity;
pub mod config;
pub mod exec;
pub mod files;
pub mod forward;
#[doc(hidden)]
pub mod fuzz;
pub mod handlers;
pub mod identity;
pub mod init;
pub mod listen;
pub mod ports;
pub mod pty;
pub mod reaper;
pub mod server;
pub mod sessions;
pub mod spawn;
pub mod user;
pub mod volumes;
