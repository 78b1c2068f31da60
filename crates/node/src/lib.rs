//! mcfs-node: the client filesystem daemon, as a library with one module per
//! subsystem (as GFS2 splits fs/gfs2) and a thin binary.
//!
//! * [`glock`]: glocks over lock-manager locks, local holders, demote on
//!   blocking callbacks, the may-sleep / no-sleep context types.
//! * [`lock_dlm`]: the mcfs-dlm backend of the glock layer (the DLM adapter).
//! * [`log`]: transactions, log flush, write-back, revokes, the tail.
//! * [`recovery`]: finding a journal's head and replaying it.
//! * [`rgrp`]: resource groups, allocation and freeing.
//! * [`inode`], [`bmap`], [`dir`]: dinodes and data, block maps, directories.
//! * [`icache`]: the inode cache, the memory budget, reclaim, eviction and the
//!   deferred deallocation list (the reason mcfs exists).
//! * [`fs`]: mount, unmount, statfs, withdraw (GFS2's super.c).
//! * [`ops`]: POSIX operations, each taking its locks in order.
//! * [`fuse`]: the thin FUSE adapter (the only module that knows fuser).
//! * [`admin`]: the NodeAdmin gRPC service (`mcfs status`, `mcfs glocks`).
//! * [`mkfs`]: formatting (shared with `mkfs.mcfs`).
//! * [`buf`]: the metadata buffer cache.

pub mod admin;
pub mod bmap;
pub mod buf;
pub mod config;
pub mod dir;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod glock;
pub mod icache;
pub mod inode;
pub mod lock_dlm;
pub mod log;
pub mod mkfs;
pub mod ops;
pub mod recovery;
pub mod rgrp;
pub mod wb;
#[doc(hidden)]
pub mod testutil;

pub use error::{FsError, Result};
pub use fs::{Fs, MountOptions};
