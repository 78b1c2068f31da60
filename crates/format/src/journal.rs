//! Journal (log) blocks. Each node owns one journal: a circular array of
//! `journal_blocks` blocks. Positions below are journal-relative (0-based); header
//! self-addresses are absolute block numbers.
//!
//! A transaction with sequence S is written contiguously (wrapping at the end):
//! ```text
//! [descriptor S][image]...[descriptor S][image]...[revoke S]...[commit S]
//! ```
//! * Descriptor (type LogDescriptor, seq S): `count` (u32 at 32), then from 48 the
//!   `count` target block numbers (u64) whose images follow it, in order.
//! * Image: the full block to write at the target (a metadata block, which carries
//!   its own header and CRC).
//! * Revoke (type LogRevoke, seq S): `count` (u32 at 32), then block numbers from 48
//!   whose images in transactions older than S must not be replayed.
//! * Commit (type LogCommit, seq S):
//! ```text
//! 32 8 tail_seq   oldest transaction still needed for replay
//! 40 4 tail_pos   its position
//! 44 4 blocks     blocks of this transaction before the commit
//! 48 4 data_crc   CRC32C over those blocks, in order
//! 52 4 flags      1 = CLEAN (written at unmount and by mkfs: nothing to replay)
//! 56 8 time       unix nanoseconds
//! 64 4 node_id    writer
//! 68              end
//! ```
//! The head is the valid commit with the highest sequence; replay walks from its
//! tail to it, transaction by transaction, and stops at the first one that is torn
//! (a bad block header or data CRC) or out of sequence.

use crate::header::{self, BlockType, FormatError};
use crate::le;

pub const LIST_OFFSET: usize = 48;
pub const FLAG_CLEAN: u32 = 1;

/// Block numbers a descriptor or revoke block can list.
pub fn list_capacity(bs: u32) -> usize {
    (bs as usize - LIST_OFFSET) / 8
}

/// A descriptor or revoke block: a sequence number and a list of block numbers.
pub fn encode_list(kind: BlockType, list: &[u64], bs: u32, blkno: u64, seq: u64, fsid: u32) -> Vec<u8> {
    let mut b = vec![0u8; bs as usize];
    let n = list.len().min(list_capacity(bs));
    le::put_u32(&mut b, 32, n as u32);
    for (i, t) in list.iter().take(n).enumerate() {
        le::put_u64(&mut b, LIST_OFFSET + i * 8, *t);
    }
    header::seal(&mut b, kind, blkno, seq, fsid);
    b
}

/// Decode a descriptor or revoke block: (seq, list).
pub fn decode_list(buf: &[u8], kind: BlockType, blkno: u64, fsid: u32) -> Result<(u64, Vec<u64>), FormatError> {
    let h = header::verify(buf, kind, blkno, Some(fsid))?;
    let n = le::u32(buf, 32) as usize;
    if n > list_capacity(buf.len() as u32) {
        return Err(FormatError::corrupted(format!("{} (count)", kind.name()), blkno));
    }
    Ok((h.seq, (0..n).map(|i| le::u64(buf, LIST_OFFSET + i * 8)).collect()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub seq: u64,
    pub tail_seq: u64,
    pub tail_pos: u32,
    pub blocks: u32,
    pub data_crc: u32,
    pub flags: u32,
    pub time_ns: u64,
    pub node_id: u32,
}

impl Commit {
    pub fn is_clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    pub fn encode(&self, bs: u32, blkno: u64, fsid: u32) -> Vec<u8> {
        let mut b = vec![0u8; bs as usize];
        le::put_u64(&mut b, 32, self.tail_seq);
        le::put_u32(&mut b, 40, self.tail_pos);
        le::put_u32(&mut b, 44, self.blocks);
        le::put_u32(&mut b, 48, self.data_crc);
        le::put_u32(&mut b, 52, self.flags);
        le::put_u64(&mut b, 56, self.time_ns);
        le::put_u32(&mut b, 64, self.node_id);
        header::seal(&mut b, BlockType::LogCommit, blkno, self.seq, fsid);
        b
    }

    /// Decode the commit at absolute block `blkno` of a journal with `jblocks` blocks.
    pub fn decode(buf: &[u8], blkno: u64, jblocks: u32, fsid: u32) -> Result<Commit, FormatError> {
        let h = header::verify(buf, BlockType::LogCommit, blkno, Some(fsid))?;
        let c = Commit {
            seq: h.seq,
            tail_seq: le::u64(buf, 32),
            tail_pos: le::u32(buf, 40),
            blocks: le::u32(buf, 44),
            data_crc: le::u32(buf, 48),
            flags: le::u32(buf, 52),
            time_ns: le::u64(buf, 56),
            node_id: le::u32(buf, 64),
        };
        if c.tail_pos >= jblocks || c.tail_seq > c.seq || c.blocks >= jblocks || c.flags & !FLAG_CLEAN != 0 {
            return Err(FormatError::corrupted("log commit (fields out of range)", blkno));
        }
        Ok(c)
    }
}

/// CRC over a transaction's blocks before its commit.
pub fn data_crc<'a>(blocks: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    blocks.into_iter().fold(0, crc32c::crc32c_append)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_round_trip_and_golden() {
        let l: Vec<u64> = (0..100).map(|i| i * 7 + 1).collect();
        let b = encode_list(BlockType::LogDescriptor, &l, 4096, 300, 12, 5);
        assert_eq!(decode_list(&b, BlockType::LogDescriptor, 300, 5).unwrap(), (12, l.clone()));
        assert!(decode_list(&b, BlockType::LogRevoke, 300, 5).is_err());
        crate::golden("log-descriptor-v1.bin", &b);
        let r = encode_list(BlockType::LogRevoke, &l[..3], 4096, 301, 13, 5);
        assert_eq!(decode_list(&r, BlockType::LogRevoke, 301, 5).unwrap(), (13, l[..3].to_vec()));
    }

    #[test]
    fn commit_round_trip_and_golden() {
        let c = Commit { seq: 10, tail_seq: 8, tail_pos: 17, blocks: 5, data_crc: 0xdead, flags: FLAG_CLEAN, time_ns: 123, node_id: 2 };
        let b = c.encode(4096, 400, 5);
        assert_eq!(Commit::decode(&b, 400, 8192, 5).unwrap(), c);
        assert!(Commit::decode(&b, 400, 10, 5).is_err());
        crate::golden("log-commit-v1.bin", &b);
    }
}
