//! Resource groups: the unit of allocation and of allocation locking.
//!
//! Header block (type RgrpHeader, seq = rgrp generation, bumped on every change):
//! ```text
//! offset size field
//!  0     32   header
//! 32      4   index
//! 36      4   length (blocks, header included)
//! 40      4   bitmap_blocks
//! 44      4   data_blocks
//! 48      8   data_start (absolute block number)
//! 56      4   free      data blocks in state Free
//! 60      4   dinodes   data blocks in state Dinode
//! 64      4   unlinked  data blocks in state Unlinked
//! 68      4   flags (reserved, 0)
//! 72          end
//! ```
//!
//! Bitmap block (type Bitmap, seq = rgrp generation):
//! ```text
//!  0     32   header
//! 32      4   rgrp index
//! 36      4   bitmap block index within the rgrp
//! 40      8   first data block this bitmap block describes (absolute)
//! 48     ..   2 bits per data block, little-endian within each byte: block k of
//!             this bitmap block is bits (2*(k%4)) .. of byte k/4
//! ```
//! States: 0 Free, 1 Used (data or metadata), 2 Unlinked (a dinode whose last
//! name is gone but whose blocks are not yet freed), 3 Dinode.

use crate::geometry::{blocks_per_bitmap, RgrpLayout};
use crate::header::{self, BlockType, FormatError};
use crate::le;

pub const BITMAP_DATA_OFFSET: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockState {
    Free = 0,
    Used = 1,
    Unlinked = 2,
    Dinode = 3,
}

impl BlockState {
    pub fn from_bits(b: u8) -> BlockState {
        match b & 3 {
            0 => BlockState::Free,
            1 => BlockState::Used,
            2 => BlockState::Unlinked,
            _ => BlockState::Dinode,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RgrpHeader {
    pub index: u32,
    pub length: u32,
    pub bitmap_blocks: u32,
    pub data_blocks: u32,
    pub data_start: u64,
    pub free: u32,
    pub dinodes: u32,
    pub unlinked: u32,
    /// Generation: bumped on every change (the header's seq).
    pub generation: u64,
}

impl RgrpHeader {
    /// A fresh, empty rgrp.
    pub fn new(l: &RgrpLayout) -> RgrpHeader {
        RgrpHeader {
            index: l.index,
            length: l.length,
            bitmap_blocks: l.bitmap_blocks,
            data_blocks: l.data_blocks,
            data_start: l.data_start,
            free: l.data_blocks,
            dinodes: 0,
            unlinked: 0,
            generation: 1,
        }
    }

    pub fn encode(&self, bs: u32, blkno: u64, fsid: u32) -> Vec<u8> {
        let mut b = vec![0u8; bs as usize];
        le::put_u32(&mut b, 32, self.index);
        le::put_u32(&mut b, 36, self.length);
        le::put_u32(&mut b, 40, self.bitmap_blocks);
        le::put_u32(&mut b, 44, self.data_blocks);
        le::put_u64(&mut b, 48, self.data_start);
        le::put_u32(&mut b, 56, self.free);
        le::put_u32(&mut b, 60, self.dinodes);
        le::put_u32(&mut b, 64, self.unlinked);
        header::seal(&mut b, BlockType::RgrpHeader, blkno, self.generation, fsid);
        b
    }

    /// Decode and check against the layout the superblock's geometry predicts.
    pub fn decode(buf: &[u8], l: &RgrpLayout, fsid: u32) -> Result<RgrpHeader, FormatError> {
        let h = header::verify(buf, BlockType::RgrpHeader, l.start, Some(fsid))?;
        let r = RgrpHeader {
            index: le::u32(buf, 32),
            length: le::u32(buf, 36),
            bitmap_blocks: le::u32(buf, 40),
            data_blocks: le::u32(buf, 44),
            data_start: le::u64(buf, 48),
            free: le::u32(buf, 56),
            dinodes: le::u32(buf, 60),
            unlinked: le::u32(buf, 64),
            generation: h.seq,
        };
        if r.index != l.index || r.length != l.length || r.bitmap_blocks != l.bitmap_blocks || r.data_blocks != l.data_blocks || r.data_start != l.data_start {
            return Err(FormatError::corrupted("rgrp header (geometry disagrees with superblock)", l.start));
        }
        let sum = r.free as u64 + r.dinodes as u64 + r.unlinked as u64;
        if sum > r.data_blocks as u64 {
            return Err(FormatError::corrupted("rgrp header (counts exceed data blocks)", l.start));
        }
        Ok(r)
    }
}

/// Data blocks described by bitmap block `i` of an rgrp: (first block, count).
pub fn bitmap_span(l: &RgrpLayout, bs: u32, i: u32) -> (u64, u32) {
    let per = blocks_per_bitmap(bs);
    let first = i as u64 * per as u64;
    let count = (l.data_blocks as u64).saturating_sub(first).min(per as u64) as u32;
    (l.data_start + first, count)
}

/// A fresh bitmap block (every block free).
pub fn encode_bitmap_block(l: &RgrpLayout, bs: u32, i: u32, generation: u64, fsid: u32) -> Vec<u8> {
    let mut b = vec![0u8; bs as usize];
    seal_bitmap_block(&mut b, l, i, generation, fsid);
    b
}

/// Write the fields and header of bitmap block `i` around bits already in `buf`.
pub fn seal_bitmap_block(buf: &mut [u8], l: &RgrpLayout, i: u32, generation: u64, fsid: u32) {
    let bs = buf.len() as u32;
    let (first, _) = bitmap_span(l, bs, i);
    le::put_u32(buf, 32, l.index);
    le::put_u32(buf, 36, i);
    le::put_u64(buf, 40, first);
    header::seal(buf, BlockType::Bitmap, l.bitmap_block(i), generation, fsid);
}

/// Verify bitmap block `i` of rgrp `l`, including that no bit beyond the last
/// data block is set.
pub fn verify_bitmap_block(buf: &[u8], l: &RgrpLayout, i: u32, fsid: u32) -> Result<u64, FormatError> {
    let blk = l.bitmap_block(i);
    let h = header::verify(buf, BlockType::Bitmap, blk, Some(fsid))?;
    let bs = buf.len() as u32;
    let (first, count) = bitmap_span(l, bs, i);
    if le::u32(buf, 32) != l.index || le::u32(buf, 36) != i || le::u64(buf, 40) != first {
        return Err(FormatError::corrupted("rgrp bitmap (fields disagree with geometry)", blk));
    }
    let bits = &buf[BITMAP_DATA_OFFSET..];
    for k in count as usize..bits.len() * 4 {
        if get_bits(bits, k) != BlockState::Free {
            return Err(FormatError::corrupted("rgrp bitmap (state set beyond the last data block)", blk));
        }
    }
    Ok(h.seq)
}

/// The state of entry `k` in a bitmap byte array.
pub fn get_bits(bits: &[u8], k: usize) -> BlockState {
    let byte = bits.get(k / 4).copied().unwrap_or(0);
    BlockState::from_bits(byte >> (2 * (k % 4)))
}

/// Set entry `k` in a bitmap byte array.
pub fn set_bits(bits: &mut [u8], k: usize, s: BlockState) {
    if let Some(byte) = bits.get_mut(k / 4) {
        let sh = 2 * (k % 4);
        *byte = (*byte & !(3 << sh)) | ((s as u8) << sh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Geometry, MkfsOptions};
    use proptest::prelude::*;

    fn layout() -> (Geometry, RgrpLayout) {
        let g = Geometry::compute(1 << 30, 512, &MkfsOptions::default()).unwrap();
        (g, g.rgrp(1).unwrap())
    }

    #[test]
    fn header_round_trip_and_golden() {
        let (g, l) = layout();
        let mut h = RgrpHeader::new(&l);
        h.free -= 10;
        h.dinodes = 4;
        h.unlinked = 1;
        h.generation = 77;
        let b = h.encode(g.block_size, l.start, 5);
        assert_eq!(RgrpHeader::decode(&b, &l, 5).unwrap(), h);
        crate::golden("rgrp-header-v1.bin", &b);
        let other = g.rgrp(2).unwrap();
        assert!(RgrpHeader::decode(&b, &other, 5).is_err());
    }

    #[test]
    fn bitmap_bits_and_tail_check() {
        let (g, l) = layout();
        let bs = g.block_size;
        let last = l.bitmap_blocks - 1;
        let (_, count) = bitmap_span(&l, bs, last);
        let mut b = encode_bitmap_block(&l, bs, last, 3, 9);
        {
            let bits = &mut b[BITMAP_DATA_OFFSET..];
            set_bits(bits, 0, BlockState::Dinode);
            set_bits(bits, 5, BlockState::Unlinked);
            assert_eq!(get_bits(bits, 0), BlockState::Dinode);
            assert_eq!(get_bits(bits, 5), BlockState::Unlinked);
            assert_eq!(get_bits(bits, 4), BlockState::Free);
        }
        seal_bitmap_block(&mut b, &l, last, 4, 9);
        assert_eq!(verify_bitmap_block(&b, &l, last, 9).unwrap(), 4);
        crate::golden("rgrp-bitmap-v1.bin", &b);
        if (count as usize) < (bs as usize - BITMAP_DATA_OFFSET) * 4 {
            set_bits(&mut b[BITMAP_DATA_OFFSET..], count as usize, BlockState::Used);
            seal_bitmap_block(&mut b, &l, last, 4, 9);
            assert!(verify_bitmap_block(&b, &l, last, 9).is_err());
        }
    }

    proptest! {
        #[test]
        fn bits_round_trip(ops in proptest::collection::vec((0usize..4000, 0u8..4), 1..200)) {
            let mut bits = vec![0u8; 1000];
            let mut model = vec![BlockState::Free; 4000];
            for (k, s) in ops {
                let s = BlockState::from_bits(s);
                set_bits(&mut bits, k, s);
                model[k] = s;
            }
            for (k, s) in model.iter().enumerate() {
                prop_assert_eq!(get_bits(&bits, k), *s);
            }
        }
    }
}
