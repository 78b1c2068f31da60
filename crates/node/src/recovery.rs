//! Journal replay (GFS2's recovery.c): finding a journal's head and replaying it.
//!
//! Who replays what, and when (the protocol around this code; docs/RECOVERY.md
//! has the whole walkthrough):
//! 1. Mount: for every journal slot whose lock it can take at once, the mounter
//!    checks the journal and replays it if dirty. The first mounter after a
//!    whole-cluster crash thereby replays every dirty journal before serving.
//! 2. A node fails: mcfs-dlm fences it, then tells the survivors its journal needs
//!    replay. One survivor takes `journal/<slot>` EX with NOEXP (the dead node's
//!    own journal lock is still held; NOEXP ignores locks of fenced nodes),
//!    replays, marks the journal clean, and reports done. Only then does the DLM
//!    release the dead node's other locks, so nobody reads a block the replay is
//!    about to rewrite.
//!
//! Replay itself:
//! 1. Scan the whole journal in large reads; the head is the valid commit (header,
//!    CRC, this filesystem's id) with the highest sequence.
//! 2. Walk from the head's recorded tail, transaction by transaction: every block
//!    must carry the expected sequence, the commit must count the blocks and
//!    match their CRC. Stop at the first torn or out-of-sequence transaction.
//! 3. Pass one collects revokes (block -> newest revoking sequence); pass two
//!    writes each image whose transaction is newer than any revoke of its block.
//! 4. Flush the device, then write a clean commit after the last good
//!    transaction: the journal is clean and writing resumes there.
//!
//! Every buffer replay reads is charged to the node's memory budget, so a node
//! short of memory must reclaim to recover a peer: the situation the nonblocking
//! eviction exists for.

use std::collections::HashMap;
use std::sync::Arc;

use mcfs_blockdev::BlockDevice;
use mcfs_format::header::{self, BlockType};
use mcfs_format::journal::{self, Commit, FLAG_CLEAN};
use mcfs_format::sb::Superblock;

use crate::error::{FsError, Result};
use crate::icache::budget::Budget;
use crate::log::JournalPos;

const CHUNK_BLOCKS: u32 = 256;

/// Reads a journal through a window of CHUNK_BLOCKS blocks.
struct JReader<'a> {
    dev: &'a dyn BlockDevice,
    budget: &'a Arc<Budget>,
    start: u64,
    blocks: u32,
    bs: usize,
    win_start: u32,
    win: Vec<u8>,
    win_len: u32,
    _charge: Option<crate::icache::budget::Charge>,
    pub reads: u64,
}

impl<'a> JReader<'a> {
    fn new(dev: &'a dyn BlockDevice, budget: &'a Arc<Budget>, start: u64, blocks: u32, bs: usize) -> Self {
        JReader { dev, budget, start, blocks, bs, win_start: 0, win: Vec::new(), win_len: 0, _charge: None, reads: 0 }
    }

    fn block(&mut self, pos: u32) -> Result<&[u8]> {
        let pos = pos % self.blocks;
        if !(pos >= self.win_start && pos < self.win_start + self.win_len) {
            let n = CHUNK_BLOCKS.min(self.blocks - pos);
            // charge before reading: replay needs memory like anyone else
            self._charge = None;
            let charge = self.budget.charge(n as u64 * self.bs as u64);
            self.win.resize(n as usize * self.bs, 0);
            self.dev.read_at((self.start + pos as u64) * self.bs as u64, &mut self.win)?;
            self._charge = Some(charge);
            self.win_start = pos;
            self.win_len = n;
            self.reads += 1;
        }
        let off = (pos - self.win_start) as usize * self.bs;
        Ok(&self.win[off..off + self.bs])
    }
}

/// The state of one journal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalInfo {
    pub slot: u32,
    /// Position and sequence of the head commit.
    pub head_pos: u32,
    pub head_seq: u64,
    pub tail_pos: u32,
    pub tail_seq: u64,
    pub clean: bool,
    pub writer_node: u32,
}

/// One transaction found by the walk.
#[derive(Debug)]
struct TxInfo {
    seq: u64,
    images: Vec<(u64, u32)>,
    revokes: Vec<u64>,
    end: u32,
}

/// What a replay did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReplayReport {
    pub slot: u32,
    pub was_clean: bool,
    pub transactions: u64,
    pub blocks_replayed: u64,
    pub blocks_revoked: u64,
    pub bad_images: u64,
    /// Why the walk stopped before the head, if it did.
    pub stopped_early: Option<String>,
    pub millis: u64,
}

fn jgeom(sb: &Superblock, slot: u32) -> (u64, u32) {
    let g = &sb.geometry;
    (g.journal_block(slot), g.journal_blocks)
}

/// Find the head commit of journal `slot`.
pub fn find_head(dev: &dyn BlockDevice, sb: &Superblock, slot: u32, budget: &Arc<Budget>) -> Result<JournalInfo> {
    let (start, jb) = jgeom(sb, slot);
    let bs = sb.geometry.block_size as usize;
    let fsid = sb.fsid();
    let mut r = JReader::new(dev, budget, start, jb, bs);
    let mut best: Option<(u32, Commit)> = None;
    let mut pos = 0;
    while pos < jb {
        let b = r.block(pos)?;
        if header::peek(b).is_some_and(|h| h.0 == header::MAGIC && h.1 == BlockType::LogCommit as u16) {
            if let Ok(c) = Commit::decode(b, start + pos as u64, jb, fsid) {
                if best.as_ref().is_none_or(|(_, h)| c.seq > h.seq) {
                    best = Some((pos, c));
                }
            }
        }
        pos += 1;
    }
    let Some((hp, h)) = best else {
        return Err(FsError::Corrupt(mcfs_format::FormatError::corrupted(format!("journal {slot} (no valid commit block)"), start)));
    };
    Ok(JournalInfo {
        slot,
        head_pos: hp,
        head_seq: h.seq,
        tail_pos: h.tail_pos,
        tail_seq: h.tail_seq,
        clean: h.is_clean() && h.tail_seq == h.seq && h.tail_pos == hp,
        writer_node: h.node_id,
    })
}

/// Walk the live part of the journal; returns the valid transactions and why
/// the walk stopped early, if it did.
fn walk(r: &mut JReader<'_>, info: &JournalInfo, fsid: u32) -> Result<(Vec<TxInfo>, Option<String>)> {
    let jb = r.blocks;
    let start = r.start;
    let mut txs = Vec::new();
    let mut pos = info.tail_pos;
    let mut seq = info.tail_seq;
    while seq <= info.head_seq {
        let mut images = Vec::new();
        let mut revokes = Vec::new();
        let mut crc = 0u32;
        let mut i = 0u32;
        let end;
        loop {
            if i >= jb {
                return Ok((txs, Some(format!("transaction {seq} never commits"))));
            }
            let p = (pos + i) % jb;
            let blk = start + p as u64;
            let b = r.block(p)?.to_vec();
            let ty = header::peek(&b).map(|h| h.1);
            if ty == Some(BlockType::LogCommit as u16) {
                match Commit::decode(&b, blk, jb, fsid) {
                    Ok(c) if c.seq == seq && c.blocks == i && c.data_crc == crc => {
                        end = (p + 1) % jb;
                        break;
                    }
                    Ok(c) if c.seq != seq => return Ok((txs, Some(format!("out of sequence at position {p}: expected {seq}, found {}", c.seq)))),
                    Ok(_) => return Ok((txs, Some(format!("transaction {seq} is torn (block count or checksum)")))),
                    Err(e) => return Ok((txs, Some(format!("transaction {seq}: {e}")))),
                }
            }
            let kind = if ty == Some(BlockType::LogDescriptor as u16) { BlockType::LogDescriptor } else { BlockType::LogRevoke };
            match journal::decode_list(&b, kind, blk, fsid) {
                Ok((s, list)) if s == seq => {
                    crc = crc32c::crc32c_append(crc, &b);
                    i += 1;
                    if kind == BlockType::LogDescriptor {
                        for t in list {
                            let ip = (pos + i) % jb;
                            let img = r.block(ip)?;
                            crc = crc32c::crc32c_append(crc, img);
                            images.push((t, ip));
                            i += 1;
                        }
                    } else {
                        revokes.extend(list);
                    }
                }
                Ok((s, _)) => return Ok((txs, Some(format!("out of sequence at position {p}: expected {seq}, found {s}")))),
                Err(e) => return Ok((txs, Some(format!("transaction {seq} is torn: {e}")))),
            }
        }
        txs.push(TxInfo { seq, images, revokes, end });
        pos = end;
        seq += 1;
    }
    Ok((txs, None))
}

/// Replay journal `slot` if dirty and leave it clean. Returns what was done and
/// where writing to this journal resumes.
pub fn replay(dev: &dyn BlockDevice, sb: &Superblock, slot: u32, budget: &Arc<Budget>, node_id: u32) -> Result<(ReplayReport, JournalPos)> {
    let t0 = std::time::Instant::now();
    let info = find_head(dev, sb, slot, budget)?;
    let (start, jb) = jgeom(sb, slot);
    let bs = sb.geometry.block_size as usize;
    let fsid = sb.fsid();
    let mut report = ReplayReport { slot, was_clean: info.clean, ..Default::default() };
    if info.clean {
        let pos = JournalPos { slot, start, blocks: jb, head: (info.head_pos + 1) % jb, next_seq: info.head_seq + 1 };
        return Ok((report, pos));
    }
    tracing::info!(slot, head = info.head_seq, tail = info.tail_seq, "replaying journal");
    let mut r = JReader::new(dev, budget, start, jb, bs);
    let (txs, stopped) = walk(&mut r, &info, fsid)?;
    if let Some(why) = &stopped {
        tracing::warn!(slot, "journal walk stopped early: {why}");
    }
    report.stopped_early = stopped;
    // pass 1: revokes
    let mut revoked: HashMap<u64, u64> = HashMap::new();
    for tx in &txs {
        for b in &tx.revokes {
            let e = revoked.entry(*b).or_insert(tx.seq);
            *e = (*e).max(tx.seq);
        }
    }
    // pass 2: newest image of each block wins; skip revoked ones
    let mut last: HashMap<u64, (u64, u32)> = HashMap::new();
    for tx in &txs {
        for (t, p) in &tx.images {
            if revoked.get(t).is_some_and(|r| *r > tx.seq) {
                report.blocks_revoked += 1;
                continue;
            }
            last.insert(*t, (tx.seq, *p));
        }
    }
    let mut todo: Vec<(u64, u32)> = last.into_iter().map(|(t, (_, p))| (t, p)).collect();
    todo.sort();
    let total = sb.geometry.block_count;
    for chunk in todo.chunks(64) {
        let mut bufs: Vec<(u64, Vec<u8>)> = Vec::with_capacity(chunk.len());
        for (t, p) in chunk {
            let img = r.block(*p)?.to_vec();
            // the image must be a valid block for its target
            let ok = *t < total
                && header::peek(&img)
                    .and_then(|h| BlockType::from_u16(h.1))
                    .is_some_and(|ty| header::verify(&img, ty, *t, Some(fsid)).is_ok());
            if !ok {
                report.bad_images += 1;
                tracing::warn!(slot, target = t, "skipping a journal image that does not verify");
                continue;
            }
            bufs.push((*t, img));
        }
        let reqs: Vec<(u64, &[u8])> = bufs.iter().map(|(t, b)| (*t * bs as u64, b.as_slice())).collect();
        dev.write_many(&reqs)?;
        report.blocks_replayed += reqs.len() as u64;
    }
    dev.flush()?;
    report.transactions = txs.len() as u64;
    // resume after the last good transaction (or the tail when none was good)
    let (resume, next_seq) = match txs.last() {
        Some(t) => (t.end, t.seq + 1),
        None => (info.tail_pos, info.tail_seq.max(info.head_seq) + 1),
    };
    let next_seq = next_seq.max(info.head_seq + 1);
    write_clean_commit(dev, sb, slot, resume, next_seq, node_id)?;
    report.millis = t0.elapsed().as_millis() as u64;
    tracing::info!(slot, txs = report.transactions, blocks = report.blocks_replayed, revoked = report.blocks_revoked, ms = report.millis, "journal replayed");
    Ok((report, JournalPos { slot, start, blocks: jb, head: (resume + 1) % jb, next_seq: next_seq + 1 }))
}

/// Write a clean commit at `pos` with sequence `seq` (journal empty).
pub fn write_clean_commit(dev: &dyn BlockDevice, sb: &Superblock, slot: u32, pos: u32, seq: u64, node_id: u32) -> Result<()> {
    let (start, _jb) = jgeom(sb, slot);
    let bs = sb.geometry.block_size;
    let c = Commit {
        seq,
        tail_seq: seq,
        tail_pos: pos,
        blocks: 0,
        data_crc: 0,
        flags: FLAG_CLEAN,
        time_ns: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0),
        node_id,
    };
    let blk = start + pos as u64;
    dev.write_at(blk * bs as u64, &c.encode(bs, blk, sb.fsid()))?;
    dev.flush()?;
    Ok(())
}
