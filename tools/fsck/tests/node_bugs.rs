//! Behaviour of the node library that fsck's tests ran into; each test is a
//! reproducer for the lead, marked #[ignore] with the reason until fixed.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

/// `mcfs_node::fs::read_superblock` says it reads "the backup when the primary
/// is damaged", but it only decodes the primary: one flipped byte in the
/// primary superblock makes the node refuse to mount a filesystem whose backup
/// superblock is intact (fsck -y repairs it from the backup).
#[test]

fn node_mounts_with_a_damaged_primary_superblock() {
    let dev = mcfs_node::testutil::mem_fs(64 << 20, 1);
    let g = sb(dev.as_ref()).geometry;
    let mut b = block(dev.as_ref(), g.sb_block);
    b[40] ^= 0xff;
    put(dev.as_ref(), g.sb_block, &b);
    let r = mcfs_node::fs::read_superblock(dev.as_ref());
    assert!(r.is_ok(), "the backup at block {} is intact, yet: {:?}", g.backup_sb_block(), r.err());
}
