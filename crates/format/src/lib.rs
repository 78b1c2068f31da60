//! The mcfs on-disk format: every structure's byte layout, encode/decode, CRC32C
//! checksums and geometry. No I/O happens here: the node daemon, `mkfs.mcfs` and
//! `fsck.mcfs` all read and write blocks through `crates/blockdev` and use these
//! types to interpret them (as GFS2's kernel and gfs2-utils share `gfs2_ondisk.h`).
//!
//! Layout of the crate, one module a structure:
//! * [`header`]: the 32-byte header every metadata block starts with (magic, type,
//!   version, self-address, sequence, filesystem id, CRC32C), and [`FormatError`].
//! * [`geometry`]: where everything lives, computed from the device size and the
//!   mkfs options, validated before any arithmetic.
//! * [`sb`]: the superblock (primary at 64 KiB, backup in the last block).
//! * [`rgrp`]: resource-group headers and the 2-bit-per-block bitmaps.
//! * [`dinode`]: the one-block inode (inline data or a pointer tree) and indirect blocks.
//! * [`dir`]: directory entries, leaves and the extendible-hash table.
//! * [`journal`]: log descriptors, revoke blocks and commit blocks.
//!
//! Every decoder takes any byte string and returns `Ok` or an error; none panics
//! (a property test feeds them random bytes). docs/FORMAT.md mirrors this crate.

pub mod dinode;
pub mod dir;
pub mod geometry;
pub mod header;
pub mod journal;
pub mod rgrp;
pub mod sb;

pub use header::{BlockType, FormatError, Header, FORMAT_VERSION, HEADER_SIZE, MAGIC};

/// Little-endian field access on a byte slice. Callers check lengths first; these
/// helpers never panic because every structure validates the block size before use.
pub(crate) mod le {
    pub fn u16(b: &[u8], off: usize) -> u16 {
        let mut a = [0u8; 2];
        if let Some(s) = b.get(off..off + 2) {
            a.copy_from_slice(s);
        }
        u16::from_le_bytes(a)
    }
    pub fn u32(b: &[u8], off: usize) -> u32 {
        let mut a = [0u8; 4];
        if let Some(s) = b.get(off..off + 4) {
            a.copy_from_slice(s);
        }
        u32::from_le_bytes(a)
    }
    pub fn u64(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        if let Some(s) = b.get(off..off + 8) {
            a.copy_from_slice(s);
        }
        u64::from_le_bytes(a)
    }
    pub fn i64(b: &[u8], off: usize) -> i64 {
        u64(b, off) as i64
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        if let Some(s) = b.get_mut(off..off + 2) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        if let Some(s) = b.get_mut(off..off + 4) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        if let Some(s) = b.get_mut(off..off + 8) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }
    pub fn put_i64(b: &mut [u8], off: usize, v: i64) {
        put_u64(b, off, v as u64)
    }
}

/// Compare `bytes` with the committed fixture `tests/fixtures/NAME`, or write the
/// fixture when `MCFS_BLESS=1` (a deliberate format change).
#[cfg(test)]
pub(crate) fn golden(name: &str, bytes: &[u8]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    if std::env::var_os("MCFS_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e} (run with MCFS_BLESS=1 once)", path.display()));
    assert!(want == bytes, "encoding of {name} changed: update docs/FORMAT.md and re-bless the fixture deliberately");
}

#[cfg(test)]
mod fuzz {
    //! Every decoder fed random bytes (and mutated valid blocks) must return, not panic.
    use super::*;
    use proptest::prelude::*;

    fn decode_all(b: &[u8]) {
        let g = geometry::Geometry::compute(1 << 30, 512, &geometry::MkfsOptions::default()).unwrap();
        let l = g.rgrp(0).unwrap();
        let _ = sb::Superblock::decode(b, g.sb_block);
        let _ = rgrp::RgrpHeader::decode(b, &l, 1);
        let _ = rgrp::verify_bitmap_block(b, &l, 0, 1);
        let _ = dinode::Dinode::decode(b, 100, 1);
        let _ = dinode::verify_indirect(b, 100, 5, 1);
        let _ = dir::Leaf::decode(b, 100, 5, 1);
        let _ = dir::decode_hash_block(b, 100, 5, 0, 1);
        let _ = dir::decode_entries(b, 300, "fuzz", 0);
        let _ = journal::decode_list(b, BlockType::LogDescriptor, 100, 1);
        let _ = journal::Commit::decode(b, 100, 1000, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..4200)) {
            decode_all(&b);
        }

        #[test]
        fn mutated_valid_blocks_never_panic(which in 0usize..4, flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
            let mut d = dinode::Dinode::new(100, 1, dinode::S_IFDIR | 0o755, 4096);
            d.flags = dinode::FLAG_INLINE;
            let mut blocks = vec![d.encode(4096, 1)];
            blocks.push(dir::Leaf { owner: 5, depth: 1, next: 0, entries: vec![dir::Entry::new(b"x", 9, 8)] }.encode(4096, 100, 1, 1).unwrap());
            blocks.push(journal::Commit { seq: 3, tail_seq: 1, tail_pos: 0, blocks: 2, data_crc: 0, flags: 0, time_ns: 0, node_id: 1 }.encode(4096, 100, 1));
            blocks.push(journal::encode_list(BlockType::LogDescriptor, &[1, 2, 3], 4096, 100, 3, 1));
            let mut b = blocks[which].clone();
            for (off, v) in flips {
                b[off] = v;
            }
            decode_all(&b);
            // re-sealing after mutation reaches the field checks behind the CRC
            header::reseal(&mut b);
            decode_all(&b);
        }
    }
}

/// Read a little-endian u32 at `off` (0 when out of range). For callers that
/// peek at raw blocks before choosing a decoder.
pub fn le_u32(b: &[u8], off: usize) -> u32 {
    le::u32(b, off)
}

/// Read a little-endian u64 at `off` (0 when out of range).
pub fn le_u64(b: &[u8], off: usize) -> u64 {
    le::u64(b, off)
}

/// Write a little-endian u64 at `off` (ignored when out of range).
pub fn le_put_u64(b: &mut [u8], off: usize, v: u64) {
    le::put_u64(b, off, v)
}
