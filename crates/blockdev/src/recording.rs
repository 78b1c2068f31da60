//! [`RecordingDevice`]: an in-memory device for crash-consistency tests.
//!
//! It behaves like a disk with a volatile write cache: reads see every write, but only
//! what a flush covered survives a crash. It records every write and flush, so a test
//! can run a workload once and then examine the image a crash would have left:
//!
//! * flush point `0` is the initial image (nothing flushed yet); flush point `k`
//!   (`1..flush_points()`) is the moment the `k`-th flush returned;
//! * [`image_at_flush(i)`](RecordingDevice::image_at_flush) is the durable image at
//!   point `i`: a crash just before the next flush returned, with none of the writes
//!   issued since reaching the disk;
//! * the writes issued after point `i` (before the next flush, or to the end) may each
//!   have reached the disk or not, in any combination, because a disk reorders its
//!   cache: [`image_with_partial`](RecordingDevice::image_with_partial) keeps a chosen
//!   subset of them, [`image_with_torn`](RecordingDevice::image_with_torn) a chosen
//!   subset of their sectors (a torn multi-sector write).
//!
//! Writes within one point's epoch are numbered from 0 in issue order
//! ([`writes_after`](RecordingDevice::writes_after) lists them).

use crate::error::{check_request, Error, IoOp};
use crate::mem::MemDevice;
use crate::BlockDevice;
use std::sync::{Arc, Mutex, MutexGuard};

/// One recorded write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    pub offset: u64,
    pub data: Arc<[u8]>,
}

struct State {
    initial: Arc<Vec<u8>>,
    current: Vec<u8>,
    writes: Vec<WriteRecord>,
    /// `flushes[k]` = number of writes issued before the `k+1`-th flush.
    flushes: Vec<usize>,
}

pub struct RecordingDevice {
    state: Mutex<State>,
    sector: u32,
    size: u64,
}

impl RecordingDevice {
    /// A zeroed device of `size` bytes (rounded down to whole sectors).
    pub fn new(size: u64, sector: u32) -> RecordingDevice {
        RecordingDevice::from_image(vec![0; size as usize], sector)
    }

    /// A device whose initial (durable) contents are `image` — e.g. a freshly
    /// formatted filesystem built on a `MemDevice`.
    pub fn from_image(image: Vec<u8>, sector: u32) -> RecordingDevice {
        let mem = MemDevice::from_vec(image, sector);
        let sector = mem.sector_size();
        let image = mem.into_vec();
        RecordingDevice {
            size: image.len() as u64,
            sector,
            state: Mutex::new(State {
                current: image.clone(),
                initial: Arc::new(image),
                writes: Vec::new(),
                flushes: Vec::new(),
            }),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of crash points: one more than the number of flushes.
    pub fn flush_points(&self) -> usize {
        self.st().flushes.len() + 1
    }

    pub fn flush_count(&self) -> usize {
        self.st().flushes.len()
    }

    /// Every write so far, in issue order.
    pub fn writes(&self) -> Vec<WriteRecord> {
        self.st().writes.clone()
    }

    /// Writes issued after flush point `i` and before the next flush (or up to now):
    /// the ones a crash right after point `i` may or may not have kept.
    ///
    /// Panics if `i >= flush_points()` (a bug in the test).
    pub fn writes_after(&self, i: usize) -> Vec<WriteRecord> {
        let st = self.st();
        let (start, end) = epoch(&st, i);
        st.writes[start..end].to_vec()
    }

    /// The durable image at flush point `i`.
    ///
    /// Panics if `i >= flush_points()` (a bug in the test).
    pub fn image_at_flush(&self, i: usize) -> MemDevice {
        self.image_with_torn(i, |_, _| false)
    }

    /// The durable image at point `i` plus those writes of the following epoch for which
    /// `keep(j)` is true (`j` numbers them from 0, see [`writes_after`](Self::writes_after)),
    /// applied in issue order.
    pub fn image_with_partial(&self, i: usize, keep: impl Fn(usize) -> bool) -> MemDevice {
        self.image_with_torn(i, |j, _| keep(j))
    }

    /// As [`image_with_partial`](Self::image_with_partial), sector by sector: write `j`'s
    /// sector `s` (counted from the write's start) reached the disk iff `keep(j, s)`.
    pub fn image_with_torn(&self, i: usize, keep: impl Fn(usize, u64) -> bool) -> MemDevice {
        let st = self.st();
        let (start, end) = epoch(&st, i);
        let mut img: Vec<u8> = st.initial.as_ref().clone();
        for w in &st.writes[..start] {
            apply(&mut img, w.offset, &w.data);
        }
        let sector = self.sector as usize;
        for (j, w) in st.writes[start..end].iter().enumerate() {
            for (s, chunk) in w.data.chunks(sector).enumerate() {
                if keep(j, s as u64) {
                    apply(&mut img, w.offset + (s * sector) as u64, chunk);
                }
            }
        }
        MemDevice::from_vec(img, self.sector)
    }

    /// What reads return now (every write applied), as if there were no crash.
    pub fn image_now(&self) -> MemDevice {
        MemDevice::from_vec(self.st().current.clone(), self.sector)
    }

    /// The durable image at the last flush.
    pub fn durable_image(&self) -> MemDevice {
        let last = self.flush_points() - 1;
        self.image_at_flush(last)
    }
}

fn epoch(st: &State, i: usize) -> (usize, usize) {
    assert!(
        i <= st.flushes.len(),
        "flush point {i} does not exist: {} flush points",
        st.flushes.len() + 1
    );
    let start = if i == 0 { 0 } else { st.flushes[i - 1] };
    let end = st.flushes.get(i).copied().unwrap_or(st.writes.len());
    (start, end)
}

fn apply(img: &mut [u8], offset: u64, data: &[u8]) {
    let o = offset as usize;
    img[o..o + data.len()].copy_from_slice(data);
}

impl BlockDevice for RecordingDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn sector_size(&self) -> u32 {
        self.sector
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        check_request(IoOp::Read, offset, buf.len() as u64, self.sector, self.size)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.st().current[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.write_many(&[(offset, buf)])
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), Error> {
        for (off, b) in reqs.iter() {
            check_request(IoOp::Read, *off, b.len() as u64, self.sector, self.size)?;
        }
        let st = self.st();
        for (off, b) in reqs.iter_mut() {
            let o = *off as usize;
            b.copy_from_slice(&st.current[o..o + b.len()]);
        }
        Ok(())
    }

    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<(), Error> {
        for (off, b) in reqs {
            check_request(IoOp::Write, *off, b.len() as u64, self.sector, self.size)?;
        }
        let mut st = self.st();
        for (off, b) in reqs {
            if b.is_empty() {
                continue;
            }
            apply(&mut st.current, *off, b);
            st.writes.push(WriteRecord {
                offset: *off,
                data: Arc::from(*b),
            });
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        let mut st = self.st();
        let n = st.writes.len();
        st.flushes.push(n);
        Ok(())
    }
}

impl std::fmt::Debug for RecordingDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.st();
        f.debug_struct("RecordingDevice")
            .field("size", &self.size)
            .field("sector", &self.sector)
            .field("writes", &st.writes.len())
            .field("flushes", &st.flushes.len())
            .finish()
    }
}
