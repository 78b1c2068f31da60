//! The node's one error type and its errno mapping (an exhaustive match, so a new
//! variant forces a decision, as mountpoint-s3's `ToErrno`).

use mcfs_format::FormatError;

pub type Result<T, E = FsError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long")]
    NameTooLong,
    #[error("no space left on device")]
    NoSpace,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("operation not permitted")]
    Perm,
    #[error("file too large")]
    TooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("stale file handle")]
    Stale,
    #[error("operation not supported")]
    NotSupported,
    #[error("would block")]
    WouldBlock,
    /// The node has withdrawn from the filesystem: nothing more is written.
    #[error("filesystem withdrawn: {0}")]
    Withdrawn(String),
    /// On-disk inconsistency: the caller withdraws the node.
    #[error("on-disk inconsistency: {0}")]
    Corrupt(#[from] FormatError),
    #[error("I/O error: {0}")]
    Io(#[from] mcfs_blockdev::Error),
    /// The lock manager refused or could not be reached.
    #[error("lock manager: {0}")]
    Lock(String),
    #[error("{0}")]
    Other(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Perm => libc::EPERM,
            FsError::TooBig => libc::EFBIG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::Stale => libc::ESTALE,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::WouldBlock => libc::EAGAIN,
            FsError::Withdrawn(_) => libc::EIO,
            FsError::Corrupt(_) => libc::EIO,
            FsError::Io(_) => libc::EIO,
            FsError::Lock(_) => libc::EIO,
            FsError::Other(_) => libc::EIO,
        }
    }

    /// Errors that mean the node must stop writing.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FsError::Corrupt(_) | FsError::Io(_) | FsError::Withdrawn(_))
    }
}
