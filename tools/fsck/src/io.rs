//! All of fsck's I/O goes through an [`Overlay`]: reads come from the device, and
//! every repair is written into memory first. Later passes read the overlay, so
//! they see the repairs of earlier passes; `-y` writes the overlay to the device
//! at the end (superblocks last), `-n` throws it away. The same code therefore
//! computes the same findings in both modes, and `-n` never writes.
//!
//! Reads are batched: [`Overlay::read_batch`] sorts the blocks asked for, merges
//! neighbours (reading small gaps through) into runs of up to 1 MiB, and submits
//! up to 8 MiB of runs in one `read_many`, into page-aligned memory so O_DIRECT
//! needs no bounce copy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use mcfs_blockdev::{AlignedBuf, BlockDevice, Error};

/// Gaps of up to this many blocks between wanted blocks are read through: one
/// larger request beats two small ones on every device we meet.
const MAX_GAP: u64 = 8;
/// Longest single request.
const MAX_RUN_BYTES: u64 = 1 << 20;
/// Bytes in flight per `read_many`.
const BATCH_BYTES: usize = 8 << 20;

pub struct Overlay<'a> {
    dev: &'a dyn BlockDevice,
    bs: u64,
    /// Blocks the device can hold (reads beyond are refused up front).
    nblocks: u64,
    dirty: RwLock<BTreeMap<u64, Vec<u8>>>,
    pub bytes_read: AtomicU64,
    pub requests: AtomicU64,
}

impl<'a> Overlay<'a> {
    pub fn new(dev: &'a dyn BlockDevice, bs: u32) -> Overlay<'a> {
        let bs = u64::from(bs.max(512));
        Overlay { dev, bs, nblocks: dev.size() / bs, dirty: RwLock::new(BTreeMap::new()), bytes_read: AtomicU64::new(0), requests: AtomicU64::new(0) }
    }

    fn dirty_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Vec<u8>>> {
        self.dirty.read().unwrap_or_else(|p| p.into_inner())
    }

    fn dirty_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Vec<u8>>> {
        self.dirty.write().unwrap_or_else(|p| p.into_inner())
    }

    /// One block (the repaired copy if there is one).
    pub fn block(&self, b: u64) -> Result<Vec<u8>, Error> {
        if let Some(v) = self.dirty_read().get(&b) {
            return Ok(v.clone());
        }
        let mut v = vec![0u8; self.bs as usize];
        self.dev.read_at(b.saturating_mul(self.bs), &mut v)?;
        self.bytes_read.fetch_add(self.bs, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(v)
    }

    /// Replace block `b` (in memory until [`Overlay::commit`]).
    pub fn put(&self, b: u64, data: Vec<u8>) {
        if data.len() as u64 == self.bs && b < self.nblocks {
            self.dirty_write().insert(b, data);
        }
    }

    pub fn is_dirty(&self, b: u64) -> bool {
        self.dirty_read().contains_key(&b)
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty_read().len()
    }

    /// Read `blocks` (any order, duplicates allowed) in large batches and call
    /// `f(block, bytes)` once for each, in ascending block order. Blocks beyond
    /// the device are skipped (the caller sees no call for them).
    pub fn read_batch(&self, blocks: &[u64], f: &mut dyn FnMut(u64, &[u8])) -> Result<(), Error> {
        let mut want: Vec<u64> = blocks.iter().copied().filter(|&b| b < self.nblocks).collect();
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            return Ok(());
        }
        let bs = self.bs;
        let max_run = (MAX_RUN_BYTES / bs).max(1);
        // runs: (first block, block count, index range into `want`)
        let mut runs: Vec<(u64, u64, usize, usize)> = Vec::new();
        let mut i = 0;
        while i < want.len() {
            let start = want[i];
            let mut j = i + 1;
            while j < want.len() && want[j] - want[j - 1] <= MAX_GAP && want[j] - start < max_run {
                j += 1;
            }
            runs.push((start, want[j - 1] - start + 1, i, j));
            i = j;
        }
        let batch_blocks = (BATCH_BYTES as u64 / bs).max(max_run) as usize;
        let mut buf = AlignedBuf::new(batch_blocks * bs as usize);
        let mut r = 0;
        while r < runs.len() {
            // gather runs that fit one batch
            let mut end = r;
            let mut total = 0u64;
            while end < runs.len() && total + runs[end].1 <= batch_blocks as u64 {
                total += runs[end].1;
                end += 1;
            }
            {
                let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(end - r);
                let mut rest: &mut [u8] = &mut buf[..(total * bs) as usize];
                for run in &runs[r..end] {
                    let (mine, after) = std::mem::take(&mut rest).split_at_mut((run.1 * bs) as usize);
                    reqs.push((run.0 * bs, mine));
                    rest = after;
                }
                self.dev.read_many(&mut reqs)?;
            }
            self.bytes_read.fetch_add(total * bs, Ordering::Relaxed);
            self.requests.fetch_add((end - r) as u64, Ordering::Relaxed);
            let dirty = self.dirty_read();
            let mut off = 0usize;
            for run in &runs[r..end] {
                for &b in &want[run.2..run.3] {
                    if let Some(d) = dirty.get(&b) {
                        f(b, d);
                    } else {
                        let s = off + ((b - run.0) * bs) as usize;
                        f(b, &buf[s..s + bs as usize]);
                    }
                }
                off += (run.1 * bs) as usize;
            }
            r = end;
        }
        Ok(())
    }

    /// Write every repaired block to the device: all but `last` first, a flush,
    /// then `last` (the superblocks) and a flush. Returns blocks written.
    pub fn commit(&self, last: &[u64]) -> Result<u64, Error> {
        let dirty = self.dirty_read();
        let bs = self.bs;
        let mut n = 0u64;
        for phase in 0..2 {
            let blocks: Vec<(&u64, &Vec<u8>)> = dirty.iter().filter(|(b, _)| last.contains(b) == (phase == 1)).collect();
            for chunk in blocks.chunks(256) {
                let reqs: Vec<(u64, &[u8])> = chunk.iter().map(|(b, d)| (**b * bs, d.as_slice())).collect();
                self.dev.write_many(&reqs)?;
                n += reqs.len() as u64;
            }
            self.dev.flush()?;
        }
        Ok(n)
    }
}

/// The overlay is itself a device, so the node's journal code (`find_head`,
/// `replay`) can run on it: with `-n` a replay lands in memory only.
impl BlockDevice for Overlay<'_> {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.dev.read_at(offset, buf)?;
        self.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bs = self.bs;
        let end = offset + buf.len() as u64;
        let dirty = self.dirty_read();
        for (&b, d) in dirty.range(offset / bs..end.div_ceil(bs)) {
            let bstart = b * bs;
            let s = bstart.max(offset);
            let e = (bstart + bs).min(end);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize].copy_from_slice(&d[(s - bstart) as usize..(e - bstart) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        let bs = self.bs;
        let sec = self.dev.sector_size() as u64;
        if !offset.is_multiple_of(sec) || !(buf.len() as u64).is_multiple_of(sec) {
            return Err(Error::Unaligned { op: mcfs_blockdev::IoOp::Write, offset, len: buf.len() as u64, sector: self.dev.sector_size() });
        }
        let end = offset + buf.len() as u64;
        if end > self.dev.size() {
            return Err(Error::OutOfRange { op: mcfs_blockdev::IoOp::Write, offset, len: buf.len() as u64, size: self.dev.size() });
        }
        let mut b = offset / bs;
        while b * bs < end {
            let bstart = b * bs;
            let mut blk = if bstart >= offset && bstart + bs <= end { vec![0u8; bs as usize] } else { self.block(b)? };
            let s = bstart.max(offset);
            let e = (bstart + bs).min(end);
            blk[(s - bstart) as usize..(e - bstart) as usize].copy_from_slice(&buf[(s - offset) as usize..(e - offset) as usize]);
            self.dirty_write().insert(b, blk);
            b += 1;
        }
        Ok(())
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), Error> {
        for (off, b) in reqs.iter_mut() {
            self.read_at(*off, b)?;
        }
        Ok(())
    }

    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<(), Error> {
        for (off, b) in reqs {
            self.write_at(*off, b)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mcfs_blockdev::MemDevice;

    #[test]
    fn batch_reads_see_repairs_and_skip_out_of_range() {
        let mut data = vec![0u8; 64 * 512];
        for (i, c) in data.chunks_mut(512).enumerate() {
            c.fill(i as u8);
        }
        let dev = MemDevice::from_vec(data, 512);
        let o = Overlay::new(&dev, 512);
        o.put(5, vec![0xee; 512]);
        let mut seen = Vec::new();
        o.read_batch(&[40, 5, 3, 3, 100, 63, 20], &mut |b, d| seen.push((b, d[0]))).unwrap();
        assert_eq!(seen, vec![(3, 3), (5, 0xee), (20, 20), (40, 40), (63, 63)]);
        // as a device: partial overlap with a repaired block
        let mut buf = vec![0u8; 1024];
        o.read_at(4 * 512, &mut buf).unwrap();
        assert_eq!((buf[0], buf[600]), (4, 0xee));
        o.write_at(512, &[7u8; 512]).unwrap();
        assert_eq!(o.block(1).unwrap()[0], 7);
        assert_eq!(dev.to_vec()[512], 1, "nothing reaches the device before commit");
        o.commit(&[]).unwrap();
        assert_eq!(dev.to_vec()[512], 7);
    }
}
