//! Helpers for tests of this crate and of the tools: format an in-memory
//! device and mount it without a lock server.

use std::sync::Arc;

use mcfs_blockdev::{BlockDevice, MemDevice};
use mcfs_format::geometry::MkfsOptions;
use mcfs_format::sb::LockProto;

use crate::fs::{Fs, MountOptions};
use crate::glock::NoLock;
use crate::mkfs::{mkfs, MkfsParams};

/// Format a fresh in-memory device of `size` bytes (4 KiB blocks, `journals`
/// journals of 8 MiB, 16 MiB rgrps).
pub fn mem_fs(size: u64, journals: u32) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new(size, 512));
    format(dev.as_ref(), journals);
    dev
}

pub fn format(dev: &dyn BlockDevice, journals: u32) {
    let p = MkfsParams {
        opts: MkfsOptions { block_size: 4096, journals, journal_bytes: 8 << 20, rgrp_bytes: Some(16 << 20) },
        lock_proto: LockProto::NoLock,
        cluster: "test".into(),
        fsname: "fs".into(),
        uuid: None,
    };
    mkfs(dev, &p, &mut |_, _| {}).expect("mkfs");
}

/// Mount with no lock server.
pub fn mount_nolock(dev: Arc<dyn BlockDevice>) -> Arc<Fs> {
    let fs = Fs::mount(dev, Arc::new(NoLock::default()), MountOptions::default()).expect("mount");
    fs.instantiate_root().expect("root");
    fs
}
