//! Formatting a device (the library half of `mkfs.mcfs`; tests use it too).
//! Only metadata is written: rgrp headers and bitmaps, one clean commit per
//! journal, the root directory, and the superblock pair, last, so that an
//! interrupted mkfs leaves nothing that looks like a filesystem.

use mcfs_blockdev::BlockDevice;
use mcfs_format::dinode::{Dinode, S_IFDIR};
use mcfs_format::geometry::{Geometry, MkfsOptions};
use mcfs_format::journal::{Commit, FLAG_CLEAN};
use mcfs_format::rgrp::{self, BlockState, RgrpHeader, BITMAP_DATA_OFFSET};
use mcfs_format::sb::{LockProto, Superblock};

use crate::error::{FsError, Result};

#[derive(Debug, Clone)]
pub struct MkfsParams {
    pub opts: MkfsOptions,
    pub lock_proto: LockProto,
    pub cluster: String,
    pub fsname: String,
    /// None: random.
    pub uuid: Option<[u8; 16]>,
}

impl Default for MkfsParams {
    fn default() -> Self {
        MkfsParams { opts: MkfsOptions::default(), lock_proto: LockProto::Dlm, cluster: "mcfs".into(), fsname: "fs".into(), uuid: None }
    }
}

/// A filesystem signature found on a device (mkfs refuses to overwrite it
/// without -f).
pub fn detect_signature(dev: &dyn BlockDevice) -> Result<Option<String>> {
    let n = (128 * 1024u64).min(dev.size()) as usize;
    let n = n - n % dev.sector_size().max(512) as usize;
    if n == 0 {
        return Ok(None);
    }
    let mut b = vec![0u8; n];
    dev.read_at(0, &mut b)?;
    let at = |off: usize, sig: &[u8]| b.get(off..off + sig.len()) == Some(sig);
    if at(65536, b"MCFS") {
        return Ok(Some("an mcfs filesystem".into()));
    }
    if at(1080, &[0x53, 0xef]) {
        return Ok(Some("an ext2/3/4 filesystem".into()));
    }
    if at(0, b"XFSB") {
        return Ok(Some("an XFS filesystem".into()));
    }
    if at(65600, b"_BHRfS_M") {
        return Ok(Some("a btrfs filesystem".into()));
    }
    if at(65536, &[0x01, 0x16, 0x19, 0x70]) {
        return Ok(Some("a GFS2 filesystem".into()));
    }
    if at(4086, b"SWAPSPACE2") {
        return Ok(Some("a swap area".into()));
    }
    Ok(None)
}

fn random_uuid() -> [u8; 16] {
    let mut u: [u8; 16] = rand::random();
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Format `dev`. `progress(done, total)` is called as rgrps are written.
pub fn mkfs(dev: &dyn BlockDevice, p: &MkfsParams, progress: &mut dyn FnMut(u64, u64)) -> Result<Superblock> {
    let g = Geometry::compute(dev.size(), dev.sector_size(), &p.opts).map_err(|e| FsError::Invalid(e.to_string()))?;
    let uuid = p.uuid.unwrap_or_else(random_uuid);
    let root = g.rgrp(0).ok_or_else(|| FsError::Invalid("no resource group".into()))?.data_start;
    let sb = Superblock { uuid, geometry: g, root_ino: root, created: crate::inode::now().sec as u64, lock_proto: p.lock_proto, cluster: p.cluster.clone(), fsname: p.fsname.clone() };
    let fsid = sb.fsid();
    let bs = g.block_size as usize;
    // The reserved area first: old signatures must not survive.
    let zero = vec![0u8; (g.sb_block as usize * bs).max(bs)];
    dev.write_at(0, &zero[..g.sb_block as usize * bs])?;
    let total = g.rgrp_count as u64;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    let flush_batch = |batch: &mut Vec<(u64, Vec<u8>)>| -> Result<()> {
        let reqs: Vec<(u64, &[u8])> = batch.iter().map(|(b, d)| (*b * bs as u64, d.as_slice())).collect();
        dev.write_many(&reqs)?;
        batch.clear();
        Ok(())
    };
    for l in g.rgrps() {
        let mut hdr = RgrpHeader::new(&l);
        for i in 0..l.bitmap_blocks {
            let mut b = rgrp::encode_bitmap_block(&l, g.block_size, i, 1, fsid);
            if l.index == 0 && i == 0 {
                rgrp::set_bits(&mut b[BITMAP_DATA_OFFSET..], 0, BlockState::Dinode);
                rgrp::seal_bitmap_block(&mut b, &l, 0, 1, fsid);
                hdr.free -= 1;
                hdr.dinodes += 1;
            }
            batch.push((l.bitmap_block(i), b));
        }
        batch.push((l.start, hdr.encode(g.block_size, l.start, fsid)));
        if batch.len() >= 256 {
            flush_batch(&mut batch)?;
        }
        progress(l.index as u64 + 1, total);
    }
    for j in 0..g.journal_count {
        let blk = g.journal_block(j);
        let c = Commit { seq: 1, tail_seq: 1, tail_pos: 0, blocks: 0, data_crc: 0, flags: FLAG_CLEAN, time_ns: 0, node_id: 0 };
        batch.push((blk, c.encode(g.block_size, blk, fsid)));
    }
    let t = crate::inode::now();
    let mut d = Dinode::new(root, 1, S_IFDIR | 0o755, g.block_size);
    d.nlink = 2;
    d.parent = root;
    d.atime = t;
    d.mtime = t;
    d.ctime = t;
    batch.push((root, d.encode(g.block_size, fsid)));
    flush_batch(&mut batch)?;
    dev.flush()?;
    // superblocks last
    dev.write_at(g.backup_sb_block() * bs as u64, &sb.encode(g.backup_sb_block()))?;
    dev.write_at(g.sb_block * bs as u64, &sb.encode(g.sb_block))?;
    dev.flush()?;
    Ok(sb)
}
