//! `mcfs_fsck`: the checker behind `fsck.mcfs`, as a library so tests run it on
//! in-memory devices.
//!
//! [`check`] runs these passes (each module's doc says more):
//! 0. [`superblock`]: primary and backup; a damaged one is rewritten from the other.
//! 1. [`journals`]: each journal's head; a dirty journal is replayed before
//!    anything else is looked at (on the device with `-y`, in memory with `-n`,
//!    so both modes check the filesystem as the next mount would see it).
//! 2. [`blockmap`]: every rgrp header and bitmap block is read and verified; the
//!    current state of every data block is kept, and an expected state is built
//!    by the passes that follow.
//! 3. [`inodes`]: breadth-first from the root, one batch of dinode reads per
//!    directory level; directories' hash tables and leaves are read in batches
//!    too. Then every block still marked as an inode that nothing reached:
//!    unlinked inodes awaiting deallocation and orphans, both freed.
//! 4. [`tree`]: every file's pointer tree, level by level across all files;
//!    blocks are claimed (dinodes, then directory blocks, then indirect blocks,
//!    then data), so a block claimed twice is found and the later claim cleared.
//! 5. [`repair`]: directories rewritten where their entries or structure
//!    changed, link counts, block counts, sizes and parent pointers.
//! 6. [`blockmap`] again: the expected states are compared with the bitmaps and
//!    the rgrp headers' counts; differences are reported and rewritten.
//!
//! Every repair goes to an in-memory [`io::Overlay`]; `-y` writes it out at the
//! end (superblocks last) and flushes. fsck must not run on a mounted
//! filesystem: nothing on disk says whether a node has it mounted (a dirty
//! journal may be a live node's), so that is the operator's duty, as with
//! fsck.gfs2.
//!
//! No lost+found in this version: an inode that no directory entry names is
//! freed with its blocks (reported as an orphan).

pub mod blockmap;
pub mod io;
pub mod inodes;
pub mod journals;
pub mod repair;
pub mod report;
pub mod superblock;
pub mod tree;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use mcfs_blockdev::BlockDevice;
use mcfs_format::geometry::Geometry;
use mcfs_format::sb::Superblock;

pub use report::{Finding, JournalState, Kind, Report, Stats, EXIT_CLEAN, EXIT_CORRECTED, EXIT_OPERATIONAL, EXIT_UNCORRECTED};

/// The crate's error: what stops a check (an operational error, exit 8).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("I/O error: {0}")]
    Io(#[from] mcfs_blockdev::Error),
    #[error("journal: {0}")]
    Journal(#[from] mcfs_node::FsError),
    #[error("{0}")]
    NotMcfs(String),
}

pub type Result<T, E = FsckError> = std::result::Result<T, E>;

/// Progress callback: (phase, done, total).
pub type ProgressFn = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// How to check.
#[derive(Clone, Default)]
pub struct Options {
    /// Write repairs (-y). Otherwise nothing is written (-n).
    pub repair: bool,
    /// Called as work advances.
    pub progress: Option<ProgressFn>,
}

/// Check (and with `opts.repair`, repair) the filesystem on `dev`.
pub fn check(dev: &dyn BlockDevice, opts: &Options) -> Report {
    let t0 = Instant::now();
    let mut report = Report { mode: if opts.repair { "repair" } else { "check" }, ..Default::default() };
    if let Err(e) = run(dev, opts, &mut report) {
        report.operational_error = Some(e.to_string());
    }
    report.stats.elapsed_ms = t0.elapsed().as_millis() as u64;
    report
}

/// What one pass knows about one inode.
#[derive(Debug, Clone, Default)]
pub struct Ino {
    pub ino: u64,
    pub generation: u64,
    pub mode: u32,
    pub nlink: u32,
    pub size: u64,
    pub blocks: u64,
    pub flags: u32,
    pub height: u8,
    pub dir_depth: u8,
    pub entries: u64,
    pub parent: u64,
    /// Non-zero payload pointers (index, block) when not inline.
    pub ptrs: Vec<(u16, u64)>,
    /// Why it is being freed (unlinked or orphan); None for a live inode.
    pub freeing: Option<String>,
    pub dir: Option<inodes::DirData>,
    /// Blocks claimed for it (dinode excluded): what `blocks` should say.
    pub counted: u64,
    /// Highest logical block mapped (pointer trees).
    pub max_lblk: Option<u64>,
    /// Entries naming it.
    pub links: u32,
    /// Entries in it naming directories (directories only).
    pub subdirs: u32,
    /// The directory whose entry reached it first.
    pub first_parent: Option<u64>,
}

impl Ino {
    pub fn is_dir(&self) -> bool {
        self.mode & mcfs_format::dinode::S_IFMT == mcfs_format::dinode::S_IFDIR
    }
    pub fn is_inline(&self) -> bool {
        self.flags & mcfs_format::dinode::FLAG_INLINE != 0
    }
    pub fn is_hashed(&self) -> bool {
        self.flags & mcfs_format::dinode::FLAG_HASHED_DIR != 0
    }
}

/// State shared by the passes.
pub struct Ctx<'a> {
    pub io: io::Overlay<'a>,
    pub sb: Superblock,
    pub g: Geometry,
    pub bs: u32,
    pub fsid: u32,
    pub repair: bool,
    pub findings: Vec<Finding>,
    pub map: blockmap::BlockMap,
    /// Every inode that decoded: live and being freed.
    pub inodes: BTreeMap<u64, Ino>,
    /// Blocks something named as an inode that are not one, and why.
    pub bad: BTreeMap<u64, String>,
    /// Live inodes, breadth-first from the root.
    pub order: Vec<u64>,
    /// Inodes to free (unlinked or orphaned), ascending.
    pub freeing: Vec<u64>,
    progress: Option<ProgressFn>,
}

impl Ctx<'_> {
    /// Record a finding. A fixable one counts as fixed when repairing (the
    /// repair itself is always applied to the overlay).
    pub fn find(&mut self, kind: Kind, ino: Option<u64>, block: Option<u64>, fixable: bool, message: String) {
        self.findings.push(Finding { kind, ino, block, message, fixable, fixed: fixable && self.repair });
    }

    pub fn progress(&self, phase: &str, done: u64, total: u64) {
        if let Some(p) = &self.progress {
            p(phase, done, total);
        }
    }

    /// Is `b` a block of some rgrp's data area (where inodes and their blocks live)?
    pub fn in_data(&self, b: u64) -> bool {
        self.g.rgrp_of(b).is_some()
    }
}

fn run(dev: &dyn BlockDevice, opts: &Options, report: &mut Report) -> Result<()> {
    if let Some(p) = &opts.progress {
        p("superblock", 0, 1);
    }
    let found = superblock::find(dev).map_err(FsckError::NotMcfs)?;
    let sb = found.sb.clone();
    let g = sb.geometry;
    report.uuid = Some(mcfs_format::sb::uuid_string(&sb.uuid));
    report.lock_table = Some(sb.table());
    report.stats.block_size = g.block_size;
    report.stats.blocks = g.block_count;
    report.stats.data_blocks = g.data_blocks();
    report.stats.rgrps = g.rgrp_count;
    let io = io::Overlay::new(dev, g.block_size);
    for (b, data) in &found.writes {
        io.put(*b, data.clone());
    }
    let map = blockmap::BlockMap::new(&g);
    let mut ctx = Ctx {
        io,
        fsid: sb.fsid(),
        bs: g.block_size,
        g,
        sb,
        repair: opts.repair,
        findings: found.findings.into_iter().map(|mut f| {
            f.fixed = opts.repair;
            f
        }).collect(),
        map,
        inodes: BTreeMap::new(),
        bad: BTreeMap::new(),
        order: Vec::new(),
        freeing: Vec::new(),
        progress: opts.progress.clone(),
    };
    let result = passes(&mut ctx, dev, report);
    report.stats.bytes_read = ctx.io.bytes_read.load(std::sync::atomic::Ordering::Relaxed);
    report.stats.read_requests = ctx.io.requests.load(std::sync::atomic::Ordering::Relaxed);
    report.findings = std::mem::take(&mut ctx.findings);
    result?;
    if opts.repair && ctx.io.dirty_count() > 0 {
        ctx.progress("writing repairs", 0, ctx.io.dirty_count() as u64);
        let sbs = [ctx.g.sb_block, ctx.g.backup_sb_block()];
        report.stats.blocks_written = ctx.io.commit(&sbs)?;
    }
    Ok(())
}

fn passes(ctx: &mut Ctx<'_>, dev: &dyn BlockDevice, report: &mut Report) -> Result<()> {
    report.journals = journals::check(ctx, dev)?;
    blockmap::load(ctx)?;
    inodes::walk(ctx)?;
    tree::claim_all(ctx)?;
    repair::fix_inodes(ctx)?;
    blockmap::reconcile(ctx)?;
    let s = &mut report.stats;
    for i in ctx.order.iter().filter_map(|i| ctx.inodes.get(i)) {
        s.inodes += 1;
        match i.mode & mcfs_format::dinode::S_IFMT {
            mcfs_format::dinode::S_IFDIR => s.directories += 1,
            mcfs_format::dinode::S_IFREG => s.files += 1,
            mcfs_format::dinode::S_IFLNK => s.symlinks += 1,
            _ => s.other_inodes += 1,
        }
    }
    let (used, free) = ctx.map.expected_totals();
    s.blocks_in_use = used;
    s.blocks_free = free;
    Ok(())
}
