//! The crate's one error type, and the request checks every device shares so that a
//! `MemDevice` in a unit test rejects exactly what the real device would.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What a request was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Flush,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Offset or length not a multiple of the device's sector size. Nothing was submitted.
    #[error(
        "unaligned {op}: offset {offset} length {len} must both be multiples of the \
         {sector}-byte sector"
    )]
    Unaligned {
        op: IoOp,
        offset: u64,
        len: u64,
        sector: u32,
    },

    /// The request reaches past the end of the device. Nothing was submitted.
    #[error("{op} of {len} bytes at offset {offset} is beyond the end of the {size}-byte device")]
    OutOfRange {
        op: IoOp,
        offset: u64,
        len: u64,
        size: u64,
    },

    /// The kernel transferred fewer bytes than asked. For a write, the range now holds a
    /// mix of old and new data; it is not retried, so the caller decides what to do.
    #[error("short {op} at offset {offset}: {done} of {len} bytes transferred")]
    ShortIo {
        op: IoOp,
        offset: u64,
        len: u64,
        done: u64,
    },

    /// The kernel failed the request (EIO, a device that vanished, ENOSPC on a shrunken
    /// device, EPERM on a device made read-only ...).
    #[error("{op} at offset {offset} failed: {source}")]
    Io {
        op: IoOp,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// A write or flush on a device opened read-only. Nothing was submitted.
    #[error("{op} at offset {offset} refused: device opened read-only")]
    ReadOnly { op: IoOp, offset: u64 },

    /// Opening or probing the device failed.
    #[error("cannot open {path}: {what}: {source}")]
    Open {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// The path is neither a block device nor a regular file.
    #[error("{path} is neither a block device nor a regular file")]
    NotADevice { path: PathBuf },

    /// A blocking call made on the ring thread (from a completion callback): it would
    /// wait for the thread that is making it. Nothing was submitted.
    #[error(
        "blocking {op} called from a completion callback on the ring thread; use the \
         submit_* methods there"
    )]
    OnRingThread { op: IoOp },

    /// Bad options (queue depth out of range, sector size not a power of two ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// The io_uring instance could not be set up, or its ring thread has stopped.
    #[error("io_uring: {what}: {source}")]
    Ring {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// The benchmark could not run (fio missing, losetup failed, fio output unreadable ...).
    #[error("bench: {0}")]
    Bench(String),
}

impl Error {
    /// The `errno` to hand to a FUSE reply for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Unaligned { .. } | Error::InvalidOption(_) => libc::EINVAL,
            Error::OutOfRange { .. } => libc::ENOSPC,
            Error::ShortIo { .. } => libc::EIO,
            Error::Io { source, .. } | Error::Open { source, .. } | Error::Ring { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::ReadOnly { .. } => libc::EROFS,
            Error::OnRingThread { .. } => libc::EDEADLK,
            Error::NotADevice { .. } => libc::ENOTBLK,
            Error::Bench(_) => libc::EIO,
        }
    }
}

/// Reject a request that is not sector-aligned or that leaves the device. `len` is the
/// total length; `0` is allowed (a no-op) so callers need not special-case empty I/O.
pub(crate) fn check_request(
    op: IoOp,
    offset: u64,
    len: u64,
    sector: u32,
    size: u64,
) -> Result<(), Error> {
    let s = u64::from(sector);
    if !offset.is_multiple_of(s) || !len.is_multiple_of(s) {
        return Err(Error::Unaligned {
            op,
            offset,
            len,
            sector,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            op,
            offset,
            len,
            size,
        }),
    }
}

/// Turn a completion's result (bytes transferred, or `-errno`) into an outcome.
pub(crate) fn check_result(op: IoOp, offset: u64, len: u64, res: i32) -> Result<(), Error> {
    if res < 0 {
        return Err(Error::Io {
            op,
            offset,
            source: io::Error::from_raw_os_error(-res),
        });
    }
    let done = res as u64;
    if op != IoOp::Flush && done != len {
        return Err(Error::ShortIo {
            op,
            offset,
            len,
            done,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checks() {
        assert!(check_request(IoOp::Read, 0, 4096, 512, 8192).is_ok());
        assert!(check_request(IoOp::Read, 8192, 0, 512, 8192).is_ok());
        assert!(matches!(
            check_request(IoOp::Write, 100, 512, 512, 8192),
            Err(Error::Unaligned { offset: 100, .. })
        ));
        assert!(matches!(
            check_request(IoOp::Write, 0, 100, 512, 8192),
            Err(Error::Unaligned { len: 100, .. })
        ));
        assert!(matches!(
            check_request(IoOp::Read, 7680, 1024, 512, 8192),
            Err(Error::OutOfRange { size: 8192, .. })
        ));
        // Overflowing offset + len must not wrap into range.
        assert!(matches!(
            check_request(IoOp::Read, u64::MAX - 511, 1024, 512, 8192),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn completion_results() {
        assert!(check_result(IoOp::Write, 0, 4096, 4096).is_ok());
        let e = check_result(IoOp::Read, 512, 4096, 1024).unwrap_err();
        assert!(matches!(e, Error::ShortIo { done: 1024, len: 4096, .. }));
        assert_eq!(
            e.to_string(),
            "short read at offset 512: 1024 of 4096 bytes transferred"
        );
        let e = check_result(IoOp::Write, 4096, 4096, -libc::EIO).unwrap_err();
        assert!(matches!(e, Error::Io { op: IoOp::Write, offset: 4096, .. }));
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().starts_with("write at offset 4096 failed: "));
        assert!(check_result(IoOp::Flush, 0, 0, 0).is_ok());
    }
}
