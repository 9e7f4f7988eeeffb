//! bhatti's engine side, under the daemon's API:
//!
//! - [`engine`]: sandbox lifecycle on top of a VMM backend (create, agent
//!   connections, pause/resume, snapshot to disk/restore, destroy, recover);
//! - [`storage`]: copy-on-write root disks and the config drive;
//! - [`net`]: per-user bridges and subnets, TAPs, the nftables firewall,
//!   sibling DNS, egress policies;
//! - [`thermal`]: the thermal manager (idle sandboxes go warm, then cold,
//!   and wake on demand);
//! - [`image`]: OCI images (pull, layer unpacking, config, ext4 build);
//! - [`cmd`]: running host tools (`ip`, `nft`, `mkfs.xfs`, …).

pub mod cmd;
pub mod engine;
pub mod image;
pub mod net;
pub mod storage;
pub mod thermal;

pub use engine::{CreateSpec, Engine, EngineConfig, EngineError, Sandbox, SandboxState};
