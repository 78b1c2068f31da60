//! Directories.
//!
//! A small directory keeps its entries inline in the dinode payload (flag INLINE,
//! `entries` = count). When they no longer fit it becomes a hashed directory
//! (extendible hashing, as GFS2's exhash): the dinode payload points at hash-table
//! blocks (flag HASHED_DIR, height 1), which hold 2^dir_depth leaf pointers indexed
//! by the top `dir_depth` bits of the 32-bit name hash. Several consecutive slots
//! point at the same leaf when the leaf's local depth is below the global depth; a
//! full leaf splits (and the table doubles when its depth equals the global depth).
//! When a leaf cannot split further (depth 32 or all hashes equal) it chains an
//! overflow leaf through `next`. Lookup reads one hash block and one leaf:
//! fast at 100k entries.
//!
//! Entry (packed, sorted by (hash, name) within a leaf or inline area):
//! ```text
//!  0  4  hash     crc32c(name)
//!  4  8  ino
//! 12  1  dtype    DT_* of readdir(3)
//! 13  1  name_len 1..=255
//! 14  .. name     any bytes but '/' and NUL
//! ```
//! Leaf block (type DirLeaf, seq = directory generation):
//! ```text
//!  0 32  header
//! 32  8  owner    directory inode number
//! 40  2  depth    local depth
//! 42  2  count
//! 44  4  used     bytes of entries
//! 48  8  next     overflow leaf, 0 if none
//! 56 ..  entries
//! ```
//! Hash block (type DirHash, seq = directory generation):
//! ```text
//!  0 32  header
//! 32  8  owner
//! 40  4  index    position of this block in the table
//! 44  4  reserved
//! 48 ..  leaf pointers (u64)
//! ```

use crate::header::{self, BlockType, FormatError, HEADER_SIZE};
use crate::le;

pub const ENTRY_HEADER: usize = 14;
pub const NAME_LEN_MAX: usize = 255;
pub const LEAF_ENTRIES_OFFSET: usize = 56;
pub const HASH_PTRS_OFFSET: usize = 48;
/// Deepest hash table (2^20 leaf pointers; ~100M entries).
pub const MAX_DIR_DEPTH: u8 = 20;

pub const DT_UNKNOWN: u8 = 0;
pub const DT_FIFO: u8 = 1;
pub const DT_CHR: u8 = 2;
pub const DT_DIR: u8 = 4;
pub const DT_BLK: u8 = 6;
pub const DT_REG: u8 = 8;
pub const DT_LNK: u8 = 10;
pub const DT_SOCK: u8 = 12;

/// The name hash.
pub fn name_hash(name: &[u8]) -> u32 {
    crc32c::crc32c(name)
}

/// File type for readdir from a mode.
pub fn dtype_of_mode(mode: u32) -> u8 {
    use crate::dinode::*;
    match mode & S_IFMT {
        S_IFDIR => DT_DIR,
        S_IFREG => DT_REG,
        S_IFLNK => DT_LNK,
        S_IFCHR => DT_CHR,
        S_IFBLK => DT_BLK,
        S_IFIFO => DT_FIFO,
        S_IFSOCK => DT_SOCK,
        _ => DT_UNKNOWN,
    }
}

/// Is this a valid single path component?
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= NAME_LEN_MAX && !name.contains(&b'/') && !name.contains(&0) && name != b"." && name != b".."
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub hash: u32,
    pub ino: u64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

impl Entry {
    pub fn new(name: &[u8], ino: u64, dtype: u8) -> Entry {
        Entry { hash: name_hash(name), ino, dtype, name: name.to_vec() }
    }
    pub fn size(&self) -> usize {
        ENTRY_HEADER + self.name.len()
    }
    /// Sort key within a leaf.
    pub fn key(&self) -> (u32, &[u8]) {
        (self.hash, &self.name)
    }
}

/// Encode entries packed into `out`; returns bytes used, or None if they do not fit.
pub fn encode_entries(entries: &[Entry], out: &mut [u8]) -> Option<usize> {
    let mut off = 0;
    for e in entries {
        let n = e.size();
        let dst = out.get_mut(off..off + n)?;
        le::put_u32(dst, 0, e.hash);
        le::put_u64(dst, 4, e.ino);
        dst[12] = e.dtype;
        dst[13] = e.name.len() as u8;
        dst[ENTRY_HEADER..].copy_from_slice(&e.name);
        off += n;
    }
    out.get_mut(off..)?.fill(0);
    Some(off)
}

/// Bytes `entries` take.
pub fn entries_size(entries: &[Entry]) -> usize {
    entries.iter().map(Entry::size).sum()
}

/// Decode `count` packed entries from `buf`, validating each (name, hash, order).
pub fn decode_entries(buf: &[u8], count: usize, what: &str, blk: u64) -> Result<Vec<Entry>, FormatError> {
    let bad = |why: &str| FormatError::corrupted(format!("{what} ({why})"), blk);
    let mut v = Vec::with_capacity(count.min(buf.len() / ENTRY_HEADER));
    let mut off = 0;
    for _ in 0..count {
        let h = buf.get(off..off + ENTRY_HEADER).ok_or_else(|| bad("entry past the end"))?;
        let len = h[13] as usize;
        let name = buf.get(off + ENTRY_HEADER..off + ENTRY_HEADER + len).ok_or_else(|| bad("name past the end"))?;
        if !valid_name(name) {
            return Err(bad("invalid name"));
        }
        let e = Entry { hash: le::u32(h, 0), ino: le::u64(h, 4), dtype: h[12], name: name.to_vec() };
        if e.hash != name_hash(name) {
            return Err(bad("entry hash does not match its name"));
        }
        if e.ino == 0 {
            return Err(bad("entry with inode 0"));
        }
        if let Some(p) = v.last() {
            let p: &Entry = p;
            if p.key() >= e.key() {
                return Err(bad("entries out of order or duplicated"));
            }
        }
        off += e.size();
        v.push(e);
    }
    Ok(v)
}

/// A decoded leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub owner: u64,
    pub depth: u16,
    pub next: u64,
    pub entries: Vec<Entry>,
}

/// Bytes of entries a leaf can hold.
pub fn leaf_capacity(bs: u32) -> usize {
    bs as usize - LEAF_ENTRIES_OFFSET
}

impl Leaf {
    /// Encode; None when the entries do not fit.
    pub fn encode(&self, bs: u32, blkno: u64, generation: u64, fsid: u32) -> Option<Vec<u8>> {
        let mut b = vec![0u8; bs as usize];
        let used = encode_entries(&self.entries, &mut b[LEAF_ENTRIES_OFFSET..])?;
        le::put_u64(&mut b, 32, self.owner);
        le::put_u16(&mut b, 40, self.depth);
        le::put_u16(&mut b, 42, self.entries.len() as u16);
        le::put_u32(&mut b, 44, used as u32);
        le::put_u64(&mut b, 48, self.next);
        header::seal(&mut b, BlockType::DirLeaf, blkno, generation, fsid);
        Some(b)
    }

    pub fn decode(buf: &[u8], blkno: u64, owner: u64, fsid: u32) -> Result<Leaf, FormatError> {
        header::verify(buf, BlockType::DirLeaf, blkno, Some(fsid))?;
        let got_owner = le::u64(buf, 32);
        if got_owner != owner {
            return Err(FormatError::corrupted(format!("directory leaf (owned by {got_owner}, expected {owner})"), blkno));
        }
        let depth = le::u16(buf, 40);
        if depth > 32 {
            return Err(FormatError::corrupted("directory leaf (depth)", blkno));
        }
        let count = le::u16(buf, 42) as usize;
        let used = le::u32(buf, 44) as usize;
        let entries = decode_entries(&buf[LEAF_ENTRIES_OFFSET..], count, "directory leaf", blkno)?;
        if entries_size(&entries) != used {
            return Err(FormatError::corrupted("directory leaf (used bytes)", blkno));
        }
        Ok(Leaf { owner, depth, next: le::u64(buf, 48), entries })
    }
}

/// Leaf pointers a hash block holds.
pub fn hash_ptrs_per_block(bs: u32) -> usize {
    (bs as usize - HASH_PTRS_OFFSET) / 8
}

/// Encode a hash-table block.
pub fn encode_hash_block(ptrs: &[u64], bs: u32, blkno: u64, owner: u64, index: u32, generation: u64, fsid: u32) -> Vec<u8> {
    let mut b = vec![0u8; bs as usize];
    le::put_u64(&mut b, HEADER_SIZE, owner);
    le::put_u32(&mut b, 40, index);
    for (i, p) in ptrs.iter().take(hash_ptrs_per_block(bs)).enumerate() {
        le::put_u64(&mut b, HASH_PTRS_OFFSET + i * 8, *p);
    }
    header::seal(&mut b, BlockType::DirHash, blkno, generation, fsid);
    b
}

/// Decode a hash-table block's pointers.
pub fn decode_hash_block(buf: &[u8], blkno: u64, owner: u64, index: u32, fsid: u32) -> Result<Vec<u64>, FormatError> {
    header::verify(buf, BlockType::DirHash, blkno, Some(fsid))?;
    if le::u64(buf, HEADER_SIZE) != owner || le::u32(buf, 40) != index {
        return Err(FormatError::corrupted("directory hash table (owner or index)", blkno));
    }
    let n = hash_ptrs_per_block(buf.len() as u32);
    Ok((0..n).map(|i| le::u64(buf, HASH_PTRS_OFFSET + i * 8)).collect())
}

/// Hash-table slot for a hash at global depth `depth`.
pub fn slot_of(hash: u32, depth: u8) -> usize {
    if depth == 0 {
        0
    } else {
        (hash >> (32 - depth as u32)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted(names: &[&str]) -> Vec<Entry> {
        let mut v: Vec<Entry> = names.iter().enumerate().map(|(i, n)| Entry::new(n.as_bytes(), 100 + i as u64, DT_REG)).collect();
        v.sort_by(|a, b| a.key().cmp(&b.key()));
        v
    }

    #[test]
    fn leaf_round_trip_and_golden() {
        let l = Leaf { owner: 77, depth: 3, next: 0, entries: sorted(&["a", "bb", "hello.txt", "zz top"]) };
        let b = l.encode(4096, 500, 2, 9).unwrap();
        assert_eq!(Leaf::decode(&b, 500, 77, 9).unwrap(), l);
        assert!(Leaf::decode(&b, 500, 78, 9).is_err());
        crate::golden("dir-leaf-v1.bin", &b);
    }

    #[test]
    fn leaf_overflow_is_refused() {
        let names: Vec<String> = (0..40).map(|i| format!("{i:0>100}")).collect();
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let l = Leaf { owner: 1, depth: 0, next: 0, entries: sorted(&refs) };
        assert!(l.encode(4096, 1, 1, 1).is_none());
    }

    #[test]
    fn decoder_rejects_bad_entries() {
        let mut e = sorted(&["x"]);
        e[0].hash ^= 1;
        let mut buf = vec![0u8; 64];
        encode_entries(&e, &mut buf).unwrap();
        assert!(decode_entries(&buf, 1, "t", 0).is_err());
        let mut buf = vec![0u8; 64];
        encode_entries(&sorted(&["a/b"]), &mut buf).unwrap();
        assert!(decode_entries(&buf, 1, "t", 0).is_err());
        // unsorted
        let mut v = sorted(&["a", "b"]);
        v.swap(0, 1);
        let mut buf = vec![0u8; 64];
        encode_entries(&v, &mut buf).unwrap();
        assert!(decode_entries(&buf, 2, "t", 0).is_err());
    }

    #[test]
    fn hash_block_round_trip_and_slots() {
        let ptrs: Vec<u64> = (0..506).map(|i| 1000 + i).collect();
        let b = encode_hash_block(&ptrs, 4096, 44, 77, 2, 1, 3);
        assert_eq!(decode_hash_block(&b, 44, 77, 2, 3).unwrap(), ptrs);
        assert!(decode_hash_block(&b, 44, 77, 3, 3).is_err());
        crate::golden("dir-hash-v1.bin", &b);
        assert_eq!(slot_of(0xffff_ffff, 0), 0);
        assert_eq!(slot_of(0x8000_0000, 1), 1);
        assert_eq!(slot_of(0xc000_0000, 2), 3);
        assert_eq!(slot_of(0x4000_0000, 2), 1);
    }

    proptest! {
        #[test]
        fn entries_round_trip(names in proptest::collection::btree_set(proptest::collection::vec(1u8..=255, 1..40), 0..30)) {
            let mut v: Vec<Entry> = names.iter().filter(|n| valid_name(n)).enumerate().map(|(i, n)| Entry::new(n, i as u64 + 1, DT_DIR)).collect();
            v.sort_by(|a, b| a.key().cmp(&b.key()));
            let mut buf = vec![0u8; 4096];
            let used = encode_entries(&v, &mut buf).unwrap();
            prop_assert_eq!(used, entries_size(&v));
            prop_assert_eq!(decode_entries(&buf, v.len(), "t", 0).unwrap(), v);
        }
    }
}
