//! Clean filesystems check clean, in both modes, and nothing is written.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

#[test]
fn fresh_mkfs_is_clean() {
    let dev = mcfs_node::testutil::mem_fs(64 << 20, 1);
    let r = run(dev.as_ref(), false);
    assert_eq!(r.exit_code(), 0, "{}", show(&r));
    assert!(r.findings.is_empty());
    assert_eq!(r.stats.inodes, 1);
    assert_eq!(r.stats.directories, 1);
}

#[test]
fn populated_filesystem_is_clean_and_untouched() {
    let (dev, m) = populated(256 << 20);
    let before = dev.to_vec();
    let r = run(dev.as_ref(), false);
    assert_eq!(r.exit_code(), 0, "{}", show(&r));
    assert!(r.findings.is_empty(), "{}", show(&r));
    // root, small, big, other, sub, deep, leaf, many, 560 entries, link, longlink,
    // hard1 (one inode, two names), fifo, medium, emptied
    let expect = 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + m.hashed_names.len() as u64 + 1 + 1 + 1 + 1 + 1 + 1;
    assert_eq!(r.stats.inodes, expect, "{}", show(&r));
    assert_eq!(r.stats.symlinks, 2);
    assert_eq!(r.stats.directories, 5);
    let y = run(dev.as_ref(), true);
    assert_eq!(y.exit_code(), 0, "{}", show(&y));
    assert_eq!(y.stats.blocks_written, 0);
    assert!(dev.to_vec() == before, "a clean check must not write");
}

#[test]
fn report_serialises_as_json() {
    let dev = mcfs_node::testutil::mem_fs(64 << 20, 1);
    let r = run(dev.as_ref(), false);
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["mode"], "check");
    assert!(v["findings"].as_array().unwrap().is_empty());
    assert_eq!(v["journals"][0]["state"], "clean");
}
