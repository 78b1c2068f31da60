//! Block devices for mcfs: the one way every other part reads and writes the disk.
//!
//! Layout:
//! * [`BlockDevice`] — the contract the filesystem, mkfs and fsck are written against.
//! * [`UringDevice`] (`uring/`) — the real one: io_uring + O_DIRECT on a block device or
//!   image file, many requests in flight from many threads, an async API. Its module
//!   documentation states the durability and ordering rules.
//! * [`AlignedBuf`], [`BufPool`] (`buf.rs`) — memory O_DIRECT accepts; bounce buffers.
//! * [`MemDevice`] (`mem.rs`) — in memory, for unit tests.
//! * [`RecordingDevice`] (`recording.rs`) — in memory, keeps the durable image apart from
//!   written-but-unflushed writes, and builds the image a crash would leave at any flush.
//! * [`FileDevice`] (`file.rs`) — plain buffered pread/pwrite, for tools on images.
//! * [`bench`](mod@bench) — this crate against fio on the same loop device.
//!
//! Every device applies the same request checks (`error.rs`), so a unit test on a
//! `MemDevice` rejects exactly what the real device would.

pub mod bench;
mod buf;
mod error;
mod file;
mod mem;
mod probe;
mod recording;
mod uring;

pub use buf::{huge_page_mode, AlignedBuf, BufPool, DEFAULT_ALIGN, HUGE};
pub use error::{Error, IoOp};
pub use file::FileDevice;
pub use mem::MemDevice;
pub use probe::DeviceKind;
pub use recording::{RecordingDevice, WriteRecord};
pub use uring::{FlushFuture, IoFuture, OpenOptions, RingInfo, RingStats, UringDevice};

use std::sync::Arc;

/// A device of fixed size addressed in bytes, in whole sectors.
///
/// Rules shared by every implementation:
/// * offsets and lengths are multiples of [`sector_size`](Self::sector_size), else
///   [`Error::Unaligned`]; a request past the end is [`Error::OutOfRange`]; in both cases
///   nothing is transferred (for the `_many` calls: nothing at all is submitted);
/// * buffers may be any memory; aligned memory is faster on [`UringDevice`];
/// * requests submitted together are not ordered with each other; a write is durable
///   once a [`flush`](Self::flush) called after it completed has returned.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes (a multiple of the sector size).
    fn size(&self) -> u64;

    /// Offsets and lengths must be multiples of it.
    fn sector_size(&self) -> u32;

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error>;

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error>;

    /// All requests in flight together (one batched submission); returns when all have
    /// completed. On failure returns the error of the lowest-indexed failed request;
    /// the others completed (or failed) too, so buffers of failed reads hold garbage.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), Error>;

    /// As [`read_many`](Self::read_many), for writes. Overlapping writes in one call land
    /// in an unspecified order.
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<(), Error>;

    /// Read one contiguous range at `offset` into several buffers, in order. Every
    /// buffer's length must be a multiple of the sector size.
    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), Error> {
        let mut off = offset;
        let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(bufs.len());
        for b in bufs.iter_mut() {
            let n = b.len() as u64;
            reqs.push((off, &mut **b));
            off = off.saturating_add(n);
        }
        self.read_many(&mut reqs)
    }

    /// Write several buffers to one contiguous range at `offset`, in order.
    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), Error> {
        let mut off = offset;
        let mut reqs: Vec<(u64, &[u8])> = Vec::with_capacity(bufs.len());
        for b in bufs {
            reqs.push((off, *b));
            off = off.saturating_add(b.len() as u64);
        }
        self.write_many(&reqs)
    }

    /// Everything whose write completed before flush was called is durable when it
    /// returns.
    fn flush(&self) -> Result<(), Error>;
}

macro_rules! forward_block_device {
    ($ty:ty) => {
        impl<T: BlockDevice + ?Sized> BlockDevice for $ty {
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn sector_size(&self) -> u32 {
                (**self).sector_size()
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
                (**self).read_at(offset, buf)
            }
            fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
                (**self).write_at(offset, buf)
            }
            fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), Error> {
                (**self).read_many(reqs)
            }
            fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<(), Error> {
                (**self).write_many(reqs)
            }
            fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), Error> {
                (**self).read_vectored_at(offset, bufs)
            }
            fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), Error> {
                (**self).write_vectored_at(offset, bufs)
            }
            fn flush(&self) -> Result<(), Error> {
                (**self).flush()
            }
        }
    };
}

forward_block_device!(Arc<T>);
forward_block_device!(Box<T>);
forward_block_device!(&T);

/// Open a path the way tools want it: a [`UringDevice`] with O_DIRECT when the path
/// supports it, else buffered io_uring (for example on tmpfs before Linux 6.6).
pub fn open_path(path: impl AsRef<std::path::Path>, read_only: bool) -> Result<UringDevice, Error> {
    let path = path.as_ref();
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    match UringDevice::open(path, opts.clone()) {
        Err(Error::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "O_DIRECT refused; using buffered I/O");
            UringDevice::open(
                path,
                OpenOptions {
                    direct: false,
                    ..opts
                },
            )
        }
        r => r,
    }
}
