//! Pass 5: directories and inode fields.
//!
//! * A directory whose entries changed or whose structure is damaged is
//!   rewritten: an inline one in place; a hashed one rebuilt from its entries
//!   (extendible hashing as the node does it: a leaf splits by the next hash bit
//!   until its entries fit, chains overflow leaves when it cannot split), reusing
//!   its own blocks first and allocating more near it only if needed.
//! * Then every live inode's fields are compared with what the walk counted:
//!   nlink (files: the entries naming them; directories: 2 + subdirectories),
//!   blocks (blocks claimed, dinode excluded), entries, the parent pointer of a
//!   directory, and the size of a file whose mapped blocks reach past it.

use mcfs_format::dinode::{self, FLAG_HASHED_DIR, FLAG_INLINE};
use mcfs_format::dir::{self, Entry, Leaf};

use crate::inodes::max_dir_depth;
use crate::report::Kind;
use crate::tree::update_dinode;
use crate::{Ctx, Result};

/// One group of a rebuilt hash table: entries whose hashes share `depth`
/// leading bits equal to `prefix`, in a chain of one or more leaves.
struct Group {
    prefix: u64,
    depth: u8,
    chain: Vec<Vec<Entry>>,
}

fn pack(entries: &[Entry], cap: usize) -> Vec<Vec<Entry>> {
    let mut out = vec![Vec::new()];
    let mut used = 0;
    for e in entries {
        if used + e.size() > cap {
            out.push(Vec::new());
            used = 0;
        }
        used += e.size();
        if let Some(l) = out.last_mut() {
            l.push(e.clone());
        }
    }
    out
}

/// Split sorted `entries` (all sharing `depth` leading hash bits) until each
/// group fits one leaf or cannot be split further.
fn split(entries: &[Entry], prefix: u64, depth: u8, maxd: u8, cap: usize, out: &mut Vec<Group>) {
    if dir::entries_size(entries) <= cap || depth >= maxd {
        out.push(Group { prefix, depth, chain: pack(entries, cap) });
        return;
    }
    let bit = 31 - depth as u32;
    let p = entries.partition_point(|e| (e.hash >> bit) & 1 == 0);
    split(&entries[..p], prefix << 1, depth + 1, maxd, cap, out);
    split(&entries[p..], (prefix << 1) | 1, depth + 1, maxd, cap, out);
}

/// Rebuild hashed directory `ino` from `entries` (sorted by key). Returns false
/// when there was no room.
fn rebuild_hashed(ctx: &mut Ctx<'_>, ino: u64, entries: &[Entry]) -> Result<bool> {
    let bs = ctx.bs;
    let cap = dir::leaf_capacity(bs);
    let per = dir::hash_ptrs_per_block(bs);
    let maxd = max_dir_depth(bs);
    let mut groups = Vec::new();
    split(entries, 0, 0, maxd, cap, &mut groups);
    let gdepth = groups.iter().map(|g| g.depth).max().unwrap_or(0);
    let nslots = 1usize << gdepth;
    let nhash = nslots.div_ceil(per);
    let nleaves: usize = groups.iter().map(|g| g.chain.len()).sum();
    let Some(i) = ctx.inodes.get(&ino) else { return Ok(false) };
    let generation = i.generation;
    let mut avail: Vec<u64> = i.dir.as_ref().map(|d| d.hash_blocks.iter().chain(d.leaves.iter()).copied().collect()).unwrap_or_default();
    avail.retain(|b| ctx.map.owner_of(*b) == Some(ino) && ctx.map.is_claimed(*b));
    avail.sort_unstable();
    avail.dedup();
    let need = nhash + nleaves;
    let mut blocks: Vec<u64> = avail.iter().copied().take(need).collect();
    let mut fresh = Vec::new();
    while blocks.len() < need {
        match ctx.map.alloc(ino, ino) {
            Some(b) => {
                blocks.push(b);
                fresh.push(b);
            }
            None => {
                for b in fresh {
                    ctx.map.release(b);
                }
                return Ok(false);
            }
        }
    }
    for b in avail.iter().skip(need) {
        ctx.map.release(*b);
    }
    let (hash_blks, leaf_blks) = blocks.split_at(nhash);
    let mut table = vec![0u64; nslots];
    let mut li = 0;
    for g in &groups {
        let first = li;
        for (j, chunk) in g.chain.iter().enumerate() {
            let blk = leaf_blks[li];
            let next = if j + 1 < g.chain.len() { leaf_blks[li + 1] } else { 0 };
            let leaf = Leaf { owner: ino, depth: g.depth as u16, next, entries: chunk.clone() };
            if let Some(enc) = leaf.encode(bs, blk, generation, ctx.fsid) {
                ctx.io.put(blk, enc);
            }
            li += 1;
        }
        let w = 1usize << (gdepth - g.depth);
        let start = (g.prefix as usize) << (gdepth - g.depth);
        for s in table.iter_mut().skip(start).take(w) {
            *s = leaf_blks[first];
        }
    }
    for (k, hb) in hash_blks.iter().enumerate() {
        let ptrs = &table[k * per..((k + 1) * per).min(nslots)];
        ctx.io.put(*hb, dir::encode_hash_block(ptrs, bs, *hb, ino, k as u32, generation, ctx.fsid));
    }
    let n = entries.len() as u64;
    update_dinode(ctx, ino, |d| {
        d.flags = (d.flags & !FLAG_INLINE) | FLAG_HASHED_DIR;
        d.height = 1;
        d.dir_depth = gdepth;
        d.payload.fill(0);
        for (k, hb) in hash_blks.iter().enumerate() {
            d.set_ptr(k, *hb);
        }
        d.entries = n;
        d.blocks = need as u64;
        d.size = bs as u64;
    })?;
    if let Some(i) = ctx.inodes.get_mut(&ino) {
        i.flags = (i.flags & !FLAG_INLINE) | FLAG_HASHED_DIR;
        i.height = 1;
        i.dir_depth = gdepth;
        i.entries = n;
        i.blocks = need as u64;
        i.counted = need as u64;
        i.size = bs as u64;
        if let Some(dd) = i.dir.as_mut() {
            dd.hash_blocks = hash_blks.to_vec();
            dd.leaves = leaf_blks.to_vec();
        }
    }
    Ok(true)
}

/// Rewrite directory `ino` from its (final) entries.
fn rewrite_dir(ctx: &mut Ctx<'_>, ino: u64) -> Result<()> {
    let Some(i) = ctx.inodes.get(&ino) else { return Ok(()) };
    let Some(dd) = i.dir.as_ref() else { return Ok(()) };
    let entries = dd.entries.clone();
    let problems = dd.problems.clone();
    let inline = i.is_inline();
    let fits_inline = dir::entries_size(&entries) <= dinode::payload_size(ctx.bs);
    let done = if inline && fits_inline {
        let n = entries.len() as u64;
        update_dinode(ctx, ino, |d| {
            d.payload.fill(0);
            let _ = dir::encode_entries(&entries, &mut d.payload);
            d.entries = n;
        })?;
        if let Some(i) = ctx.inodes.get_mut(&ino) {
            i.entries = n;
        }
        true
    } else {
        rebuild_hashed(ctx, ino, &entries)?
    };
    if !problems.is_empty() {
        let mut what = problems.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
        if problems.len() > 3 {
            what.push_str(&format!("; and {} more", problems.len() - 3));
        }
        if done {
            ctx.find(Kind::Directory, Some(ino), Some(ino), true, format!("directory {ino}: {what}: rebuilt with {} entries", entries.len()));
        } else {
            ctx.find(Kind::Directory, Some(ino), Some(ino), false, format!("directory {ino}: {what}: no free space to rebuild it"));
        }
    } else if !done {
        ctx.find(Kind::Directory, Some(ino), Some(ino), false, format!("directory {ino}: entries changed but there is no free space to rewrite it"));
    }
    Ok(())
}

/// Pass 5.
pub fn fix_inodes(ctx: &mut Ctx<'_>) -> Result<()> {
    let order = ctx.order.clone();
    let n = order.len() as u64;
    for (k, &ino) in order.iter().enumerate() {
        let needs = ctx.inodes.get(&ino).and_then(|i| i.dir.as_ref()).is_some_and(|d| d.dirty || !d.problems.is_empty());
        if needs {
            rewrite_dir(ctx, ino)?;
        }
        if k % 4096 == 0 {
            ctx.progress("inode fields", k as u64, n);
        }
    }
    let bs = ctx.bs as u64;
    for &ino in &order {
        let Some(i) = ctx.inodes.get(&ino) else { continue };
        let mut msgs: Vec<(Kind, String)> = Vec::new();
        let want_nlink = if i.is_dir() { 2u32.saturating_add(i.subdirs) } else { i.links };
        let nlink = (i.nlink != want_nlink).then_some(want_nlink);
        if let Some(w) = nlink {
            msgs.push((Kind::LinkCount, format!("inode {ino}: nlink {} should be {w}; fixed", i.nlink)));
        }
        let blocks = (i.blocks != i.counted).then_some(i.counted);
        if let Some(w) = blocks {
            msgs.push((Kind::BlockCount, format!("inode {ino}: block count {} should be {w}; fixed", i.blocks)));
        }
        let mut entries = None;
        let mut parent = None;
        if let Some(dd) = &i.dir {
            let n = dd.entries.len() as u64;
            if i.entries != n {
                entries = Some(n);
                msgs.push((Kind::Directory, format!("directory {ino}: entry count {} should be {n}; fixed", i.entries)));
            }
            if let Some(p) = i.first_parent {
                if i.parent != p {
                    parent = Some(p);
                    msgs.push((Kind::Directory, format!("directory {ino}: parent pointer {} should be {p}; fixed", i.parent)));
                }
            }
        }
        let mut size = None;
        if !i.is_dir() {
            if let Some(m) = i.max_lblk {
                if i.size <= m.saturating_mul(bs) {
                    let w = (m + 1).saturating_mul(bs);
                    size = Some(w);
                    msgs.push((Kind::Size, format!("inode {ino}: size {} does not reach its block at logical block {m}; set to {w}", i.size)));
                }
            }
        }
        if msgs.is_empty() {
            continue;
        }
        update_dinode(ctx, ino, |d| {
            if let Some(v) = nlink {
                d.nlink = v;
            }
            if let Some(v) = blocks {
                d.blocks = v;
            }
            if let Some(v) = entries {
                d.entries = v;
            }
            if let Some(v) = parent {
                d.parent = v;
            }
            if let Some(v) = size {
                d.size = v;
            }
        })?;
        for (k, m) in msgs {
            ctx.find(k, Some(ino), None, true, m);
        }
    }
    ctx.progress("inode fields", n, n);
    Ok(())
}
