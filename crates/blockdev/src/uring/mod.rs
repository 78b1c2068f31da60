//! [`UringDevice`]: a block device or image file driven through io_uring, O_DIRECT by
//! default.
//!
//! * Thread-safe: any number of threads call the blocking [`BlockDevice`] methods at
//!   once; their requests are queued to one ring thread (see `ring.rs`) and reach the
//!   kernel together, up to `queue_depth` in flight.
//! * Async: [`UringDevice::submit_read`] / [`UringDevice::submit_write`] /
//!   [`UringDevice::submit_flush`] submit at once and return a future ([`IoFuture`],
//!   [`FlushFuture`]) that any executor (tokio included) can await, or that
//!   `wait()` blocks on. They take ownership of the buffer, so dropping a future
//!   cannot free memory the kernel is writing: the request still completes and the
//!   buffer is freed then. `read_async` / `write_async` / `flush_async` wrap them.
//! * Callbacks: [`UringDevice::submit_write_with`] / [`UringDevice::submit_read_with`]
//!   run a closure on the ring thread at completion; a closure that submits the next
//!   request keeps a queue full with no thread hand-off at all (how the bench matches
//!   fio, and how a streaming writer such as journal write-back can work).
//! * Memory: a buffer whose address is aligned to [`UringDevice::mem_align`] goes to
//!   the kernel as it is (zero-copy; [`AlignedBuf`] always is). Any other memory is
//!   copied through a pooled bounce buffer. Offsets and lengths must be multiples of
//!   [`BlockDevice::sector_size`], else [`Error::Unaligned`], and nothing is sent.
//!
//! Durability and ordering:
//! * A write is durable only after a flush that was *called* after the write
//!   *completed*. [`BlockDevice::flush`] is `IORING_OP_FSYNC` with `DATASYNC`: on a
//!   block device the kernel sends a cache flush (REQ_PREFLUSH) to the device; on a
//!   regular file it is `fdatasync` (data plus the metadata needed to read it back,
//!   such as block allocation in a sparse image). No write uses FUA.
//! * Requests in flight together are not ordered with each other: two overlapping
//!   writes in one `write_many`, or from two threads at once, may land in either order.
//!   A caller that needs B after A waits for A to complete before submitting B; a
//!   caller that needs A durable before B is written calls flush in between (the
//!   journal's commit record is written that way).
//! * A failed or short request is reported, never retried: a retry could land after a
//!   later write to the same blocks.

mod ring;

pub use ring::{RingInfo, RingStats};
pub(crate) use ring::lock as lock_ignoring_poison;

use crate::buf::{AlignedBuf, BufPool};
use crate::error::{check_request, Error, IoOp};
use crate::probe::{check_kind, probe, DeviceKind, Geometry};
use crate::BlockDevice;
use ring::{lock, Group, Kind, Request, Shared, Waiter, MAX_CHUNK};
use std::fs::OpenOptions as FsOpenOptions;
use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;

/// Most iovecs one vectored request may carry (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// How to open a [`UringDevice`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// O_DIRECT (default). Without it I/O goes through the page cache, which a cluster
    /// filesystem must not use on a shared device; kept for tests on odd filesystems.
    pub direct: bool,
    /// Requests in flight at once, 1..=4096 (default 128). More wait in the ring
    /// thread's backlog in arrival order.
    pub queue_depth: u32,
    /// Use a larger sector than the device's (a power of two at least as large).
    pub sector_size: Option<u32>,
    /// Kernel submission-queue polling with this idle time in ms. Off by default: the
    /// poller spins a CPU, which a small machine cannot spare.
    pub sqpoll_idle_ms: Option<u32>,
    /// Register the fd with the ring (default on; falls back silently if refused).
    pub register_file: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            read_only: false,
            direct: true,
            queue_depth: 128,
            sector_size: None,
            sqpoll_idle_ms: None,
            register_file: true,
        }
    }
}

/// An io_uring block device. Dropping it waits for requests still in flight (from
/// dropped futures), then closes the ring and the device.
pub struct UringDevice {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    geo: Geometry,
    read_only: bool,
    pool: Arc<BufPool>,
    path: PathBuf,
    info: RingInfo,
}

impl UringDevice {
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<UringDevice, Error> {
        let path = path.as_ref();
        if opts.queue_depth == 0 || opts.queue_depth > 4096 {
            return Err(Error::InvalidOption(format!(
                "queue depth {} (must be 1..=4096)",
                opts.queue_depth
            )));
        }
        check_kind(path)?;
        let mut oo = FsOpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            what: if opts.direct { "open with O_DIRECT" } else { "open" },
            source,
        })?;
        let geo = probe(&file, path, opts.direct, opts.sector_size)?;
        let (shared, thread, info) = ring::spawn(
            Arc::new(file),
            ring::RingConfig {
                queue_depth: opts.queue_depth,
                sqpoll_idle_ms: opts.sqpoll_idle_ms,
                register_file: opts.register_file,
            },
        )?;
        tracing::debug!(path = %path.display(), ?geo, "opened");
        Ok(UringDevice {
            shared,
            thread: Some(thread),
            pool: Arc::new(BufPool::new(
                (geo.mem_align as usize).max(crate::buf::DEFAULT_ALIGN),
            )),
            geo,
            read_only: opts.read_only,
            path: path.to_path_buf(),
            info,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> DeviceKind {
        self.geo.kind
    }

    /// Memory alignment a buffer needs to skip the bounce copy.
    pub fn mem_align(&self) -> usize {
        self.geo.mem_align as usize
    }

    /// What the ring was set up with (queue depth, flags the kernel accepted).
    pub fn ring_info(&self) -> RingInfo {
        self.info
    }

    /// Counters since open: requests submitted and completed, `io_uring_enter` calls,
    /// the most requests in flight at once.
    pub fn stats(&self) -> RingStats {
        self.shared.stats()
    }

    /// An aligned, zeroed buffer of `len` bytes suited to this device.
    pub fn alloc_buf(&self, len: usize) -> AlignedBuf {
        AlignedBuf::with_alignment(len, self.pool.alignment())
    }

    fn aligned(&self, p: *const u8) -> bool {
        (p as usize).is_multiple_of(self.geo.mem_align as usize)
    }

    fn check(&self, op: IoOp, offset: u64, len: u64) -> Result<(), Error> {
        if op == IoOp::Write && self.read_only {
            return Err(Error::ReadOnly { op, offset });
        }
        check_request(op, offset, len, self.geo.sector, self.geo.size)
    }

    /// Requests covering `len` bytes at `ptr`, split into chunks the kernel accepts.
    fn push_chunks(
        out: &mut Vec<Request>,
        write: bool,
        offset: u64,
        ptr: *mut u8,
        len: u64,
        group: &Arc<Group>,
        index: u32,
    ) {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_CHUNK);
            // SAFETY (pointer arithmetic): done < len, within the caller's buffer.
            let p = unsafe { ptr.add(done as usize) };
            let kind = if write {
                Kind::Write {
                    ptr: p,
                    len: n as u32,
                }
            } else {
                Kind::Read { ptr: p, len: n as u32 }
            };
            out.push(Request {
                kind,
                offset: offset + done,
                len: n,
                group: group.clone(),
                index,
            });
            done += n;
        }
    }

    fn chunks(len: u64) -> usize {
        len.div_ceil(MAX_CHUNK) as usize
    }

    // ---- async API -------------------------------------------------------------

    fn submit_owned(&self, write: bool, offset: u64, buf: AlignedBuf) -> IoFuture {
        match self.prepare_owned(write, offset, buf, Waiter::None) {
            Ok((group, reqs)) => {
                self.shared.submit(reqs);
                IoFuture {
                    group,
                    read: !write,
                    pool: Some(self.pool.clone()),
                }
            }
            Err((e, buf)) => IoFuture::ready(Group::failed(e), buf),
        }
    }

    /// Check one owned-buffer request and build its group and requests (bouncing the
    /// buffer if it is not aligned), without submitting.
    #[allow(clippy::type_complexity)]
    fn prepare_owned(
        &self,
        write: bool,
        offset: u64,
        buf: AlignedBuf,
        waiter: Waiter,
    ) -> Result<(Arc<Group>, Vec<Request>), (Error, AlignedBuf)> {
        let op = if write { IoOp::Write } else { IoOp::Read };
        if let Err(e) = self.check(op, offset, buf.len() as u64) {
            return Err((e, buf));
        }
        let len = buf.len() as u64;
        let group = Group::new(UringDevice::chunks(len), waiter);
        let mut reqs = Vec::with_capacity(UringDevice::chunks(len));
        {
            let mut bufs = lock(&group.bufs);
            let mut user = buf;
            let ptr = if self.aligned(user.as_ptr()) {
                user.as_mut_ptr()
            } else {
                let mut b = self.pool.take(user.len());
                if write {
                    b.copy_from_slice(&user);
                }
                let p = b.as_mut_ptr();
                bufs.bounce = Some(b);
                p
            };
            bufs.user = Some(user);
            UringDevice::push_chunks(&mut reqs, write, offset, ptr, len, &group, 0);
        }
        Ok((group, reqs))
    }

    /// Write `buf` at `offset` and run `f(outcome, buf)` when it completes.
    ///
    /// `f` runs on the ring thread, as soon as the completion is reaped: it may submit
    /// further requests (the `submit_*` methods never block), which then reach the
    /// kernel without a wake-up in between; that is the cheapest way to keep a queue
    /// full from one place. It must not block: the blocking [`BlockDevice`] methods
    /// called there return [`Error::OnRingThread`] rather than wait for themselves, and
    /// `IoFuture::wait` there would hang.
    /// A request rejected before submission (unaligned, out of range, read-only) runs
    /// `f` at once on the calling thread.
    pub fn submit_write_with(
        &self,
        offset: u64,
        buf: AlignedBuf,
        f: impl FnOnce(Result<(), Error>, AlignedBuf) + Send + 'static,
    ) {
        self.submit_cb(true, offset, buf, f)
    }

    /// Read into `buf` at `offset` and run `f(outcome, buf)` on completion; see
    /// [`submit_write_with`](Self::submit_write_with).
    pub fn submit_read_with(
        &self,
        offset: u64,
        buf: AlignedBuf,
        f: impl FnOnce(Result<(), Error>, AlignedBuf) + Send + 'static,
    ) {
        self.submit_cb(false, offset, buf, f)
    }

    fn submit_cb(
        &self,
        write: bool,
        offset: u64,
        buf: AlignedBuf,
        f: impl FnOnce(Result<(), Error>, AlignedBuf) + Send + 'static,
    ) {
        let op = if write { IoOp::Write } else { IoOp::Read };
        if let Err(e) = self.check(op, offset, buf.len() as u64) {
            return f(Err(e), buf);
        }
        if buf.is_empty() {
            // No request, so no completion would ever run it.
            return f(Ok(()), buf);
        }
        let pool = self.pool.clone();
        let cb = Box::new(move |g: &Group| {
            let (res, buf) = g.finish(!write, Some(&pool));
            f(res, buf)
        });
        // Cannot fail: the same checks passed above.
        if let Ok((_group, reqs)) = self.prepare_owned(write, offset, buf, Waiter::Callback(cb)) {
            self.shared.submit(reqs);
        }
    }

    /// Read `buf.len()` bytes at `offset` into `buf`; the future yields the buffer back.
    pub fn submit_read(&self, offset: u64, buf: AlignedBuf) -> IoFuture {
        self.submit_owned(false, offset, buf)
    }

    /// Write `buf` at `offset`; the future yields the buffer back for reuse.
    pub fn submit_write(&self, offset: u64, buf: AlignedBuf) -> IoFuture {
        self.submit_owned(true, offset, buf)
    }

    /// Several writes handed to the ring in one batch (one queue lock, one wake-up).
    /// They are not ordered with each other.
    pub fn submit_writes(&self, reqs: Vec<(u64, AlignedBuf)>) -> Vec<IoFuture> {
        self.submit_owned_batch(true, reqs)
    }

    /// Several reads handed to the ring in one batch.
    pub fn submit_reads(&self, reqs: Vec<(u64, AlignedBuf)>) -> Vec<IoFuture> {
        self.submit_owned_batch(false, reqs)
    }

    fn submit_owned_batch(&self, write: bool, reqs: Vec<(u64, AlignedBuf)>) -> Vec<IoFuture> {
        let op = if write { IoOp::Write } else { IoOp::Read };
        let mut futs = Vec::with_capacity(reqs.len());
        let mut out = Vec::with_capacity(reqs.len());
        for (offset, mut buf) in reqs {
            let len = buf.len() as u64;
            if let Err(e) = self.check(op, offset, len) {
                futs.push(IoFuture::ready(Group::failed(e), buf));
                continue;
            }
            if !self.aligned(buf.as_ptr()) {
                // Rare (an AlignedBuf with a smaller alignment): take the general path.
                self.shared.submit(std::mem::take(&mut out));
                futs.push(self.submit_owned(write, offset, buf));
                continue;
            }
            let group = Group::new(UringDevice::chunks(len), Waiter::None);
            UringDevice::push_chunks(&mut out, write, offset, buf.as_mut_ptr(), len, &group, 0);
            lock(&group.bufs).user = Some(buf);
            futs.push(IoFuture {
                group,
                read: !write,
                pool: None,
            });
        }
        self.shared.submit(out);
        futs
    }

    /// Flush: completes when every write that completed before this call is durable.
    pub fn submit_flush(&self) -> FlushFuture {
        let group = Group::new(1, Waiter::None);
        self.shared.submit([Request {
            kind: Kind::Fsync,
            offset: 0,
            len: 0,
            group: group.clone(),
            index: 0,
        }]);
        FlushFuture { group }
    }

    /// Read `len` bytes at `offset` into a fresh aligned buffer.
    pub async fn read_async(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        let (res, buf) = self.submit_read(offset, self.pool.take(len)).await;
        res.map(|()| buf)
    }

    /// Write `buf` at `offset`; returns the buffer for reuse.
    pub async fn write_async(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, Error> {
        let (res, buf) = self.submit_write(offset, buf).await;
        res.map(|()| buf)
    }

    pub async fn flush_async(&self) -> Result<(), Error> {
        self.submit_flush().await
    }

    // ---- blocking helpers --------------------------------------------------------

    /// A group the calling thread will block on; refused on the ring thread, which
    /// would then wait for itself.
    fn sync_group(&self, op: IoOp, count: usize) -> Result<Arc<Group>, Error> {
        let me = std::thread::current();
        if Some(me.id()) == self.thread.as_ref().map(|t| t.thread().id()) {
            return Err(Error::OnRingThread { op });
        }
        Ok(Group::new(count, Waiter::Thread(me)))
    }

    fn vectored(
        &self,
        write: bool,
        offset: u64,
        segs: &mut [(*mut u8, usize)],
    ) -> Result<(), Error> {
        let op = if write { IoOp::Write } else { IoOp::Read };
        let sector = u64::from(self.geo.sector);
        let total: u64 = segs.iter().map(|s| s.1 as u64).sum();
        for s in segs.iter() {
            if !(s.1 as u64).is_multiple_of(sector) {
                return Err(Error::Unaligned {
                    op,
                    offset,
                    len: s.1 as u64,
                    sector: self.geo.sector,
                });
            }
        }
        self.check(op, offset, total)?;
        if total == 0 {
            return Ok(());
        }
        let mut bounces: Vec<(usize, AlignedBuf)> = Vec::new();
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(segs.len());
        for (i, &(p, n)) in segs.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let base = if self.aligned(p) {
                p
            } else {
                let mut b = self.pool.take(n);
                if write {
                    // SAFETY: p/n come from a live caller slice.
                    b.copy_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
                }
                let bp = b.as_mut_ptr();
                bounces.push((i, b));
                bp
            };
            iov.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: n,
            });
        }
        let res = if iov.len() <= IOV_MAX && total <= MAX_CHUNK {
            let group = self.sync_group(op, 1)?;
            let cnt = iov.len() as u32;
            let kind = if write {
                Kind::Writev {
                    iov: iov.as_ptr(),
                    cnt,
                }
            } else {
                Kind::Readv {
                    iov: iov.as_ptr(),
                    cnt,
                }
            };
            self.shared.submit([Request {
                kind,
                offset,
                len: total,
                group: group.clone(),
                index: 0,
            }]);
            group.wait()
        } else {
            // Too many pieces for one request: the same bytes as separate requests.
            let mut reqs = Vec::new();
            let mut off = offset;
            let count: usize = iov.iter().map(|v| UringDevice::chunks(v.iov_len as u64)).sum();
            let group = self.sync_group(op, count)?;
            for (i, v) in iov.iter().enumerate() {
                UringDevice::push_chunks(
                    &mut reqs,
                    write,
                    off,
                    v.iov_base as *mut u8,
                    v.iov_len as u64,
                    &group,
                    i as u32,
                );
                off += v.iov_len as u64;
            }
            self.shared.submit(reqs);
            group.wait()
        };
        for (i, b) in bounces {
            if !write && res.is_ok() {
                let (p, n) = segs[i];
                // SAFETY: p/n come from a live, exclusively borrowed caller slice.
                unsafe { std::slice::from_raw_parts_mut(p, n) }.copy_from_slice(&b);
            }
            self.pool.put(b);
        }
        res
    }

    fn many(&self, write: bool, reqs: &mut [(u64, *mut u8, usize)]) -> Result<(), Error> {
        let op = if write { IoOp::Write } else { IoOp::Read };
        for &(off, _, n) in reqs.iter() {
            self.check(op, off, n as u64)?;
        }
        let count: usize = reqs.iter().map(|r| UringDevice::chunks(r.2 as u64)).sum();
        if count == 0 {
            return Ok(());
        }
        let group = self.sync_group(op, count)?;
        let mut out = Vec::with_capacity(count);
        let mut bounces: Vec<(usize, AlignedBuf)> = Vec::new();
        for (i, &(off, p, n)) in reqs.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let ptr = if self.aligned(p) {
                p
            } else {
                let mut b = self.pool.take(n);
                if write {
                    // SAFETY: p/n come from a live caller slice.
                    b.copy_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
                }
                let bp = b.as_mut_ptr();
                bounces.push((i, b));
                bp
            };
            UringDevice::push_chunks(&mut out, write, off, ptr, n as u64, &group, i as u32);
        }
        self.shared.submit(out);
        let res = group.wait();
        for (i, b) in bounces {
            if !write && res.is_ok() {
                let (_, p, n) = reqs[i];
                // SAFETY: p/n come from a live, exclusively borrowed caller slice.
                unsafe { std::slice::from_raw_parts_mut(p, n) }.copy_from_slice(&b);
            }
            self.pool.put(b);
        }
        res
    }
}

impl BlockDevice for UringDevice {
    fn size(&self) -> u64 {
        self.geo.size
    }

    fn sector_size(&self) -> u32 {
        self.geo.sector
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.many(false, &mut [(offset, buf.as_mut_ptr(), buf.len())])
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        // The pointer is only read from: Kind::Write takes it as *const.
        self.many(true, &mut [(offset, buf.as_ptr() as *mut u8, buf.len())])
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), Error> {
        let mut raw: Vec<_> = reqs
            .iter_mut()
            .map(|(o, b)| (*o, b.as_mut_ptr(), b.len()))
            .collect();
        self.many(false, &mut raw)
    }

    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<(), Error> {
        let mut raw: Vec<_> = reqs
            .iter()
            .map(|(o, b)| (*o, b.as_ptr() as *mut u8, b.len()))
            .collect();
        self.many(true, &mut raw)
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), Error> {
        let mut segs: Vec<_> = bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())).collect();
        self.vectored(false, offset, &mut segs)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), Error> {
        let mut segs: Vec<_> = bufs
            .iter()
            .map(|b| (b.as_ptr() as *mut u8, b.len()))
            .collect();
        self.vectored(true, offset, &mut segs)
    }

    fn flush(&self) -> Result<(), Error> {
        let group = self.sync_group(IoOp::Flush, 1)?;
        self.shared.submit([Request {
            kind: Kind::Fsync,
            offset: 0,
            len: 0,
            group: group.clone(),
            index: 0,
        }]);
        group.wait()
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        self.shared.shutdown();
        if let Some(t) = self.thread.take() {
            // The last Arc<UringDevice> may be dropped by a completion callback, on the
            // ring thread itself: then it finishes on its own (it holds the file and
            // the queue), and joining would deadlock.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice")
            .field("path", &self.path)
            .field("size", &self.geo.size)
            .field("sector", &self.geo.sector)
            .field("ring", &self.info)
            .finish()
    }
}

/// Completion of a submitted read or write: yields the outcome and the caller's buffer
/// (filled, for a read). Submission already happened; polling only waits.
pub struct IoFuture {
    group: Arc<Group>,
    read: bool,
    /// Where the bounce buffer goes back, when there is one.
    pool: Option<Arc<BufPool>>,
}

impl IoFuture {
    fn ready(group: Arc<Group>, buf: AlignedBuf) -> IoFuture {
        lock(&group.bufs).user = Some(buf);
        IoFuture {
            group,
            read: false,
            pool: None,
        }
    }

    /// True once the request has completed (polling would return Ready).
    pub fn is_done(&self) -> bool {
        self.group.is_done()
    }

    /// Block the calling thread until completion.
    pub fn wait(self) -> (Result<(), Error>, AlignedBuf) {
        if !self.group.is_done() {
            self.group.set_thread_waiter();
            while !self.group.is_done() {
                std::thread::park();
            }
        }
        self.finish()
    }

    fn finish(&self) -> (Result<(), Error>, AlignedBuf) {
        self.group.finish(self.read, self.pool.as_deref())
    }
}

impl Future for IoFuture {
    type Output = (Result<(), Error>, AlignedBuf);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.group.poll_done(cx.waker()) {
            Poll::Ready(self.finish())
        } else {
            Poll::Pending
        }
    }
}

/// Completion of a submitted flush.
pub struct FlushFuture {
    group: Arc<Group>,
}

impl FlushFuture {
    pub fn wait(self) -> Result<(), Error> {
        if !self.group.is_done() {
            self.group.set_thread_waiter();
            while !self.group.is_done() {
                std::thread::park();
            }
        }
        self.group.take_result()
    }
}

impl Future for FlushFuture {
    type Output = Result<(), Error>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.group.poll_done(cx.waker()) {
            Poll::Ready(self.group.take_result())
        } else {
            Poll::Pending
        }
    }
}
