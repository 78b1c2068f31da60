//! Pass 4: claiming every block, in an order that lets the most trustworthy
//! owner win a dispute: dinodes first (they verify and sit where their number
//! says), then directory blocks (they verify and name their owner), then
//! indirect blocks level by level across all files (verified, owner named),
//! and file data last (nothing in a data block says whose it is). A block
//! claimed a second time is a cross-link: the later pointer is cleared (a hole
//! in that file) and the finding says which file lost data to which.
//!
//! Indirect blocks are read level by level across every file at once, in
//! batches of up to 4096 blocks, so a filesystem of big files costs a few large
//! reads per tree level. Data pointers are kept as runs (most files are
//! contiguous), which is what bounds memory on big files.
//!
//! Inodes being freed claim last and never win: their blocks end free unless a
//! live file has them.

use std::collections::HashMap;

use mcfs_format::dinode::{self, Dinode};
use mcfs_format::header;
use mcfs_format::rgrp::BlockState;

use crate::report::Kind;
use crate::{Ctx, Result};

/// Where a pointer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Payload pointer `idx` of dinode `ino`.
    Dinode(u64, usize),
    /// Pointer `idx` of indirect block `blk`.
    Indirect(u64, usize),
}

impl Loc {
    fn at(self, k: usize) -> Loc {
        match self {
            Loc::Dinode(i, x) => Loc::Dinode(i, x + k),
            Loc::Indirect(b, x) => Loc::Indirect(b, x + k),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Item {
    owner: u64,
    loc: Loc,
    blk: u64,
    /// Tree levels below the block (0: data).
    below: u8,
    /// First logical block it maps.
    first: u64,
}

/// Consecutive data pointers of one parent to consecutive blocks.
#[derive(Debug, Clone, Copy)]
struct Run {
    owner: u64,
    loc: Loc,
    blk: u64,
    len: u64,
    first: u64,
}

/// Read-modify-write a live dinode in the overlay.
pub fn update_dinode(ctx: &mut Ctx<'_>, ino: u64, f: impl FnOnce(&mut Dinode)) -> Result<()> {
    let buf = ctx.io.block(ino)?;
    if let Ok(mut d) = Dinode::decode(&buf, ino, ctx.fsid) {
        f(&mut d);
        ctx.io.put(ino, d.encode(ctx.bs, ctx.fsid));
    }
    Ok(())
}

/// Zero the pointer at `loc` (in the overlay).
pub fn clear_ptr(ctx: &mut Ctx<'_>, loc: Loc) -> Result<()> {
    match loc {
        Loc::Dinode(ino, idx) => {
            update_dinode(ctx, ino, |d| d.set_ptr(idx, 0))?;
            if let Some(i) = ctx.inodes.get_mut(&ino) {
                i.ptrs.retain(|p| p.0 as usize != idx);
            }
        }
        Loc::Indirect(blk, idx) => {
            let mut b = ctx.io.block(blk)?;
            dinode::set_indirect_ptr(&mut b, idx, 0);
            header::reseal(&mut b);
            ctx.io.put(blk, b);
        }
    }
    Ok(())
}

fn span(q: u64, below: u8) -> u64 {
    q.saturating_pow(below as u32)
}

struct Walk {
    freeing: bool,
    runs: Vec<Run>,
    /// Pointers to clear: (loc, owner, block, logical block, why).
    clears: Vec<(Loc, u64, u64, u64, String)>,
}

impl Walk {
    /// Route one pointer: outside the data area (cleared), data (a run), or an
    /// indirect block (read next level).
    fn add(&mut self, ctx: &Ctx<'_>, it: Item, next: &mut Vec<Item>) {
        if !ctx.in_data(it.blk) {
            if !self.freeing {
                self.clears.push((it.loc, it.owner, it.blk, it.first, "points outside the data area".into()));
            }
            return;
        }
        if it.below > 0 {
            next.push(it);
            return;
        }
        if let Some(r) = self.runs.last_mut() {
            if r.owner == it.owner && r.loc.at(r.len as usize) == it.loc && r.blk + r.len == it.blk && r.first + r.len == it.first {
                r.len += 1;
                return;
            }
        }
        self.runs.push(Run { owner: it.owner, loc: it.loc, blk: it.blk, len: 1, first: it.first });
    }
}

/// Walk the pointer trees of `inos`, claiming their blocks.
fn walk_trees(ctx: &mut Ctx<'_>, inos: &[u64], freeing: bool) -> Result<()> {
    let q = dinode::indirect_ptrs(ctx.bs) as u64;
    let mut w = Walk { freeing, runs: Vec::new(), clears: Vec::new() };
    let mut level: Vec<Item> = Vec::new();
    let mut top = Vec::new();
    for &ino in inos {
        let Some(i) = ctx.inodes.get(&ino) else { continue };
        if i.is_dir() || i.is_inline() || i.height == 0 {
            continue;
        }
        let below = i.height - 1;
        for &(idx, p) in &i.ptrs {
            top.push(Item { owner: ino, loc: Loc::Dinode(ino, idx as usize), blk: p, below, first: idx as u64 * span(q, below) });
        }
    }
    for it in top {
        w.add(ctx, it, &mut level);
    }
    let mut counted: HashMap<u64, u64> = HashMap::new();
    let mut depth = 0;
    while !level.is_empty() {
        depth += 1;
        ctx.progress("block maps", depth, 5);
        level.sort_by_key(|it| it.blk);
        let mut next = Vec::new();
        for chunk in level.chunks(4096) {
            let blocks: Vec<u64> = chunk.iter().map(|it| it.blk).collect();
            let mut bufs: HashMap<u64, Vec<u8>> = HashMap::with_capacity(chunk.len());
            ctx.io.read_batch(&blocks, &mut |b, buf| {
                bufs.insert(b, buf.to_vec());
            })?;
            for it in chunk {
                let ok = match bufs.get(&it.blk) {
                    Some(buf) => dinode::verify_indirect(buf, it.blk, it.owner, ctx.fsid).map_err(|e| e.to_string()),
                    None => Err("beyond the end of the device".into()),
                };
                if let Err(e) = ok {
                    if !freeing {
                        let lost = span(q, it.below);
                        w.clears.push((it.loc, it.owner, it.blk, it.first, format!("is an indirect block that does not verify ({e}); up to {lost} blocks of data lost")));
                    }
                    continue;
                }
                if freeing {
                    ctx.map.claim_freeing(it.blk);
                    *counted.entry(it.owner).or_default() += 1;
                } else {
                    match ctx.map.claim(it.blk, BlockState::Used, it.owner) {
                        Ok(()) => *counted.entry(it.owner).or_default() += 1,
                        Err(o) => {
                            w.clears.push((it.loc, it.owner, it.blk, it.first, format!("is an indirect block already claimed by inode {}", o.unwrap_or(0))));
                            continue;
                        }
                    }
                }
                let Some(buf) = bufs.get(&it.blk) else { continue };
                for k in 0..q as usize {
                    let p = dinode::indirect_ptr(buf, k);
                    if p != 0 {
                        let child = Item { owner: it.owner, loc: Loc::Indirect(it.blk, k), blk: p, below: it.below - 1, first: it.first + k as u64 * span(q, it.below - 1) };
                        w.add(ctx, child, &mut next);
                    }
                }
            }
        }
        level = next;
    }
    // Data last.
    let mut max_lblk: HashMap<u64, u64> = HashMap::new();
    for r in std::mem::take(&mut w.runs) {
        for k in 0..r.len {
            let b = r.blk + k;
            if freeing {
                ctx.map.claim_freeing(b);
                *counted.entry(r.owner).or_default() += 1;
                continue;
            }
            match ctx.map.claim(b, BlockState::Used, r.owner) {
                Ok(()) => {
                    *counted.entry(r.owner).or_default() += 1;
                    let m = max_lblk.entry(r.owner).or_insert(0);
                    *m = (*m).max(r.first + k);
                }
                Err(o) => w.clears.push((r.loc.at(k as usize), r.owner, b, r.first + k, format!("is a data block already claimed by inode {}", o.unwrap_or(0)))),
            }
        }
    }
    for (ino, n) in counted {
        if let Some(i) = ctx.inodes.get_mut(&ino) {
            i.counted += n;
        }
    }
    for (ino, m) in max_lblk {
        if let Some(i) = ctx.inodes.get_mut(&ino) {
            i.max_lblk = Some(m);
        }
    }
    for (loc, owner, blk, lblk, why) in w.clears {
        clear_ptr(ctx, loc)?;
        let kind = if why.contains("already claimed") { Kind::CrossLink } else { Kind::BadPointer };
        let lost = if kind == Kind::CrossLink { " (this file loses that block's data; the other keeps it)" } else { "" };
        ctx.find(kind, Some(owner), Some(blk), true, format!("inode {owner}: the pointer for logical block {lblk} to block {blk} {why}: pointer cleared{lost}"));
    }
    Ok(())
}

/// Pass 4: claim every block of every live inode, then of those being freed.
pub fn claim_all(ctx: &mut Ctx<'_>) -> Result<()> {
    let order = ctx.order.clone();
    for &ino in &order {
        let _ = ctx.map.claim(ino, BlockState::Dinode, ino);
    }
    for &ino in &order {
        let Some(dd) = ctx.inodes.get(&ino).and_then(|i| i.dir.as_ref()) else { continue };
        let blocks: Vec<u64> = dd.hash_blocks.iter().chain(dd.leaves.iter()).copied().collect();
        let mut lost = Vec::new();
        let mut n = 0;
        for b in blocks {
            match ctx.map.claim(b, BlockState::Used, ino) {
                Ok(()) => n += 1,
                Err(o) => lost.push((b, o.unwrap_or(0))),
            }
        }
        if let Some(i) = ctx.inodes.get_mut(&ino) {
            i.counted += n;
            if let Some(dd) = i.dir.as_mut() {
                for (b, o) in lost {
                    dd.hash_blocks.retain(|x| *x != b);
                    dd.leaves.retain(|x| *x != b);
                    dd.problems.push(format!("block {b} is also claimed by inode {o}"));
                }
            }
        }
    }
    walk_trees(ctx, &order, false)?;
    // Inodes being freed: nothing they point at is taken from a live owner.
    let freeing = ctx.freeing.clone();
    for &ino in &freeing {
        ctx.map.claim_freeing(ino);
        let Some(i) = ctx.inodes.get(&ino) else { continue };
        let blocks: Vec<u64> = i.dir.as_ref().map(|d| d.hash_blocks.iter().chain(d.leaves.iter()).copied().collect()).unwrap_or_default();
        for &b in &blocks {
            ctx.map.claim_freeing(b);
        }
        if let Some(i) = ctx.inodes.get_mut(&ino) {
            i.counted += blocks.len() as u64;
        }
    }
    walk_trees(ctx, &freeing, true)?;
    for ino in freeing {
        let Some(i) = ctx.inodes.get(&ino) else { continue };
        let (why, nlink, blocks) = (i.freeing.clone().unwrap_or_default(), i.nlink, i.counted);
        let kind_name = match i.mode & dinode::S_IFMT {
            dinode::S_IFDIR => "directory",
            dinode::S_IFREG => "file",
            dinode::S_IFLNK => "symlink",
            _ => "special file",
        };
        if why == "unlinked" {
            ctx.find(Kind::Unlinked, Some(ino), Some(ino), true, format!("unlinked inode {ino} ({kind_name}, nlink {nlink}, {blocks} blocks) awaiting deallocation: freed"));
        } else {
            ctx.find(
                Kind::Orphan,
                Some(ino),
                Some(ino),
                true,
                format!("inode {ino} ({kind_name}, nlink {nlink}, {blocks} blocks) is in use but no directory entry names it: freed (no lost+found in this version)"),
            );
        }
    }
    Ok(())
}
