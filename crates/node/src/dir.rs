//! Directories (GFS2's dir.c): inline entries in the dinode while they fit, then
//! an extendible hash table of leaves (see `mcfs_format::dir` for the layout).
//! Callers hold the directory's glock (EX to change it) and, to add an entry, a
//! reservation of [`Fs::dir_add_estimate`] blocks.

use std::sync::Arc;

use mcfs_format::dinode::{self, Dinode};
use mcfs_format::dir::{self, Entry, Leaf};
use mcfs_format::header::BlockType;
use mcfs_format::rgrp::BlockState;

use crate::buf::Buf;
use crate::error::{FsError, Result};
use crate::fs::Fs;
use crate::glock::LockName;
use crate::log::Tx;
use crate::rgrp::Reservation;

impl Fs {
    fn hash_per_block(&self) -> usize {
        dir::hash_ptrs_per_block(self.geo.block_size)
    }

    /// The deepest hash table the dinode can point at.
    pub fn max_dir_depth(&self) -> u8 {
        let slots = dinode::dinode_ptrs(self.geo.block_size) * self.hash_per_block();
        let mut d = 0u8;
        while (1usize << (d + 1)) <= slots && d < dir::MAX_DIR_DEPTH {
            d += 1;
        }
        d
    }

    fn hash_buf(&self, d: &Dinode, index: usize) -> Result<Arc<Buf>> {
        let blk = d.ptr(index);
        if blk == 0 {
            return Err(self.inconsistent(format!("directory {} hash table block {index} missing", d.ino)));
        }
        let owner = d.ino;
        self.read_meta(blk, LockName::Inode(owner), BlockType::DirHash, move |b, fs| dir::decode_hash_block(b, blk, owner, index as u32, fs.fsid).map(|_| ()))
    }

    fn leaf_buf(&self, blk: u64, owner: u64) -> Result<Arc<Buf>> {
        if self.geo.rgrp_of(blk).is_none() {
            return Err(self.inconsistent(format!("directory {owner} points at leaf {blk} outside the data area")));
        }
        self.read_meta(blk, LockName::Inode(owner), BlockType::DirLeaf, move |b, fs| Leaf::decode(b, blk, owner, fs.fsid).map(|_| ()))
    }

    fn leaf(&self, blk: u64, owner: u64) -> Result<(Arc<Buf>, Leaf)> {
        let b = self.leaf_buf(blk, owner)?;
        let l = Leaf::decode(&b.read(), blk, owner, self.fsid).map_err(|e| self.corrupt(e))?;
        Ok((b, l))
    }

    fn slot(&self, d: &Dinode, s: usize) -> Result<u64> {
        let per = self.hash_per_block();
        let b = self.hash_buf(d, s / per)?;
        let v = mcfs_format::le_u64(&b.read(), dir::HASH_PTRS_OFFSET + (s % per) * 8);
        Ok(v)
    }

    fn set_slots(&self, tx: &mut Tx<'_>, d: &Dinode, range: std::ops::Range<usize>, leaf: u64) -> Result<()> {
        let per = self.hash_per_block();
        let mut s = range.start;
        while s < range.end {
            let bi = s / per;
            let b = self.hash_buf(d, bi)?;
            {
                let mut w = b.write();
                while s < range.end && s / per == bi {
                    mcfs_format::le_put_u64(&mut w, dir::HASH_PTRS_OFFSET + (s % per) * 8, leaf);
                    s += 1;
                }
                mcfs_format::header::reseal(&mut w);
            }
            tx.add(&b);
        }
        Ok(())
    }

    fn inline_entries(&self, d: &Dinode) -> Result<Vec<Entry>> {
        dir::decode_entries(&d.payload, d.entries as usize, "inline directory", d.ino).map_err(|e| self.corrupt(e))
    }

    /// Find `name` in directory `d`.
    pub fn dir_lookup(&self, d: &Dinode, name: &[u8]) -> Result<Option<Entry>> {
        if !d.is_dir() {
            return Err(FsError::NotDir);
        }
        if d.is_inline() {
            return Ok(self.inline_entries(d)?.into_iter().find(|e| e.name == name));
        }
        let h = dir::name_hash(name);
        let mut blk = self.slot(d, dir::slot_of(h, d.dir_depth))?;
        let mut hops = 0;
        while blk != 0 {
            let (_, l) = self.leaf(blk, d.ino)?;
            if let Some(e) = l.entries.into_iter().find(|e| e.name == name) {
                return Ok(Some(e));
            }
            blk = l.next;
            hops += 1;
            if hops > 1_000_000 {
                return Err(self.inconsistent(format!("directory {} leaf chain loops", d.ino)));
            }
        }
        Ok(None)
    }

    /// Every leaf block of a hashed directory, each once, in hash order, with
    /// its overflow chain.
    pub fn dir_leaves(&self, d: &Dinode) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        if d.is_inline() {
            return Ok(out);
        }
        if d.dir_depth > self.max_dir_depth() {
            return Err(self.inconsistent(format!("directory {} hash depth {} too large", d.ino, d.dir_depth)));
        }
        let n = 1usize << d.dir_depth;
        let mut s = 0;
        let mut seen = std::collections::HashSet::new();
        while s < n {
            let blk = self.slot(d, s)?;
            let (_, l) = self.leaf(blk, d.ino)?;
            let width = if (l.depth as u8) <= d.dir_depth { 1usize << (d.dir_depth - l.depth as u8) } else { 1 };
            if seen.insert(blk) {
                out.push(blk);
                let mut next = l.next;
                while next != 0 {
                    if !seen.insert(next) {
                        return Err(self.inconsistent(format!("directory {} leaf chain loops", d.ino)));
                    }
                    out.push(next);
                    next = self.leaf(next, d.ino)?.1.next;
                }
            }
            s += width.max(1);
        }
        Ok(out)
    }

    /// All entries of directory `d`.
    pub fn dir_list(&self, d: &Dinode) -> Result<Vec<Entry>> {
        if d.is_inline() {
            return self.inline_entries(d);
        }
        let mut v = Vec::with_capacity(d.entries as usize);
        for blk in self.dir_leaves(d)? {
            v.extend(self.leaf(blk, d.ino)?.1.entries);
        }
        Ok(v)
    }

    /// Blocks owned by a hashed directory: hash-table blocks and leaves.
    pub fn dir_blocks(&self, d: &Dinode) -> Result<Vec<u64>> {
        if d.is_inline() || !d.is_hashed_dir() {
            return Ok(Vec::new());
        }
        let mut v = self.dir_leaves(d)?;
        for i in 0..dinode::dinode_ptrs(self.geo.block_size) {
            let p = d.ptr(i);
            if p != 0 {
                v.push(p);
            }
        }
        Ok(v)
    }

    /// Blocks an insertion may need in the worst case (reserve this many).
    pub fn dir_add_estimate(&self, d: &Dinode) -> u32 {
        if d.is_inline() {
            return 4;
        }
        let per = self.hash_per_block();
        let cur = (1usize << d.dir_depth).div_ceil(per);
        let next = (1usize << (d.dir_depth + 1).min(self.max_dir_depth())).div_ceil(per);
        (3 + 2 * (next - cur)) as u32
    }

    /// Add `e` to directory `d` (EX). `Exists` if the name is taken.
    pub fn dir_add(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode, e: Entry) -> Result<()> {
        if d.is_inline() {
            let mut v = self.inline_entries(d)?;
            if v.iter().any(|x| x.name == e.name) {
                return Err(FsError::Exists);
            }
            let pos = v.partition_point(|x| x.key() < e.key());
            v.insert(pos, e.clone());
            if dir::entries_size(&v) <= dinode::payload_size(self.geo.block_size) {
                dir::encode_entries(&v, &mut d.payload).ok_or_else(|| FsError::Other("inline directory overflow".into()))?;
                d.entries += 1;
                return Ok(());
            }
            v.remove(pos);
            self.dir_make_hashed(tx, res, d, v)?;
        }
        self.hashed_add(tx, res, d, e)?;
        d.entries += 1;
        Ok(())
    }

    fn alloc_meta_block(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode) -> Result<u64> {
        let goal = if d.goal != 0 { d.goal + 1 } else { d.ino + 1 };
        let got = self.alloc_blocks(tx, res, 1, goal, BlockState::Used)?;
        let b = *got.first().ok_or(FsError::NoSpace)?;
        d.blocks += 1;
        d.goal = b;
        Ok(b)
    }

    fn put_leaf(&self, tx: &mut Tx<'_>, blk: u64, d: &Dinode, l: &Leaf) -> Result<bool> {
        let Some(enc) = l.encode(self.geo.block_size, blk, d.generation, self.fsid) else { return Ok(false) };
        let b = self.bufs.replace(blk, LockName::Inode(d.ino), enc);
        tx.add(&b);
        Ok(true)
    }

    fn dir_make_hashed(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode, entries: Vec<Entry>) -> Result<()> {
        let leaf_blk = self.alloc_meta_block(tx, res, d)?;
        let hash_blk = self.alloc_meta_block(tx, res, d)?;
        let l = Leaf { owner: d.ino, depth: 0, next: 0, entries };
        if !self.put_leaf(tx, leaf_blk, d, &l)? {
            return Err(FsError::Other("inline entries do not fit one leaf".into()));
        }
        let hb = dir::encode_hash_block(&[leaf_blk], self.geo.block_size, hash_blk, d.ino, 0, d.generation, self.fsid);
        let b = self.bufs.replace(hash_blk, LockName::Inode(d.ino), hb);
        tx.add(&b);
        d.payload.fill(0);
        d.flags = (d.flags & !dinode::FLAG_INLINE) | dinode::FLAG_HASHED_DIR;
        d.height = 1;
        d.dir_depth = 0;
        d.set_ptr(0, hash_blk);
        d.size = self.bs as u64;
        Ok(())
    }

    fn hashed_add(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode, e: Entry) -> Result<()> {
        let cap = dir::leaf_capacity(self.geo.block_size);
        for _round in 0..64 {
            let s = dir::slot_of(e.hash, d.dir_depth);
            let first = self.slot(d, s)?;
            // name taken anywhere in the chain?
            let mut chain = Vec::new();
            let mut blk = first;
            while blk != 0 {
                let (_, l) = self.leaf(blk, d.ino)?;
                if l.entries.iter().any(|x| x.name == e.name) {
                    return Err(FsError::Exists);
                }
                let next = l.next;
                chain.push((blk, l));
                blk = next;
                if chain.len() > 100_000 {
                    return Err(self.inconsistent(format!("directory {} leaf chain loops", d.ino)));
                }
            }
            for (blk, l) in chain.iter_mut() {
                if dir::entries_size(&l.entries) + e.size() <= cap {
                    let pos = l.entries.partition_point(|x| x.key() < e.key());
                    l.entries.insert(pos, e.clone());
                    self.put_leaf(tx, *blk, d, l)?;
                    return Ok(());
                }
            }
            let (lblk, leaf) = chain.swap_remove(0);
            let ld = leaf.depth as u8;
            if ld < d.dir_depth {
                self.split_leaf(tx, res, d, s, lblk, leaf)?;
            } else if d.dir_depth < self.max_dir_depth() {
                self.double_table(tx, res, d)?;
            } else {
                // cannot split further: chain an overflow leaf at the end
                let nb = self.alloc_meta_block(tx, res, d)?;
                let last = chain.last().map(|c| c.0).unwrap_or(lblk);
                let nl = Leaf { owner: d.ino, depth: ld as u16, next: 0, entries: vec![e.clone()] };
                self.put_leaf(tx, nb, d, &nl)?;
                let (_, mut lastleaf) = self.leaf(last, d.ino)?;
                lastleaf.next = nb;
                self.put_leaf(tx, last, d, &lastleaf)?;
                return Ok(());
            }
        }
        Err(FsError::Other(format!("directory {}: could not make room for an entry", d.ino)))
    }

    fn split_leaf(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode, s: usize, lblk: u64, mut leaf: Leaf) -> Result<()> {
        let ld = leaf.depth as u8;
        let width = 1usize << (d.dir_depth - ld);
        let start = s & !(width - 1);
        let nb = self.alloc_meta_block(tx, res, d)?;
        let bit = 31 - ld as u32;
        let (hi, lo): (Vec<Entry>, Vec<Entry>) = leaf.entries.drain(..).partition(|x| (x.hash >> bit) & 1 == 1);
        leaf.entries = lo;
        leaf.depth += 1;
        let nl = Leaf { owner: d.ino, depth: leaf.depth, next: 0, entries: hi };
        self.put_leaf(tx, lblk, d, &leaf)?;
        self.put_leaf(tx, nb, d, &nl)?;
        self.set_slots(tx, d, start + width / 2..start + width, nb)?;
        Ok(())
    }

    fn double_table(&self, tx: &mut Tx<'_>, res: &Reservation, d: &mut Dinode) -> Result<()> {
        let per = self.hash_per_block();
        let old_n = 1usize << d.dir_depth;
        let mut old = Vec::with_capacity(old_n);
        for s in 0..old_n {
            old.push(self.slot(d, s)?);
        }
        let new_n = old_n * 2;
        let new_blocks = new_n.div_ceil(per);
        if new_blocks > dinode::dinode_ptrs(self.geo.block_size) {
            return Err(FsError::Other("directory hash table full".into()));
        }
        for i in 0..new_blocks {
            if d.ptr(i) == 0 {
                let nb = self.alloc_meta_block(tx, res, d)?;
                d.set_ptr(i, nb);
            }
        }
        for i in 0..new_blocks {
            let ptrs: Vec<u64> = (i * per..((i + 1) * per).min(new_n)).map(|s| old[s / 2]).collect();
            let blk = d.ptr(i);
            let hb = dir::encode_hash_block(&ptrs, self.geo.block_size, blk, d.ino, i as u32, d.generation, self.fsid);
            let b = self.bufs.replace(blk, LockName::Inode(d.ino), hb);
            tx.add(&b);
        }
        d.dir_depth += 1;
        Ok(())
    }

    /// Remove `name` from `d` (EX). Leaves are not merged (as GFS2).
    pub fn dir_remove(&self, tx: &mut Tx<'_>, d: &mut Dinode, name: &[u8]) -> Result<Entry> {
        if d.is_inline() {
            let mut v = self.inline_entries(d)?;
            let pos = v.iter().position(|x| x.name == name).ok_or(FsError::NotFound)?;
            let e = v.remove(pos);
            dir::encode_entries(&v, &mut d.payload).ok_or_else(|| FsError::Other("inline directory overflow".into()))?;
            d.entries -= 1;
            return Ok(e);
        }
        let h = dir::name_hash(name);
        let mut blk = self.slot(d, dir::slot_of(h, d.dir_depth))?;
        while blk != 0 {
            let (_, mut l) = self.leaf(blk, d.ino)?;
            if let Some(pos) = l.entries.iter().position(|x| x.name == name) {
                let e = l.entries.remove(pos);
                self.put_leaf(tx, blk, d, &l)?;
                d.entries = d.entries.saturating_sub(1);
                return Ok(e);
            }
            blk = l.next;
        }
        Err(FsError::NotFound)
    }

    /// Point an existing entry at a different inode (rename over a target).
    pub fn dir_replace(&self, tx: &mut Tx<'_>, d: &mut Dinode, name: &[u8], ino: u64, dtype: u8) -> Result<Entry> {
        if d.is_inline() {
            let mut v = self.inline_entries(d)?;
            let x = v.iter_mut().find(|x| x.name == name).ok_or(FsError::NotFound)?;
            let old = x.clone();
            x.ino = ino;
            x.dtype = dtype;
            dir::encode_entries(&v, &mut d.payload).ok_or_else(|| FsError::Other("inline directory overflow".into()))?;
            return Ok(old);
        }
        let h = dir::name_hash(name);
        let mut blk = self.slot(d, dir::slot_of(h, d.dir_depth))?;
        while blk != 0 {
            let (_, mut l) = self.leaf(blk, d.ino)?;
            if let Some(x) = l.entries.iter_mut().find(|x| x.name == name) {
                let old = x.clone();
                x.ino = ino;
                x.dtype = dtype;
                self.put_leaf(tx, blk, d, &l)?;
                return Ok(old);
            }
            blk = l.next;
        }
        Err(FsError::NotFound)
    }
}
