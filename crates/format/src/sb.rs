//! The superblock: primary at byte offset 64 KiB, an identical backup (but for its
//! self-address) in the device's last block.
//!
//! ```text
//! offset size field
//!   0    32   header (type Superblock, seq 0)
//!  32    16   uuid
//!  48     4   block_size
//!  52     4   flags (reserved, 0)
//!  56     8   block_count
//!  64     8   sb_block
//!  72     8   journal_start
//!  80     4   journal_count
//!  84     4   journal_blocks
//!  88     8   rgrp_start
//!  96     4   rgrp_count
//! 100     4   rgrp_blocks
//! 104     8   reserved
//! 112     8   root_ino
//! 120     8   created (unix seconds)
//! 128    16   lock protocol, NUL padded ("dlm" or "nolock")
//! 144    32   cluster name, NUL padded
//! 176    32   filesystem name, NUL padded
//! 208         end (rest of the block zero)
//! ```

use crate::geometry::Geometry;
use crate::header::{self, BlockType, FormatError};
use crate::le;

const OFF_UUID: usize = 32;
const OFF_BS: usize = OFF_UUID + 16;
const OFF_FLAGS: usize = OFF_BS + 4;
const OFF_BLOCK_COUNT: usize = OFF_FLAGS + 4;
const OFF_SB_BLOCK: usize = OFF_BLOCK_COUNT + 8;
const OFF_JSTART: usize = OFF_SB_BLOCK + 8;
const OFF_JCOUNT: usize = OFF_JSTART + 8;
const OFF_JBLOCKS: usize = OFF_JCOUNT + 4;
const OFF_RSTART: usize = OFF_JBLOCKS + 4;
const OFF_RCOUNT: usize = OFF_RSTART + 8;
const OFF_RBLOCKS: usize = OFF_RCOUNT + 4;
const OFF_ROOT: usize = OFF_RBLOCKS + 4 + 8; // 8 reserved bytes keep u64s aligned
const OFF_CREATED: usize = OFF_ROOT + 8;
const OFF_LOCKPROTO: usize = OFF_CREATED + 8;
const OFF_CLUSTER: usize = OFF_LOCKPROTO + 16;
const OFF_FSNAME: usize = OFF_CLUSTER + 32;
pub const SB_END: usize = OFF_FSNAME + 32;
const _: () = assert!(SB_END == 208);

pub const NAME_MAX: usize = 32;

/// How nodes coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockProto {
    /// Cluster mount through mcfs-dlm.
    Dlm,
    /// Single node, no lock server (GFS2's lock_nolock).
    NoLock,
}

impl LockProto {
    pub fn as_str(self) -> &'static str {
        match self {
            LockProto::Dlm => "dlm",
            LockProto::NoLock => "nolock",
        }
    }
    pub fn parse(s: &str) -> Option<LockProto> {
        match s {
            "dlm" | "lock_dlm" => Some(LockProto::Dlm),
            "nolock" | "lock_nolock" => Some(LockProto::NoLock),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub geometry: Geometry,
    pub root_ino: u64,
    pub created: u64,
    pub lock_proto: LockProto,
    pub cluster: String,
    pub fsname: String,
}

/// Check a `cluster:fsname` table name as mkfs -t takes it.
pub fn parse_table(s: &str) -> Result<(String, String), String> {
    let (c, f) = s.split_once(':').ok_or_else(|| format!("lock table '{s}' must be CLUSTER:FSNAME"))?;
    for (what, v) in [("cluster name", c), ("filesystem name", f)] {
        if v.is_empty() || v.len() >= NAME_MAX {
            return Err(format!("{what} '{v}' must be 1 to {} characters", NAME_MAX - 1));
        }
        if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("{what} '{v}' may contain only letters, digits, '-' and '_'"));
        }
    }
    Ok((c.to_string(), f.to_string()))
}

fn put_str(b: &mut [u8], off: usize, len: usize, s: &str) {
    let n = s.len().min(len - 1);
    if let Some(d) = b.get_mut(off..off + n) {
        d.copy_from_slice(&s.as_bytes()[..n]);
    }
}

fn get_str(b: &[u8], off: usize, len: usize, what: &str, blk: u64) -> Result<String, FormatError> {
    let raw = b.get(off..off + len).ok_or_else(|| FormatError::corrupted(what, blk))?;
    let end = raw.iter().position(|&c| c == 0).unwrap_or(len);
    if raw[end..].iter().any(|&c| c != 0) {
        return Err(FormatError::corrupted(format!("superblock ({what} not NUL padded)"), blk));
    }
    String::from_utf8(raw[..end].to_vec()).map_err(|_| FormatError::corrupted(format!("superblock ({what} not UTF-8)"), blk))
}

impl Superblock {
    /// The filesystem id stamped into every block header.
    pub fn fsid(&self) -> u32 {
        fsid_of(&self.uuid)
    }

    /// `cluster:fsname`, the lockspace name.
    pub fn table(&self) -> String {
        format!("{}:{}", self.cluster, self.fsname)
    }

    /// Encode as the block at `blkno` (primary or backup location).
    pub fn encode(&self, blkno: u64) -> Vec<u8> {
        let g = &self.geometry;
        let mut b = vec![0u8; g.block_size as usize];
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.uuid);
        le::put_u32(&mut b, OFF_BS, g.block_size);
        le::put_u32(&mut b, OFF_FLAGS, 0);
        le::put_u64(&mut b, OFF_BLOCK_COUNT, g.block_count);
        le::put_u64(&mut b, OFF_SB_BLOCK, g.sb_block);
        le::put_u64(&mut b, OFF_JSTART, g.journal_start);
        le::put_u32(&mut b, OFF_JCOUNT, g.journal_count);
        le::put_u32(&mut b, OFF_JBLOCKS, g.journal_blocks);
        le::put_u64(&mut b, OFF_RSTART, g.rgrp_start);
        le::put_u32(&mut b, OFF_RCOUNT, g.rgrp_count);
        le::put_u32(&mut b, OFF_RBLOCKS, g.rgrp_blocks);
        le::put_u64(&mut b, OFF_ROOT, self.root_ino);
        le::put_u64(&mut b, OFF_CREATED, self.created);
        put_str(&mut b, OFF_LOCKPROTO, 16, self.lock_proto.as_str());
        put_str(&mut b, OFF_CLUSTER, NAME_MAX, &self.cluster);
        put_str(&mut b, OFF_FSNAME, NAME_MAX, &self.fsname);
        header::seal(&mut b, BlockType::Superblock, blkno, 0, self.fsid());
        b
    }

    /// Decode the superblock found at `blkno`. The block size is read from the
    /// block itself; `buf` must be at least that long.
    pub fn decode(buf: &[u8], blkno: u64) -> Result<Superblock, FormatError> {
        if buf.len() < SB_END {
            return Err(FormatError::corrupted("superblock (short block)", blkno));
        }
        let bs = le::u32(buf, OFF_BS);
        if !(crate::geometry::MIN_BLOCK_SIZE..=crate::geometry::MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            // A bad magic is the better first message when this is not mcfs at all.
            if header::peek(buf).map(|h| h.0) != Some(header::MAGIC) {
                return Err(FormatError::corrupted("superblock (bad magic)", blkno));
            }
            return Err(FormatError::corrupted(format!("superblock (block size {bs})"), blkno));
        }
        if buf.len() < bs as usize {
            return Err(FormatError::corrupted("superblock (short block)", blkno));
        }
        let block = &buf[..bs as usize];
        let h = header::verify(block, BlockType::Superblock, blkno, None)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&block[OFF_UUID..OFF_UUID + 16]);
        if h.fsid != fsid_of(&uuid) {
            return Err(FormatError::corrupted("superblock (fsid does not match uuid)", blkno));
        }
        let geometry = Geometry {
            block_size: bs,
            block_count: le::u64(block, OFF_BLOCK_COUNT),
            sb_block: le::u64(block, OFF_SB_BLOCK),
            journal_start: le::u64(block, OFF_JSTART),
            journal_count: le::u32(block, OFF_JCOUNT),
            journal_blocks: le::u32(block, OFF_JBLOCKS),
            rgrp_start: le::u64(block, OFF_RSTART),
            rgrp_count: le::u32(block, OFF_RCOUNT),
            rgrp_blocks: le::u32(block, OFF_RBLOCKS),
        };
        geometry.validate().map_err(|e| FormatError::corrupted(format!("superblock ({e})"), blkno))?;
        if blkno != geometry.sb_block && blkno != geometry.backup_sb_block() {
            return Err(FormatError::corrupted("superblock (not at a superblock location)", blkno));
        }
        let lp = get_str(block, OFF_LOCKPROTO, 16, "lock protocol", blkno)?;
        let lock_proto = LockProto::parse(&lp).ok_or_else(|| FormatError::corrupted(format!("superblock (lock protocol '{lp}')"), blkno))?;
        let cluster = get_str(block, OFF_CLUSTER, NAME_MAX, "cluster name", blkno)?;
        let fsname = get_str(block, OFF_FSNAME, NAME_MAX, "filesystem name", blkno)?;
        let root_ino = le::u64(block, OFF_ROOT);
        if geometry.rgrp_of(root_ino).is_none() {
            return Err(FormatError::corrupted("superblock (root inode outside the data area)", blkno));
        }
        Ok(Superblock { uuid, geometry, root_ino, created: le::u64(block, OFF_CREATED), lock_proto, cluster, fsname })
    }
}

/// The 32-bit filesystem id derived from a UUID.
pub fn fsid_of(uuid: &[u8; 16]) -> u32 {
    crc32c::crc32c(uuid)
}

/// Format a UUID the usual way.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", h[0..4].concat(), h[4..6].concat(), h[6..8].concat(), h[8..10].concat(), h[10..16].concat())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::geometry::MkfsOptions;

    pub fn sample() -> Superblock {
        let g = Geometry::compute(1 << 30, 512, &MkfsOptions { journals: 3, ..Default::default() }).unwrap();
        Superblock {
            uuid: *b"0123456789abcdef",
            geometry: g,
            root_ino: g.rgrp(0).unwrap().data_start,
            created: 1_700_000_000,
            lock_proto: LockProto::Dlm,
            cluster: "alpha".into(),
            fsname: "data".into(),
        }
    }

    #[test]
    fn round_trip_both_copies() {
        let sb = sample();
        let g = sb.geometry;
        for at in [g.sb_block, g.backup_sb_block()] {
            let b = sb.encode(at);
            assert_eq!(Superblock::decode(&b, at).unwrap(), sb);
        }
        // the primary copy does not decode as the backup
        assert!(Superblock::decode(&sb.encode(g.sb_block), g.backup_sb_block()).is_err());
    }

    #[test]
    fn table_names() {
        assert_eq!(parse_table("c1:fs_1").unwrap(), ("c1".into(), "fs_1".into()));
        assert!(parse_table("nocolon").is_err());
        assert!(parse_table(":x").is_err());
        assert!(parse_table("a:b c").is_err());
        assert!(parse_table(&format!("a:{}", "x".repeat(40))).is_err());
    }

    #[test]
    fn golden_bytes() {
        let sb = sample();
        let b = sb.encode(sb.geometry.sb_block);
        // Fixed prefix: magic, type 1, version 1, blkno 16 (64 KiB / 4096).
        assert_eq!(&b[0..8], &[b'M', b'C', b'F', b'S', 1, 0, 1, 0]);
        assert_eq!(&b[8..16], &16u64.to_le_bytes());
        assert_eq!(&b[OFF_UUID..OFF_UUID + 16], b"0123456789abcdef");
        assert_eq!(&b[OFF_LOCKPROTO..OFF_LOCKPROTO + 4], b"dlm\0");
        assert_eq!(&b[OFF_CLUSTER..OFF_CLUSTER + 6], b"alpha\0");
        let crc = crate::header::block_crc(&b);
        assert_eq!(&b[28..32], &crc.to_le_bytes());
        // A committed fixture pins the whole block: the format may not drift silently.
        crate::golden("superblock-v1.bin", &b);
    }
}
