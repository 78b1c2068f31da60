//! Resource groups: allocation and freeing of blocks (GFS2's rgrp.c).
//!
//! An rgrp's header and bitmap blocks are buffers owned by its glock; all changes
//! happen under that glock in EX, inside a transaction. Allocation is reserved
//! before the transaction opens ([`Reservation`]: the rgrp glock taken, enough free
//! blocks seen), because no thread may wait for a glock inside a transaction.
//! Each node starts its search at a different rgrp (node id spread over the
//! rgrps), so writers on different nodes rarely want the same rgrp glock.

use std::sync::Arc;

use mcfs_format::geometry::{blocks_per_bitmap, RgrpLayout};
use mcfs_format::header::BlockType;
use mcfs_format::rgrp::{self, BlockState, RgrpHeader, BITMAP_DATA_OFFSET};

use crate::buf::Buf;
use crate::error::{FsError, Result};
use crate::fs::Fs;
use crate::glock::{Holder, LockName, MaySleep, Mode};
use crate::log::Tx;

/// An rgrp glock held in EX with room for `want` blocks.
pub struct Reservation {
    pub holder: Holder,
    pub layout: RgrpLayout,
    pub want: u32,
}

impl Fs {
    pub(crate) fn rgrp_header_buf(&self, l: &RgrpLayout) -> Result<Arc<Buf>> {
        self.read_meta(l.start, LockName::Rgrp(l.index), BlockType::RgrpHeader, |b, fs| {
            RgrpHeader::decode(b, l, fs.fsid).map(|_| ())
        })
    }

    pub(crate) fn rgrp_header(&self, l: &RgrpLayout) -> Result<RgrpHeader> {
        let b = self.rgrp_header_buf(l)?;
        let h = RgrpHeader::decode(&b.read(), l, self.fsid)?;
        Ok(h)
    }

    fn bitmap_buf(&self, l: &RgrpLayout, i: u32) -> Result<Arc<Buf>> {
        self.read_meta(l.bitmap_block(i), LockName::Rgrp(l.index), BlockType::Bitmap, |b, fs| {
            rgrp::verify_bitmap_block(b, l, i, fs.fsid).map(|_| ())
        })
    }

    /// Where this node starts looking: the last rgrp that had room, or its own
    /// quarter of the device.
    fn first_rgrp(&self) -> usize {
        let n = self.geo.rgrp_count as usize;
        match self.rgrp_hint.load(std::sync::atomic::Ordering::Relaxed) {
            0 => (self.node_id as usize).saturating_sub(1) * n.div_ceil(4).max(1) % n,
            h => (h - 1) % n,
        }
    }

    /// Reserve an rgrp with at least `min` free blocks (and ideally `want`),
    /// taking its glock in EX. Tries the rgrps this node prefers first and uses
    /// try-locks on the first pass so that contended rgrps are skipped.
    pub fn reserve(&self, want: u32, min: u32, goal: Option<u64>, ms: &MaySleep) -> Result<Reservation> {
        let n = self.geo.rgrp_count as usize;
        let start = goal.and_then(|g| self.geo.rgrp_of(g)).map_or_else(|| self.first_rgrp(), |l| l.index as usize);
        let mut flushed = false;
        loop {
            let mut flush_would_help = false;
            for pass in 0..2 {
            for k in 0..n {
                let i = (start + k) % n;
                let Some(l) = self.geo.rgrp(i) else { continue };
                let h = if pass == 0 {
                    match self.glocks.try_acquire(LockName::Rgrp(i as u32), Mode::EX) {
                        Ok(h) => h,
                        Err(FsError::WouldBlock) => continue,
                        Err(e) => return Err(e),
                    }
                } else {
                    self.glocks.acquire(LockName::Rgrp(i as u32), Mode::EX, ms)?
                };
                let hdr = self.rgrp_header(&l)?;
                // blocks freed by uncommitted transactions are not free yet
                let quarantined = self.log.uncommitted_frees_count(l.data_start, l.data_blocks as u64) as u32;
                let usable = hdr.free.saturating_sub(quarantined);
                if usable >= min.max(1) {
                    self.rgrp_hint.store(i + 1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(Reservation { holder: h, layout: l, want: want.min(usable) });
                }
                if hdr.free >= min.max(1) {
                    flush_would_help = true;
                }
            }
            }
            if !flush_would_help || flushed {
                return Err(FsError::NoSpace);
            }
            // committing the frees makes their blocks usable
            self.log.flush()?;
            flushed = true;
        }
    }

    /// Allocate up to `n` blocks in the reserved rgrp: the first free block at or
    /// after `goal` and the free blocks right after it (one contiguous run, so
    /// file data stays sequential; callers loop for more). Marks them `state`.
    pub fn alloc_blocks(&self, tx: &mut Tx<'_>, res: &Reservation, n: u32, goal: u64, state: BlockState) -> Result<Vec<u64>> {
        let l = &res.layout;
        let hbuf = self.rgrp_header_buf(l)?;
        let mut hdr = RgrpHeader::decode(&hbuf.read(), l, self.fsid)?;
        let quarantined = self.log.uncommitted_frees_in(l.data_start, l.data_blocks as u64);
        let n = n.min(hdr.free.saturating_sub(quarantined.len() as u32)) as usize;
        if n == 0 {
            return Ok(Vec::new());
        }
        let per = blocks_per_bitmap(self.geo.block_size);
        let start_rel = if l.contains_data(goal) { (goal - l.data_start) as u32 } else { 0 };
        let (start_bi, start_k) = (start_rel / per, (start_rel % per) as usize);
        let mut out: Vec<u64> = Vec::with_capacity(n);
        let mut touched = Vec::new();
        for step in 0..=l.bitmap_blocks {
            let bi = (start_bi + step) % l.bitmap_blocks;
            let (_, count) = rgrp::bitmap_span(l, self.geo.block_size, bi);
            let (from, to) = match step {
                0 => (start_k, count as usize),
                s if s == l.bitmap_blocks => (0, start_k.min(count as usize)),
                _ => (0, count as usize),
            };
            let buf = self.bitmap_buf(l, bi)?;
            let mut data = buf.write();
            let bits = &mut data[BITMAP_DATA_OFFSET..];
            let mut run_ended = false;
            let before = out.len();
            let mut k = from;
            while k < to && out.len() < n {
                if out.is_empty() && k % 4 == 0 && k + 4 <= to && ((bits[k / 4] & 0x55) | ((bits[k / 4] & 0xaa) >> 1)) == 0x55 {
                    k += 4; // no free entry in this byte
                    continue;
                }
                let b = l.data_start + bi as u64 * per as u64 + k as u64;
                if rgrp::get_bits(bits, k) == BlockState::Free && !quarantined.contains(&b) {
                    rgrp::set_bits(bits, k, state);
                    out.push(b);
                } else if !out.is_empty() {
                    run_ended = true;
                    break;
                }
                k += 1;
            }
            if out.len() > before {
                rgrp::seal_bitmap_block(&mut data, l, bi, self.next_generation(&hdr, l)?, self.fsid);
                drop(data);
                tx.add(&buf);
                touched.push(bi);
            }
            // A run may continue into the next bitmap block only when that one
            // describes the blocks right after (no wrap to the rgrp's start).
            if run_ended || out.len() >= n || (!out.is_empty() && (to < count as usize || bi + 1 >= l.bitmap_blocks)) {
                break;
            }
        }
        if out.is_empty() {
            return Err(self.inconsistent(format!("rgrp {} header says {} free blocks but its bitmap has none", l.index, hdr.free)));
        }
        hdr.free = self.counter_less(hdr.free, out.len() as u32, "free", l)?;
        if state == BlockState::Dinode {
            hdr.dinodes += out.len() as u32;
        }
        self.write_rgrp_header(tx, l, &hbuf, &mut hdr, &touched)?;
        self.stats.blocks_allocated.fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// The generation the next write of this rgrp carries; one at its limit
    /// can only come from a damaged header (withdraw, never wrap).
    fn next_generation(&self, hdr: &RgrpHeader, l: &RgrpLayout) -> Result<u64> {
        hdr.generation
            .checked_add(1)
            .ok_or_else(|| self.inconsistent(format!("rgrp header at block {}: generation {} at its limit", l.start, hdr.generation)))
    }

    /// A header count lowered by `n`; below zero the header disagrees with
    /// its bitmap: an on-disk inconsistency (withdraw), never a wrap.
    fn counter_less(&self, v: u32, n: u32, what: &str, l: &RgrpLayout) -> Result<u32> {
        v.checked_sub(n)
            .ok_or_else(|| self.inconsistent(format!("rgrp header at block {}: {what} count {v} is less than the {n} blocks its bitmap says", l.start)))
    }

    fn write_rgrp_header(&self, tx: &mut Tx<'_>, l: &RgrpLayout, hbuf: &Arc<Buf>, hdr: &mut RgrpHeader, touched: &[u32]) -> Result<()> {
        hdr.generation = self.next_generation(hdr, l)?;
        let enc = hdr.encode(self.geo.block_size, l.start, self.fsid);
        hbuf.write().copy_from_slice(&enc);
        tx.add(hbuf);
        // bitmap blocks not touched this time keep the older generation: that
        // is fine, generations only need to be monotonic per block
        let _ = touched;
        Ok(())
    }

    /// Change the state of blocks (all in rgrps whose glocks the caller holds in
    /// EX). Used to free (-> Free), and for dinodes: Dinode <-> Unlinked.
    pub fn set_block_states(&self, tx: &mut Tx<'_>, blocks: &[u64], state: BlockState) -> Result<()> {
        let per = blocks_per_bitmap(self.geo.block_size) as u64;
        let mut by_rgrp: std::collections::BTreeMap<u32, Vec<u64>> = std::collections::BTreeMap::new();
        for &b in blocks {
            let Some(l) = self.geo.rgrp_of(b) else {
                return Err(self.inconsistent(format!("block {b} outside every rgrp")));
            };
            by_rgrp.entry(l.index).or_default().push(b);
        }
        if state == BlockState::Free {
            // not reusable until this transaction commits
            tx.quarantine(blocks);
        }
        for (ri, bl) in by_rgrp {
            let Some(l) = self.geo.rgrp(ri as usize) else { continue };
            debug_assert!(self.glocks.is_granted(LockName::Rgrp(ri)) == Some(Mode::EX));
            let hbuf = self.rgrp_header_buf(&l)?;
            let mut hdr = RgrpHeader::decode(&hbuf.read(), &l, self.fsid)?;
            // one pass per bitmap block: set its bits, then seal and log it
            // once (freeing a large file changes thousands of bits a block)
            let mut by_bitmap: std::collections::BTreeMap<u32, Vec<usize>> = std::collections::BTreeMap::new();
            for b in bl {
                let rel = b - l.data_start;
                by_bitmap.entry((rel / per) as u32).or_default().push((rel % per) as usize);
            }
            let mut touched = Vec::new();
            let mut changed_total = 0u64;
            for (bi, ks) in by_bitmap {
                let buf = self.bitmap_buf(&l, bi)?;
                let mut data = buf.write();
                let mut changed = 0u64;
                for k in ks {
                    let old = rgrp::get_bits(&data[BITMAP_DATA_OFFSET..], k);
                    if old == state {
                        continue;
                    }
                    rgrp::set_bits(&mut data[BITMAP_DATA_OFFSET..], k, state);
                    match old {
                        BlockState::Free => hdr.free = self.counter_less(hdr.free, 1, "free", &l)?,
                        BlockState::Dinode => hdr.dinodes = self.counter_less(hdr.dinodes, 1, "dinode", &l)?,
                        BlockState::Unlinked => hdr.unlinked = self.counter_less(hdr.unlinked, 1, "unlinked", &l)?,
                        BlockState::Used => {}
                    }
                    match state {
                        BlockState::Free => hdr.free += 1,
                        BlockState::Dinode => hdr.dinodes += 1,
                        BlockState::Unlinked => hdr.unlinked += 1,
                        BlockState::Used => {}
                    }
                    changed += 1;
                }
                if changed > 0 {
                    rgrp::seal_bitmap_block(&mut data, &l, bi, self.next_generation(&hdr, &l)?, self.fsid);
                    drop(data);
                    tx.add(&buf);
                    touched.push(bi);
                    changed_total += changed;
                }
            }
            if !touched.is_empty() {
                if state == BlockState::Free {
                    self.stats.blocks_freed.fetch_add(changed_total, std::sync::atomic::Ordering::Relaxed);
                }
                self.write_rgrp_header(tx, &l, &hbuf, &mut hdr, &touched)?;
            }
        }
        Ok(())
    }

    /// The state of one block (rgrp glock held).
    pub fn block_state(&self, b: u64) -> Result<BlockState> {
        let Some(l) = self.geo.rgrp_of(b) else {
            return Err(self.inconsistent(format!("block {b} outside every rgrp")));
        };
        let per = blocks_per_bitmap(self.geo.block_size) as u64;
        let rel = b - l.data_start;
        let buf = self.bitmap_buf(&l, (rel / per) as u32)?;
        let s = rgrp::get_bits(&buf.read()[BITMAP_DATA_OFFSET..], (rel % per) as usize);
        Ok(s)
    }

    /// Every block in state Unlinked in rgrp `l` (rgrp glock held).
    pub fn unlinked_in(&self, l: &RgrpLayout) -> Result<Vec<u64>> {
        let hdr = self.rgrp_header(l)?;
        if hdr.unlinked == 0 {
            return Ok(Vec::new());
        }
        let per = blocks_per_bitmap(self.geo.block_size);
        let mut v = Vec::new();
        for bi in 0..l.bitmap_blocks {
            let buf = self.bitmap_buf(l, bi)?;
            let data = buf.read();
            let (first, count) = rgrp::bitmap_span(l, self.geo.block_size, bi);
            for k in 0..count as usize {
                if rgrp::get_bits(&data[BITMAP_DATA_OFFSET..], k) == BlockState::Unlinked {
                    v.push(first + k as u64);
                }
            }
            let _ = per;
        }
        Ok(v)
    }
}

impl Fs {
    /// A free block in the reserved rgrp at or after `goal`, not in `skip`,
    /// without allocating it (create picks the new dinode's block first so it
    /// can lock the new inode before its transaction opens).
    pub fn pick_free(&self, res: &Reservation, goal: u64, skip: &[u64]) -> Result<Option<u64>> {
        let l = &res.layout;
        let per = blocks_per_bitmap(self.geo.block_size);
        let start_rel = if l.contains_data(goal) { (goal - l.data_start) as u32 } else { 0 };
        let quarantined = self.log.uncommitted_frees_in(l.data_start, l.data_blocks as u64);
        for step in 0..=l.bitmap_blocks {
            let bi = (start_rel / per + step) % l.bitmap_blocks;
            let (first, count) = rgrp::bitmap_span(l, self.geo.block_size, bi);
            let from = if step == 0 { (start_rel % per) as usize } else { 0 };
            let buf = self.bitmap_buf(l, bi)?;
            let data = buf.read();
            let bits = &data[BITMAP_DATA_OFFSET..];
            for k in from..count as usize {
                if rgrp::get_bits(bits, k) == BlockState::Free {
                    let b = first + k as u64;
                    if !skip.contains(&b) && !quarantined.contains(&b) {
                        return Ok(Some(b));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Allocate exactly block `b` (found by [`Fs::pick_free`]) as `state`.
    pub fn alloc_exact(&self, tx: &mut Tx<'_>, res: &Reservation, b: u64, state: BlockState) -> Result<()> {
        if !res.layout.contains_data(b) {
            return Err(FsError::Other(format!("internal: block {b} is not in the reserved rgrp")));
        }
        if self.block_state(b)? != BlockState::Free || self.log.uncommitted_frees_count(b, 1) > 0 {
            return Err(FsError::Other(format!("internal: block {b} is no longer free")));
        }
        let l = &res.layout;
        let hbuf = self.rgrp_header_buf(l)?;
        let mut hdr = RgrpHeader::decode(&hbuf.read(), l, self.fsid)?;
        let per = blocks_per_bitmap(self.geo.block_size) as u64;
        let rel = b - l.data_start;
        let bi = (rel / per) as u32;
        let buf = self.bitmap_buf(l, bi)?;
        {
            let mut data = buf.write();
            rgrp::set_bits(&mut data[BITMAP_DATA_OFFSET..], (rel % per) as usize, state);
            rgrp::seal_bitmap_block(&mut data, l, bi, self.next_generation(&hdr, l)?, self.fsid);
        }
        tx.add(&buf);
        hdr.free = self.counter_less(hdr.free, 1, "free", l)?;
        if state == BlockState::Dinode {
            hdr.dinodes += 1;
        }
        self.write_rgrp_header(tx, l, &hbuf, &mut hdr, &[bi])?;
        self.stats.blocks_allocated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
