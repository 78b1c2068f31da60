//! One corruption per structure: fsck -n detects it and writes nothing, -y fixes
//! what it claims to, a second run is clean, and the node mounts the result.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use mcfs_blockdev::BlockDevice;
use mcfs_format::dinode::{self, Dinode};
use mcfs_format::dir::{self, Entry};
use mcfs_format::header;
use mcfs_format::rgrp::{self, BlockState, RgrpHeader, BITMAP_DATA_OFFSET};
use mcfs_fsck::Kind;
use mcfs_node::ops::Caller;

fn flip(dev: &dyn BlockDevice, b: u64, off: usize) {
    let mut v = block(dev, b);
    v[off] ^= 0x5a;
    put(dev, b, &v);
}

/// Set the bitmap state of data block `b`, re-sealing the bitmap block (the
/// header's counts are left alone).
fn set_state(dev: &dyn BlockDevice, b: u64, s: BlockState) {
    let sbk = sb(dev);
    let g = sbk.geometry;
    let l = g.rgrp_of(b).unwrap();
    let per = mcfs_format::geometry::blocks_per_bitmap(g.block_size) as u64;
    let rel = b - l.data_start;
    let bi = (rel / per) as u32;
    let mut v = block(dev, l.bitmap_block(bi));
    rgrp::set_bits(&mut v[BITMAP_DATA_OFFSET..], (rel % per) as usize, s);
    rgrp::seal_bitmap_block(&mut v, &l, bi, 99, sbk.fsid());
    put(dev, l.bitmap_block(bi), &v);
}

fn state(dev: &dyn BlockDevice, b: u64) -> BlockState {
    let g = sb(dev).geometry;
    let l = g.rgrp_of(b).unwrap();
    let per = mcfs_format::geometry::blocks_per_bitmap(g.block_size) as u64;
    let rel = b - l.data_start;
    let v = block(dev, l.bitmap_block((rel / per) as u32));
    rgrp::get_bits(&v[BITMAP_DATA_OFFSET..], (rel % per) as usize)
}

fn root_entries(dev: &dyn BlockDevice, root: u64) -> (Dinode, Vec<Entry>) {
    let d = dinode(dev, root);
    let e = dir::decode_entries(&d.payload, d.entries as usize, "root", root).unwrap();
    (d, e)
}

fn put_root_entries(dev: &dyn BlockDevice, mut d: Dinode, mut e: Vec<Entry>) {
    e.sort_by(|a, b| a.key().cmp(&b.key()));
    d.payload.fill(0);
    dir::encode_entries(&e, &mut d.payload).unwrap();
    d.entries = e.len() as u64;
    put_dinode(dev, &d);
}

fn lookup_all(dev: &std::sync::Arc<mcfs_blockdev::MemDevice>, m: &Made) {
    let fs = mount(dev.clone());
    fs.lookup(m.root, b"many").unwrap();
    for (name, ino) in &m.hashed_names {
        let a = fs.lookup(m.hashed, name.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.ino, *ino);
    }
    fs.unmount().unwrap();
}

#[test]
fn primary_superblock_fixed_from_backup() {
    let (dev, _) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    flip(dev.as_ref(), g.sb_block, 40);
    let r = assert_repairs(&dev, Kind::Superblock);
    assert!(r.of(Kind::Superblock).any(|f| f.message.contains("primary")));
}

#[test]
fn backup_superblock_fixed_from_primary() {
    let (dev, _) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    put(dev.as_ref(), g.backup_sb_block(), &vec![0u8; BS]);
    assert_repairs(&dev, Kind::Superblock);
}

#[test]
fn both_superblocks_bad_is_an_operational_error() {
    let (dev, _) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    flip(dev.as_ref(), g.sb_block, 40);
    put(dev.as_ref(), g.backup_sb_block(), &vec![0u8; BS]);
    for repair in [false, true] {
        let r = run(dev.as_ref(), repair);
        assert_eq!(r.exit_code(), 8);
        assert!(r.operational_error.as_deref().unwrap().contains("no valid mcfs superblock"), "{:?}", r.operational_error);
    }
}

#[test]
fn zeroed_device_is_not_mcfs() {
    let dev = mcfs_blockdev::MemDevice::new(32 << 20, 512);
    let r = run(&dev, true);
    assert_eq!(r.exit_code(), 8);
    assert!(dev.to_vec().iter().all(|b| *b == 0));
}

#[test]
fn zeroed_rgrp_header_is_rebuilt() {
    let (dev, _) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    put(dev.as_ref(), g.rgrp(0).unwrap().start, &vec![0u8; BS]);
    assert_repairs(&dev, Kind::RgrpHeader);
}

#[test]
fn wrong_rgrp_counts_are_fixed() {
    let (dev, _) = populated(128 << 20);
    let s = sb(dev.as_ref());
    let l = s.geometry.rgrp(0).unwrap();
    let mut h = RgrpHeader::decode(&block(dev.as_ref(), l.start), &l, s.fsid()).unwrap();
    h.free -= 17;
    h.dinodes += 3;
    put(dev.as_ref(), l.start, &h.encode(BS as u32, l.start, s.fsid()));
    let r = assert_repairs(&dev, Kind::RgrpHeader);
    assert!(r.of(Kind::RgrpHeader).any(|f| f.message.contains("counts")), "{}", show(&r));
}

#[test]
fn damaged_bitmap_block_is_rebuilt() {
    let (dev, m) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    let l = g.rgrp_of(m.big).unwrap();
    flip(dev.as_ref(), l.bitmap_block(0), 200);
    assert_repairs(&dev, Kind::Bitmap);
}

#[test]
fn leaked_block_is_freed() {
    let (dev, m) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    let l = g.rgrp_of(m.root).unwrap();
    let victim = l.data_start + l.data_blocks as u64 - 10;
    assert_eq!(state(dev.as_ref(), victim), BlockState::Free);
    set_state(dev.as_ref(), victim, BlockState::Used);
    let r = assert_repairs_then(&dev, Kind::LeakedBlocks, |_| assert_eq!(state(dev.as_ref(), victim), BlockState::Free));
    assert!(r.of(Kind::LeakedBlocks).any(|f| f.message.contains(&victim.to_string())), "{}", show(&r));
}

#[test]
fn used_block_marked_free_is_marked_used() {
    let (dev, m) = populated(128 << 20);
    let data = dinode(dev.as_ref(), m.other_big).ptr(3);
    set_state(dev.as_ref(), data, BlockState::Free);
    assert_repairs_then(&dev, Kind::UsedMarkedFree, |_| assert_eq!(state(dev.as_ref(), data), BlockState::Used));
}

#[test]
fn dinode_marked_as_plain_used_is_corrected() {
    let (dev, m) = populated(128 << 20);
    set_state(dev.as_ref(), m.small, BlockState::Used);
    assert_repairs_then(&dev, Kind::WrongBlockState, |_| assert_eq!(state(dev.as_ref(), m.small), BlockState::Dinode));
}

#[test]
fn dinode_with_bad_checksum_loses_its_name_and_blocks() {
    let (dev, m) = populated(128 << 20);
    let data = dinode(dev.as_ref(), m.other_big).ptr(0);
    flip(dev.as_ref(), m.other_big, 300);
    let r = assert_repairs_then(&dev, Kind::BadDinode, |_| {
        assert_eq!(state(dev.as_ref(), m.other_big), BlockState::Free);
        assert_eq!(state(dev.as_ref(), data), BlockState::Free);
    });
    assert!(r.of(Kind::BadDinode).any(|f| f.message.contains("other.bin")), "{}", show(&r));
    assert!(r.of(Kind::LeakedBlocks).next().is_some(), "its blocks are freed:\n{}", show(&r));
}

#[test]
fn wrong_nlink_is_fixed() {
    let (dev, m) = populated(128 << 20);
    for (ino, bad) in [(m.small, 5), (m.linked, 1), (m.sub, 2), (m.root, 9)] {
        let mut d = dinode(dev.as_ref(), ino);
        d.nlink = bad;
        put_dinode(dev.as_ref(), &d);
    }
    let r = assert_repairs(&dev, Kind::LinkCount);
    assert_eq!(r.of(Kind::LinkCount).count(), 4, "{}", show(&r));
    assert_eq!(dinode(dev.as_ref(), m.small).nlink, 1);
    assert_eq!(dinode(dev.as_ref(), m.linked).nlink, 2);
    assert_eq!(dinode(dev.as_ref(), m.sub).nlink, 3, "sub has one subdirectory");
    assert_eq!(dinode(dev.as_ref(), m.root).nlink, 2 + 3, "root has sub, many, emptied");
}

#[test]
fn wrong_block_count_and_size_are_fixed() {
    let (dev, m) = populated(128 << 20);
    let mut d = dinode(dev.as_ref(), m.big);
    let blocks = d.blocks;
    d.blocks += 7;
    put_dinode(dev.as_ref(), &d);
    let mut d = dinode(dev.as_ref(), m.other_big);
    d.size = 10;
    put_dinode(dev.as_ref(), &d);
    assert_repairs(&dev, Kind::BlockCount);
    assert_eq!(dinode(dev.as_ref(), m.big).blocks, blocks);
    assert_eq!(dinode(dev.as_ref(), m.other_big).size, 40 * BS as u64);
}

#[test]
fn damaged_directory_leaf_is_salvaged_and_rebuilt() {
    let (dev, m) = populated(128 << 20);
    let leaves = leaves(dev.as_ref(), m.hashed);
    assert!(leaves.len() >= 3, "the test needs a split hashed directory");
    // a flipped byte in the entry area (checksum fails, header intact)
    flip(dev.as_ref(), leaves[1], 3000);
    let r = assert_repairs(&dev, Kind::Directory);
    assert!(r.of(Kind::Directory).any(|f| f.message.contains("salvaged")), "{}", show(&r));
    // every name that the flip did not hit is still there
    let fs = mount(dev.clone());
    fs.lookup(m.root, b"many").unwrap();
    let found = m.hashed_names.iter().filter(|(n, _)| fs.lookup(m.hashed, n.as_bytes()).is_ok()).count();
    fs.unmount().unwrap();
    assert!(found + 1 >= m.hashed_names.len(), "at most the damaged entry is lost: {found} of {}", m.hashed_names.len());
}

#[test]
fn leaf_depth_inconsistency_is_rebuilt_without_loss() {
    let (dev, m) = populated(128 << 20);
    let s = sb(dev.as_ref());
    let leaves = leaves(dev.as_ref(), m.hashed);
    let b = leaves[0];
    let mut l = dir::Leaf::decode(&block(dev.as_ref(), b), b, m.hashed, s.fsid()).unwrap();
    l.depth += 1;
    let gen = dinode(dev.as_ref(), m.hashed).generation;
    put(dev.as_ref(), b, &l.encode(BS as u32, b, gen, s.fsid()).unwrap());
    assert_repairs(&dev, Kind::Directory);
    lookup_all(&dev, &m);
}

#[test]
fn misplaced_entry_is_moved() {
    let (dev, m) = populated(128 << 20);
    let s = sb(dev.as_ref());
    let leaves = leaves(dev.as_ref(), m.hashed);
    let gen = dinode(dev.as_ref(), m.hashed).generation;
    let (a, b) = (leaves[0], leaves[leaves.len() - 1]);
    let mut la = dir::Leaf::decode(&block(dev.as_ref(), a), a, m.hashed, s.fsid()).unwrap();
    let mut lb = dir::Leaf::decode(&block(dev.as_ref(), b), b, m.hashed, s.fsid()).unwrap();
    let e = la.entries.remove(0);
    lb.entries.push(e);
    lb.entries.sort_by(|x, y| x.key().cmp(&y.key()));
    put(dev.as_ref(), a, &la.encode(BS as u32, a, gen, s.fsid()).unwrap());
    put(dev.as_ref(), b, &lb.encode(BS as u32, b, gen, s.fsid()).unwrap());
    let r = assert_repairs(&dev, Kind::Directory);
    assert!(r.of(Kind::Directory).any(|f| f.message.contains("hash does not map")), "{}", show(&r));
    lookup_all(&dev, &m);
}

#[test]
fn duplicate_name_is_dropped() {
    let (dev, m) = populated(128 << 20);
    let (d, mut e) = root_entries(dev.as_ref(), m.root);
    // a second "small.txt"... the inline decoder refuses duplicates, so name
    // the fifo with a fresh entry pointing at small instead, and duplicate by
    // writing two entries with the same name and different inodes unsorted
    let dup = Entry::new(b"small.txt", m.fifo, dir::DT_FIFO);
    e.push(dup);
    e.sort_by(|a, b| a.key().cmp(&b.key()).then(a.ino.cmp(&b.ino)));
    let mut d2 = d.clone();
    d2.payload.fill(0);
    dir::encode_entries(&e, &mut d2.payload).unwrap();
    d2.entries = e.len() as u64;
    put_dinode(dev.as_ref(), &d2);
    let r = assert_repairs(&dev, Kind::Directory);
    assert!(r.of(Kind::Directory).any(|f| f.message.contains("salvaged")), "{}", show(&r));
}

#[test]
fn entry_naming_a_non_inode_is_removed() {
    let (dev, m) = populated(128 << 20);
    let (d, mut e) = root_entries(dev.as_ref(), m.root);
    let data = dinode(dev.as_ref(), m.other_big).ptr(0);
    e.push(Entry::new(b"bogus", data, dir::DT_REG));
    e.push(Entry::new(b"far-away", 3, dir::DT_REG));
    put_root_entries(dev.as_ref(), d, e);
    // other.bin still owns its block
    let r = assert_repairs_then(&dev, Kind::BadDinode, |_| assert_eq!(state(dev.as_ref(), data), BlockState::Used));
    assert!(r.of(Kind::BadDinode).any(|f| f.message.contains("bogus")), "{}", show(&r));
    assert!(r.of(Kind::DirEntry).any(|f| f.message.contains("far-away")), "{}", show(&r));
}

#[test]
fn wrong_entry_type_is_corrected() {
    let (dev, m) = populated(128 << 20);
    let (d, mut e) = root_entries(dev.as_ref(), m.root);
    for x in e.iter_mut().filter(|x| x.name == b"sub") {
        x.dtype = dir::DT_REG;
    }
    put_root_entries(dev.as_ref(), d, e);
    assert_repairs(&dev, Kind::DirEntry);
}

#[test]
fn orphan_inode_is_freed() {
    let (dev, m) = populated(128 << 20);
    let (d, mut e) = root_entries(dev.as_ref(), m.root);
    let data = dinode(dev.as_ref(), m.other_big).ptr(0);
    e.retain(|x| x.name != b"other.bin");
    put_root_entries(dev.as_ref(), d, e);
    let r = assert_repairs_then(&dev, Kind::Orphan, |_| {
        assert_eq!(state(dev.as_ref(), m.other_big), BlockState::Free);
        assert_eq!(state(dev.as_ref(), data), BlockState::Free);
    });
    assert!(r.of(Kind::Orphan).any(|f| f.ino == Some(m.other_big) && f.message.contains("40 blocks")), "{}", show(&r));
    assert!(r.of(Kind::LeakedBlocks).next().is_none(), "the orphan's blocks are part of its finding:\n{}", show(&r));
}

#[test]
fn directory_parent_pointer_is_fixed() {
    let (dev, m) = populated(128 << 20);
    let mut d = dinode(dev.as_ref(), m.deep);
    d.parent = m.root;
    put_dinode(dev.as_ref(), &d);
    assert_repairs_then(&dev, Kind::Directory, |_| assert_eq!(dinode(dev.as_ref(), m.deep).parent, m.sub));
}

#[test]
fn directory_named_twice_is_reported_not_corrected() {
    let (dev, m) = populated(128 << 20);
    let (d, mut e) = root_entries(dev.as_ref(), m.root);
    e.push(Entry::new(b"deep-again", m.deep, dir::DT_DIR));
    put_root_entries(dev.as_ref(), d, e);
    let r = run(dev.as_ref(), true);
    assert!(r.of(Kind::DirLinkedTwice).any(|f| !f.fixed && f.ino == Some(m.deep)), "{}", show(&r));
    assert_eq!(r.exit_code() & 4, 4);
    // the root gained a subdirectory link: its nlink was fixed in the same run
    let again = run(dev.as_ref(), true);
    assert_eq!(again.exit_code(), 4, "only the uncorrectable finding remains:\n{}", show(&again));
    assert!(again.findings.iter().all(|f| f.kind == Kind::DirLinkedTwice), "{}", show(&again));
}

#[test]
fn cross_linked_files_lose_the_later_claim() {
    let (dev, m) = populated(128 << 20);
    let s = sb(dev.as_ref());
    // other.bin's first pointer now names one of medium's data blocks
    let medium = dinode(dev.as_ref(), m.medium);
    let stolen = medium.ptr(2);
    let mut o = dinode(dev.as_ref(), m.other_big);
    let lost = o.ptr(0);
    o.set_ptr(0, stolen);
    put_dinode(dev.as_ref(), &o);
    // and an indirect pointer of big.bin names one of other.bin's blocks
    let big = dinode(dev.as_ref(), m.big);
    assert_eq!(big.height, 2);
    let ind = big.ptr(0);
    let mut ib = block(dev.as_ref(), ind);
    let stolen2 = o.ptr(5);
    dinode::set_indirect_ptr(&mut ib, 10, stolen2);
    header::reseal(&mut ib);
    put(dev.as_ref(), ind, &ib);
    assert!(dinode::verify_indirect(&ib, ind, m.big, s.fsid()).is_ok());
    let r = assert_repairs_then(&dev, Kind::CrossLink, |_| assert_eq!(state(dev.as_ref(), lost), BlockState::Free, "other.bin's old block was leaked and freed"));
    assert_eq!(r.of(Kind::CrossLink).count(), 2, "{}", show(&r));
    for b in [stolen, stolen2] {
        assert_eq!(state(dev.as_ref(), b), BlockState::Used);
    }
    // exactly one owner of each block is left pointing at it
    let owners = |b: u64| [m.medium, m.other_big, m.big].iter().filter(|&&i| {
        let d = dinode(dev.as_ref(), i);
        let mut v: Vec<u64> = (0..dinode::dinode_ptrs(BS as u32)).map(|k| d.ptr(k)).collect();
        if d.height == 2 {
            let ib = block(dev.as_ref(), d.ptr(0));
            v.extend((0..dinode::indirect_ptrs(BS as u32)).map(|k| dinode::indirect_ptr(&ib, k)));
        }
        v.contains(&b)
    }).count();
    assert_eq!(owners(stolen), 1);
    assert_eq!(owners(stolen2), 1);
}

#[test]
fn out_of_range_pointers_are_cleared() {
    let (dev, m) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    let mut d = dinode(dev.as_ref(), m.medium);
    let old = d.ptr(1);
    d.set_ptr(1, g.journal_start + 3);
    d.set_ptr(7, g.block_count + 100);
    put_dinode(dev.as_ref(), &d);
    let r = assert_repairs_then(&dev, Kind::BadPointer, |_| {
        let d = dinode(dev.as_ref(), m.medium);
        assert_eq!((d.ptr(1), d.ptr(7)), (0, 0));
        assert_eq!(state(dev.as_ref(), old), BlockState::Free);
    });
    assert_eq!(r.of(Kind::BadPointer).count(), 2, "{}", show(&r));
}

#[test]
fn corrupt_indirect_block_is_cut_off() {
    let (dev, m) = populated(128 << 20);
    let ind = dinode(dev.as_ref(), m.big).ptr(1);
    flip(dev.as_ref(), ind, 900);
    let r = assert_repairs(&dev, Kind::BadPointer);
    assert!(r.of(Kind::BadPointer).any(|f| f.message.contains("does not verify")), "{}", show(&r));
}

#[test]
fn recreates_a_destroyed_root() {
    let (dev, m) = populated(128 << 20);
    put(dev.as_ref(), m.root, &vec![0u8; BS]);
    let r = assert_repairs(&dev, Kind::Root);
    assert!(r.of(Kind::Orphan).count() > 5, "everything below the root is orphaned:\n{}", show(&r));
}

#[test]
fn dirty_journal_is_replayed() {
    let dev = mcfs_node::testutil::mem_fs(128 << 20, 2);
    let fs = mount(dev.clone());
    let root = fs.root_ino();
    let a = fs.create(root, b"journaled", 0o644, Caller::ROOT).unwrap();
    fs.write(a.ino, 0, &vec![4u8; 3 * BS]).unwrap();
    fs.mkdir(root, b"newdir", 0o755, Caller::ROOT).unwrap();
    fs.sync_all().unwrap();
    let crashed = snapshot(&dev);
    drop(fs);
    let r = run(crashed.as_ref(), false);
    assert!(r.of(Kind::Journal).any(|f| f.message.contains("dirty")), "{}", show(&r));
    assert_eq!(r.journals.iter().filter(|j| j.state == "dirty").count(), 1);
    // Checked as replayed: the new file is found and everything adds up.
    assert_eq!(r.findings.len(), 1, "{}", show(&r));
    assert_eq!(r.stats.files, 1);
    let y = assert_repairs(&crashed, Kind::Journal);
    assert_eq!(y.findings.len(), 1, "{}", show(&y));
    let fs = mount(crashed.clone());
    let a = fs.lookup(fs.root_ino(), b"journaled").unwrap();
    assert_eq!(fs.read(a.ino, 0, 10).unwrap(), vec![4u8; 10]);
    fs.unmount().unwrap();
}

#[test]
fn unlinked_open_inode_is_freed_after_a_crash() {
    let dev = mcfs_node::testutil::mem_fs(128 << 20, 1);
    let fs = mount(dev.clone());
    let root = fs.root_ino();
    let a = fs.create(root, b"tmpfile", 0o644, Caller::ROOT).unwrap();
    fs.write(a.ino, 0, &vec![8u8; 20 * BS]).unwrap();
    fs.sync_all().unwrap();
    // still open: the unlink leaves it Unlinked, awaiting the last close
    fs.unlink(root, b"tmpfile").unwrap();
    fs.sync_all().unwrap();
    let crashed = snapshot(&dev);
    drop(fs);
    let data = {
        // the data block as the journal will have it after replay
        let r = run(crashed.as_ref(), false);
        assert!(r.of(Kind::Unlinked).any(|f| f.ino == Some(a.ino) && f.message.contains("awaiting deallocation")), "{}", show(&r));
        assert!(r.of(Kind::Journal).next().is_some(), "{}", show(&r));
        r
    };
    assert!(data.of(Kind::LeakedBlocks).next().is_none(), "{}", show(&data));
    let y = assert_repairs_then(&crashed, Kind::Unlinked, |_| assert_eq!(state(crashed.as_ref(), a.ino), BlockState::Free));
    assert!(y.of(Kind::Journal).next().is_some(), "-y replays first:\n{}", show(&y));
}

#[test]
fn journal_without_a_commit_is_reset() {
    let (dev, _) = populated(128 << 20);
    let g = sb(dev.as_ref()).geometry;
    let start = g.journal_block(1);
    for b in start..start + g.journal_blocks as u64 {
        put(dev.as_ref(), b, &vec![0u8; BS]);
    }
    assert_repairs(&dev, Kind::Journal);
}
