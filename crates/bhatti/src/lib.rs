//! bhatti: the host side of the sandbox orchestrator: the daemon's API,
//! store, proxy and CLI. The engine side (sandbox lifecycle, storage,
//! networks, the thermal manager) is the `bhatti-engine` crate and the API's
//! bodies are `bhatti-api-types`, both re-exported here under the same
//! module names.

pub use bhatti_api_types as api_types;
pub use bhatti_engine::{cmd, engine, image, net, storage, thermal};
pub use engine::{CreateSpec, Engine, EngineConfig, EngineError, Sandbox, SandboxState};

pub mod api;
pub mod auth;
pub mod backups;
pub mod config;
pub mod daemon;
pub mod events;
pub mod images;
pub mod init_session;
pub mod metrics;
pub mod prebooted;
pub mod proxy;
pub mod secrets;
pub mod store;
