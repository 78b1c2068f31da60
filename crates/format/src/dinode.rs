//! Dinodes (one block each; the block number is the inode number) and indirect
//! (pointer) blocks.
//!
//! ```text
//! offset size field
//!   0    32   header (type Dinode, seq = generation: bumped each time the block
//!             becomes a new inode, so a stale handle is detected)
//!  32     4   mode (file type and permission bits, as st_mode)
//!  36     4   uid
//!  40     4   gid
//!  44     4   nlink
//!  48     8   size (bytes)
//!  56     8   blocks (fs blocks allocated to this inode, dinode excluded)
//!  64     8   atime seconds (signed)
//!  72     8   mtime seconds
//!  80     8   ctime seconds
//!  88     4   atime nanoseconds
//!  92     4   mtime nanoseconds
//!  96     4   ctime nanoseconds
//! 100     4   flags: 1 INLINE (payload holds the data or directory entries),
//!                    2 HASHED_DIR (payload holds pointers to hash-table blocks)
//! 104     1   height of the pointer tree (0 when INLINE)
//! 105     1   dir_depth (global depth of a hashed directory's hash table)
//! 106     2   reserved
//! 108     4   rdev
//! 112     8   entries (directories: number of entries, "." and ".." excluded)
//! 120     8   goal (allocation hint: last block allocated)
//! 128     8   parent (directories: the directory holding it; others: 0). Lets
//!             rename refuse to move a directory below itself, and gives "..".
//! 136    ..   payload: inline bytes, or block pointers (u64 LE, 0 = hole)
//! ```
//!
//! Pointer tree (as GFS2's metadata tree): with height h the dinode's P payload
//! pointers point at blocks of level h-1; level 0 blocks are data. Indirect blocks
//! (type Indirect, seq = owning inode's generation) hold Q = (bs-40)/8 pointers after
//! a header and the owning inode number (offset 32, 8 bytes). A file of height h
//! maps P * Q^(h-1) blocks.

use crate::header::{self, BlockType, FormatError, HEADER_SIZE};
use crate::le;

pub const PAYLOAD_OFFSET: usize = 136;
pub const INDIRECT_OFFSET: usize = HEADER_SIZE + 8;
pub const MAX_HEIGHT: u8 = 5;

pub const FLAG_INLINE: u32 = 1;
pub const FLAG_HASHED_DIR: u32 = 2;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;

/// Bytes of payload in a dinode.
pub fn payload_size(bs: u32) -> usize {
    bs as usize - PAYLOAD_OFFSET
}
/// Pointers in a dinode's payload.
pub fn dinode_ptrs(bs: u32) -> usize {
    payload_size(bs) / 8
}
/// Pointers in an indirect block.
pub fn indirect_ptrs(bs: u32) -> usize {
    (bs as usize - INDIRECT_OFFSET) / 8
}

/// Blocks addressable with a tree of `height`.
pub fn tree_capacity(bs: u32, height: u8) -> u64 {
    if height == 0 {
        return 0;
    }
    let mut c = dinode_ptrs(bs) as u64;
    for _ in 1..height {
        c = c.saturating_mul(indirect_ptrs(bs) as u64);
    }
    c
}

/// Smallest height that maps `blocks` logical blocks.
pub fn height_for(bs: u32, blocks: u64) -> u8 {
    let mut h = 1;
    while tree_capacity(bs, h) < blocks && h < MAX_HEIGHT {
        h += 1;
    }
    h
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dinode {
    pub ino: u64,
    pub generation: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub flags: u32,
    pub height: u8,
    pub dir_depth: u8,
    pub rdev: u32,
    pub entries: u64,
    pub goal: u64,
    pub parent: u64,
    /// Raw payload (payload_size bytes): inline data/entries or pointers.
    pub payload: Vec<u8>,
}

impl Dinode {
    pub fn new(ino: u64, generation: u64, mode: u32, bs: u32) -> Dinode {
        Dinode {
            ino,
            generation,
            mode,
            uid: 0,
            gid: 0,
            nlink: 1,
            size: 0,
            blocks: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            flags: FLAG_INLINE,
            height: 0,
            dir_depth: 0,
            rdev: 0,
            entries: 0,
            goal: 0,
            parent: 0,
            payload: vec![0u8; payload_size(bs)],
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    pub fn is_inline(&self) -> bool {
        self.flags & FLAG_INLINE != 0
    }
    pub fn is_hashed_dir(&self) -> bool {
        self.flags & FLAG_HASHED_DIR != 0
    }

    /// Pointer `i` of the payload (when not inline).
    pub fn ptr(&self, i: usize) -> u64 {
        le::u64(&self.payload, i * 8)
    }
    pub fn set_ptr(&mut self, i: usize, v: u64) {
        le::put_u64(&mut self.payload, i * 8, v)
    }

    pub fn encode(&self, bs: u32, fsid: u32) -> Vec<u8> {
        let mut b = vec![0u8; bs as usize];
        self.encode_into(&mut b, fsid);
        b
    }

    pub fn encode_into(&self, b: &mut [u8], fsid: u32) {
        b[HEADER_SIZE..].fill(0);
        le::put_u32(b, 32, self.mode);
        le::put_u32(b, 36, self.uid);
        le::put_u32(b, 40, self.gid);
        le::put_u32(b, 44, self.nlink);
        le::put_u64(b, 48, self.size);
        le::put_u64(b, 56, self.blocks);
        le::put_i64(b, 64, self.atime.sec);
        le::put_i64(b, 72, self.mtime.sec);
        le::put_i64(b, 80, self.ctime.sec);
        le::put_u32(b, 88, self.atime.nsec);
        le::put_u32(b, 92, self.mtime.nsec);
        le::put_u32(b, 96, self.ctime.nsec);
        le::put_u32(b, 100, self.flags);
        b[104] = self.height;
        b[105] = self.dir_depth;
        le::put_u32(b, 108, self.rdev);
        le::put_u64(b, 112, self.entries);
        le::put_u64(b, 120, self.goal);
        le::put_u64(b, 128, self.parent);
        let n = self.payload.len().min(b.len() - PAYLOAD_OFFSET);
        b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + n].copy_from_slice(&self.payload[..n]);
        header::seal(b, BlockType::Dinode, self.ino, self.generation, fsid);
    }

    /// Decode the dinode at block `ino`, checking every field that later code
    /// relies on (so no arithmetic on it can go wrong).
    pub fn decode(buf: &[u8], ino: u64, fsid: u32) -> Result<Dinode, FormatError> {
        let h = header::verify(buf, BlockType::Dinode, ino, Some(fsid))?;
        let bs = buf.len() as u32;
        let bad = |what: &str| FormatError::corrupted(format!("dinode ({what})"), ino);
        let d = Dinode {
            ino,
            generation: h.seq,
            mode: le::u32(buf, 32),
            uid: le::u32(buf, 36),
            gid: le::u32(buf, 40),
            nlink: le::u32(buf, 44),
            size: le::u64(buf, 48),
            blocks: le::u64(buf, 56),
            atime: Timespec { sec: le::i64(buf, 64), nsec: le::u32(buf, 88) },
            mtime: Timespec { sec: le::i64(buf, 72), nsec: le::u32(buf, 92) },
            ctime: Timespec { sec: le::i64(buf, 80), nsec: le::u32(buf, 96) },
            flags: le::u32(buf, 100),
            height: buf[104],
            dir_depth: buf[105],
            rdev: le::u32(buf, 108),
            entries: le::u64(buf, 112),
            goal: le::u64(buf, 120),
            parent: le::u64(buf, 128),
            payload: buf[PAYLOAD_OFFSET..].to_vec(),
        };
        match d.mode & S_IFMT {
            S_IFDIR | S_IFREG | S_IFLNK | S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK => {}
            _ => return Err(bad("unknown file type")),
        }
        if d.flags & !(FLAG_INLINE | FLAG_HASHED_DIR) != 0 {
            return Err(bad("unknown flags"));
        }
        if d.is_inline() {
            if d.height != 0 || d.is_hashed_dir() {
                return Err(bad("inline with a pointer tree"));
            }
            if !d.is_dir() && d.size > payload_size(bs) as u64 {
                return Err(bad("inline size larger than the payload"));
            }
        } else {
            if d.height == 0 || d.height > MAX_HEIGHT {
                return Err(bad("pointer tree height"));
            }
            // sparse files may be larger than their tree maps (holes read as
            // zeros), but never larger than the tallest tree
            if d.size.div_ceil(bs as u64) > tree_capacity(bs, MAX_HEIGHT) {
                return Err(bad("size larger than any pointer tree maps"));
            }
        }
        if d.is_hashed_dir() && (!d.is_dir() || d.height != 1 || d.dir_depth > 32) {
            return Err(bad("hashed directory fields"));
        }
        if d.atime.nsec >= 1_000_000_000 || d.mtime.nsec >= 1_000_000_000 || d.ctime.nsec >= 1_000_000_000 {
            return Err(bad("nanoseconds out of range"));
        }
        Ok(d)
    }
}

/// An indirect block's pointers.
pub fn encode_indirect(ptrs: &[u64], bs: u32, blkno: u64, owner: u64, generation: u64, fsid: u32) -> Vec<u8> {
    let mut b = vec![0u8; bs as usize];
    le::put_u64(&mut b, HEADER_SIZE, owner);
    for (i, p) in ptrs.iter().take(indirect_ptrs(bs)).enumerate() {
        le::put_u64(&mut b, INDIRECT_OFFSET + i * 8, *p);
    }
    header::seal(&mut b, BlockType::Indirect, blkno, generation, fsid);
    b
}

/// Verify an indirect block belongs to `owner` (inode number).
pub fn verify_indirect(buf: &[u8], blkno: u64, owner: u64, fsid: u32) -> Result<(), FormatError> {
    header::verify(buf, BlockType::Indirect, blkno, Some(fsid))?;
    if le::u64(buf, HEADER_SIZE) != owner {
        return Err(FormatError::corrupted(format!("indirect block (owned by {}, expected {owner})", le::u64(buf, HEADER_SIZE)), blkno));
    }
    Ok(())
}

/// Pointer `i` of an indirect block.
pub fn indirect_ptr(buf: &[u8], i: usize) -> u64 {
    le::u64(buf, INDIRECT_OFFSET + i * 8)
}
pub fn set_indirect_ptr(buf: &mut [u8], i: usize, v: u64) {
    le::put_u64(buf, INDIRECT_OFFSET + i * 8, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(bs: u32) -> Dinode {
        let mut d = Dinode::new(4242, 3, S_IFREG | 0o644, bs);
        d.uid = 1000;
        d.gid = 100;
        d.size = 12;
        d.atime = Timespec { sec: -5, nsec: 7 };
        d.mtime = Timespec { sec: 1_700_000_000, nsec: 999_999_999 };
        d.payload[..12].copy_from_slice(b"hello world\n");
        d
    }

    #[test]
    fn round_trip_and_golden() {
        let d = sample(4096);
        let b = d.encode(4096, 77);
        assert_eq!(Dinode::decode(&b, 4242, 77).unwrap(), d);
        crate::golden("dinode-v1.bin", &b);
    }

    #[test]
    fn rejects_inconsistent_fields() {
        let mut d = sample(4096);
        d.size = 5000;
        assert!(Dinode::decode(&d.encode(4096, 1), 4242, 1).is_err());
        let mut d = sample(4096);
        d.flags = 0;
        d.height = 1;
        d.size = u64::MAX;
        assert!(Dinode::decode(&d.encode(4096, 1), 4242, 1).is_err());
        let mut d = sample(4096);
        d.flags = 0;
        d.height = 0;
        assert!(Dinode::decode(&d.encode(4096, 1), 4242, 1).is_err());
        let mut d = sample(4096);
        d.mode = 0o644;
        assert!(Dinode::decode(&d.encode(4096, 1), 4242, 1).is_err());
    }

    #[test]
    fn capacities() {
        assert_eq!(dinode_ptrs(4096), 495);
        assert_eq!(indirect_ptrs(4096), 507);
        assert_eq!(tree_capacity(4096, 1), 495);
        assert_eq!(tree_capacity(4096, 2), 495 * 507);
        assert_eq!(height_for(4096, 1), 1);
        assert_eq!(height_for(4096, 496), 2);
        assert!(tree_capacity(4096, MAX_HEIGHT) * 4096 > 1 << 50);
    }

    #[test]
    fn indirect_round_trip() {
        let ptrs: Vec<u64> = (0..507).map(|i| i * 3).collect();
        let b = encode_indirect(&ptrs, 4096, 900, 4242, 3, 5);
        verify_indirect(&b, 900, 4242, 5).unwrap();
        assert!(verify_indirect(&b, 900, 4243, 5).is_err());
        for (i, p) in ptrs.iter().enumerate() {
            assert_eq!(indirect_ptr(&b, i), *p);
        }
        crate::golden("indirect-v1.bin", &b);
    }

    proptest! {
        #[test]
        fn dinode_fields_round_trip(mode in prop::sample::select(vec![S_IFREG, S_IFDIR, S_IFLNK]), perm in 0u32..0o7777,
            uid: u32, gid: u32, nlink: u32, size in 0u64..3960, blocks: u64, sec: i64, nsec in 0u32..1_000_000_000,
            generation: u64, rdev: u32, entries: u64, goal: u64) {
            let mut d = Dinode::new(99, generation, mode | perm, 4096);
            d.uid = uid; d.gid = gid; d.nlink = nlink; d.size = size; d.blocks = blocks;
            d.mtime = Timespec { sec, nsec }; d.rdev = rdev; d.entries = entries; d.goal = goal; d.parent = goal ^ 1;
            let b = d.encode(4096, 3);
            prop_assert_eq!(Dinode::decode(&b, 99, 3).unwrap(), d);
        }
    }
}
