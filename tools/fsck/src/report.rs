//! What a check found and did: the [`Report`], its [`Finding`]s, and the exit
//! code they map to (e2fsck's: bit flags that add up).

use serde::Serialize;

/// Exit code bits, as e2fsck: 0 clean; 1 errors corrected; 4 errors left
/// uncorrected; 8 operational error. 1 and 4 add up (5: some fixed, some not).
pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_CORRECTED: i32 = 1;
pub const EXIT_UNCORRECTED: i32 = 4;
pub const EXIT_OPERATIONAL: i32 = 8;

/// What kind of structure a finding is about (stable names for `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Primary or backup superblock damaged or disagreeing.
    Superblock,
    /// A journal that is dirty (needs replay) or has no valid commit.
    Journal,
    /// An rgrp header that does not verify or whose counts are wrong.
    RgrpHeader,
    /// A bitmap block that does not verify.
    Bitmap,
    /// Blocks marked in use that nothing reaches.
    LeakedBlocks,
    /// Blocks in use that the bitmap calls free.
    UsedMarkedFree,
    /// Blocks whose bitmap state is the wrong kind of "in use".
    WrongBlockState,
    /// A block that should be a dinode and is not (entry removed).
    BadDinode,
    /// A directory entry that is invalid or points at no inode.
    DirEntry,
    /// Directory structure: leaves, hash table, entry count, parent pointer.
    Directory,
    /// A directory named by more than one entry (a loop or a hard-linked directory).
    DirLinkedTwice,
    /// nlink disagrees with the entries that name the inode.
    LinkCount,
    /// The dinode's block count disagrees with its block map.
    BlockCount,
    /// The file size does not cover its mapped blocks.
    Size,
    /// A block claimed by two owners.
    CrossLink,
    /// A block pointer outside the data area, or to a block that does not verify.
    BadPointer,
    /// An unlinked inode whose deallocation was never finished.
    Unlinked,
    /// An inode in use that no directory entry names.
    Orphan,
    /// The root directory.
    Root,
}

/// One thing found wrong.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: Kind,
    /// The inode concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
    /// The block concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    pub message: String,
    /// fsck knows how to fix it.
    pub fixable: bool,
    /// It was fixed on the device (only with -y).
    pub fixed: bool,
}

/// One journal's state as fsck found it.
#[derive(Debug, Clone, Serialize)]
pub struct JournalState {
    pub slot: u32,
    /// "clean", "dirty" or "corrupt".
    pub state: &'static str,
    pub head_seq: u64,
    pub transactions_replayed: u64,
    pub blocks_replayed: u64,
}

/// Counts of what the check saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub block_size: u32,
    pub blocks: u64,
    pub data_blocks: u64,
    pub rgrps: u32,
    pub inodes: u64,
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub other_inodes: u64,
    pub blocks_in_use: u64,
    pub blocks_free: u64,
    pub bytes_read: u64,
    pub read_requests: u64,
    pub blocks_written: u64,
    pub elapsed_ms: u64,
}

/// Everything a check found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// "repair" (-y) or "check" (-n).
    pub mode: &'static str,
    /// Set when the check could not run (cannot read, not mcfs at all, ...).
    pub operational_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_table: Option<String>,
    pub journals: Vec<JournalState>,
    pub findings: Vec<Finding>,
    pub stats: Stats,
}

impl Report {
    pub fn fixed(&self) -> usize {
        self.findings.iter().filter(|f| f.fixed).count()
    }

    pub fn uncorrected(&self) -> usize {
        self.findings.iter().filter(|f| !f.fixed).count()
    }

    /// e2fsck's exit code for this report.
    pub fn exit_code(&self) -> i32 {
        if self.operational_error.is_some() {
            return EXIT_OPERATIONAL;
        }
        let mut code = EXIT_CLEAN;
        if self.fixed() > 0 {
            code |= EXIT_CORRECTED;
        }
        if self.uncorrected() > 0 {
            code |= EXIT_UNCORRECTED;
        }
        code
    }

    pub fn is_clean(&self) -> bool {
        self.exit_code() == EXIT_CLEAN
    }

    /// Findings of one kind.
    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.kind == kind)
    }

    /// Number of findings per kind, in kind order.
    pub fn counts(&self) -> Vec<(Kind, usize)> {
        let mut m: std::collections::BTreeMap<Kind, usize> = std::collections::BTreeMap::new();
        for f in &self.findings {
            *m.entry(f.kind).or_default() += 1;
        }
        m.into_iter().collect()
    }
}
