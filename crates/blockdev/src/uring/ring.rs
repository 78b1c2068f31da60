//! The ring thread: the one task that submits to and reaps from the io_uring.
//!
//! How a request travels:
//! 1. A caller (any thread, sync or async) builds [`Request`]s that point at memory it
//!    keeps alive until completion, all sharing one [`Group`], and calls
//!    [`Shared::submit`]: one lock to append them to the shared queue, and one eventfd
//!    write only if the ring thread said it is going to sleep.
//! 2. The ring thread drains the whole queue at once, so requests that many threads
//!    queued meanwhile go to the kernel in one `io_uring_enter` (the batching), up to
//!    the queue depth in flight; the rest wait in its backlog, in arrival order.
//! 3. It sleeps in `io_uring_enter(min_complete = 1)`, which also submits. An eventfd
//!    read is always armed in the ring, so a caller's eventfd write wakes it for new
//!    work exactly like a completion does.
//! 4. Each completion is checked (errno, short transfer) and counted against its group;
//!    the last one marks the group done and wakes its waiter: a parked thread, a
//!    future's waker, or a completion callback, which runs right here and may queue
//!    more requests (taken in the next turn of the loop, without any wake-up).
//!
//! Why one thread: with one submitter the ring can use `SINGLE_ISSUER | DEFER_TASKRUN`,
//! so completion work runs in this thread when it asks for events instead of
//! interrupting whichever caller happened to submit; and requests from many callers
//! are naturally batched. Nothing is ever retried or reordered here: a failed or short
//! request is reported to its caller as it is.

use crate::error::{check_result, Error, IoOp};
use crate::{AlignedBuf, BufPool};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

/// Largest single transfer handed to the kernel (it caps one read/write near 2 GiB);
/// bigger requests are split into chunks submitted together.
pub(crate) const MAX_CHUNK: u64 = 1 << 30;

const EVENTFD_TOKEN: u64 = u64::MAX;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves the data consistent (plain
    // pushes and takes), so poisoning is ignored rather than spread.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) enum Kind {
    Read { ptr: *mut u8, len: u32 },
    Write { ptr: *const u8, len: u32 },
    Readv { iov: *const libc::iovec, cnt: u32 },
    Writev { iov: *const libc::iovec, cnt: u32 },
    Fsync,
}

pub(crate) struct Request {
    pub kind: Kind,
    pub offset: u64,
    /// Bytes the request must transfer; anything else is a short I/O.
    pub len: u64,
    pub group: Arc<Group>,
    /// Position in the group: the error reported is the lowest-indexed one.
    pub index: u32,
}

// SAFETY: the raw pointers refer to memory that the submitter keeps alive and does not
// touch until the request's group completes (a blocked caller's buffers, or buffers
// owned by the group itself).
unsafe impl Send for Request {}

impl Request {
    fn op(&self) -> IoOp {
        match self.kind {
            Kind::Read { .. } | Kind::Readv { .. } => IoOp::Read,
            Kind::Write { .. } | Kind::Writev { .. } => IoOp::Write,
            Kind::Fsync => IoOp::Flush,
        }
    }
}

pub(crate) enum Waiter {
    None,
    Thread(Thread),
    Task(Waker),
    /// Run on the ring thread when the group completes.
    Callback(Box<dyn FnOnce(&Group) + Send>),
}

/// Completion state shared by the requests of one call (or one future).
pub(crate) struct Group {
    remaining: AtomicUsize,
    done: AtomicBool,
    error: Mutex<Option<(u32, Error)>>,
    waiter: Mutex<Waiter>,
    /// Buffers the group owns for an async request: the caller's buffer and, when it
    /// was not aligned, the bounce buffer the kernel actually uses. Kept here so that a
    /// dropped future cannot free memory the kernel is still writing.
    pub bufs: Mutex<GroupBufs>,
}

#[derive(Default)]
pub(crate) struct GroupBufs {
    pub user: Option<AlignedBuf>,
    pub bounce: Option<AlignedBuf>,
}

impl Group {
    pub fn new(count: usize, waiter: Waiter) -> Arc<Group> {
        Arc::new(Group {
            remaining: AtomicUsize::new(count),
            done: AtomicBool::new(count == 0),
            error: Mutex::new(None),
            waiter: Mutex::new(waiter),
            bufs: Mutex::new(GroupBufs::default()),
        })
    }

    /// A group that is already complete with `err` (a request rejected before submission).
    pub fn failed(err: Error) -> Arc<Group> {
        let g = Group::new(0, Waiter::None);
        *lock(&g.error) = Some((0, err));
        g
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Count one request done; the last one wakes the group's waiter.
    pub fn complete(&self, index: u32, outcome: Result<(), Error>) {
        if let Err(e) = outcome {
            let mut slot = lock(&self.error);
            if slot.as_ref().is_none_or(|(i, _)| index < *i) {
                *slot = Some((index, e));
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.store(true, Ordering::Release);
            let w = std::mem::replace(&mut *lock(&self.waiter), Waiter::None);
            match w {
                Waiter::None => {}
                Waiter::Thread(t) => t.unpark(),
                Waiter::Task(w) => w.wake(),
                Waiter::Callback(f) => {
                    // A panicking callback must not take the ring thread (and every
                    // request in flight) down with it.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))).is_err()
                    {
                        tracing::error!("an I/O completion callback panicked");
                    }
                }
            }
        }
    }

    /// Block the calling thread until the group is done. The thread registered itself
    /// as the waiter when the group was made.
    pub fn wait(&self) -> Result<(), Error> {
        while !self.is_done() {
            thread::park();
        }
        self.take_result()
    }

    /// Register `waker` unless already done; true when done.
    pub fn poll_done(&self, waker: &Waker) -> bool {
        if self.is_done() {
            return true;
        }
        {
            let mut w = lock(&self.waiter);
            match &*w {
                Waiter::Task(old) if old.will_wake(waker) => {}
                _ => *w = Waiter::Task(waker.clone()),
            }
        }
        // The ring thread may have finished between the first check and registering.
        self.is_done()
    }

    /// Register the current thread as waiter (for a future turned into a blocking wait).
    pub fn set_thread_waiter(&self) {
        *lock(&self.waiter) = Waiter::Thread(thread::current());
    }

    /// Outcome and buffer of a completed owned-buffer request: copies a read back out
    /// of its bounce buffer and returns the bounce buffer to `pool`.
    pub fn finish(&self, read: bool, pool: Option<&BufPool>) -> (Result<(), Error>, AlignedBuf) {
        let res = self.take_result();
        let mut bufs = lock(&self.bufs);
        let mut user = bufs.user.take().unwrap_or_else(|| AlignedBuf::new(0));
        if let Some(b) = bufs.bounce.take() {
            if read && res.is_ok() {
                user.copy_from_slice(&b);
            }
            if let Some(pool) = pool {
                pool.put(b);
            }
        }
        (res, user)
    }

    pub fn take_result(&self) -> Result<(), Error> {
        match lock(&self.error).take() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// Counters kept by the ring thread (single writer, relaxed), for tests and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Requests handed to the kernel (the eventfd wake-up read not counted).
    pub submitted: u64,
    pub completed: u64,
    /// `io_uring_enter` calls; `submitted / enters` is the mean batch size.
    pub enters: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    completed: AtomicU64,
    enters: AtomicU64,
    max_in_flight: AtomicU64,
}

pub(crate) struct Shared {
    queue: Mutex<Vec<Request>>,
    counters: Counters,
    /// Set by the ring thread just before it blocks; whoever clears it owes a wake-up.
    sleeping: AtomicBool,
    shutdown: AtomicBool,
    efd: OwnedFd,
}

impl Shared {
    pub fn submit(&self, reqs: impl IntoIterator<Item = Request>) {
        {
            let mut q = lock(&self.queue);
            q.extend(reqs);
        }
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.kick();
        }
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. It cannot fail short of
        // a counter overflow (2^64 - 2 pending kicks), which would itself mean the
        // thread is already awake with a readable eventfd.
        unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }

    pub fn stats(&self) -> RingStats {
        let c = &self.counters;
        RingStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            enters: c.enters.load(Ordering::Relaxed),
            max_in_flight: c.max_in_flight.load(Ordering::Relaxed),
        }
    }

    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        // Unconditionally: the armed eventfd read must complete so the thread can exit
        // with nothing of ours left in the kernel.
        self.kick();
    }
}

/// Ring configuration chosen at open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingConfig {
    pub queue_depth: u32,
    pub sqpoll_idle_ms: Option<u32>,
    pub register_file: bool,
}

/// What the ring ended up using, for `UringDevice::describe`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RingInfo {
    pub queue_depth: u32,
    pub sq_entries: u32,
    pub cq_entries: u32,
    pub defer_taskrun: bool,
    pub sqpoll: bool,
    pub fixed_file: bool,
}

pub(crate) fn spawn(
    file: Arc<File>,
    cfg: RingConfig,
) -> Result<(Arc<Shared>, JoinHandle<()>, RingInfo), Error> {
    // SAFETY: plain syscall; the fd is owned below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(Error::Ring {
            what: "eventfd",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: raw is a fresh fd we own.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    let shared = Arc::new(Shared {
        queue: Mutex::new(Vec::new()),
        counters: Counters::default(),
        sleeping: AtomicBool::new(false),
        shutdown: AtomicBool::new(false),
        efd,
    });
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let sh = shared.clone();
    // The ring is created inside its thread: SINGLE_ISSUER binds it to its creator.
    let handle = thread::Builder::new()
        .name("mcfs-uring".into())
        .spawn(move || match RingThread::new(file, sh, cfg) {
            Ok(mut rt) => {
                let _ = tx.send(Ok(rt.info));
                rt.run();
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|source| Error::Ring {
            what: "spawn ring thread",
            source,
        })?;
    match rx.recv() {
        Ok(Ok(info)) => Ok((shared, handle, info)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(Error::Ring {
                what: "ring thread died during setup",
                source: io::Error::other("no setup result"),
            })
        }
    }
}

/// Applies one set of setup flags to a ring builder.
type SetFlags = fn(&mut io_uring::Builder);

fn build_ring(cfg: &RingConfig) -> Result<(IoUring, bool, bool), Error> {
    let entries = (cfg.queue_depth + 1).next_power_of_two();
    let mut last = None;
    if let Some(idle) = cfg.sqpoll_idle_ms {
        match IoUring::builder().setup_sqpoll(idle).build(entries) {
            Ok(r) => return Ok((r, false, true)),
            Err(e) => last = Some(e),
        }
    } else {
        // Newest first; each step drops flags an older kernel rejects with EINVAL.
        let attempts: [(bool, SetFlags); 3] = [
            (true, |b| {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_coop_taskrun()
                    .setup_submit_all();
            }),
            (false, |b| {
                b.setup_coop_taskrun().setup_submit_all();
            }),
            (false, |_| {}),
        ];
        for (defer, flags) in attempts {
            let mut b = IoUring::builder();
            flags(&mut b);
            match b.build(entries) {
                Ok(r) => return Ok((r, defer, false)),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(Error::Ring {
        what: "io_uring_setup",
        source: last.unwrap_or_else(|| io::Error::other("no attempt made")),
    })
}

struct RingThread {
    ring: IoUring,
    shared: Arc<Shared>,
    /// Keeps the fd open as long as the ring may use it.
    _file: Arc<File>,
    fd: RawFd,
    fixed: bool,
    qd: usize,
    slots: Vec<Option<Request>>,
    free: Vec<u32>,
    inflight: usize,
    backlog: VecDeque<Request>,
    spare: Vec<Request>,
    efd_buf: Box<u64>,
    efd_armed: bool,
    info: RingInfo,
}

/// Build an SQE on the registered file if we have one, else on the raw fd.
macro_rules! on_fd {
    ($self:ident, |$fd:ident| $e:expr) => {
        if $self.fixed {
            let $fd = types::Fixed(0);
            $e
        } else {
            let $fd = types::Fd($self.fd);
            $e
        }
    };
}

impl RingThread {
    fn new(file: Arc<File>, shared: Arc<Shared>, cfg: RingConfig) -> Result<RingThread, Error> {
        let (ring, defer, sqpoll) = build_ring(&cfg)?;
        let fd = file.as_raw_fd();
        // A registered file saves the per-request fget/fput; optional, as on old kernels.
        let fixed = cfg.register_file && ring.submitter().register_files(&[fd]).is_ok();
        let qd = cfg.queue_depth as usize;
        let info = RingInfo {
            queue_depth: cfg.queue_depth,
            sq_entries: ring.params().sq_entries(),
            cq_entries: ring.params().cq_entries(),
            defer_taskrun: defer,
            sqpoll,
            fixed_file: fixed,
        };
        tracing::debug!(?info, "io_uring ready");
        Ok(RingThread {
            ring,
            shared,
            _file: file,
            fd,
            fixed,
            qd,
            slots: (0..qd).map(|_| None).collect(),
            free: (0..qd as u32).rev().collect(),
            inflight: 0,
            backlog: VecDeque::new(),
            spare: Vec::new(),
            efd_buf: Box::new(0),
            efd_armed: false,
            info,
        })
    }

    fn run(&mut self) {
        let mut failures = 0u32;
        loop {
            self.take_queue();
            self.push_backlog();
            self.arm_eventfd();

            // Completions already posted: hand in what we queued, then deliver them.
            if !self.ring.completion().is_empty() {
                if !self.ring.submission().is_empty() {
                    self.bump_enters();
                    let _ = self.ring.submit();
                }
                self.reap();
                continue;
            }

            if self.shared.shutdown.load(Ordering::SeqCst)
                && self.inflight == 0
                && self.backlog.is_empty()
                && !self.efd_armed
                && lock(&self.shared.queue).is_empty()
            {
                break;
            }

            self.shared.sleeping.store(true, Ordering::SeqCst);
            if !lock(&self.shared.queue).is_empty() {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            self.bump_enters();
            match self.ring.submit_and_wait(1) {
                Ok(_) => failures = 0,
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    // Not seen in practice. In-flight requests still hold caller memory,
                    // so keep trying to reap them instead of giving up on the ring.
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::error!(error = %e, failures, "io_uring_enter failed");
                    }
                    thread::sleep(Duration::from_millis(u64::from(failures.min(100))));
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
        tracing::debug!("ring thread exits");
    }

    fn take_queue(&mut self) {
        {
            let mut q = lock(&self.shared.queue);
            if q.is_empty() {
                return;
            }
            // Swap vectors so callers never wait on us moving requests one by one.
            std::mem::swap(&mut *q, &mut self.spare);
        }
        self.backlog.extend(self.spare.drain(..));
    }

    fn push_backlog(&mut self) {
        while self.inflight < self.qd && !self.ring.submission().is_full() {
            let Some(req) = self.backlog.pop_front() else {
                return;
            };
            let Some(slot) = self.free.pop() else {
                self.backlog.push_front(req);
                return;
            };
            let sqe = self.sqe(&req).user_data(u64::from(slot));
            // SAFETY: the SQE's memory stays valid until its completion (see Request).
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                self.free.push(slot);
                self.backlog.push_front(req);
                return;
            }
            self.slots[slot as usize] = Some(req);
            self.inflight += 1;
            let c = &self.shared.counters;
            c.submitted.fetch_add(1, Ordering::Relaxed);
            if self.inflight as u64 > c.max_in_flight.load(Ordering::Relaxed) {
                c.max_in_flight.store(self.inflight as u64, Ordering::Relaxed);
            }
        }
    }

    fn sqe(&self, req: &Request) -> squeue::Entry {
        let off = req.offset;
        match req.kind {
            Kind::Read { ptr, len } => {
                on_fd!(self, |fd| opcode::Read::new(fd, ptr, len).offset(off).build())
            }
            Kind::Write { ptr, len } => {
                on_fd!(self, |fd| opcode::Write::new(fd, ptr, len).offset(off).build())
            }
            Kind::Readv { iov, cnt } => {
                on_fd!(self, |fd| opcode::Readv::new(fd, iov, cnt).offset(off).build())
            }
            Kind::Writev { iov, cnt } => {
                on_fd!(self, |fd| opcode::Writev::new(fd, iov, cnt).offset(off).build())
            }
            Kind::Fsync => on_fd!(self, |fd| opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
        }
    }

    fn bump_enters(&self) {
        self.shared.counters.enters.fetch_add(1, Ordering::Relaxed);
    }

    fn arm_eventfd(&mut self) {
        if self.efd_armed || self.shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let sqe = opcode::Read::new(
            types::Fd(self.shared.efd.as_raw_fd()),
            (&mut *self.efd_buf) as *mut u64 as *mut u8,
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        // SAFETY: efd_buf lives in this struct, which outlives the ring's use of it: we
        // only exit after this read has completed.
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            self.efd_armed = true;
        }
    }

    fn reap(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let token = cqe.user_data();
            if token == EVENTFD_TOKEN {
                self.efd_armed = false;
                continue;
            }
            let Some(req) = self
                .slots
                .get_mut(token as usize)
                .and_then(|s| s.take())
            else {
                tracing::error!(token, "completion for an unknown request");
                continue;
            };
            self.free.push(token as u32);
            self.inflight -= 1;
            self.shared.counters.completed.fetch_add(1, Ordering::Relaxed);
            let outcome = check_result(req.op(), req.offset, req.len, cqe.result());
            req.group.complete(req.index, outcome);
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ETIME)
    )
}
