//! Write-behind of file data. A FUSE write copies its bytes into an aligned
//! buffer, queues it for a writer thread and returns; the device write runs
//! while the kernel sends the next request, and a sequential writer keeps a
//! few requests in flight instead of one. These rules keep it as safe as
//! writing in place before returning (GFS2's ordered data mode):
//!
//! * The journal commits nothing while file data is in flight (the log flush
//!   waits for [`WriteBehind::wait_all`] first): metadata never maps blocks
//!   whose data is not on the device, fsync and every glock given up to
//!   another node (its sync flushes the log) find the data written, and
//!   blocks freed by a commit cannot be reused before the data written to
//!   them has landed.
//! * Writes that overlap wait for each other (the device does not order the
//!   requests it has in flight), and so does anything that reads blocks being
//!   written: every read of file data waits for its inode's writes
//!   ([`WriteBehind::wait_inode`]), a partial-block write or a tail zeroing for
//!   the block it reads ([`WriteBehind::wait_ranges`]).
//! * A write that ends inside a block leaves that last block *held back*
//!   ([`WriteBehind::hold_tail`]), one per file: the next write usually
//!   continues it (a writer whose buffer is not page-aligned has every 1 MiB
//!   write split by the kernel into a long request and a short one that
//!   finishes its last block), and takes it from memory
//!   ([`WriteBehind::take_tail`]) instead of waiting for the device to write
//!   it and reading it back. Every wait above first queues the held blocks it
//!   covers, so a held block counts as in flight for all of them.
//! * What is in flight or held is bounded (bytes, and [`MAX_TAILS`] held
//!   blocks; the buffers are charged to the memory budget).
//! * A failed write makes every later wait fail (the operation or the
//!   background flusher that sees it withdraws the node); once the node has
//!   withdrawn, queued writes are dropped, not written.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use mcfs_blockdev::{AlignedBuf, BlockDevice};

use crate::error::{FsError, Result};
use crate::icache::budget::{Budget, Charge};
use crate::inode::SpareBufs;

/// Writer threads: one writes while the other collects the next batch.
const WORKERS: usize = 2;
/// A writer submits up to this much at once.
const BATCH_BYTES: usize = 4 << 20;
/// Spare buffers kept for the next writes, and the largest kept.
const SPARE: usize = 4;
const SPARE_MAX: usize = 2 << 20;
/// The longest write a buffer in 4 KiB pages goes out in as one device
/// request (a loop device takes 128 segments a request).
const SMALL_PAGE_REQUEST_MAX: usize = 512 << 10;
/// Held-back last blocks, at most (one per file): past it a write's partial
/// last block is queued at once.
pub const MAX_TAILS: usize = 64;

/// A file's last written block, held back (see the module doc).
struct Tail {
    /// its device byte offset
    off: u64,
    /// the whole block image
    buf: AlignedBuf,
    /// its budget charge, handed on to the job that writes it
    charge: Option<Charge>,
}

impl Tail {
    /// The device bytes it covers.
    fn range(&self) -> [(u64, u64); 1] {
        [(self.off, self.off + self.buf.len() as u64)]
    }
}

struct Job {
    id: u64,
    /// (device byte offset, range of `buf`)
    reqs: Vec<(u64, Range<usize>)>,
    buf: AlignedBuf,
    _charge: Option<Charge>,
}

struct Inflight {
    ino: u64,
    /// device byte ranges [start, end)
    ranges: Vec<(u64, u64)>,
    bytes: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// queued and being written
    inflight: HashMap<u64, Inflight>,
    bytes: usize,
    next_id: u64,
    error: Option<String>,
    shutdown: bool,
    /// held-back last blocks, by inode
    tails: HashMap<u64, Tail>,
    submitted: u64,
    waited: u64,
}

/// What `mcfs status` shows of the write-behind.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DataStats {
    /// Bytes queued or being written now.
    pub inflight_bytes: usize,
    /// Writes handed to the writers since mount.
    pub writes_behind: u64,
    /// Writes that first waited: for an overlapping write, or for room.
    pub writes_waited: u64,
    /// Last blocks held back now.
    pub tails_held: usize,
}

pub struct WriteBehind {
    dev: Arc<dyn BlockDevice>,
    withdrawn: Arc<AtomicBool>,
    cap: usize,
    spare: SpareBufs,
    st: Mutex<State>,
    cv: Condvar,
}

fn overlaps(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter().any(|x| b.iter().any(|y| x.0 < y.1 && y.0 < x.1))
}

impl WriteBehind {
    /// At most `cap` bytes in flight (at least one write is always let
    /// through). `withdrawn` is the node's flag: no write starts once it is set.
    pub fn new(dev: Arc<dyn BlockDevice>, cap: usize, withdrawn: Arc<AtomicBool>, budget: Option<Arc<Budget>>) -> Arc<WriteBehind> {
        let wb = Arc::new(WriteBehind { dev, withdrawn, cap, spare: SpareBufs::new(SPARE, SPARE_MAX, budget), st: Mutex::new(State::default()), cv: Condvar::new() });
        let mut started = 0;
        for i in 0..WORKERS {
            let w = Arc::downgrade(&wb);
            if std::thread::Builder::new().name(format!("data-wb-{i}")).spawn(move || worker(w)).is_ok() {
                started += 1;
            }
        }
        if started == 0 {
            // nothing would ever write the queue: fail every write instead
            tracing::error!("could not start a file data writer thread");
            wb.lock().error = Some("no file data writer thread could be started".into());
        }
        wb
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(st: &State) -> Result<()> {
        match &st.error {
            Some(e) => Err(FsError::Withdrawn(format!("a file data write failed: {e}"))),
            None => Ok(()),
        }
    }

    /// An aligned buffer of `len` bytes (contents unspecified): a spare, or a
    /// new one; one longer than small pages carry in a single device request
    /// is at least a huge page (see [`mcfs_blockdev::HUGE`]), so that a 1 MiB
    /// write goes to the device as one request. A short write does not pay
    /// for (or charge) a huge page.
    pub fn take_buf(&self, len: usize) -> AlignedBuf {
        self.spare.take(len).unwrap_or_else(|| {
            let mut b = AlignedBuf::new(if len > SMALL_PAGE_REQUEST_MAX { len.max(mcfs_blockdev::HUGE) } else { len });
            b.truncate(len);
            b
        })
    }

    /// Let the spare buffers go (reclaim); returns the bytes freed.
    pub fn drop_spares(&self) -> u64 {
        self.spare.clear()
    }

    /// A buffer from [`WriteBehind::take_buf`] that was not queued after all.
    pub fn recycle(&self, buf: AlignedBuf) {
        self.spare.put(buf);
    }

    /// Queue the writes `reqs` (device offset, range of `buf`) of inode `ino`;
    /// returns once they are queued, after any overlapping write in flight has
    /// landed and while in-flight bytes stay under the cap.
    pub fn submit(&self, ino: u64, reqs: Vec<(u64, Range<usize>)>, buf: AlignedBuf, charge: Option<Charge>) -> Result<()> {
        let st = self.lock();
        let ranges: Vec<(u64, u64)> = reqs.iter().map(|(o, r)| (*o, *o + r.len() as u64)).collect();
        let (st, r) = self.queue_held(st, |_, t| overlaps(&t.range(), &ranges));
        r?;
        let (_st, r) = self.enqueue(st, ino, reqs, buf, charge);
        r
    }

    /// Queue one job, waiting first for overlapping writes and for room.
    fn enqueue<'a>(&'a self, mut st: MutexGuard<'a, State>, ino: u64, reqs: Vec<(u64, Range<usize>)>, buf: AlignedBuf, charge: Option<Charge>) -> (MutexGuard<'a, State>, Result<()>) {
        let ranges: Vec<(u64, u64)> = reqs.iter().map(|(o, r)| (*o, *o + r.len() as u64)).collect();
        let bytes: usize = reqs.iter().map(|(_, r)| r.len()).sum();
        let mut waited = false;
        loop {
            if let Err(e) = Self::failed(&st) {
                return (st, Err(e));
            }
            if self.withdrawn.load(Ordering::SeqCst) {
                return (st, Err(FsError::Withdrawn("the node has withdrawn from this filesystem".into())));
            }
            let clash = st.inflight.values().any(|f| overlaps(&f.ranges, &ranges));
            if !clash && (st.bytes == 0 || st.bytes + bytes <= self.cap) {
                break;
            }
            if !waited {
                st.waited += 1;
                waited = true;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let id = st.next_id;
        st.next_id += 1;
        st.inflight.insert(id, Inflight { ino, ranges, bytes });
        st.bytes += bytes;
        st.submitted += 1;
        st.queue.push_back(Job { id, reqs, buf, _charge: charge });
        self.cv.notify_all();
        (st, Ok(()))
    }

    /// Queue the held-back blocks that `which` picks (inode, block).
    fn queue_held<'a>(&'a self, mut st: MutexGuard<'a, State>, which: impl Fn(u64, &Tail) -> bool) -> (MutexGuard<'a, State>, Result<()>) {
        let picked: Vec<u64> = st.tails.iter().filter(|(i, t)| which(**i, t)).map(|(i, _)| *i).collect();
        for ino in picked {
            let Some(t) = st.tails.remove(&ino) else { continue };
            let len = t.buf.len();
            let (g, r) = self.enqueue(st, ino, vec![(t.off, 0..len)], t.buf, t.charge);
            st = g;
            if r.is_err() {
                return (st, r);
            }
        }
        (st, Ok(()))
    }

    /// Hold back `block`, the whole image of the block at device offset `off`
    /// that a write of inode `ino` ended inside, instead of queueing it: the
    /// next write of the file may continue it. The block the file held before
    /// is queued, and so is this one when [`MAX_TAILS`] are held.
    pub fn hold_tail(&self, ino: u64, off: u64, block: AlignedBuf, charge: Option<Charge>) -> Result<()> {
        let st = self.lock();
        let (mut st, r) = self.queue_held(st, |i, t| i == ino && t.off != off);
        r?;
        Self::failed(&st)?;
        if st.tails.len() >= MAX_TAILS && !st.tails.contains_key(&ino) {
            let len = block.len();
            let (_st, r) = self.enqueue(st, ino, vec![(off, 0..len)], block, charge);
            return r;
        }
        st.tails.insert(ino, Tail { off, buf: block, charge });
        Ok(())
    }

    /// The image of the block at device offset `off` if `ino` holds it back:
    /// taken, so the caller writes it (changed) itself.
    pub fn take_tail(&self, ino: u64, off: u64) -> Option<AlignedBuf> {
        let mut st = self.lock();
        if st.tails.get(&ino).is_some_and(|t| t.off == off) {
            return st.tails.remove(&ino).map(|t| t.buf);
        }
        None
    }

    /// Queue the held-back blocks `which` picks, then wait until every job
    /// queued so far that `mine` picks has landed (jobs queued meanwhile are
    /// not waited for: a steady writer cannot keep a waiter waiting).
    fn wait_for(&self, which: impl Fn(u64, &Tail) -> bool, mine: impl Fn(&Inflight) -> bool) -> Result<()> {
        let (mut st, r) = self.queue_held(self.lock(), which);
        r?;
        let mark = st.next_id;
        loop {
            Self::failed(&st)?;
            if !st.inflight.iter().any(|(id, f)| *id < mark && mine(f)) {
                return Ok(());
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Until every write of `ino` (queued or held back) has landed.
    pub fn wait_inode(&self, ino: u64) -> Result<()> {
        self.wait_for(|i, _| i == ino, |f| f.ino == ino)
    }

    /// Until no write (queued or held back) touches the device byte ranges
    /// `ranges`.
    pub fn wait_ranges(&self, ranges: &[(u64, u64)]) -> Result<()> {
        self.wait_for(|_, t| overlaps(&t.range(), ranges), |f| overlaps(&f.ranges, ranges))
    }

    /// Until every write queued or held back so far has landed.
    pub fn wait_all(&self) -> Result<()> {
        self.wait_for(|_, _| true, |_| true)
    }

    pub fn stats(&self) -> DataStats {
        let st = self.lock();
        DataStats { inflight_bytes: st.bytes, writes_behind: st.submitted, writes_waited: st.waited, tails_held: st.tails.len() }
    }

    /// Stop the writers once the queue is empty (unmount).
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.cv.notify_all();
    }
}

fn worker(w: Weak<WriteBehind>) {
    loop {
        let Some(wb) = w.upgrade() else { return };
        let batch: Vec<Job> = {
            let mut st = wb.lock();
            let mut idle = false;
            while st.queue.is_empty() {
                if st.shutdown || idle {
                    break;
                }
                // wake now and then so a dropped filesystem lets the thread go
                let (g, t) = wb.cv.wait_timeout(st, Duration::from_millis(500)).unwrap_or_else(|p| p.into_inner());
                st = g;
                idle = t.timed_out();
            }
            if st.queue.is_empty() {
                if st.shutdown {
                    return;
                }
                continue;
            }
            let mut v = Vec::new();
            let mut n = 0;
            while let Some(j) = st.queue.front() {
                let len: usize = j.reqs.iter().map(|(_, r)| r.len()).sum();
                if !v.is_empty() && n + len > BATCH_BYTES {
                    break;
                }
                n += len;
                if let Some(j) = st.queue.pop_front() {
                    v.push(j);
                }
            }
            v
        };
        let res = if wb.withdrawn.load(Ordering::SeqCst) {
            // a withdrawn node writes nothing more
            Err("the node withdrew before these writes started".to_string())
        } else {
            let reqs: Vec<(u64, &[u8])> = batch.iter().flat_map(|j| j.reqs.iter().map(|(o, r)| (*o, &j.buf[r.clone()]))).collect();
            wb.dev.write_many(&reqs).map_err(|e| e.to_string())
        };
        let mut st = wb.lock();
        if let Err(e) = res {
            tracing::error!("file data write failed: {e}");
            st.error.get_or_insert(e);
        }
        let mut bufs = Vec::with_capacity(batch.len());
        for j in batch {
            if let Some(f) = st.inflight.remove(&j.id) {
                st.bytes -= f.bytes;
            }
            bufs.push(j.buf);
        }
        drop(st);
        for b in bufs {
            wb.spare.put(b);
        }
        wb.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcfs_blockdev::MemDevice;

    #[test]
    fn writes_land_and_waits_see_them() {
        let dev = Arc::new(MemDevice::new(1 << 20, 512));
        let wb = WriteBehind::new(dev.clone(), 64 << 10, Arc::new(AtomicBool::new(false)), None);
        for i in 0..64u64 {
            let mut b = wb.take_buf(4096);
            b.fill(i as u8);
            // every other write overlaps the one before
            wb.submit(7, vec![((i / 2) * 4096, 0..4096)], b, None).unwrap();
        }
        wb.wait_inode(7).unwrap();
        let mut out = vec![0u8; 4096];
        for k in 0..32u64 {
            dev.read_at(k * 4096, &mut out).unwrap();
            // the later of the two overlapping writes wins
            assert!(out.iter().all(|x| *x == (2 * k + 1) as u8), "block {k}");
        }
        wb.wait_all().unwrap();
        let st = wb.stats();
        assert_eq!(st.inflight_bytes, 0);
        assert_eq!(st.writes_behind, 64);
    }

    #[test]
    fn a_failed_write_fails_every_later_wait() {
        let dev = Arc::new(MemDevice::new(1 << 20, 512));
        let wb = WriteBehind::new(dev, 1 << 20, Arc::new(AtomicBool::new(false)), None);
        let b = wb.take_buf(4096);
        // past the end of the device: the writer's write_many fails
        wb.submit(1, vec![(1 << 20, 0..4096)], b, None).unwrap();
        let e = wb.wait_all().unwrap_err();
        assert!(e.is_fatal(), "{e}");
        assert!(wb.wait_inode(2).is_err(), "every wait fails, not only the writer's inode");
        assert!(wb.submit(1, vec![(0, 0..4096)], wb.take_buf(4096), None).is_err());
    }

    #[test]
    fn a_withdrawn_node_starts_no_write() {
        let dev = Arc::new(MemDevice::new(1 << 20, 512));
        let withdrawn = Arc::new(AtomicBool::new(false));
        let wb = WriteBehind::new(dev.clone(), 1 << 20, withdrawn.clone(), None);
        withdrawn.store(true, Ordering::SeqCst);
        let mut b = wb.take_buf(4096);
        b.fill(7);
        assert!(matches!(wb.submit(1, vec![(0, 0..4096)], b, None), Err(FsError::Withdrawn(_))));
        let mut out = vec![1u8; 4096];
        dev.read_at(0, &mut out).unwrap();
        assert!(out.iter().all(|x| *x == 0), "nothing reached the device");
    }

    #[test]
    fn held_back_blocks_are_taken_or_written_by_every_wait() {
        let dev = Arc::new(MemDevice::new(1 << 20, 512));
        let wb = WriteBehind::new(dev.clone(), 1 << 20, Arc::new(AtomicBool::new(false)), None);
        let block = |v: u8| {
            let mut b = AlignedBuf::new(4096);
            b.fill(v);
            b
        };
        let on_disk = |off: u64| {
            let mut out = vec![0u8; 4096];
            dev.read_at(off, &mut out).unwrap();
            out[0]
        };
        // held, then taken back: never written
        wb.hold_tail(1, 0, block(1), None).unwrap();
        assert_eq!(wb.stats().tails_held, 1);
        assert!(wb.take_tail(1, 4096).is_none(), "another block");
        assert!(wb.take_tail(2, 0).is_none(), "another file");
        assert_eq!(wb.take_tail(1, 0).map(|b| b[0]), Some(1));
        wb.wait_all().unwrap();
        assert_eq!(on_disk(0), 0);
        // a file's next held block queues the one before
        wb.hold_tail(1, 0, block(2), None).unwrap();
        wb.hold_tail(1, 4096, block(3), None).unwrap();
        wb.wait_ranges(&[(0, 4096)]).unwrap();
        assert_eq!(on_disk(0), 2);
        assert_eq!(on_disk(4096), 0, "still held");
        // each wait writes what it covers
        wb.hold_tail(2, 8192, block(4), None).unwrap();
        wb.wait_inode(1).unwrap();
        assert_eq!(on_disk(4096), 3);
        assert_eq!(on_disk(8192), 0);
        wb.wait_ranges(&[(8192, 8193)]).unwrap();
        assert_eq!(on_disk(8192), 4);
        // a write over a held block queues it first, and lands after it
        wb.hold_tail(3, 12288, block(5), None).unwrap();
        let mut b = wb.take_buf(4096);
        b.fill(6);
        wb.submit(4, vec![(12288, 0..4096)], b, None).unwrap();
        wb.wait_all().unwrap();
        assert_eq!(on_disk(12288), 6);
        // at most MAX_TAILS held: past that a block is queued at once
        for i in 0..=MAX_TAILS as u64 {
            wb.hold_tail(100 + i, (16 + i) * 4096, block(7), None).unwrap();
        }
        assert_eq!(wb.stats().tails_held, MAX_TAILS);
        wb.wait_all().unwrap();
        assert_eq!(wb.stats().tails_held, 0);
        assert!((0..=MAX_TAILS as u64).all(|i| on_disk((16 + i) * 4096) == 7));
    }
}
