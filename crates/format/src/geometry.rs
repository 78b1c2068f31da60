//! Where everything lives on the device.
//!
//! ```text
//! block 0 .. sb_block          reserved (first 64 KiB: boot loaders, partition labels)
//! sb_block                     primary superblock (byte offset 64 KiB)
//! journal_start ..             journal_count journals of journal_blocks each
//! rgrp_start ..                rgrp_count resource groups of rgrp_blocks each (the
//!                              last may be shorter); each is one header block, then
//!                              bitmap blocks, then data blocks
//! block_count - 1              backup superblock
//! ```
//!
//! Geometry is validated before any arithmetic that could overflow or divide by
//! zero; [`Geometry::validate`] is what the superblock decoder calls too.

use crate::header::{FormatError, HEADER_SIZE};

pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 65536;
pub const MAX_JOURNALS: u32 = 64;
/// Smallest journal: enough for the largest single transaction plus slack.
pub const MIN_JOURNAL_BLOCKS: u32 = 256;
/// An rgrp needs a header, a bitmap block and some data.
pub const MIN_RGRP_BLOCKS: u32 = 16;
/// The reserved area before the primary superblock.
pub const SB_OFFSET: u64 = 64 * 1024;

/// Bytes of bitmap a bitmap block carries (after its header and the 16-byte
/// bitmap-block fields).
pub fn bitmap_bytes_per_block(bs: u32) -> u32 {
    bs - crate::rgrp::BITMAP_DATA_OFFSET as u32
}

/// Data blocks one bitmap block describes (2 bits each).
pub fn blocks_per_bitmap(bs: u32) -> u32 {
    bitmap_bytes_per_block(bs) * 4
}

/// Options given to mkfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkfsOptions {
    pub block_size: u32,
    pub journals: u32,
    pub journal_bytes: u64,
    /// None: chosen from the device size.
    pub rgrp_bytes: Option<u64>,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions { block_size: 4096, journals: 1, journal_bytes: 32 << 20, rgrp_bytes: None }
    }
}

/// The computed layout, stored in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub block_count: u64,
    pub sb_block: u64,
    pub journal_start: u64,
    pub journal_count: u32,
    pub journal_blocks: u32,
    pub rgrp_start: u64,
    pub rgrp_count: u32,
    pub rgrp_blocks: u32,
}

/// Where one resource group lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RgrpLayout {
    pub index: u32,
    /// Block number of the rgrp header.
    pub start: u64,
    /// Total blocks (header + bitmaps + data).
    pub length: u32,
    pub bitmap_blocks: u32,
    /// First data block (absolute).
    pub data_start: u64,
    pub data_blocks: u32,
}

impl RgrpLayout {
    pub fn contains_data(&self, blk: u64) -> bool {
        blk >= self.data_start && blk < self.data_start + self.data_blocks as u64
    }
    /// Block number of bitmap block `i` of this rgrp.
    pub fn bitmap_block(&self, i: u32) -> u64 {
        self.start + 1 + i as u64
    }
}

fn geo(msg: impl Into<String>) -> FormatError {
    FormatError::Geometry(msg.into())
}

/// Bitmap blocks needed for an rgrp of `len` blocks (header included).
fn bitmap_blocks_for(len: u32, bs: u32) -> u32 {
    let per = blocks_per_bitmap(bs);
    // data = len - 1 - bm, bm = ceil(data / per): smallest bm with bm*per >= len-1-bm.
    let avail = len.saturating_sub(1);
    avail.div_ceil(per + 1).max(1)
}

impl Geometry {
    /// Compute the layout for a device of `device_bytes` with `sector` bytes per
    /// logical sector.
    pub fn compute(device_bytes: u64, sector: u32, o: &MkfsOptions) -> Result<Geometry, FormatError> {
        let bs = o.block_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(geo(format!("block size {bs} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}")));
        }
        if bs < sector {
            return Err(geo(format!("block size {bs} is smaller than the device's logical sector size {sector}")));
        }
        if o.journals == 0 || o.journals > MAX_JOURNALS {
            return Err(geo(format!("journal count {} must be between 1 and {MAX_JOURNALS}", o.journals)));
        }
        let block_count = device_bytes / bs as u64;
        let journal_blocks = o.journal_bytes / bs as u64;
        if journal_blocks < MIN_JOURNAL_BLOCKS as u64 || journal_blocks > u32::MAX as u64 {
            return Err(geo(format!(
                "journal size {} bytes gives {journal_blocks} blocks; need between {MIN_JOURNAL_BLOCKS} and {} blocks",
                o.journal_bytes,
                u32::MAX
            )));
        }
        let sb_block = (SB_OFFSET / bs as u64).max(1);
        let journal_start = sb_block + 1;
        let rgrp_start = journal_start + o.journals as u64 * journal_blocks;
        // one backup superblock at the end, and room for at least one usable rgrp
        let need = rgrp_start + MIN_RGRP_BLOCKS as u64 + 1;
        if block_count < need {
            return Err(geo(format!(
                "device of {device_bytes} bytes is too small: {} journals of {} MiB need at least {} bytes",
                o.journals,
                o.journal_bytes >> 20,
                need * bs as u64
            )));
        }
        let avail = block_count - 1 - rgrp_start;
        let rgrp_bytes = match o.rgrp_bytes {
            Some(b) => b,
            None => (avail * bs as u64 / 16).clamp(16 << 20, 256 << 20),
        };
        let max_rgrp = (2 * blocks_per_bitmap(bs) as u64 * 64).min(u32::MAX as u64 / 2);
        let rgrp_blocks = (rgrp_bytes / bs as u64).clamp(MIN_RGRP_BLOCKS as u64, max_rgrp);
        if let Some(b) = o.rgrp_bytes {
            if b / (bs as u64) < MIN_RGRP_BLOCKS as u64 {
                return Err(geo(format!("rgrp size {b} bytes is below the minimum of {MIN_RGRP_BLOCKS} blocks")));
            }
        }
        let full = avail / rgrp_blocks;
        let rest = avail % rgrp_blocks;
        let mut rgrp_count = full + u64::from(rest >= MIN_RGRP_BLOCKS as u64);
        let rgrp_blocks_final = if rgrp_count == 0 {
            // device smaller than one nominal rgrp: one rgrp takes all of it
            rgrp_count = 1;
            avail
        } else {
            rgrp_blocks
        };
        if rgrp_count > u32::MAX as u64 {
            return Err(geo("too many resource groups; use a larger rgrp size (-r)"));
        }
        let g = Geometry {
            block_size: bs,
            block_count,
            sb_block,
            journal_start,
            journal_count: o.journals,
            journal_blocks: journal_blocks as u32,
            rgrp_start,
            rgrp_count: rgrp_count as u32,
            rgrp_blocks: rgrp_blocks_final as u32,
        };
        g.validate()?;
        Ok(g)
    }

    /// Check that a geometry (typically decoded from a superblock) is internally
    /// consistent, so that later arithmetic on it cannot overflow or go out of range.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bs = self.block_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(geo(format!("block size {bs}")));
        }
        if self.sb_block != (SB_OFFSET / bs as u64).max(1) {
            return Err(geo(format!("superblock location {}", self.sb_block)));
        }
        if self.journal_start != self.sb_block + 1 {
            return Err(geo("journal start"));
        }
        if self.journal_count == 0 || self.journal_count > MAX_JOURNALS || self.journal_blocks < MIN_JOURNAL_BLOCKS {
            return Err(geo("journal count or size"));
        }
        let jend = self.journal_start + self.journal_count as u64 * self.journal_blocks as u64;
        if self.rgrp_start != jend {
            return Err(geo("rgrp start"));
        }
        if self.rgrp_count == 0 || self.rgrp_blocks < MIN_RGRP_BLOCKS {
            return Err(geo("rgrp count or size"));
        }
        let rend = self.rgrp_start.checked_add(self.rgrp_count as u64 * self.rgrp_blocks as u64);
        // the last rgrp may be short, so the nominal end may pass the backup sb by
        // less than one rgrp
        match rend {
            Some(e) if e <= self.block_count - 1 + self.rgrp_blocks as u64 && self.rgrp_start < self.block_count => {}
            _ => return Err(geo("rgrps beyond the end of the device")),
        }
        let last = self.rgrp((self.rgrp_count - 1) as usize).ok_or_else(|| geo("last rgrp"))?;
        if last.length < MIN_RGRP_BLOCKS {
            return Err(geo("last rgrp too short"));
        }
        Ok(())
    }

    pub fn backup_sb_block(&self) -> u64 {
        self.block_count - 1
    }

    /// First block of journal `j`.
    pub fn journal_block(&self, j: u32) -> u64 {
        self.journal_start + j as u64 * self.journal_blocks as u64
    }

    /// Layout of rgrp `i`.
    pub fn rgrp(&self, i: usize) -> Option<RgrpLayout> {
        if i >= self.rgrp_count as usize {
            return None;
        }
        let start = self.rgrp_start + i as u64 * self.rgrp_blocks as u64;
        let end = (start + self.rgrp_blocks as u64).min(self.block_count - 1);
        let length = end.checked_sub(start)? as u32;
        let bitmap_blocks = bitmap_blocks_for(length, self.block_size);
        let data_blocks = length.checked_sub(1 + bitmap_blocks)?;
        Some(RgrpLayout { index: i as u32, start, length, bitmap_blocks, data_start: start + 1 + bitmap_blocks as u64, data_blocks })
    }

    /// Which rgrp holds data block `blk`.
    pub fn rgrp_of(&self, blk: u64) -> Option<RgrpLayout> {
        if blk < self.rgrp_start {
            return None;
        }
        let i = (blk - self.rgrp_start) / self.rgrp_blocks as u64;
        self.rgrp(i as usize).filter(|r| r.contains_data(blk))
    }

    pub fn rgrps(&self) -> impl Iterator<Item = RgrpLayout> + '_ {
        (0..self.rgrp_count as usize).filter_map(|i| self.rgrp(i))
    }

    /// Total data blocks in all rgrps.
    pub fn data_blocks(&self) -> u64 {
        self.rgrps().map(|r| r.data_blocks as u64).sum()
    }

    pub fn bytes(&self, blocks: u64) -> u64 {
        blocks * self.block_size as u64
    }
}

const _: () = assert!(HEADER_SIZE < MIN_BLOCK_SIZE as usize);

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(bs: u32, j: u32, jmb: u64) -> MkfsOptions {
        MkfsOptions { block_size: bs, journals: j, journal_bytes: jmb << 20, rgrp_bytes: None }
    }

    #[test]
    fn typical_layout_is_consistent() {
        for &(size, bs, jmb) in &[(1u64 << 30, 4096u32, 8), (100u64 << 30, 4096, 128), (256u64 << 20, 512, 8), (2u64 << 30, 65536, 32)] {
            let g = Geometry::compute(size, 512, &opts(bs, 3, jmb)).unwrap();
            g.validate().unwrap();
            assert_eq!(g.sb_block * bs as u64, SB_OFFSET.max(bs as u64));
            let mut prev_end = g.rgrp_start;
            for r in g.rgrps() {
                assert_eq!(r.start, prev_end);
                assert!(r.bitmap_blocks as u64 * blocks_per_bitmap(bs) as u64 >= r.data_blocks as u64);
                assert_eq!(1 + r.bitmap_blocks + r.data_blocks, r.length);
                prev_end = r.start + r.length as u64;
            }
            assert!(prev_end <= g.backup_sb_block());
            assert!(g.backup_sb_block() - prev_end < MIN_RGRP_BLOCKS as u64);
        }
    }

    #[test]
    fn rejects_impossible() {
        assert!(matches!(Geometry::compute(1 << 30, 512, &opts(1000, 1, 8)), Err(FormatError::Geometry(_))));
        assert!(matches!(Geometry::compute(1 << 30, 4096, &opts(1024, 1, 8)), Err(FormatError::Geometry(m)) if m.contains("sector")));
        let e = Geometry::compute(20 << 20, 512, &opts(4096, 4, 8)).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        assert!(Geometry::compute(1 << 30, 512, &opts(4096, 0, 8)).is_err());
        assert!(Geometry::compute(1 << 30, 512, &opts(4096, 65, 8)).is_err());
        assert!(Geometry::compute(1 << 30, 512, &opts(4096, 1, 0)).is_err());
    }

    #[test]
    fn rgrp_of_finds_data_blocks_only() {
        let g = Geometry::compute(1 << 30, 512, &opts(4096, 2, 8)).unwrap();
        let r = g.rgrp(1).unwrap();
        assert_eq!(g.rgrp_of(r.data_start), Some(r));
        assert_eq!(g.rgrp_of(r.start), None);
        assert_eq!(g.rgrp_of(0), None);
        assert_eq!(g.rgrp_of(g.block_count + 5), None);
    }
}
