//! Passes 2 and 6: resource groups.
//!
//! [`load`] reads every rgrp header and bitmap block in one batched read and
//! keeps, per data block, the state the bitmap gives it (`cur`, one byte a
//! block; `UNKNOWN` where the bitmap block does not verify). The later passes
//! *claim* blocks (`exp`): a claim says which state the block must have and who
//! owns it; a second claim of a claimed block is refused and names the owner
//! (a cross-link). Blocks whose state changes because of a repair already
//! reported (an inode freed, a directory rebuilt) are marked `ATTRIB`, so the
//! final comparison does not report them twice.
//!
//! [`reconcile`] compares expected and current states, reports leaked blocks,
//! used-but-free blocks and wrong states per rgrp, rewrites the bitmap blocks
//! that differ, and rewrites each header whose counts (free, dinodes,
//! unlinked) disagree with the final bitmap.
//!
//! Memory: two bytes per data block (5 MiB for a 10 GiB filesystem of 4 KiB
//! blocks), plus an extent map of owners.

use std::collections::BTreeMap;

use mcfs_format::geometry::{blocks_per_bitmap, Geometry, RgrpLayout};
use mcfs_format::rgrp::{self, BlockState, RgrpHeader, BITMAP_DATA_OFFSET};

use crate::report::Kind;
use crate::{Ctx, Result};

pub const ST_MASK: u8 = 3;
/// A live owner claimed the block; its state is `exp & ST_MASK`.
pub const CLAIMED: u8 = 4;
/// A reported repair changes this block's state: no separate finding.
pub const ATTRIB: u8 = 8;
/// In `cur`: the bitmap block describing it does not verify.
pub const UNKNOWN: u8 = 0xff;

/// Block numbers quoted in one aggregated finding.
const EXAMPLES: usize = 5;

#[derive(Debug, Clone)]
pub struct RgrpInfo {
    pub layout: RgrpLayout,
    pub header: Option<RgrpHeader>,
    /// Highest generation seen in its header and bitmaps.
    pub generation: u64,
    /// Per bitmap block: did it verify?
    pub bitmap_ok: Vec<bool>,
}

pub struct BlockMap {
    g: Geometry,
    pub rgrps: Vec<RgrpInfo>,
    cur: Vec<Vec<u8>>,
    exp: Vec<Vec<u8>>,
    /// Owner extents: first block -> (length, owner inode).
    owners: BTreeMap<u64, (u64, u64)>,
}

fn state_name(s: BlockState) -> &'static str {
    match s {
        BlockState::Free => "free",
        BlockState::Used => "used",
        BlockState::Unlinked => "unlinked inode",
        BlockState::Dinode => "inode",
    }
}

impl BlockMap {
    pub fn new(g: &Geometry) -> BlockMap {
        BlockMap { g: *g, rgrps: Vec::new(), cur: Vec::new(), exp: Vec::new(), owners: BTreeMap::new() }
    }

    /// (rgrp index, offset in its data area) of a data block.
    fn locate(&self, b: u64) -> Option<(usize, usize)> {
        let l = self.g.rgrp_of(b)?;
        let i = l.index as usize;
        let rel = (b - l.data_start) as usize;
        (i < self.exp.len() && rel < self.exp[i].len()).then_some((i, rel))
    }

    /// The bitmap's state for `b` (None: not a data block, or its bitmap is damaged).
    pub fn cur_state(&self, b: u64) -> Option<BlockState> {
        let (i, r) = self.locate(b)?;
        let c = self.cur[i][r];
        (c != UNKNOWN).then(|| BlockState::from_bits(c))
    }

    pub fn is_claimed(&self, b: u64) -> bool {
        self.locate(b).is_some_and(|(i, r)| self.exp[i][r] & CLAIMED != 0)
    }

    /// Who claimed `b`.
    pub fn owner_of(&self, b: u64) -> Option<u64> {
        let (&s, &(len, owner)) = self.owners.range(..=b).next_back()?;
        (b < s + len).then_some(owner)
    }

    fn note_owner(&mut self, b: u64, owner: u64) {
        if let Some((&s, v)) = self.owners.range_mut(..=b).next_back() {
            if s + v.0 == b && v.1 == owner {
                v.0 += 1;
                return;
            }
        }
        self.owners.insert(b, (1, owner));
    }

    /// Claim `b` for a live `owner` in `state`. Err(Some(owner)) when someone
    /// claimed it first, Err(None) when it is not a data block.
    pub fn claim(&mut self, b: u64, state: BlockState, owner: u64) -> std::result::Result<(), Option<u64>> {
        let Some((i, r)) = self.locate(b) else { return Err(None) };
        if self.exp[i][r] & CLAIMED != 0 {
            return Err(Some(self.owner_of(b).unwrap_or(0)));
        }
        self.exp[i][r] = (self.exp[i][r] & ATTRIB) | CLAIMED | state as u8;
        self.note_owner(b, owner);
        Ok(())
    }

    /// A block of an inode being freed: it ends free, silently, unless a live
    /// owner has it (then it stays theirs).
    pub fn claim_freeing(&mut self, b: u64) {
        if let Some((i, r)) = self.locate(b) {
            if self.exp[i][r] & CLAIMED == 0 {
                self.exp[i][r] |= ATTRIB;
            }
        }
    }

    /// Give up a claim as part of a reported repair (the block ends free).
    pub fn release(&mut self, b: u64) {
        if let Some((i, r)) = self.locate(b) {
            self.exp[i][r] = ATTRIB;
        }
    }

    /// Allocate a block for a repair, near `goal`: one that no one claims,
    /// preferring one the bitmap already calls free.
    pub fn alloc(&mut self, goal: u64, owner: u64) -> Option<u64> {
        let n = self.exp.len();
        if n == 0 {
            return None;
        }
        let start = self.g.rgrp_of(goal).map_or(0, |l| l.index as usize);
        for pass in 0..2 {
            for k in 0..n {
                let i = (start + k) % n;
                let from = if k == 0 { self.g.rgrp_of(goal).map_or(0, |l| (goal - l.data_start) as usize) } else { 0 };
                let len = self.exp[i].len();
                for step in 0..len {
                    let r = (from + step) % len;
                    let free_now = self.cur[i][r] == BlockState::Free as u8;
                    if self.exp[i][r] & CLAIMED == 0 && (pass == 1 || free_now) {
                        self.exp[i][r] = CLAIMED | ATTRIB | BlockState::Used as u8;
                        let b = self.rgrps[i].layout.data_start + r as u64;
                        self.note_owner(b, owner);
                        return Some(b);
                    }
                }
            }
        }
        None
    }

    fn expected(e: u8) -> BlockState {
        if e & CLAIMED != 0 {
            BlockState::from_bits(e & ST_MASK)
        } else {
            BlockState::Free
        }
    }

    /// Every data block the bitmaps mark as an inode (or unlinked inode).
    pub fn marked_inodes(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (i, cur) in self.cur.iter().enumerate() {
            let base = self.rgrps[i].layout.data_start;
            for (r, &c) in cur.iter().enumerate() {
                if c == BlockState::Dinode as u8 || c == BlockState::Unlinked as u8 {
                    v.push(base + r as u64);
                }
            }
        }
        v
    }

    /// (blocks in use, blocks free) as the repaired filesystem will have them.
    pub fn expected_totals(&self) -> (u64, u64) {
        let mut used = 0;
        let mut free = 0;
        for e in self.exp.iter().flatten() {
            if BlockMap::expected(*e) == BlockState::Free {
                free += 1;
            } else {
                used += 1;
            }
        }
        (used, free)
    }
}

/// Pass 2: read and verify every rgrp header and bitmap block.
pub fn load(ctx: &mut Ctx<'_>) -> Result<()> {
    let g = ctx.g;
    let bs = g.block_size;
    let layouts: Vec<RgrpLayout> = g.rgrps().collect();
    let mut want = Vec::new();
    for l in &layouts {
        for b in l.start..=l.start + l.bitmap_blocks as u64 {
            want.push(b);
        }
    }
    let mut infos: Vec<RgrpInfo> = layouts.iter().map(|l| RgrpInfo { layout: *l, header: None, generation: 0, bitmap_ok: vec![false; l.bitmap_blocks as usize] }).collect();
    let mut cur: Vec<Vec<u8>> = layouts.iter().map(|l| vec![UNKNOWN; l.data_blocks as usize]).collect();
    let mut header_errs: Vec<(usize, String)> = Vec::new();
    let mut bitmap_errs: Vec<(usize, u32, String)> = Vec::new();
    let fsid = ctx.fsid;
    let rgrp_start = g.rgrp_start;
    let rgrp_blocks = g.rgrp_blocks as u64;
    ctx.progress("resource groups", 0, layouts.len() as u64);
    ctx.io.read_batch(&want, &mut |b, buf| {
        let i = ((b - rgrp_start) / rgrp_blocks) as usize;
        let Some(l) = layouts.get(i) else { return };
        let info = &mut infos[i];
        if b == l.start {
            match RgrpHeader::decode(buf, l, fsid) {
                Ok(h) => {
                    info.generation = info.generation.max(h.generation);
                    info.header = Some(h);
                }
                Err(e) => header_errs.push((i, e.to_string())),
            }
            return;
        }
        let bi = (b - l.start - 1) as u32;
        match rgrp::verify_bitmap_block(buf, l, bi, fsid) {
            Ok(gen) => {
                info.generation = info.generation.max(gen);
                info.bitmap_ok[bi as usize] = true;
                let (first, count) = rgrp::bitmap_span(l, bs, bi);
                let bits = &buf[BITMAP_DATA_OFFSET..];
                let off = (first - l.data_start) as usize;
                for k in 0..count as usize {
                    if let Some(c) = cur[i].get_mut(off + k) {
                        *c = rgrp::get_bits(bits, k) as u8;
                    }
                }
            }
            Err(e) => bitmap_errs.push((i, bi, e.to_string())),
        }
    })?;
    for (i, e) in header_errs {
        let l = layouts[i];
        ctx.find(Kind::RgrpHeader, None, Some(l.start), true, format!("rgrp {i} header does not verify ({e}): rebuilt from its bitmaps"));
    }
    for (i, bi, e) in bitmap_errs {
        let l = layouts[i];
        let (first, count) = rgrp::bitmap_span(&l, bs, bi);
        ctx.find(
            Kind::Bitmap,
            None,
            Some(l.bitmap_block(bi)),
            true,
            format!("rgrp {i} bitmap block {bi} does not verify ({e}): states of blocks {first}..{} rebuilt from what is reachable", first + count as u64),
        );
    }
    ctx.map.exp = layouts.iter().map(|l| vec![0u8; l.data_blocks as usize]).collect();
    ctx.map.cur = cur;
    ctx.map.rgrps = infos;
    ctx.progress("resource groups", layouts.len() as u64, layouts.len() as u64);
    Ok(())
}

#[derive(Default)]
struct Tally {
    n: u64,
    examples: Vec<u64>,
}

impl Tally {
    fn add(&mut self, b: u64) {
        self.n += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(b);
        }
    }
    fn say(&self) -> String {
        let ex: Vec<String> = self.examples.iter().map(|b| b.to_string()).collect();
        format!("{}{}", ex.join(", "), if self.n > self.examples.len() as u64 { ", ..." } else { "" })
    }
}

/// Pass 6: bitmaps and headers against the expected states.
pub fn reconcile(ctx: &mut Ctx<'_>) -> Result<()> {
    let bs = ctx.bs;
    let per = blocks_per_bitmap(bs) as usize;
    let n = ctx.map.rgrps.len();
    for i in 0..n {
        ctx.progress("bitmaps", i as u64, n as u64);
        let info = ctx.map.rgrps[i].clone();
        let l = info.layout;
        let mut leaked = Tally::default();
        let mut used_free = Tally::default();
        let mut wrong: BTreeMap<(u8, u8), Tally> = BTreeMap::new();
        let (mut free, mut dinodes, mut unlinked) = (0u32, 0u32, 0u32);
        let mut rewrite = vec![false; l.bitmap_blocks as usize];
        for r in 0..l.data_blocks as usize {
            let e = ctx.map.exp[i][r];
            let want = BlockMap::expected(e);
            match want {
                BlockState::Free => free += 1,
                BlockState::Dinode => dinodes += 1,
                BlockState::Unlinked => unlinked += 1,
                BlockState::Used => {}
            }
            let c = ctx.map.cur[i][r];
            if c == want as u8 {
                continue;
            }
            let bi = r / per;
            if let Some(w) = rewrite.get_mut(bi) {
                *w = true;
            }
            if c == UNKNOWN || e & ATTRIB != 0 {
                continue;
            }
            let b = l.data_start + r as u64;
            let have = BlockState::from_bits(c);
            match (have, want) {
                (BlockState::Free, _) => used_free.add(b),
                (_, BlockState::Free) => leaked.add(b),
                (h, w) => wrong.entry((h as u8, w as u8)).or_default().add(b),
            }
        }
        if leaked.n > 0 {
            ctx.find(Kind::LeakedBlocks, None, leaked.examples.first().copied(), true, format!("rgrp {i}: {} blocks marked in use but unreachable (leaked): {}; freed", leaked.n, leaked.say()));
        }
        if used_free.n > 0 {
            ctx.find(Kind::UsedMarkedFree, None, used_free.examples.first().copied(), true, format!("rgrp {i}: {} blocks in use but marked free: {}; marked in use", used_free.n, used_free.say()));
        }
        for ((h, w), t) in &wrong {
            let (h, w) = (BlockState::from_bits(*h), BlockState::from_bits(*w));
            ctx.find(Kind::WrongBlockState, None, t.examples.first().copied(), true, format!("rgrp {i}: {} blocks marked {} should be {}: {}; fixed", t.n, state_name(h), state_name(w), t.say()));
        }
        // A generation at its limit can only be damage (a node refuses to
        // wrap it and withdraws): start the rgrp's generations again at 1,
        // header and every bitmap together, so they stay monotonic.
        let at_limit = info.generation == u64::MAX;
        let gen = if at_limit { 1 } else { info.generation + 1 };
        if at_limit {
            ctx.find(Kind::RgrpHeader, None, Some(l.start), true, format!("rgrp {i}: generation at its limit ({}); restarted at 1", u64::MAX));
            rewrite.iter_mut().for_each(|w| *w = true);
        }
        for (bi, w) in rewrite.iter().enumerate() {
            if !*w && info.bitmap_ok[bi] {
                continue;
            }
            let bi = bi as u32;
            let mut buf = rgrp::encode_bitmap_block(&l, bs, bi, gen, ctx.fsid);
            let (first, count) = rgrp::bitmap_span(&l, bs, bi);
            let off = (first - l.data_start) as usize;
            for k in 0..count as usize {
                let s = BlockMap::expected(ctx.map.exp[i][off + k]);
                rgrp::set_bits(&mut buf[BITMAP_DATA_OFFSET..], k, s);
            }
            rgrp::seal_bitmap_block(&mut buf, &l, bi, gen, ctx.fsid);
            ctx.io.put(l.bitmap_block(bi), buf);
        }
        let mut h = info.header.unwrap_or_else(|| RgrpHeader::new(&l));
        let changed = info.header.is_none() || rewrite.iter().any(|w| *w) || h.free != free || h.dinodes != dinodes || h.unlinked != unlinked;
        if info.header.is_some() && (h.free != free || h.dinodes != dinodes || h.unlinked != unlinked) {
            ctx.find(
                Kind::RgrpHeader,
                None,
                Some(l.start),
                true,
                format!("rgrp {i} header counts free {} dinodes {} unlinked {} should be {free} {dinodes} {unlinked}; fixed", h.free, h.dinodes, h.unlinked),
            );
        }
        if changed {
            h.free = free;
            h.dinodes = dinodes;
            h.unlinked = unlinked;
            h.generation = gen;
            ctx.io.put(l.start, h.encode(bs, l.start, ctx.fsid));
        }
    }
    ctx.progress("bitmaps", n as u64, n as u64);
    Ok(())
}
