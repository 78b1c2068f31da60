//! Pass 3: inodes and directories, breadth-first from the root.
//!
//! Each round reads, in one batch, every dinode named by the directories of the
//! previous round (sorted, so neighbours merge into large reads), then the
//! hash-table blocks of the new hashed directories in one batch, their leaves in
//! another, and their overflow chains round by round. An entry whose target is
//! outside the data area or does not decode as a dinode is removed; an entry
//! whose type disagrees with its inode is corrected.
//!
//! Trust rules: a dinode whose checksum or fields fail is not an inode (its
//! names are removed, its blocks freed): nothing in it can be trusted. A
//! directory leaf or hash-table block whose checksum fails but whose header
//! (magic, type, self-address, filesystem, owner) is intact is *salvaged*:
//! every entry carries its own check (its hash is the CRC32C of its name) and
//! must still name a valid inode, and every leaf pointer must lead to a leaf of
//! the same directory; the directory is then rebuilt. Anything structurally
//! wrong in a hashed directory (depths, slot runs, misplaced entries,
//! duplicates, missing leaves) also gets it rebuilt from the entries found.
//!
//! Finally every block the bitmaps mark as an inode that the walk did not
//! reach is read: unlinked inodes awaiting deallocation and orphans (in use,
//! named by nothing) are queued to be freed.

use std::collections::{BTreeMap, HashMap, HashSet};

use mcfs_format::dinode::{self, Dinode, S_IFDIR};
use mcfs_format::dir::{self, Entry, Leaf, ENTRY_HEADER, LEAF_ENTRIES_OFFSET};
use mcfs_format::header::{self, BlockType, MAGIC};
use mcfs_format::rgrp::BlockState;

use crate::report::Kind;
use crate::{Ctx, Ino, Result};

/// What the walk learned about a directory's contents.
#[derive(Debug, Clone, Default)]
pub struct DirData {
    /// Entries, sorted by (hash, name), names unique.
    pub entries: Vec<Entry>,
    /// Hash-table blocks it owns (verified or salvaged).
    pub hash_blocks: Vec<u64>,
    /// Leaves it owns (verified or salvaged), overflow leaves included.
    pub leaves: Vec<u64>,
    /// Structural problems: when any, the directory is rebuilt.
    pub problems: Vec<String>,
    /// Entries changed (removed, retyped, salvaged): the directory is rewritten.
    pub dirty: bool,
}

/// The deepest hash table a dinode can point at (as the node computes it).
pub fn max_dir_depth(bs: u32) -> u8 {
    let slots = dinode::dinode_ptrs(bs) * dir::hash_ptrs_per_block(bs);
    let mut d = 0u8;
    while (1usize << (d + 1)) <= slots && d < dir::MAX_DIR_DEPTH {
        d += 1;
    }
    d
}

/// Entries of a damaged entry area, each checked on its own: valid name,
/// hash matching the name, non-zero inode. Returns (entries, rejected).
pub fn salvage_entries(area: &[u8]) -> (Vec<Entry>, usize) {
    let mut v = Vec::new();
    let mut bad = 0;
    let mut off = 0usize;
    while let Some(h) = area.get(off..off + ENTRY_HEADER) {
        let len = h[13] as usize;
        if len == 0 {
            break; // the zero fill after the last entry
        }
        let Some(name) = area.get(off + ENTRY_HEADER..off + ENTRY_HEADER + len) else { break };
        let e = Entry { hash: mcfs_format::le_u32(h, 0), ino: mcfs_format::le_u64(h, 4), dtype: h[12], name: name.to_vec() };
        if dir::valid_name(name) && e.hash == dir::name_hash(name) && e.ino != 0 {
            v.push(e);
        } else {
            bad += 1;
        }
        off += ENTRY_HEADER + len;
    }
    (v, bad)
}

/// Sort by (hash, name) and drop repeated names (keeping the first seen).
/// Returns the names dropped.
pub fn sort_dedup(entries: &mut Vec<Entry>) -> Vec<Entry> {
    entries.sort_by(|a, b| a.key().cmp(&b.key()));
    let mut dropped = Vec::new();
    let mut out: Vec<Entry> = Vec::with_capacity(entries.len());
    for e in entries.drain(..) {
        if out.last().is_some_and(|p| p.name == e.name) {
            dropped.push(e);
        } else {
            out.push(e);
        }
    }
    *entries = out;
    dropped
}

fn inline_dir(d: &Dinode) -> DirData {
    let mut dd = DirData::default();
    match dir::decode_entries(&d.payload, d.entries as usize, "inline directory", d.ino) {
        Ok(v) => dd.entries = v,
        Err(e) => {
            let (mut v, bad) = salvage_entries(&d.payload);
            let dups = sort_dedup(&mut v);
            dd.problems.push(format!("inline entries do not decode ({e}); {} entries salvaged, {} rejected", v.len(), bad + dups.len()));
            dd.entries = v;
            dd.dirty = true;
        }
    }
    dd
}

/// A decoded dinode, as much as later passes need of it.
pub fn ino_of(d: &Dinode, bs: u32) -> Ino {
    let ptrs = if d.is_inline() {
        Vec::new()
    } else {
        (0..dinode::dinode_ptrs(bs)).filter_map(|i| {
            let p = d.ptr(i);
            (p != 0).then_some((i as u16, p))
        }).collect()
    };
    let dir = if d.is_dir() && d.is_inline() { Some(inline_dir(d)) } else { None };
    Ino {
        ino: d.ino,
        generation: d.generation,
        mode: d.mode,
        nlink: d.nlink,
        size: d.size,
        blocks: d.blocks,
        flags: d.flags,
        height: d.height,
        dir_depth: d.dir_depth,
        entries: d.entries,
        parent: d.parent,
        ptrs,
        dir,
        ..Default::default()
    }
}

/// Read and decode `inos` in one batch; valid ones go to `ctx.inodes`, others
/// to `ctx.bad`. Returns the valid ones, in the order given.
fn load_inodes(ctx: &mut Ctx<'_>, inos: &[u64], freeing: bool) -> Result<Vec<u64>> {
    let mut got: HashMap<u64, std::result::Result<Ino, String>> = HashMap::with_capacity(inos.len());
    let (fsid, bs) = (ctx.fsid, ctx.bs);
    ctx.io.read_batch(inos, &mut |b, buf| {
        let r = Dinode::decode(buf, b, fsid).map(|d| ino_of(&d, bs)).map_err(|e| e.to_string());
        got.insert(b, r);
    })?;
    let mut ok = Vec::new();
    for &i in inos {
        match got.remove(&i) {
            Some(Ok(mut ino)) => {
                if freeing {
                    ino.freeing = Some(String::new());
                }
                ctx.inodes.insert(i, ino);
                ok.push(i);
            }
            Some(Err(e)) => {
                ctx.bad.insert(i, e);
            }
            None => {
                if !ctx.inodes.contains_key(&i) {
                    ctx.bad.entry(i).or_insert_with(|| "beyond the end of the device".into());
                }
            }
        }
    }
    Ok(ok)
}

/// One leaf as read.
struct LeafInfo {
    depth: u16,
    next: u64,
    entries: Vec<Entry>,
}

/// Working state for one hashed directory.
struct Hashed {
    ino: u64,
    /// Global depth, when it is usable.
    depth: Option<u8>,
    table: Vec<u64>,
    problems: Vec<String>,
    hash_owned: Vec<u64>,
    leaves: BTreeMap<u64, LeafInfo>,
}

fn intact_header(buf: &[u8], ty: BlockType, blk: u64, fsid: u32, owner: u64) -> bool {
    header::peek(buf).is_some_and(|(magic, t, _, b, _, f, _)| magic == MAGIC && t == ty as u16 && b == blk && f == fsid) && mcfs_format::le_u64(buf, 32) == owner
}

/// Read the hash tables and leaves of the hashed (non-inline) directories in
/// `dirs`, in batches across all of them, and fill in their `dir` data.
fn load_hashed(ctx: &mut Ctx<'_>, dirs: &[u64]) -> Result<()> {
    let bs = ctx.bs;
    let fsid = ctx.fsid;
    let per = dir::hash_ptrs_per_block(bs);
    let maxd = max_dir_depth(bs);
    let mut hs: Vec<Hashed> = Vec::new();
    // hash block reads: block -> [(dir index, table index)]
    let mut want: HashMap<u64, Vec<(usize, usize)>> = HashMap::new();
    for &ino in dirs {
        let Some(i) = ctx.inodes.get(&ino) else { continue };
        let mut h = Hashed { ino, depth: None, table: Vec::new(), problems: Vec::new(), hash_owned: Vec::new(), leaves: BTreeMap::new() };
        if !i.is_hashed() {
            h.problems.push("has a pointer tree instead of entries or a hash table".into());
            hs.push(h);
            continue;
        }
        let nblocks;
        if i.dir_depth <= maxd {
            h.depth = Some(i.dir_depth);
            let nslots = 1usize << i.dir_depth;
            nblocks = nslots.div_ceil(per);
            h.table = vec![0; nslots];
        } else {
            h.problems.push(format!("hash table depth {} exceeds the maximum {maxd}", i.dir_depth));
            nblocks = i.ptrs.len();
            h.table = vec![0; nblocks * per];
        }
        let di = hs.len();
        let present: HashSet<u16> = i.ptrs.iter().map(|p| p.0).collect();
        for k in 0..nblocks.min(dinode::dinode_ptrs(bs)) {
            if !present.contains(&(k as u16)) && h.depth.is_some() {
                h.problems.push(format!("hash table block {k} is missing"));
            }
        }
        for &(k, p) in &i.ptrs {
            if ctx.g.rgrp_of(p).is_none() {
                h.problems.push(format!("hash table block {k} points outside the data area ({p})"));
            } else if h.depth.is_none() || (k as usize) < nblocks {
                want.entry(p).or_default().push((di, k as usize));
            } else {
                h.problems.push(format!("unused hash table pointer {k} ({p})"));
            }
        }
        hs.push(h);
    }
    let blocks: Vec<u64> = want.keys().copied().collect();
    ctx.io.read_batch(&blocks, &mut |b, buf| {
        for &(di, k) in want.get(&b).map(|v| v.as_slice()).unwrap_or(&[]) {
            let h = &mut hs[di];
            let ptrs = match dir::decode_hash_block(buf, b, h.ino, k as u32, fsid) {
                Ok(p) => p,
                Err(e) if intact_header(buf, BlockType::DirHash, b, fsid, h.ino) && mcfs_format::le_u32(buf, 40) == k as u32 => {
                    h.problems.push(format!("hash table block {k} ({b}) salvaged: {e}"));
                    (0..per).map(|i| mcfs_format::le_u64(buf, dir::HASH_PTRS_OFFSET + i * 8)).collect()
                }
                Err(e) => {
                    h.problems.push(format!("hash table block {k} ({b}) does not verify: {e}"));
                    continue;
                }
            };
            if h.hash_owned.contains(&b) {
                h.problems.push(format!("hash table block {b} used twice"));
                continue;
            }
            h.hash_owned.push(b);
            for (j, p) in ptrs.into_iter().enumerate() {
                if let Some(s) = h.table.get_mut(k * per + j) {
                    *s = p;
                }
            }
        }
    })?;
    // Leaves, then overflow chains round by round.
    let mut round: HashMap<u64, Vec<usize>> = HashMap::new();
    for (di, h) in hs.iter_mut().enumerate() {
        let mut seen = HashSet::new();
        let mut bad_slots = 0;
        for &p in &h.table {
            if p != 0 && ctx.g.rgrp_of(p).is_some() {
                if seen.insert(p) {
                    round.entry(p).or_default().push(di);
                }
            } else {
                bad_slots += 1;
            }
        }
        if bad_slots > 0 && !h.hash_owned.is_empty() {
            h.problems.push(format!("{bad_slots} hash table slots point at no leaf"));
        }
    }
    let cap_per_dir = |h: &Hashed| h.table.len() + 65536;
    while !round.is_empty() {
        let blocks: Vec<u64> = round.keys().copied().collect();
        let mut next: HashMap<u64, Vec<usize>> = HashMap::new();
        ctx.io.read_batch(&blocks, &mut |b, buf| {
            for &di in round.get(&b).map(|v| v.as_slice()).unwrap_or(&[]) {
                let h = &mut hs[di];
                if h.leaves.contains_key(&b) {
                    continue;
                }
                let info = match Leaf::decode(buf, b, h.ino, fsid) {
                    Ok(l) => LeafInfo { depth: l.depth, next: l.next, entries: l.entries },
                    Err(e) if intact_header(buf, BlockType::DirLeaf, b, fsid, h.ino) => {
                        let (v, bad) = salvage_entries(buf.get(LEAF_ENTRIES_OFFSET..).unwrap_or(&[]));
                        h.problems.push(format!("leaf {b} damaged ({e}): {} entries salvaged, {bad} rejected", v.len()));
                        LeafInfo { depth: (mcfs_format::le_u32(buf, 40) & 0xffff) as u16, next: mcfs_format::le_u64(buf, 48), entries: v }
                    }
                    Err(e) => {
                        h.problems.push(format!("leaf {b} does not verify: {e}"));
                        continue;
                    }
                };
                if info.next != 0 {
                    if h.leaves.contains_key(&info.next) || info.next == b {
                        h.problems.push(format!("leaf chain loops at {b}"));
                    } else if ctx.g.rgrp_of(info.next).is_none() {
                        h.problems.push(format!("leaf {b} chains to {} outside the data area", info.next));
                    } else if h.leaves.len() < cap_per_dir(h) {
                        next.entry(info.next).or_default().push(di);
                    } else {
                        h.problems.push("leaf chains too long".into());
                    }
                }
                h.leaves.insert(b, info);
            }
        })?;
        round = next;
    }
    // Structure and placement, then hand the results over.
    for h in hs {
        let mut h = h;
        let mut entries: Vec<Entry> = Vec::new();
        let mut order: Vec<u64> = Vec::new();
        let mut heads: HashSet<u64> = HashSet::new();
        let mut misplaced = 0u64;
        let n = h.table.len();
        let mut s = 0usize;
        while s < n {
            let blk = h.table[s];
            let Some(l) = h.leaves.get(&blk) else {
                s += 1;
                continue;
            };
            let (start, width) = match h.depth {
                Some(d) if (l.depth as u8) <= d && l.depth <= 32 => {
                    let w = 1usize << (d - l.depth as u8);
                    if !s.is_multiple_of(w) || h.table[s..(s + w).min(n)].iter().any(|&x| x != blk) {
                        h.problems.push(format!("leaf {blk} (depth {}) does not fill an aligned run of {w} slots at slot {s}", l.depth));
                    }
                    (s, w)
                }
                Some(d) => {
                    h.problems.push(format!("leaf {blk} depth {} exceeds the table depth {d}", l.depth));
                    (s, 1)
                }
                None => (s, 1),
            };
            let run_end = (start + width).min(n);
            // every slot of the run that points here belongs to this visit
            let mut e = s + 1;
            while e < run_end && h.table[e] == blk {
                e += 1;
            }
            if !heads.insert(blk) {
                if h.depth.is_some() {
                    h.problems.push(format!("leaf {blk} appears in two places in the hash table"));
                }
                s = e;
                continue;
            }
            // the chain from this head
            let mut c = blk;
            let mut hops = 0usize;
            while c != 0 && hops <= h.leaves.len() {
                let Some(cl) = h.leaves.get(&c) else { break };
                if c != blk && heads.contains(&c) {
                    break;
                }
                if let Some(d) = h.depth {
                    misplaced += cl.entries.iter().filter(|x| {
                        let slot = dir::slot_of(x.hash, d);
                        slot < start || slot >= start + width
                    }).count() as u64;
                }
                entries.extend(cl.entries.iter().cloned());
                order.push(c);
                c = cl.next;
                hops += 1;
            }
            s = e.max(s + 1);
        }
        if misplaced > 0 {
            h.problems.push(format!("{misplaced} entries are in a leaf their hash does not map to"));
        }
        let reached: HashSet<u64> = order.iter().copied().collect();
        for b in h.leaves.keys() {
            if !reached.contains(b) {
                order.push(*b); // a leaf whose chain we lost track of: still ours
            }
        }
        let dups = sort_dedup(&mut entries);
        if !dups.is_empty() {
            h.problems.push(format!("{} duplicate names", dups.len()));
        }
        let dd = DirData { entries, hash_blocks: h.hash_owned, leaves: order, dirty: !h.problems.is_empty(), problems: h.problems };
        if let Some(i) = ctx.inodes.get_mut(&h.ino) {
            i.dir = Some(dd);
        }
    }
    Ok(())
}

/// Recreate the root directory (empty) when it is not a valid directory.
fn recreate_root(ctx: &mut Ctx<'_>, why: String) {
    let root = ctx.sb.root_ino;
    let old_gen = ctx.io.block(root).ok().and_then(|b| header::peek(&b)).map_or(0, |h| h.4);
    let t = mcfs_node::inode::now();
    let mut d = Dinode::new(root, old_gen.wrapping_add(1).max(1), S_IFDIR | 0o755, ctx.bs);
    d.nlink = 2;
    d.parent = root;
    d.atime = t;
    d.mtime = t;
    d.ctime = t;
    ctx.io.put(root, d.encode(ctx.bs, ctx.fsid));
    ctx.bad.remove(&root);
    ctx.inodes.insert(root, ino_of(&d, ctx.bs));
    ctx.find(Kind::Root, Some(root), Some(root), true, format!("root directory {root} is not a valid directory ({why}): recreated empty; everything below it is lost (no lost+found in this version)"));
}

/// Pass 3: the breadth-first walk, then the inodes nothing reached.
pub fn walk(ctx: &mut Ctx<'_>) -> Result<()> {
    let root = ctx.sb.root_ino;
    let expect = ctx.map.rgrps.iter().filter_map(|r| r.header.map(|h| h.dinodes as u64 + h.unlinked as u64)).sum::<u64>().max(1);
    load_inodes(ctx, &[root], false)?;
    match ctx.inodes.get(&root) {
        Some(i) if i.is_dir() => {}
        Some(_) => {
            ctx.inodes.remove(&root);
            recreate_root(ctx, "not a directory".into());
        }
        None => {
            let why = ctx.bad.get(&root).cloned().unwrap_or_default();
            recreate_root(ctx, why);
        }
    }
    ctx.order.push(root);
    let mut level = vec![root];
    while !level.is_empty() {
        ctx.progress("inodes", ctx.order.len() as u64, expect.max(ctx.order.len() as u64));
        let dirs: Vec<u64> = level.iter().copied().filter(|i| ctx.inodes.get(i).is_some_and(|x| x.is_dir())).collect();
        let hashed: Vec<u64> = dirs.iter().copied().filter(|i| ctx.inodes.get(i).is_some_and(|x| x.dir.is_none())).collect();
        load_hashed(ctx, &hashed)?;
        let mut next = Vec::new();
        let mut queued = HashSet::new();
        for d in &dirs {
            let Some(dd) = ctx.inodes.get(d).and_then(|x| x.dir.as_ref()) else { continue };
            for e in &dd.entries {
                if ctx.g.rgrp_of(e.ino).is_some() && !ctx.inodes.contains_key(&e.ino) && !ctx.bad.contains_key(&e.ino) && queued.insert(e.ino) {
                    next.push(e.ino);
                }
            }
        }
        let loaded = load_inodes(ctx, &next, false)?;
        for d in &dirs {
            check_entries(ctx, *d);
        }
        ctx.order.extend(loaded.iter().copied());
        level = loaded;
    }
    count_links(ctx);
    // Inodes the bitmaps know and the walk did not reach.
    let unreached: Vec<u64> = ctx.map.marked_inodes().into_iter().filter(|b| !ctx.inodes.contains_key(b) && !ctx.bad.contains_key(b)).collect();
    if !unreached.is_empty() {
        ctx.progress("unreached inodes", 0, unreached.len() as u64);
        let got = load_inodes(ctx, &unreached, true)?;
        for b in unreached {
            // not inodes at all: the bitmap comparison reports them as leaked
            ctx.bad.remove(&b);
        }
        let dirs: Vec<u64> = got.iter().copied().filter(|i| ctx.inodes.get(i).is_some_and(|x| x.is_dir() && x.dir.is_none())).collect();
        load_hashed(ctx, &dirs)?;
        for i in got {
            let unlinked = ctx.map.cur_state(i) == Some(BlockState::Unlinked);
            if let Some(x) = ctx.inodes.get_mut(&i) {
                x.freeing = Some(if unlinked { "unlinked".into() } else { "orphan".into() });
            }
            ctx.freeing.push(i);
        }
        ctx.freeing.sort_unstable();
    }
    Ok(())
}

/// Drop entries naming no valid inode; correct entry types.
fn check_entries(ctx: &mut Ctx<'_>, d: u64) {
    let Some(mut dd) = ctx.inodes.get_mut(&d).and_then(|x| x.dir.take()) else { return };
    let mut msgs: Vec<(Kind, String)> = Vec::new();
    dd.entries.retain_mut(|e| {
        let name = || String::from_utf8_lossy(&e.name).into_owned();
        match ctx.inodes.get(&e.ino) {
            Some(t) => {
                let want = dir::dtype_of_mode(t.mode);
                if e.dtype != want {
                    msgs.push((Kind::DirEntry, format!("directory {d}: entry '{}' has type {} but inode {} has type {want}: corrected", name(), e.dtype, e.ino)));
                    e.dtype = want;
                }
                true
            }
            None => {
                let why = if ctx.g.rgrp_of(e.ino).is_none() {
                    "outside the data area".to_string()
                } else {
                    ctx.bad.get(&e.ino).cloned().unwrap_or_else(|| "unreadable".into())
                };
                let kind = if ctx.g.rgrp_of(e.ino).is_some() { Kind::BadDinode } else { Kind::DirEntry };
                msgs.push((kind, format!("directory {d}: entry '{}' names block {}, which is not an inode ({why}): removed", name(), e.ino)));
                false
            }
        }
    });
    if !msgs.is_empty() {
        dd.dirty = true;
    }
    if let Some(x) = ctx.inodes.get_mut(&d) {
        x.dir = Some(dd);
    }
    for (k, m) in msgs {
        ctx.find(k, Some(d), None, true, m);
    }
}

/// Link counts, subdirectory counts and first parents from the final entries,
/// in walk order; a directory named twice is reported (not corrected).
fn count_links(ctx: &mut Ctx<'_>) {
    let root = ctx.sb.root_ino;
    if let Some(r) = ctx.inodes.get_mut(&root) {
        r.first_parent = Some(root);
    }
    let order = ctx.order.clone();
    let mut twice: Vec<(u64, u64, usize)> = Vec::new();
    for d in order {
        let targets: Vec<u64> = match ctx.inodes.get(&d).and_then(|x| x.dir.as_ref()) {
            Some(dd) => dd.entries.iter().map(|e| e.ino).collect(),
            None => continue,
        };
        let mut subdirs = 0;
        for (k, t) in targets.into_iter().enumerate() {
            let Some(ti) = ctx.inodes.get_mut(&t) else { continue };
            ti.links += 1;
            if ti.is_dir() {
                subdirs += 1;
                if ti.first_parent.is_none() {
                    ti.first_parent = Some(d);
                } else {
                    twice.push((t, d, k));
                }
            } else if ti.first_parent.is_none() {
                ti.first_parent = Some(d);
            }
        }
        if let Some(x) = ctx.inodes.get_mut(&d) {
            x.subdirs = subdirs;
        }
    }
    for (t, d, k) in twice {
        let name = ctx.inodes.get(&d).and_then(|x| x.dir.as_ref()).and_then(|dd| dd.entries.get(k)).map(|e| String::from_utf8_lossy(&e.name).into_owned()).unwrap_or_default();
        let first = ctx.inodes.get(&t).and_then(|x| x.first_parent).unwrap_or(0);
        ctx.find(
            Kind::DirLinkedTwice,
            Some(t),
            None,
            false,
            format!("directory {t} is named again by entry '{name}' in directory {d} (first reached from {first}): a directory loop or hard link; not corrected"),
        );
    }
}
