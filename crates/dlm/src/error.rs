//! The crate's one error type, shared by the core, the service, the store and the
//! client (`ClientError` is an alias). `tonic::Status` conversions live here and
//! nowhere else.

use tonic::{Code, Status};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// NOQUEUE and not grantable now (EAGAIN).
    #[error("the request would block (NOQUEUE)")]
    WouldBlock,
    /// Conversion deadlock (EDEADLK); the lock keeps its granted mode.
    #[error("conversion deadlock (EDEADLK)")]
    Deadlock,
    /// The request was cancelled (ECANCEL).
    #[error("request canceled")]
    Canceled,
    /// The lock server declared this node's session failed, or refused its rejoin:
    /// the node must withdraw (its locks are no longer its own).
    #[error("session lost: {0}")]
    SessionLost(String),
    #[error("lock server unavailable: {0}")]
    Unavailable(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Any other gRPC status.
    #[error("rpc failed ({code:?}): {message}")]
    Rpc { code: Code, message: String },
    #[error("storage: {0}")]
    Store(String),
    #[error("configuration: {0}")]
    Config(String),
    /// A daemon cannot start (data directory in use, port taken), already
    /// phrased for the operator: shown as is, without a prefix.
    #[error("{0}")]
    Startup(String),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::WouldBlock => Status::unavailable(msg),
            Error::Deadlock => Status::aborted(msg),
            Error::Canceled => Status::cancelled(msg),
            Error::SessionLost(m) => Status::failed_precondition(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::Rpc { code, message } => Status::new(code, message),
            Error::Store(_) | Error::Config(_) | Error::Startup(_) | Error::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        let m = s.message().to_string();
        match s.code() {
            Code::InvalidArgument => Error::InvalidArgument(m),
            Code::NotFound => Error::NotFound(m),
            Code::FailedPrecondition => Error::FailedPrecondition(m),
            Code::ResourceExhausted => Error::ResourceExhausted(m),
            Code::AlreadyExists => Error::AlreadyExists(m),
            Code::Unavailable => Error::Unavailable(m),
            Code::Unauthenticated => Error::Unauthenticated(m),
            code => Error::Rpc { code, message: m },
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        Error::Store(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::Store(format!("corrupt record: {e}"))
    }
}

impl Error {
    /// The gRPC code of this error, for the pipelined Ops replies.
    pub fn code(&self) -> Code {
        Status::from(self.clone()).code()
    }

    /// Rebuild from an Ops stream error (code + message).
    pub fn from_code(code: i32, message: String) -> Error {
        Error::from(Status::new(Code::from_i32(code), message))
    }
}
