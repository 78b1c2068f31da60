//! The header every metadata block starts with, and the format's error type.
//!
//! ```text
//! offset size field
//!  0     4    magic      "MCFS" (0x5346434d little-endian)
//!  4     2    type       BlockType
//!  6     2    version    FORMAT_VERSION when written
//!  8     8    blkno      the block's own address (detects misdirected writes)
//! 16     8    seq        generation (dinodes) or log sequence (journal blocks)
//! 24     4    fsid       first 4 bytes of the filesystem UUID: a block left over
//!                        from an earlier mkfs of the same device is foreign
//! 28     4    crc        CRC32C of the whole block with this field zeroed
//! 32          end of header
//! ```

use crate::le;

pub const MAGIC: u32 = u32::from_le_bytes(*b"MCFS");
pub const HEADER_SIZE: usize = 32;
/// The version this code writes.
pub const FORMAT_VERSION: u16 = 1;
/// The oldest version this code can still read without an upgrade step. Versions
/// in `MIN_READABLE_VERSION..FORMAT_VERSION` are read; older known ones need
/// `fsck.mcfs --upgrade` (none exist yet: version 1 is the first).
pub const MIN_READABLE_VERSION: u16 = 1;

const OFF_MAGIC: usize = 0;
const OFF_TYPE: usize = OFF_MAGIC + 4;
const OFF_VERSION: usize = OFF_TYPE + 2;
const OFF_BLKNO: usize = OFF_VERSION + 2;
const OFF_SEQ: usize = OFF_BLKNO + 8;
const OFF_FSID: usize = OFF_SEQ + 8;
const OFF_CRC: usize = OFF_FSID + 4;
const _: () = assert!(OFF_CRC + 4 == HEADER_SIZE);

/// Errors from decoding or validating on-disk structures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The bytes are not what they claim to be: bad magic, checksum, self-address,
    /// type, field value or geometry.
    #[error("corrupted {what} at block {block}")]
    Corrupted { what: String, block: u64 },
    /// A known older format version: readable only after an upgrade.
    #[error("on-disk format version {0} needs an upgrade (this mcfs writes version {FORMAT_VERSION})")]
    UpgradeRequired(u16),
    /// A version newer than this code knows.
    #[error("on-disk format version {0} is newer than this mcfs (version {FORMAT_VERSION}); upgrade mcfs")]
    TooNew(u16),
    /// Options or device size that cannot make a filesystem.
    #[error("impossible geometry: {0}")]
    Geometry(String),
}

impl FormatError {
    pub fn corrupted(what: impl Into<String>, block: u64) -> FormatError {
        FormatError::Corrupted { what: what.into(), block }
    }
}

/// Metadata block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum BlockType {
    Superblock = 1,
    RgrpHeader = 2,
    Bitmap = 3,
    Dinode = 4,
    Indirect = 5,
    DirLeaf = 6,
    DirHash = 7,
    LogDescriptor = 8,
    LogRevoke = 9,
    LogCommit = 10,
}

impl BlockType {
    pub fn from_u16(v: u16) -> Option<BlockType> {
        use BlockType::*;
        Some(match v {
            1 => Superblock,
            2 => RgrpHeader,
            3 => Bitmap,
            4 => Dinode,
            5 => Indirect,
            6 => DirLeaf,
            7 => DirHash,
            8 => LogDescriptor,
            9 => LogRevoke,
            10 => LogCommit,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        use BlockType::*;
        match self {
            Superblock => "superblock",
            RgrpHeader => "rgrp header",
            Bitmap => "rgrp bitmap",
            Dinode => "dinode",
            Indirect => "indirect block",
            DirLeaf => "directory leaf",
            DirHash => "directory hash table",
            LogDescriptor => "log descriptor",
            LogRevoke => "log revoke",
            LogCommit => "log commit",
        }
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub btype: BlockType,
    pub version: u16,
    pub blkno: u64,
    pub seq: u64,
    pub fsid: u32,
}

/// CRC32C of a block with the CRC field taken as zero.
pub fn block_crc(buf: &[u8]) -> u32 {
    if buf.len() < HEADER_SIZE {
        return crc32c::crc32c(buf);
    }
    let c = crc32c::crc32c(&buf[..OFF_CRC]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[HEADER_SIZE..])
}

/// Fill in the header of `buf` (type, version, blkno, seq, fsid) and its CRC.
/// Call after the body is complete.
pub fn seal(buf: &mut [u8], btype: BlockType, blkno: u64, seq: u64, fsid: u32) {
    le::put_u32(buf, OFF_MAGIC, MAGIC);
    le::put_u16(buf, OFF_TYPE, btype as u16);
    le::put_u16(buf, OFF_VERSION, FORMAT_VERSION);
    le::put_u64(buf, OFF_BLKNO, blkno);
    le::put_u64(buf, OFF_SEQ, seq);
    le::put_u32(buf, OFF_FSID, fsid);
    reseal(buf);
}

/// Recompute the CRC after changing a sealed block's body.
pub fn reseal(buf: &mut [u8]) {
    let crc = block_crc(buf);
    le::put_u32(buf, OFF_CRC, crc);
}

/// Read a header without checking anything but its length.
pub fn peek(buf: &[u8]) -> Option<(u32, u16, u16, u64, u64, u32, u32)> {
    if buf.len() < HEADER_SIZE {
        return None;
    }
    Some((
        le::u32(buf, OFF_MAGIC),
        le::u16(buf, OFF_TYPE),
        le::u16(buf, OFF_VERSION),
        le::u64(buf, OFF_BLKNO),
        le::u64(buf, OFF_SEQ),
        le::u32(buf, OFF_FSID),
        le::u32(buf, OFF_CRC),
    ))
}

/// Decide what a version number means for this code.
pub fn check_version(version: u16, current: u16, min_readable: u16, block: u64) -> Result<(), FormatError> {
    if version > current {
        Err(FormatError::TooNew(version))
    } else if version >= min_readable {
        Ok(())
    } else if version >= 1 {
        Err(FormatError::UpgradeRequired(version))
    } else {
        Err(FormatError::corrupted("block header (version 0)", block))
    }
}

/// Verify a block: magic, version, checksum, type, self-address and (when `fsid`
/// is given) filesystem id. Checks run in that order so the error names the first
/// thing that is wrong.
pub fn verify(buf: &[u8], want: BlockType, blkno: u64, fsid: Option<u32>) -> Result<Header, FormatError> {
    let what = want.name();
    let Some((magic, ty, version, got_blkno, seq, got_fsid, crc)) = peek(buf) else {
        return Err(FormatError::corrupted(format!("{what} (short block)"), blkno));
    };
    if magic != MAGIC {
        return Err(FormatError::corrupted(format!("{what} (bad magic)"), blkno));
    }
    check_version(version, FORMAT_VERSION, MIN_READABLE_VERSION, blkno)?;
    if block_crc(buf) != crc {
        return Err(FormatError::corrupted(format!("{what} (checksum mismatch)"), blkno));
    }
    let Some(btype) = BlockType::from_u16(ty) else {
        return Err(FormatError::corrupted(format!("{what} (unknown block type {ty})"), blkno));
    };
    if btype != want {
        return Err(FormatError::corrupted(format!("{what} (found a {} instead)", btype.name()), blkno));
    }
    if got_blkno != blkno {
        return Err(FormatError::corrupted(format!("{what} (claims to be block {got_blkno}: misdirected write)"), blkno));
    }
    if let Some(f) = fsid {
        if f != got_fsid {
            return Err(FormatError::corrupted(format!("{what} (belongs to another filesystem)"), blkno));
        }
    }
    Ok(Header { btype, version, blkno: got_blkno, seq, fsid: got_fsid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_verify() {
        let mut b = vec![7u8; 512];
        seal(&mut b, BlockType::Dinode, 42, 9, 0xabcd);
        let h = verify(&b, BlockType::Dinode, 42, Some(0xabcd)).unwrap();
        assert_eq!(h.seq, 9);
        assert_eq!(h.version, FORMAT_VERSION);
    }

    #[test]
    fn each_check_names_the_fault() {
        let mut b = vec![0u8; 512];
        seal(&mut b, BlockType::Dinode, 42, 9, 1);
        let err = |b: &[u8], t, n, f| match verify(b, t, n, f) {
            Err(FormatError::Corrupted { what, .. }) => what,
            other => panic!("{other:?}"),
        };
        assert!(err(&b, BlockType::Dinode, 43, Some(1)).contains("misdirected"));
        assert!(err(&b, BlockType::Indirect, 42, Some(1)).contains("found a dinode"));
        assert!(err(&b, BlockType::Dinode, 42, Some(2)).contains("another filesystem"));
        let mut c = b.clone();
        c[100] ^= 1;
        assert!(err(&c, BlockType::Dinode, 42, Some(1)).contains("checksum"));
        let mut d = b.clone();
        d[0] = 0;
        assert!(err(&d, BlockType::Dinode, 42, Some(1)).contains("magic"));
        assert!(err(&b[..10], BlockType::Dinode, 42, Some(1)).contains("short"));
    }

    #[test]
    fn versions() {
        assert_eq!(check_version(1, 1, 1, 0), Ok(()));
        assert_eq!(check_version(2, 1, 1, 0), Err(FormatError::TooNew(2)));
        assert_eq!(check_version(1, 3, 2, 0), Err(FormatError::UpgradeRequired(1)));
        assert_eq!(check_version(2, 3, 2, 0), Ok(()));
        assert!(matches!(check_version(0, 3, 2, 0), Err(FormatError::Corrupted { .. })));
        // A block written by a newer mcfs is reported as such, before its checksum.
        let mut b = vec![0u8; 512];
        seal(&mut b, BlockType::Dinode, 1, 1, 1);
        le::put_u16(&mut b, OFF_VERSION, 9);
        assert_eq!(verify(&b, BlockType::Dinode, 1, None), Err(FormatError::TooNew(9)));
    }
}
