//! Errors of engine operations.

use bhatti_protocol::ClientError;
use bhatti_vmm::VmmError;

use crate::net::NetError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no sandbox {0:?}")]
    NotFound(String),
    #[error("a sandbox named {0:?} already exists")]
    AlreadyExists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The operation is not allowed in the sandbox's current state.
    #[error("sandbox {id}: {message}")]
    State { id: String, message: String },
    #[error("engine setup: {0}")]
    Setup(String),
    /// An operation's task ended without an answer (it panicked): a bug.
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("sandbox {id}: {context}: {source}")]
    Vmm {
        id: String,
        context: &'static str,
        #[source]
        source: VmmError,
    },
    /// The guest did not come up (or back); carries the console tail.
    #[error("sandbox {id} {what}: {reason}\n--- guest console (last lines) ---\n{console}")]
    Boot {
        id: String,
        /// "did not boot", "did not restore", …
        what: &'static str,
        reason: String,
        console: String,
    },
    #[error("sandbox {id}: agent: {source}")]
    Agent {
        id: String,
        #[source]
        source: ClientError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
