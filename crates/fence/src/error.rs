//! The crate's one error type, and the one place it becomes a `tonic::Status`.
//!
//! A fencing *level* that fails is not an error here: it is a recorded attempt
//! with a message, and the operation goes on to the next level. `FenceError` is for
//! what stops a call or the daemon: bad configuration, a bad request, the store.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The configuration cannot be used; found at start-up, never at fence time.
    #[error("configuration {path}: {msg}")]
    Config { path: String, msg: String },

    #[error("node {node} is not in the fencing configuration (configured nodes: {known})")]
    UnknownNode { node: u32, known: String },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// A request id names an earlier operation of another kind or for another node.
    #[error("request id {id:?} was already used for {previous}; use a fresh id")]
    RequestIdReused { id: String, previous: String },

    #[error("node {0} is not fenced; refusing to unfence it")]
    NotFenced(u32),

    /// Too many operations already wait for this node (`max_pending_ops_per_node`).
    #[error("node {node} already has {pending} operations running or queued (limit {limit}); retry with the same request id later")]
    TooBusy { node: u32, pending: usize, limit: usize },

    #[error("fence store: {0}")]
    Store(#[from] sled::Error),

    /// Another process has the fence log open (phrased for the operator).
    #[error("{0}")]
    DataDirInUse(String),

    #[error("fence store record {key:?} cannot be decoded: {msg}")]
    Corrupt { key: String, msg: String },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl FenceError {
    pub fn config(path: impl Into<String>, msg: impl Into<String>) -> FenceError {
        FenceError::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> FenceError {
        FenceError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = FenceError> = std::result::Result<T, E>;

impl From<FenceError> for Status {
    fn from(e: FenceError) -> Status {
        // Exhaustive on purpose: a new variant must decide what a caller sees.
        let code = match &e {
            FenceError::UnknownNode { .. } => Code::NotFound,
            FenceError::InvalidRequest(_) => Code::InvalidArgument,
            FenceError::RequestIdReused { .. } => Code::AlreadyExists,
            FenceError::NotFenced(_) => Code::FailedPrecondition,
            FenceError::TooBusy { .. } => Code::ResourceExhausted,
            FenceError::Config { .. }
            | FenceError::Store(_)
            | FenceError::DataDirInUse(_)
            | FenceError::Corrupt { .. }
            | FenceError::Io { .. } => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
