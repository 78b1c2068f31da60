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

/// The kernel caches attributes (and, with `-o namecache`, names) while this
/// node holds their glocks (docs/SEMANTICS.md, "Kernel caches"). Node 1 caches
/// each thing first, node 2 changes it, and node 1 must see the change at once:
/// no waiting, because the change returned on node 2 before node 1's call
/// starts.
#[test]
fn kernel_caches_never_hide_another_nodes_change() {
    kernel_caches_follow_the_glocks(&[], "entry: 0ns");
}

#[test]
fn kernel_name_cache_never_hides_another_nodes_change() {
    kernel_caches_follow_the_glocks(&["-o", "namecache"], "entry: 3600s");
}

fn kernel_caches_follow_the_glocks(node1_args: &[&str], policy: &str) {
    use std::os::unix::fs::PermissionsExt;
    let (dir, mut o) = TestCluster::options(2);
    o.per_node_args.insert(1, node1_args.iter().map(|s| s.to_string()).collect());
    let tc = TestCluster::up(dir, &o).unwrap();
    let (m1, m2) = (tc.mnt(1), tc.mnt(2));
    let log = |n: u32| fs::read_to_string(tc.c.log(&format!("node{n}"))).unwrap_or_default();
    let line = log(1).lines().find(|l| l.contains("kernel caches")).map(str::to_string).unwrap_or_default();
    // Names are cached only where the kernel has FUSE_NOTIFY_INC_EPOCH (FUSE
    // 7.44, Linux 6.16); an older kernel must get a zero entry TTL instead.
    let minor = line.split("kernel_abi=Version(7, ").nth(1).and_then(|r| r.split(')').next()).and_then(|m| m.parse::<u32>().ok());
    let policy = if minor.is_some_and(|m| m < 44) { "entry: 0ns" } else { policy };
    assert!(line.contains(policy) && line.contains("attr: 3600s"), "node 1's kernel cache policy is not {policy}: {line:?}\n{}", log(1));
    fs::create_dir(m1.join("d")).unwrap();
    fs::write(m1.join("d/f"), b"12345").unwrap();
    let st = |p: &std::path::Path| fs::symlink_metadata(p);
    let twice = |p: &std::path::Path| {
        // the second call is the one a cache would answer
        let _ = st(p);
        st(p)
    };

    // attributes: mode, owner, size, times, link count
    assert_eq!(twice(&m1.join("d/f")).unwrap().mode() & 0o777, 0o644);
    fs::set_permissions(m2.join("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(st(&m1.join("d/f")).unwrap().mode() & 0o777, 0o600, "mode changed on node 2");
    std::os::unix::fs::chown(m2.join("d/f"), Some(4321), Some(8765)).unwrap();
    let a = st(&m1.join("d/f")).unwrap();
    assert_eq!((a.uid(), a.gid()), (4321, 8765), "owner changed on node 2");
    fs::OpenOptions::new().append(true).open(m2.join("d/f")).unwrap().write_all(b"678").unwrap();
    assert_eq!(st(&m1.join("d/f")).unwrap().len(), 8, "appended on node 2");
    let held = fs::File::open(m1.join("d/f")).unwrap();
    assert_eq!(held.metadata().unwrap().len(), 8);
    fs::OpenOptions::new().write(true).open(m2.join("d/f")).unwrap().set_len(2).unwrap();
    assert_eq!(held.metadata().unwrap().len(), 2, "fstat on node 1 after a truncate on node 2");
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options().write(true).open(m2.join("d/f")).unwrap().set_modified(t).unwrap();
    assert_eq!(st(&m1.join("d/f")).unwrap().mtime(), 1_000_000_000, "mtime set on node 2");
    fs::hard_link(m2.join("d/f"), m2.join("d/f2")).unwrap();
    assert_eq!(st(&m1.join("d/f")).unwrap().nlink(), 2, "linked on node 2");
    drop(held);

    // names: a rename, an unlink, a name that did not exist, a directory
    // replaced by another with the same name
    assert!(twice(&m1.join("d/f2")).is_ok());
    fs::rename(m2.join("d/f2"), m2.join("d/g")).unwrap();
    assert_eq!(st(&m1.join("d/f2")).unwrap_err().raw_os_error(), Some(libc::ENOENT), "renamed away on node 2");
    assert!(st(&m1.join("d/g")).is_ok());
    fs::remove_file(m2.join("d/g")).unwrap();
    assert_eq!(st(&m1.join("d/g")).unwrap_err().raw_os_error(), Some(libc::ENOENT), "unlinked on node 2");
    assert!(twice(&m1.join("d/new")).is_err());
    fs::write(m2.join("d/new"), b"n").unwrap();
    assert_eq!(fs::read(m1.join("d/new")).unwrap(), b"n", "created on node 2");
    fs::create_dir(m1.join("d/sub")).unwrap();
    fs::write(m1.join("d/sub/inner"), b"old").unwrap();
    let old_ino = twice(&m1.join("d/sub")).unwrap().ino();
    assert!(twice(&m1.join("d/sub/inner")).is_ok());
    fs::remove_file(m2.join("d/sub/inner")).unwrap();
    fs::remove_dir(m2.join("d/sub")).unwrap();
    fs::create_dir(m2.join("d/sub")).unwrap();
    let a = st(&m1.join("d/sub")).unwrap();
    assert!(a.is_dir() && a.ino() != old_ino, "directory replaced on node 2: node 1 still has inode {old_ino}");
    assert_eq!(st(&m1.join("d/sub/inner")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    let mut names: Vec<String> = fs::read_dir(m1.join("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["f", "new", "sub"]);

    // a process whose working directory is in the mount keeps it across
    // another node's changes (the names are looked up again, not lost)
    let out = std::process::Command::new("sh")
        .current_dir(m1.join("d"))
        .arg("-c")
        .arg(format!("ls >/dev/null; touch {}/d/from2; /bin/pwd; ls", m2.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with(&format!("{}\n", m1.join("d").display())) && text.contains("from2"), "{text}");
    tc.c.stop(1).unwrap();
    tc.c.stop(2).unwrap();
}

/// A node gives up idle inode glocks beyond `max_glocks` (GFS2's glock
/// shrinker): without it every file it ever created, even deleted ones, kept
/// a lock on the lock server until another node asked for it.
/// File data is written behind (docs/RECOVERY.md, "Ordered data"): a write
/// returns before its data is on the device, and the block a write ends
/// inside stays in node 1's memory until the next write finishes it or
/// something waits for it. Neither may show. After every write on node 1,
/// node 1 reads the whole file back (the read must wait for the file's
/// writes), then node 2 does (taking the glock from node 1, which must first
/// write everything out). The writes come from
/// a buffer that starts 16 bytes into a page, in odd sizes, so the kernel
/// splits them and most end inside a block.
#[test]
fn data_written_behind_is_seen_at_once_on_both_nodes() {
    use std::io::{Seek, SeekFrom};
    let tc = TestCluster::start(2).unwrap();
    let (m1, m2) = (tc.mnt(1), tc.mnt(2));
    let mut f = fs::OpenOptions::new().create(true).write(true).truncate(true).open(m1.join("wb")).unwrap();
    let mut backing = vec![0u8; (3 << 20) + 8192];
    let skew = (4096 - backing.as_ptr() as usize % 4096) % 4096 + 16;
    let mut expect: Vec<u8> = Vec::new();
    let check = |what: &str, expect: &[u8]| {
        for (node, m) in [(1, &m1), (2, &m2)] {
            let got = fs::read(m.join("wb")).unwrap();
            assert_eq!(got.len(), expect.len(), "{what}: size on node {node}");
            if let Some(i) = got.iter().zip(expect).position(|(a, b)| a != b) {
                panic!("{what}: node {node} reads {} at offset {i}, wrote {}", got[i], expect[i]);
            }
        }
    };
    let sizes = [1usize << 20, 16, 5000, 3, 4093, (1 << 20) + 7, 1, 12288, 700_000];
    for (k, &n) in sizes.iter().enumerate() {
        let chunk: Vec<u8> = (0..n).map(|i| ((i * 7 + k * 13) % 251) as u8).collect();
        backing[skew..skew + n].copy_from_slice(&chunk);
        f.write_all(&backing[skew..skew + n]).unwrap();
        expect.extend_from_slice(&chunk);
        check(&format!("after append {k} of {n} bytes"), &expect);
    }
    // overwrites inside blocks, the last one in the file's last block
    for (at, n) in [(5000u64, 10usize), (1 << 20, 4097), (expect.len() as u64 - 5, 5)] {
        let chunk: Vec<u8> = (0..n).map(|i| (i % 13) as u8 + 200).collect();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&chunk).unwrap();
        expect[at as usize..at as usize + n].copy_from_slice(&chunk);
        check(&format!("after overwriting {n} bytes at {at}"), &expect);
    }
    drop(f);
    let st = mcfs_integration::seed::node_status(&tc, 1);
    assert!(st["log"]["data"]["writes_behind"].as_u64().unwrap_or(0) >= sizes.len() as u64, "{}", st["log"]);
    tc.c.stop(1).unwrap();
    tc.c.stop(2).unwrap();
}

#[test]
fn idle_inode_glocks_are_trimmed_to_max_glocks() {
    let (dir, mut o) = TestCluster::options(1);
    o.per_node_args.insert(1, vec!["--max-glocks".into(), "200".into()]);
    let tc = TestCluster::up(dir, &o).unwrap();
    let m = tc.mnt(1);
    fs::create_dir(m.join("churn")).unwrap();
    fs::create_dir(m.join("kept")).unwrap();
    for i in 0..1500 {
        fs::write(m.join(format!("churn/f{i}")), b"x").unwrap();
        fs::remove_file(m.join(format!("churn/f{i}"))).unwrap();
    }
    for i in 0..600 {
        fs::write(m.join(format!("kept/f{i}")), format!("{i}")).unwrap();
    }
    // Each inode this node has in memory holds its iopen lock (shared; the
    // cache budget bounds those). Beyond them: at most 200 inode glocks, plus
    // journal and rgrp locks.
    let beyond_iopen = || {
        let st = mcfs_integration::seed::status(&tc);
        let locks = st["lock_server"]["lockspaces"][0]["members"][0]["locks"].as_u64()?;
        let cached = st["nodes"][0]["status"]["eviction"]["cached_inodes"].as_u64()?;
        Some(locks.saturating_sub(cached))
    };
    let held = wait_for("the node's inode glocks trimmed to max_glocks", Duration::from_secs(30), || beyond_iopen().filter(|n| *n <= 200 + 64))
        .unwrap_or_else(|e| panic!("{e}: {:?} locks beyond iopen; glocks {}", beyond_iopen(), mcfs_integration::seed::node_status(&tc, 1)["glocks"]));
    let g = mcfs_integration::seed::node_status(&tc, 1)["glocks"].clone();
    // Trimming did it (with the trimmer disabled the count above never comes
    // down). The churn is not 1500 distinct glocks, though: a freed dinode
    // block may be reused once the free commits, and the log flushes during
    // the churn when the machine is slow, so later files can get an earlier
    // file's inode number (and glock). A loaded CI run counted 1424 trims.
    assert!(g["trimmed"].as_u64().unwrap_or(0) >= 1000, "{g}");
    // what was given up comes back on use, with the right contents
    for i in (0..600).step_by(7) {
        assert_eq!(fs::read_to_string(m.join(format!("kept/f{i}"))).unwrap(), format!("{i}"));
    }
    assert_eq!(fs::read_dir(m.join("kept")).unwrap().count(), 600);
    assert_eq!(fs::read_dir(m.join("churn")).unwrap().count(), 0);
    eprintln!("locks beyond iopen after trimming: {held}; glocks {g}");
    tc.c.stop(1).unwrap();
}

fn statvfs_free(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bfree as u64
}

#[test]
fn concurrent_appends_from_two_nodes() {
    let tc = TestCluster::start(2).unwrap();
    let (m1, m2) = (tc.mnt(1), tc.mnt(2));
    fs::create_dir(m1.join("shared")).unwrap();
    let rounds = 200;
    // different files, and new files in the same directory, from both nodes at once
    let h: Vec<_> = [(1u8, m1.clone()), (2u8, m2.clone())]
        .into_iter()
        .map(|(n, m)| {
            std::thread::spawn(move || {
                let mut f = fs::OpenOptions::new().create(true).append(true).open(m.join(format!("shared/log{n}"))).unwrap();
                for i in 0..rounds {
                    f.write_all(format!("node {n} line {i:05}\n").as_bytes()).unwrap();
                    if i % 10 == 0 {
                        fs::write(m.join(format!("shared/n{n}-{i}")), format!("{n}:{i}")).unwrap();
                    }
                }
                f.sync_all().unwrap();
            })
        })
        .collect();
    for t in h {
        t.join().unwrap();
    }
    for (n, m) in [(1u8, &m2), (2u8, &m1)] {
        let text = fs::read_to_string(m.join(format!("shared/log{n}"))).unwrap();
        let want: String = (0..rounds).map(|i| format!("node {n} line {i:05}\n")).collect();
        assert_eq!(text, want, "appends of node {n} seen from the other node");
    }
    let mut names: Vec<String> = fs::read_dir(m1.join("shared")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names.len(), 2 + 2 * (rounds / 10));
    for n in 1..=2 {
        for i in (0..rounds).step_by(10) {
            assert_eq!(fs::read_to_string(m2.join(format!("shared/n{n}-{i}"))).unwrap(), format!("{n}:{i}"));
        }
    }
    // the same file appended from both nodes (O_APPEND is atomic per node only;
    // every line must be there, whole)
    let h: Vec<_> = [(1u8, m1.clone()), (2u8, m2.clone())]
        .into_iter()
        .map(|(n, m)| {
            std::thread::spawn(move || {
                for i in 0..100 {
                    let mut f = fs::OpenOptions::new().create(true).append(true).open(m.join("shared/both")).unwrap();
                    f.write_all(format!("{n}-{i:04}\n").as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for t in h {
        t.join().unwrap();
    }
    let text = fs::read_to_string(m1.join("shared/both")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    let mut want: Vec<String> = (1..=2).flat_map(|n| (0..100).map(move |i| format!("{n}-{i:04}"))).collect();
    want.sort();
    assert_eq!(lines, want);
    tc.c.stop(1).unwrap();
    tc.c.stop(2).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
}

#[test]
fn unlink_while_open_on_another_node_frees_at_last_close() {
    let tc = TestCluster::start(2).unwrap();
    let (m1, m2) = (tc.mnt(1), tc.mnt(2));
    let free0 = statvfs_free(&m1);
    let data = vec![0x5au8; 8 << 20];
    {
        let mut f = fs::File::create(m1.join("victim")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let used = free0 - statvfs_free(&m1);
    assert!(used >= (8 << 20) / 4096, "8 MiB allocated: {used} blocks");
    // node 2 opens it and keeps reading it
    let mut f2 = fs::File::open(m2.join("victim")).unwrap();
    let mut buf = vec![0u8; 4096];
    f2.read_exact(&mut buf).unwrap();
    // node 1 unlinks it: the name goes everywhere, the data stays for node 2
    fs::remove_file(m1.join("victim")).unwrap();
    assert!(!m2.join("victim").exists());
    let mut rest = Vec::new();
    f2.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), data.len() - 4096, "the open file is still whole on node 2");
    assert!(statvfs_free(&m1) + 4 < free0, "the blocks may not be freed while node 2 has it open");
    // last close on node 2: it deallocates
    drop(f2);
    wait_for("blocks freed after the last close", Duration::from_secs(30), || (statvfs_free(&m1) + 2 >= free0).then_some(())).unwrap();
    tc.c.stop(1).unwrap();
    tc.c.stop(2).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
}
