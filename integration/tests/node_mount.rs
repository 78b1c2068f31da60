//! mcfs-node over a real loop device and real FUSE mounts: one node without a
//! lock server, and two nodes through mcfs-dlm.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;

use mcfs_integration::{wait_for, TestCluster};
use std::time::Duration;

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

#[test]
fn single_node_nolock_posix_basics() {
    let (dir, mut o) = TestCluster::options(1);
    o.nolock = true;
    let tc = TestCluster::up(dir, &o).unwrap();
    let m = tc.mnt(1);
    fs::write(m.join("a.txt"), b"hello").unwrap();
    assert_eq!(fs::read(m.join("a.txt")).unwrap(), b"hello");
    fs::create_dir(m.join("d")).unwrap();
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    fs::write(m.join("d/big"), &big).unwrap();
    assert_eq!(checksum(&fs::read(m.join("d/big")).unwrap()), checksum(&big));
    fs::rename(m.join("a.txt"), m.join("d/b.txt")).unwrap();
    assert!(!m.join("a.txt").exists());
    std::os::unix::fs::symlink("b.txt", m.join("d/link")).unwrap();
    assert_eq!(fs::read_link(m.join("d/link")).unwrap().to_str(), Some("b.txt"));
    assert_eq!(fs::read(m.join("d/link")).unwrap(), b"hello");
    fs::hard_link(m.join("d/b.txt"), m.join("hard")).unwrap();
    assert_eq!(fs::metadata(m.join("hard")).unwrap().nlink(), 2);
    let mut names: Vec<String> = fs::read_dir(m.join("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["b.txt", "big", "link"]);
    // truncate and append
    let f = fs::OpenOptions::new().write(true).open(m.join("d/big")).unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    let mut f = fs::OpenOptions::new().append(true).open(m.join("d/big")).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    let mut v = Vec::new();
    fs::File::open(m.join("d/big")).unwrap().read_to_end(&mut v).unwrap();
    assert_eq!(v.len(), 1004);
    assert_eq!(&v[..1000], &big[..1000]);
    assert_eq!(&v[1000..], b"tail");
    fs::remove_file(m.join("d/big")).unwrap();
    assert_eq!(fs::remove_dir(m.join("d")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    // clean unmount leaves a clean filesystem; a remount sees everything
    tc.c.stop(1).unwrap();
    tc.c.start(1).unwrap();
    assert_eq!(fs::read(m.join("hard")).unwrap(), b"hello");
    assert!(!m.join("d/big").exists());
}

#[test]
fn two_nodes_see_each_other() {
    let tc = TestCluster::start(2).unwrap();
    let (m1, m2) = (tc.mnt(1), tc.mnt(2));
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    fs::write(m1.join("from1"), &data).unwrap();
    // node 2 sees the file and its content
    assert_eq!(checksum(&fs::read(m2.join("from1")).unwrap()), checksum(&data));
    fs::create_dir(m2.join("dir2")).unwrap();
    fs::write(m2.join("dir2/x"), b"x from 2").unwrap();
    let names: Vec<String> = fs::read_dir(&m1).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.contains(&"dir2".to_string()), "{names:?}");
    assert_eq!(fs::read(m1.join("dir2/x")).unwrap(), b"x from 2");
    // overwrite on 1, read on 2
    fs::write(m1.join("dir2/x"), b"rewritten by 1").unwrap();
    assert_eq!(fs::read(m2.join("dir2/x")).unwrap(), b"rewritten by 1");
    // rename on 2, visible on 1
    fs::rename(m2.join("from1"), m2.join("dir2/moved")).unwrap();
    assert!(!m1.join("from1").exists());
    assert_eq!(fs::metadata(m1.join("dir2/moved")).unwrap().len(), data.len() as u64);
    // unlink on 1, gone on 2
    fs::remove_file(m1.join("dir2/moved")).unwrap();
    wait_for("unlink visible on node 2", Duration::from_secs(5), || (!m2.join("dir2/moved").exists()).then_some(())).unwrap();
    tc.c.stop(1).unwrap();
    tc.c.stop(2).unwrap();
}
