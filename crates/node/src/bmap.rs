//! Block maps: logical file blocks to device blocks through the dinode's pointer
//! tree (GFS2's bmap.c). All callers hold the inode glock; growing or shrinking
//! the tree happens inside a transaction with an rgrp reserved.

use std::sync::Arc;

use mcfs_format::dinode::{self, Dinode};
use mcfs_format::header::BlockType;
use mcfs_format::rgrp::BlockState;

use crate::buf::Buf;
use crate::error::Result;
use crate::fs::Fs;
use crate::glock::LockName;
use crate::log::Tx;
use crate::rgrp::Reservation;

impl Fs {
    pub(crate) fn indirect_buf(&self, blk: u64, owner: u64) -> Result<Arc<Buf>> {
        self.read_meta(blk, LockName::Inode(owner), BlockType::Indirect, move |b, fs| dinode::verify_indirect(b, blk, owner, fs.fsid))
    }

    /// Index path of logical block `lblk` in a tree of height `h`: the slot in
    /// the dinode, then one slot per indirect level.
    fn path(&self, h: u8, lblk: u64) -> Vec<usize> {
        let q = dinode::indirect_ptrs(self.geo.block_size) as u64;
        let mut idx = vec![0usize; h as usize];
        let mut rem = lblk;
        for lvl in (1..h as usize).rev() {
            idx[lvl] = (rem % q) as usize;
            rem /= q;
        }
        idx[0] = rem as usize;
        idx
    }

    /// Device block of logical block `lblk`, or None for a hole.
    pub fn bmap(&self, d: &Dinode, lblk: u64) -> Result<Option<u64>> {
        if d.is_inline() || lblk >= dinode::tree_capacity(self.geo.block_size, d.height) {
            return Ok(None);
        }
        let path = self.path(d.height, lblk);
        let mut p = d.ptr(path[0]);
        for &i in &path[1..] {
            if p == 0 {
                return Ok(None);
            }
            let b = self.indirect_buf(p, d.ino)?;
            p = dinode::indirect_ptr(&b.read(), i);
        }
        if p != 0 {
            self.check_data_ptr(d.ino, p)?;
        }
        Ok((p != 0).then_some(p))
    }

    fn check_data_ptr(&self, ino: u64, p: u64) -> Result<()> {
        if self.geo.rgrp_of(p).is_none() {
            return Err(self.inconsistent(format!("inode {ino} points at block {p} outside the data area")));
        }
        Ok(())
    }

    /// Map `count` logical blocks from `lblk` (holes are None).
    pub fn bmap_range(&self, d: &Dinode, lblk: u64, count: u64) -> Result<Vec<Option<u64>>> {
        let mut v = Vec::with_capacity(count as usize);
        if d.is_inline() {
            v.resize(count as usize, None);
            return Ok(v);
        }
        let q = dinode::indirect_ptrs(self.geo.block_size) as u64;
        let cap = dinode::tree_capacity(self.geo.block_size, d.height);
        let mut l = lblk;
        while l < lblk + count {
            if l >= cap {
                v.push(None);
                l += 1;
                continue;
            }
            if d.height == 1 {
                let p = d.ptr(l as usize);
                if p != 0 {
                    self.check_data_ptr(d.ino, p)?;
                }
                v.push((p != 0).then_some(p));
                l += 1;
                continue;
            }
            // walk to the lowest indirect block once, then read its run
            let path = self.path(d.height, l);
            let mut p = d.ptr(path[0]);
            let mut buf = None;
            for &i in &path[1..path.len() - 1] {
                if p == 0 {
                    break;
                }
                let b = self.indirect_buf(p, d.ino)?;
                p = dinode::indirect_ptr(&b.read(), i);
            }
            let last = path[path.len() - 1] as u64;
            let n = (q - last).min(lblk + count - l);
            if p != 0 {
                buf = Some(self.indirect_buf(p, d.ino)?);
            }
            for k in 0..n {
                let ptr = match &buf {
                    Some(b) => dinode::indirect_ptr(&b.read(), (last + k) as usize),
                    None => 0,
                };
                if ptr != 0 {
                    self.check_data_ptr(d.ino, ptr)?;
                }
                v.push((ptr != 0).then_some(ptr));
            }
            l += n;
        }
        Ok(v)
    }

    /// Blocks needed in the worst case to map `count` new blocks from `lblk`:
    /// the data plus indirect blocks (and one per level for a taller tree).
    pub fn alloc_estimate(&self, d: &Dinode, lblk: u64, count: u64) -> u32 {
        let q = dinode::indirect_ptrs(self.geo.block_size) as u64;
        let h = dinode::height_for(self.geo.block_size, lblk + count).max(d.height);
        let mut ind = 0u64;
        let mut span = count;
        for _ in 1..h {
            span = span.div_ceil(q) + 1;
            ind += span;
        }
        (count + ind + h as u64 + 1) as u32
    }

    /// Make sure `count` logical blocks from `lblk` are mapped, allocating data
    /// and indirect blocks from `res`. Returns (device block, newly allocated)
    /// for each; stops early (shorter result) when the reservation runs out.
    pub fn bmap_alloc(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode, dbuf: &Arc<Buf>, lblk: u64, count: u64) -> Result<Vec<(u64, bool)>> {
        let bs = self.geo.block_size;
        if d.is_inline() {
            self.unstuff(tx, res, d, dbuf)?;
        }
        let need_h = dinode::height_for(bs, lblk + count);
        while d.height < need_h {
            self.grow_height(tx, res, d)?;
        }
        let mut out = Vec::with_capacity(count as usize);
        let mut l = lblk;
        while l < lblk + count {
            let path = self.path(d.height, l);
            // find or build the indirect chain down to the leaf level
            let mut parent: Option<Arc<Buf>> = None;
            let mut slot = path[0];
            for lvl in 1..d.height as usize {
                let cur = match &parent {
                    None => d.ptr(slot),
                    Some(b) => dinode::indirect_ptr(&b.read(), slot),
                };
                let b = if cur == 0 {
                    let Some(nb) = self.alloc_one(tx, res, d, BlockState::Used)? else { return Ok(out) };
                    let ib = self.bufs.replace(nb, LockName::Inode(d.ino), dinode::encode_indirect(&[], bs, nb, d.ino, d.generation, self.fsid));
                    tx.add(&ib);
                    match &parent {
                        None => d.set_ptr(slot, nb),
                        Some(pb) => self.set_indirect(tx, pb, slot, nb),
                    }
                    ib
                } else {
                    self.indirect_buf(cur, d.ino)?
                };
                parent = Some(b);
                slot = path[lvl];
            }
            // leaf level: a run of data pointers
            let leaf_cap = if d.height == 1 { dinode::dinode_ptrs(bs) } else { dinode::indirect_ptrs(bs) } as u64;
            let n = (leaf_cap - slot as u64).min(lblk + count - l);
            let mut k = 0;
            while k < n {
                let i = slot + k as usize;
                let cur = match &parent {
                    None => d.ptr(i),
                    Some(b) => dinode::indirect_ptr(&b.read(), i),
                };
                if cur != 0 {
                    out.push((cur, false));
                    k += 1;
                    continue;
                }
                // allocate a contiguous run for the holes that follow
                let mut holes = 1;
                while k + holes < n {
                    let j = slot + (k + holes) as usize;
                    let c = match &parent {
                        None => d.ptr(j),
                        Some(b) => dinode::indirect_ptr(&b.read(), j),
                    };
                    if c != 0 {
                        break;
                    }
                    holes += 1;
                }
                let goal = if d.goal != 0 { d.goal + 1 } else { d.ino + 1 };
                let got = self.alloc_blocks(tx, res, holes as u32, goal, BlockState::Used)?;
                if got.is_empty() {
                    return Ok(out);
                }
                for (m, b) in got.iter().enumerate() {
                    let j = slot + k as usize + m;
                    match &parent {
                        None => d.set_ptr(j, *b),
                        Some(pb) => self.set_indirect(tx, pb, j, *b),
                    }
                    out.push((*b, true));
                }
                d.blocks += got.len() as u64;
                d.goal = *got.last().unwrap_or(&d.goal);
                k += got.len() as u64;
            }
            l += n;
        }
        Ok(out)
    }

    /// Set one pointer. The block's checksum is recomputed when the log takes
    /// its copy (every journaled image is resealed), not once per pointer.
    fn set_indirect(&self, tx: &mut Tx<'_>, b: &Arc<Buf>, i: usize, v: u64) {
        dinode::set_indirect_ptr(&mut b.write(), i, v);
        tx.add(b);
    }

    fn alloc_one(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode, state: BlockState) -> Result<Option<u64>> {
        let goal = if d.goal != 0 { d.goal + 1 } else { d.ino + 1 };
        let got = self.alloc_blocks(tx, res, 1, goal, state)?;
        match got.first() {
            Some(b) => {
                d.blocks += 1;
                d.goal = *b;
                Ok(Some(*b))
            }
            None => Ok(None),
        }
    }

    /// Inline file -> a pointer tree of height 1 (the inline bytes move to a
    /// data block written in place).
    fn unstuff(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode, _dbuf: &Arc<Buf>) -> Result<()> {
        let bs = self.bs;
        let len = (d.size as usize).min(dinode::payload_size(bs as u32));
        let data: Vec<u8> = d.payload[..len].to_vec();
        d.payload.fill(0);
        d.flags &= !dinode::FLAG_INLINE;
        d.height = 1;
        if len > 0 {
            let Some(b) = self.alloc_one(tx, res, d, BlockState::Used)? else {
                return Err(crate::error::FsError::NoSpace);
            };
            let mut block = vec![0u8; bs];
            block[..len].copy_from_slice(&data);
            self.dev.write_at(b * bs as u64, &block)?;
            self.log.note_data_write();
            d.set_ptr(0, b);
        }
        Ok(())
    }

    /// One more level: the dinode's pointers move into a new indirect block.
    fn grow_height(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode) -> Result<()> {
        let bs = self.geo.block_size;
        let n = dinode::dinode_ptrs(bs);
        let ptrs: Vec<u64> = (0..n).map(|i| d.ptr(i)).collect();
        let Some(nb) = self.alloc_one(tx, res, d, BlockState::Used)? else {
            return Err(crate::error::FsError::NoSpace);
        };
        let ib = self.bufs.replace(nb, LockName::Inode(d.ino), dinode::encode_indirect(&ptrs, bs, nb, d.ino, d.generation, self.fsid));
        tx.add(&ib);
        d.payload.fill(0);
        d.set_ptr(0, nb);
        d.height += 1;
        Ok(())
    }

    /// Every block of the tree (data and indirect) at or beyond logical block
    /// `from`, split into (data, indirect blocks that become empty). Used by
    /// truncate (from > 0) and deallocation (from = 0).
    pub fn collect_blocks(&self, d: &Dinode, from: u64) -> Result<(Vec<u64>, Vec<u64>)> {
        let mut data = Vec::new();
        let mut meta = Vec::new();
        if d.is_inline() {
            return Ok((data, meta));
        }
        let q = dinode::indirect_ptrs(self.geo.block_size) as u64;
        let top = dinode::dinode_ptrs(self.geo.block_size);
        // span of logical blocks under one pointer at level `lvl` below the dinode
        let span = |levels_below: u8| q.saturating_pow(levels_below as u32);
        let mut stack: Vec<(u64, u8, u64)> = Vec::new(); // (block, levels below it, first lblk)
        for i in 0..top {
            let p = d.ptr(i);
            if p == 0 {
                continue;
            }
            let first = i as u64 * span(d.height - 1);
            stack.push((p, d.height - 1, first));
        }
        while let Some((p, below, first)) = stack.pop() {
            let cover = span(below);
            if first + cover <= from {
                continue;
            }
            if below == 0 {
                self.check_data_ptr(d.ino, p)?;
                data.push(p);
                continue;
            }
            let b = self.indirect_buf(p, d.ino)?;
            let ptrs: Vec<u64> = (0..q as usize).map(|i| dinode::indirect_ptr(&b.read(), i)).collect();
            for (i, c) in ptrs.iter().enumerate() {
                if *c != 0 {
                    stack.push((*c, below - 1, first + i as u64 * span(below - 1)));
                }
            }
            if first >= from {
                meta.push(p);
            }
        }
        Ok((data, meta))
    }

    /// Clear pointers to blocks at or beyond `from` (the blocks themselves are
    /// freed by the caller). Indirect blocks entirely beyond `from` are dropped.
    pub fn clear_from(&self, tx: &mut Tx<'_>, d: &mut Dinode, from: u64) -> Result<()> {
        if d.is_inline() {
            return Ok(());
        }
        let q = dinode::indirect_ptrs(self.geo.block_size) as u64;
        let top = dinode::dinode_ptrs(self.geo.block_size);
        let span = |levels_below: u8| q.saturating_pow(levels_below as u32);
        for i in 0..top {
            let p = d.ptr(i);
            if p == 0 {
                continue;
            }
            let first = i as u64 * span(d.height - 1);
            if first >= from {
                d.set_ptr(i, 0);
            } else if first + span(d.height - 1) > from && d.height > 1 {
                self.clear_in(tx, p, d.ino, d.height - 1, first, from)?;
            }
        }
        Ok(())
    }

    fn clear_in(&self, tx: &mut Tx<'_>, blk: u64, ino: u64, below: u8, first: u64, from: u64) -> Result<()> {
        let q = dinode::indirect_ptrs(self.geo.block_size) as u64;
        let child_span = q.saturating_pow(below as u32 - 1);
        let b = self.indirect_buf(blk, ino)?;
        let mut changed = false;
        for i in 0..q as usize {
            let c = dinode::indirect_ptr(&b.read(), i);
            if c == 0 {
                continue;
            }
            let cf = first + i as u64 * child_span;
            if cf >= from {
                let mut w = b.write();
                dinode::set_indirect_ptr(&mut w, i, 0);
                changed = true;
            } else if cf + child_span > from && below > 1 {
                self.clear_in(tx, c, ino, below - 1, cf, from)?;
            }
        }
        if changed {
            mcfs_format::header::reseal(&mut b.write());
            tx.add(&b);
        }
        Ok(())
    }
}
