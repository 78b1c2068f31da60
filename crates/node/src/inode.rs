//! Dinodes in memory: reading and writing them, creating inodes, file data I/O,
//! truncation and deallocation (GFS2's inode.c and the data half of aops.c).
//! Every function here runs with the inode's glock held by the caller, in the
//! mode its comment says.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mcfs_format::dinode::{self, Dinode, Timespec};
use mcfs_format::header::BlockType;
use mcfs_format::rgrp::BlockState;

use crate::buf::Buf;
use crate::error::{FsError, Result};
use crate::fs::Fs;
use crate::glock::LockName;
use crate::icache::budget::{Budget, Charge};
use crate::log::Tx;
use crate::rgrp::Reservation;

pub fn now() -> Timespec {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timespec { sec: d.as_secs() as i64, nsec: d.subsec_nanos() }
}

/// Attributes as the FUSE adapter and tests see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub generation: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub rdev: u32,
    pub blksize: u32,
}

/// Largest single device read of file data; longer runs are split into
/// requests of this size submitted together. 1 MiB goes out whole from a
/// buffer in huge pages (read-ahead windows are); in small pages the block
/// layer splits it at 512 KiB anyway.
const READ_CHUNK: u64 = 1 << 20;

/// A few page-aligned file data buffers kept for reuse (read-ahead windows,
/// data writes): a streaming reader or writer reuses them instead of mapping,
/// zeroing and unmapping fresh memory each time.
///
/// A spare is memory the daemon holds, so it is charged to the budget while
/// it waits here, the spares of one pool together take at most a sixteenth
/// of the budget, and reclaim lets them all go ([`SpareBufs::clear`]).
pub(crate) struct SpareBufs {
    bufs: std::sync::Mutex<Vec<(mcfs_blockdev::AlignedBuf, Option<Charge>)>>,
    keep: usize,
    max_capacity: usize,
    budget: Option<Arc<Budget>>,
}

impl SpareBufs {
    /// Keep at most `keep` buffers, none larger than `max_capacity`, charged
    /// to `budget` (uncharged and unbounded in bytes without one).
    pub(crate) fn new(keep: usize, max_capacity: usize, budget: Option<Arc<Budget>>) -> SpareBufs {
        SpareBufs { bufs: std::sync::Mutex::new(Vec::new()), keep, max_capacity, budget }
    }

    /// A spare of `len` bytes (old contents), if the one on top is big enough
    /// (one that is not is let go). It is no longer charged: the caller
    /// charges what it keeps.
    pub(crate) fn take(&self, len: usize) -> Option<mcfs_blockdev::AlignedBuf> {
        let (mut b, _charge) = self.bufs.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        b.set_len_within_capacity(len).then_some(b)
    }

    pub(crate) fn put(&self, b: mcfs_blockdev::AlignedBuf) {
        if b.capacity() > self.max_capacity {
            return;
        }
        let mut v = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() >= self.keep {
            return;
        }
        let charge = match &self.budget {
            Some(budget) => {
                let held: usize = v.iter().map(|(b, _)| b.capacity()).sum();
                if (held + b.capacity()) as u64 > budget.limit() / 16 {
                    return;
                }
                // never reclaims here: a writer thread or a reader puts back
                Some(budget.charge_no_reclaim(b.capacity() as u64))
            }
            None => None,
        };
        v.push((b, charge));
    }

    /// Let every spare go (reclaim); returns the bytes freed.
    pub(crate) fn clear(&self) -> u64 {
        let gone = std::mem::take(&mut *self.bufs.lock().unwrap_or_else(|p| p.into_inner()));
        gone.iter().map(|(b, _)| b.capacity() as u64).sum()
    }
}

impl Fs {
    pub fn attr_of(&self, d: &Dinode) -> Attr {
        Attr {
            ino: d.ino,
            generation: d.generation,
            mode: d.mode,
            nlink: d.nlink,
            uid: d.uid,
            gid: d.gid,
            size: d.size,
            // st_blocks counts 512-byte units, dinode included
            blocks: d.blocks.saturating_add(1).saturating_mul(self.bs as u64 / 512),
            atime: d.atime,
            mtime: d.mtime,
            ctime: d.ctime,
            rdev: d.rdev,
            blksize: self.bs as u32,
        }
    }

    /// The dinode buffer of `ino` (glock held, any mode).
    pub fn dinode_buf(&self, ino: u64) -> Result<Arc<Buf>> {
        self.read_meta(ino, LockName::Inode(ino), BlockType::Dinode, move |b, fs| {
            let d = Dinode::decode(b, ino, fs.fsid)?;
            // a count the device cannot hold is damage the checksum missed
            if d.blocks >= fs.geo.block_count {
                return Err(mcfs_format::FormatError::corrupted(format!("dinode block count {} beyond the filesystem's {} blocks", d.blocks, fs.geo.block_count), ino));
            }
            Ok(())
        })
    }

    /// Decode the dinode of `ino` (glock held, any mode).
    pub fn dinode(&self, ino: u64) -> Result<(Arc<Buf>, Dinode)> {
        let b = self.dinode_buf(ino)?;
        let d = Dinode::decode(&b.read(), ino, self.fsid).map_err(|e| self.corrupt(e))?;
        Ok((b, d))
    }

    /// Write `d` into its buffer inside `tx` (glock held EX).
    pub fn put_dinode(&self, tx: &mut Tx<'_>, b: &Arc<Buf>, d: &Dinode) {
        d.encode_into(&mut b.write(), self.fsid);
        tx.add(b);
    }

    /// Initialise dinode block `ino` (picked with [`Fs::pick_free`], its glock
    /// already held EX) as a new inode, allocating it from `res`.
    #[allow(clippy::too_many_arguments)]
    pub fn alloc_dinode(&self, tx: &mut Tx<'_>, res: &Reservation, ino: u64, mode: u32, uid: u32, gid: u32, rdev: u32, parent: u64) -> Result<(Arc<Buf>, Dinode)> {
        self.alloc_exact(tx, res, ino, BlockState::Dinode)?;
        let t = now();
        // The generation tells a reused inode number apart (NFS-style stale
        // handles, FUSE's generation): the creation time in nanoseconds is
        // unique per block without reading the old dinode.
        let generation = (t.sec as u64).saturating_mul(1_000_000_000).saturating_add(t.nsec as u64).max(1);
        let mut d = Dinode::new(ino, generation, mode, self.geo.block_size);
        d.uid = uid;
        d.gid = gid;
        d.rdev = rdev;
        d.nlink = if mode & dinode::S_IFMT == dinode::S_IFDIR { 2 } else { 1 };
        d.parent = if mode & dinode::S_IFMT == dinode::S_IFDIR { parent } else { 0 };
        d.atime = t;
        d.mtime = t;
        d.ctime = t;
        let b = self.bufs.replace(ino, LockName::Inode(ino), d.encode(self.geo.block_size, self.fsid));
        tx.add(&b);
        self.stats.inodes_created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((b, d))
    }

    /// Read file data (glock held, any mode). Short at end of file.
    pub fn read_data(&self, d: &Dinode, off: u64, size: u32) -> Result<Vec<u8>> {
        if off >= d.size || size == 0 {
            return Ok(Vec::new());
        }
        if d.is_inline() {
            let end = (off + size as u64).min(d.size);
            let s = off as usize;
            return Ok(d.payload.get(s..s + (end - off) as usize).map(|x| x.to_vec()).unwrap_or_default());
        }
        let (buf, s, len) = self.read_blocks(d, off, size)?;
        Ok(buf[s..s + len].to_vec())
    }

    /// Read the whole blocks holding `[off, off + size)` of a file that is not
    /// inline (glock held, any mode) straight into page-aligned memory (the
    /// device's zero-copy path; holes are zeroes). Returns the buffer and where
    /// in it the range starts and how long it is (short at end of file).
    pub fn read_blocks(&self, d: &Dinode, off: u64, size: u32) -> Result<(mcfs_blockdev::AlignedBuf, usize, usize)> {
        self.read_blocks_into(d, off, size, None)
    }

    /// [`Fs::read_blocks`] into `reuse` when it is big enough (its old
    /// contents are overwritten: every block is read or, for a hole, zeroed).
    pub fn read_blocks_into(&self, d: &Dinode, off: u64, size: u32, reuse: Option<mcfs_blockdev::AlignedBuf>) -> Result<(mcfs_blockdev::AlignedBuf, usize, usize)> {
        let end = (off + size as u64).min(d.size);
        if off >= end || d.is_inline() {
            return Ok((mcfs_blockdev::AlignedBuf::new(0), 0, 0));
        }
        let len = (end - off) as usize;
        let bs = self.bs as u64;
        let first = off / bs;
        let last = (end - 1) / bs;
        let map = self.bmap_range(d, first, last - first + 1)?;
        // this file's data still being written behind lands first
        self.log.data.wait_inode(d.ino)?;
        let want = ((last - first + 1) * bs) as usize;
        let mut out = match reuse.filter(|b| b.capacity() >= want) {
            Some(mut b) => {
                b.set_len_within_capacity(want);
                for (i, p) in map.iter().enumerate() {
                    if p.is_none() {
                        b[i * bs as usize..(i + 1) * bs as usize].fill(0);
                    }
                }
                b
            }
            None => mcfs_blockdev::AlignedBuf::new(want),
        };
        // coalesce contiguous runs into single reads
        let mut i = 0usize;
        let mut reqs: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
        while i < map.len() {
            let Some(p) = map[i] else {
                i += 1;
                continue;
            };
            // runs up to READ_CHUNK: a long run becomes several requests in
            // flight together, not one the device serves alone
            let most = (READ_CHUNK / bs).max(1) as usize;
            let mut j = i + 1;
            while j < map.len() && j - i < most && map[j] == Some(p + (j - i) as u64) {
                j += 1;
            }
            reqs.push((p * bs, i * bs as usize..j * bs as usize));
            i = j;
        }
        {
            let mut slices: Vec<(u64, &mut [u8])> = Vec::with_capacity(reqs.len());
            let mut rest: &mut [u8] = &mut out;
            let mut base = 0usize;
            for (doff, r) in &reqs {
                let tmp = std::mem::take(&mut rest);
                let (_, tail) = tmp.split_at_mut(r.start - base);
                let (mine, after) = tail.split_at_mut(r.end - r.start);
                slices.push((*doff, mine));
                rest = after;
                base = r.end;
            }
            if !slices.is_empty() {
                self.dev.read_many(&mut slices)?;
            }
        }
        let s = (off - first * bs) as usize;
        self.stats.data_bytes_read.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
        Ok((out, s, len))
    }

    /// Write file data at `off` (glock held EX, `res` reserved when the write
    /// may allocate). Data goes in place (ordered mode: before the transaction
    /// that maps it commits). Returns bytes written; may be short when the
    /// reservation runs out (the caller loops with a new one).
    pub fn write_data(&self, tx: &mut Tx<'_>, res: Option<&Reservation>, d: &mut Dinode, dbuf: &Arc<Buf>, off: u64, data: &[u8]) -> Result<usize> {
        let bs = self.bs as u64;
        let end = off + data.len() as u64;
        if end > dinode::tree_capacity(self.geo.block_size, dinode::MAX_HEIGHT) * bs {
            return Err(FsError::TooBig);
        }
        // small files stay inline
        if d.is_inline() && end <= dinode::payload_size(self.geo.block_size) as u64 && !d.is_dir() {
            d.payload[off as usize..end as usize].copy_from_slice(data);
            d.size = d.size.max(end);
            return Ok(data.len());
        }
        let first = off / bs;
        let last = (end - 1) / bs;
        let count = last - first + 1;
        let map: Vec<(u64, bool)> = match res {
            Some(r) => self.bmap_alloc(tx, r, d, dbuf, first, count)?,
            None => {
                let m = self.bmap_range(d, first, count)?;
                m.into_iter().map_while(|p| p.map(|b| (b, false))).collect()
            }
        };
        if map.is_empty() {
            return Err(FsError::NoSpace);
        }
        let mapped = map.len() as u64;
        let wend = end.min((first + mapped) * bs);
        let wlen = (wend - off) as usize;
        // Build whole blocks: partial first/last blocks that already existed are
        // read first; new blocks are zero-filled.
        // Aligned memory, so the device writes it without another copy; a
        // recycled buffer holds old bytes, so every byte is written below.
        let total = (mapped * bs) as usize;
        // Written behind (crate::wb): this returns once the write is queued.
        let mut buf = self.log.data.take_buf(total);
        let head = (off - first * bs) as usize;
        let tail_end = head + wlen;
        // An edge block that already exists: its image held back by the
        // write before (usually the one this continues), or read once no
        // write of it is in flight.
        let edge = |boff: u64, dst: &mut [u8]| -> Result<()> {
            if let Some(img) = self.log.data.take_tail(d.ino, boff) {
                dst.copy_from_slice(&img);
                return Ok(());
            }
            self.log.data.wait_ranges(&[(boff, boff + bs)])?;
            self.dev.read_at(boff, dst)?;
            Ok(())
        };
        if head != 0 {
            if map[0].1 {
                buf[..head].fill(0);
            } else {
                edge(map[0].0 * bs, &mut buf[..bs as usize])?;
            }
        }
        let lastidx = (mapped - 1) as usize;
        if tail_end < total {
            if map[lastidx].1 {
                buf[tail_end..].fill(0);
            } else if lastidx > 0 || head == 0 {
                let s = lastidx * bs as usize;
                edge(map[lastidx].0 * bs, &mut buf[s..s + bs as usize])?;
            }
        }
        buf[head..tail_end].copy_from_slice(&data[..wlen]);
        // A last block the write ends inside is held back: the next write
        // likely finishes it.
        let whole = if tail_end < total { lastidx } else { map.len() };
        if whole < map.len() {
            let s = lastidx * bs as usize;
            let img = mcfs_blockdev::AlignedBuf::from_slice(&buf[s..s + bs as usize]);
            let charge = self.budget.charge_no_reclaim(bs);
            self.log.data.hold_tail(d.ino, map[lastidx].0 * bs, img, Some(charge))?;
        }
        let mut reqs: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
        let mut i = 0;
        while i < whole {
            let mut j = i + 1;
            while j < whole && map[j].0 == map[i].0 + (j - i) as u64 {
                j += 1;
            }
            reqs.push((map[i].0 * bs, i * bs as usize..j * bs as usize));
            i = j;
        }
        if reqs.is_empty() {
            self.log.data.recycle(buf);
        } else {
            let charge = self.budget.charge_no_reclaim(buf.capacity() as u64);
            self.log.data.submit(d.ino, reqs, buf, Some(charge))?;
        }
        self.log.note_data_write();
        d.size = d.size.max(wend);
        self.stats.data_bytes_written.fetch_add(wlen as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(wlen)
    }

    /// Before a write past the end of file or a truncate up: zero the bytes of
    /// the old last block past the old end `old` (a shrink leaves them). In
    /// place before the extend commits, which is harmless: until that commit
    /// they are past the end of file.
    pub fn zero_tail(&self, d: &Dinode, old: u64) -> Result<()> {
        let bs = self.bs as u64;
        if d.is_inline() || old.is_multiple_of(bs) {
            return Ok(());
        }
        if let Some(p) = self.bmap(d, old / bs)? {
            let mut blk = vec![0u8; bs as usize];
            // a write of this block still in flight lands first (this one
            // then comes after it)
            self.log.data.wait_ranges(&[(p * bs, (p + 1) * bs)])?;
            self.dev.read_at(p * bs, &mut blk)?;
            if blk[(old % bs) as usize..].iter().any(|b| *b != 0) {
                blk[(old % bs) as usize..].fill(0);
                self.dev.write_at(p * bs, &blk)?;
                self.log.note_data_write();
            }
        }
        Ok(())
    }

    /// Blocks a truncate to `size` frees, and the rgrps that hold them.
    pub fn truncate_plan(&self, d: &Dinode, size: u64) -> Result<(Vec<u64>, Vec<u64>)> {
        if d.is_inline() {
            return Ok((Vec::new(), Vec::new()));
        }
        let from = size.div_ceil(self.bs as u64);
        self.collect_blocks(d, from)
    }

    /// Shrink or extend `d` to `size` (glock EX; the rgrps of the freed blocks
    /// held EX). Freed metadata blocks are revoked.
    pub fn truncate(&self, tx: &mut Tx<'_>, d: &mut Dinode, size: u64, plan: &(Vec<u64>, Vec<u64>)) -> Result<()> {
        let bs = self.bs as u64;
        if d.is_inline() {
            if size < d.size {
                d.payload[size as usize..].fill(0);
            }
            if size <= dinode::payload_size(self.geo.block_size) as u64 || d.is_dir() {
                d.size = size;
                return Ok(());
            }
            // growing an inline file past the payload: it becomes a (sparse) tree
            d.flags &= !dinode::FLAG_INLINE;
            let data = d.payload[..d.size as usize].to_vec();
            if !data.is_empty() {
                return Err(FsError::Other("internal: extend of non-empty inline file needs unstuffing".into()));
            }
            d.payload.fill(0);
            d.height = dinode::height_for(self.geo.block_size, size.div_ceil(bs));
            d.size = size;
            return Ok(());
        }
        let from = size.div_ceil(bs);
        self.clear_from(tx, d, from)?;
        let (data, meta) = plan;
        for m in meta {
            tx.revoke(*m);
            self.bufs.forget(*m);
        }
        let mut all = data.clone();
        all.extend_from_slice(meta);
        self.set_block_states(tx, &all, BlockState::Free)?;
        d.blocks = d.blocks.saturating_sub(all.len() as u64);
        // The bytes of the last block past the new end stay on disk until an
        // extend zeroes them (zero_tail): zeroing them here, in place, before
        // this transaction commits, would lose durable data in a crash.
        // Growing past what the tree maps needs no blocks: bmap and bmap_range
        // read blocks beyond the tree's capacity as holes, and bmap_alloc grows
        // the tree when a write lands there.
        let _ = bs;
        d.size = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_buffers_are_charged_bounded_and_let_go() {
        let budget = Budget::new(16 << 20); // spares: at most 1 MiB
        let spares = SpareBufs::new(4, usize::MAX, Some(budget.clone()));
        spares.put(mcfs_blockdev::AlignedBuf::new(512 << 10));
        assert_eq!(budget.used(), 512 << 10, "a spare is memory held");
        spares.put(mcfs_blockdev::AlignedBuf::new(512 << 10));
        spares.put(mcfs_blockdev::AlignedBuf::new(512 << 10));
        assert_eq!(budget.used(), 1 << 20, "past a sixteenth of the budget a spare is let go");
        let b = spares.take(4096).unwrap();
        assert_eq!((b.len(), budget.used()), (4096, 512 << 10), "a spare taken is the taker's to charge");
        assert_eq!(spares.clear(), 512 << 10);
        assert_eq!(budget.used(), 0);
        assert!(spares.take(4096).is_none());
    }
}
