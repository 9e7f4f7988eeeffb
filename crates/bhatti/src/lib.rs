//! bhatti: the host side of the sandbox orchestrator.
//!
//! - [`engine`]: sandbox lifecycle on top of a VMM backend (create, agent
//!   connections, pause/resume, snapshot to disk/restore, destroy, recover);
//! - [`storage`]: copy-on-write root disks and the config drive;
//! - [`net`]: the bridge, TAPs, guest addresses and MACs.

pub mod cmd;
pub mod engine;
pub mod net;
pub mod storage;

pub use engine::{CreateSpec, Engine, EngineConfig, EngineError, Sandbox, SandboxState};

pub mod api;
pub mod api_types;
pub mod auth;
pub mod config;
pub mod daemon;
pub mod proxy;
pub mod secrets;
pub mod store;
pub mod thermal;
