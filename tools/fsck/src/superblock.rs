//! Pass 0: find the superblock. The primary sits at byte 64 KiB; the backup is
//! the filesystem's last block, found from the primary's (possibly damaged)
//! fields or, failing that, by trying every block size at the device's end.
//!
//! * both decode and agree (they differ only in self-address): fine;
//! * one decodes: use it and rewrite the other from it;
//! * both decode but disagree: keep the one under which the first rgrp header
//!   and the root dinode verify (the primary on a tie) and rewrite the other;
//! * neither decodes: operational error (exit 8): this is not mcfs, or nothing
//!   of it can be trusted.

use mcfs_blockdev::BlockDevice;
use mcfs_format::dinode::Dinode;
use mcfs_format::geometry::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, SB_OFFSET};
use mcfs_format::rgrp::RgrpHeader;
use mcfs_format::sb::Superblock;

use crate::report::{Finding, Kind};

/// The superblock to use, the repairs to write (block, bytes) and what was found.
pub struct Found {
    pub sb: Superblock,
    pub writes: Vec<(u64, Vec<u8>)>,
    pub findings: Vec<Finding>,
}

fn read(dev: &dyn BlockDevice, off: u64, len: usize) -> Option<Vec<u8>> {
    let sec = dev.sector_size().max(1) as u64;
    if !off.is_multiple_of(sec) || !(len as u64).is_multiple_of(sec) || off.checked_add(len as u64)? > dev.size() {
        return None;
    }
    let mut v = vec![0u8; len];
    dev.read_at(off, &mut v).ok()?;
    Some(v)
}

fn primary(dev: &dyn BlockDevice) -> (Result<Superblock, String>, Option<Vec<u8>>) {
    let len = (MAX_BLOCK_SIZE as u64).min(dev.size().saturating_sub(SB_OFFSET)) as usize;
    let len = len - len % dev.sector_size().max(1) as usize;
    let Some(raw) = read(dev, SB_OFFSET, len).filter(|r| r.len() >= MIN_BLOCK_SIZE as usize) else {
        return (Err(format!("device of {} bytes is too small to hold the superblock at byte {SB_OFFSET}", dev.size())), None);
    };
    let bs = mcfs_format::le_u32(&raw, 48);
    let blk = if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) && bs.is_power_of_two() { SB_OFFSET / bs as u64 } else { SB_OFFSET / 4096 };
    let r = Superblock::decode(&raw, blk).map_err(|e| e.to_string());
    (r, Some(raw))
}

/// Candidate backup locations: (block size, block number).
fn backup_candidates(dev: &dyn BlockDevice, raw_primary: Option<&[u8]>) -> Vec<(u32, u64)> {
    let mut v = Vec::new();
    if let Some(raw) = raw_primary {
        let bs = mcfs_format::le_u32(raw, 48);
        let count = mcfs_format::le_u64(raw, 56);
        if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) && bs.is_power_of_two() && count > 1 {
            v.push((bs, count - 1));
        }
    }
    let mut bs = MIN_BLOCK_SIZE;
    while bs <= MAX_BLOCK_SIZE {
        let n = dev.size() / bs as u64;
        if n > 1 && !v.contains(&(bs, n - 1)) {
            v.push((bs, n - 1));
        }
        bs *= 2;
    }
    v
}

fn backup(dev: &dyn BlockDevice, raw_primary: Option<&[u8]>) -> Result<Superblock, String> {
    let mut last = String::from("no candidate location");
    for (bs, blk) in backup_candidates(dev, raw_primary) {
        let Some(raw) = blk.checked_mul(bs as u64).and_then(|off| read(dev, off, bs as usize)) else { continue };
        match Superblock::decode(&raw, blk) {
            Ok(sb) if sb.geometry.block_size == bs && sb.geometry.backup_sb_block() == blk => return Ok(sb),
            Ok(_) => last = format!("block {blk}: superblock describes another location"),
            Err(e) => {
                if raw_primary.is_some() && last == "no candidate location" {
                    last = e.to_string();
                }
            }
        }
    }
    Err(last)
}

/// How well the rest of the device agrees with a superblock: its first and last
/// rgrp headers and its root dinode verifying under its geometry and fsid.
fn score(dev: &dyn BlockDevice, sb: &Superblock) -> u32 {
    let g = &sb.geometry;
    let bs = g.block_size as usize;
    let mut s = 0;
    for l in [g.rgrp(0), g.rgrp(g.rgrp_count.saturating_sub(1) as usize)].into_iter().flatten() {
        if l.start.checked_mul(bs as u64).and_then(|off| read(dev, off, bs)).is_some_and(|b| RgrpHeader::decode(&b, &l, sb.fsid()).is_ok()) {
            s += 1;
        }
    }
    if sb.root_ino.checked_mul(bs as u64).and_then(|off| read(dev, off, bs)).is_some_and(|b| Dinode::decode(&b, sb.root_ino, sb.fsid()).is_ok()) {
        s += 1;
    }
    s
}

fn finding(message: String, block: u64) -> Finding {
    Finding { kind: Kind::Superblock, ino: None, block: Some(block), message, fixable: true, fixed: false }
}

/// Find the superblock, or say why there is none (an operational error).
pub fn find(dev: &dyn BlockDevice) -> Result<Found, String> {
    let (p, raw) = primary(dev);
    let b = backup(dev, raw.as_deref());
    let mut findings = Vec::new();
    let mut writes = Vec::new();
    let sb = match (p, b) {
        (Ok(p), Ok(b)) if p == b => p,
        (Ok(p), Ok(b)) => {
            let (keep, other, which) = if score(dev, &b) > score(dev, &p) { (b, "primary", "backup") } else { (p, "backup", "primary") };
            let g = keep.geometry;
            let at = if other == "primary" { g.sb_block } else { g.backup_sb_block() };
            findings.push(finding(format!("the {other} superblock disagrees with the {which}; rewritten from the {which}"), at));
            keep
        }
        (Ok(p), Err(e)) => {
            let g = p.geometry;
            findings.push(finding(format!("backup superblock (block {}) is damaged: {e}; rewritten from the primary", g.backup_sb_block()), g.backup_sb_block()));
            p
        }
        (Err(e), Ok(b)) => {
            let g = b.geometry;
            findings.push(finding(format!("primary superblock is damaged: {e}; rewritten from the backup"), g.sb_block));
            b
        }
        (Err(pe), Err(be)) => {
            return Err(format!("no valid mcfs superblock: primary (byte {SB_OFFSET}): {pe}; backup (last block): {be}. Is this an mcfs filesystem?"));
        }
    };
    let g = sb.geometry;
    let need = g.block_count.saturating_mul(g.block_size as u64);
    if need > dev.size() {
        return Err(format!("the superblock describes {need} bytes but the device has only {}: truncated image or wrong device", dev.size()));
    }
    for f in &findings {
        if let Some(blk) = f.block {
            writes.push((blk, sb.encode(blk)));
        }
    }
    Ok(Found { sb, writes, findings })
}
