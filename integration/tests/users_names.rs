//! Names as users give them: lengths up to 255 bytes (256 and more give
//! ENAMETOOLONG, for every operation that makes or finds a name), any byte but
//! '/' and NUL (non-UTF-8, newlines, spaces, control characters), symlink
//! targets up to the kernel's 4095 bytes, exact bytes back from readdir and
//! readlink (also after a remount), and a 20,000-entry directory listed
//! completely and exactly once.

// Test helpers fail the test on any unexpected error: that is their job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mcfs_integration::TestCluster;

fn p(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(OsStr::from_bytes(name))
}

fn errno<T>(r: io::Result<T>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

fn list(dir: &Path) -> Vec<Vec<u8>> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect()
}

fn nolock_cluster() -> TestCluster {
    let (dir, mut o) = TestCluster::options(1);
    o.nolock = true;
    o.journals = Some(1);
    TestCluster::up(dir, &o).unwrap()
}

/// Every byte value but NUL and '/', and the awkward names people do create.
fn odd_names() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        (1..=255u8).filter(|b| *b != b'/').collect(), // 254 bytes, every allowed value
        b"line\nbreak".to_vec(),
        b"\n".to_vec(),
        b" ".to_vec(),
        b"  leading and trailing spaces  ".to_vec(),
        b"tab\there".to_vec(),
        b"\x01\x02\x1b[31mescape".to_vec(),
        b"\x7f".to_vec(),
        b"\xff\xfe\xfd".to_vec(),          // not UTF-8
        b"\xc3\x28".to_vec(),              // invalid UTF-8 sequence
        b"\xed\xa0\x80".to_vec(),          // UTF-16 surrogate encoded (invalid UTF-8)
        "ünïcödé 日本語 🦀".as_bytes().to_vec(),
        "€".repeat(85).into_bytes(),       // 255 bytes of 3-byte characters
        b"-rf".to_vec(),
        b"...".to_vec(),
        b".hidden".to_vec(),
        b"a\\b".to_vec(),
        b"*?[]{}$`'\"".to_vec(),
    ];
    v.push(vec![0xff; 255]);
    v.push(vec![b'x'; 255]);
    // names that differ only in their last byte, and in case
    v.push([vec![b'y'; 254], vec![b'a']].concat());
    v.push([vec![b'y'; 254], vec![b'b']].concat());
    v.push(b"Case".to_vec());
    v.push(b"case".to_vec());
    v
}

#[test]
fn name_lengths_and_bytes() {
    let tc = nolock_cluster();
    let m = tc.mnt(1);
    let d = m.join("names");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("src"), b"source").unwrap();

    // 255 bytes: every way of making a name works
    for (i, len) in [1usize, 2, 100, 254, 255].into_iter().enumerate() {
        let base = |c: u8| -> Vec<u8> { vec![c; len] };
        fs::write(p(&d, &base(b'f')), format!("file {len}")).unwrap();
        fs::create_dir(p(&d, &base(b'd'))).unwrap();
        std::os::unix::fs::symlink("src", p(&d, &base(b's'))).unwrap();
        fs::hard_link(d.join("src"), p(&d, &base(b'h'))).unwrap();
        fs::write(d.join(format!("tmp{i}")), b"r").unwrap();
        fs::rename(d.join(format!("tmp{i}")), p(&d, &base(b'r'))).unwrap();
        assert_eq!(fs::read(p(&d, &base(b'f'))).unwrap(), format!("file {len}").as_bytes());
        assert!(fs::metadata(p(&d, &base(b'd'))).unwrap().is_dir());
        assert_eq!(fs::read(p(&d, &base(b's'))).unwrap(), b"source");
        assert_eq!(fs::read(p(&d, &base(b'h'))).unwrap(), b"source");
        assert_eq!(fs::read(p(&d, &base(b'r'))).unwrap(), b"r");
    }
    // 256 bytes and more: ENAMETOOLONG from every operation, nothing created.
    // 256..=1024 reach the daemon (FUSE allows names up to 1024); longer ones
    // are refused by the kernel.
    for len in [256usize, 257, 300, 1024, 1025, 4000] {
        let n = vec![b'L'; len];
        let path = p(&d, &n);
        let want = Some(libc::ENAMETOOLONG);
        assert_eq!(errno(fs::write(&path, b"x")), want, "create {len}");
        assert_eq!(errno(fs::create_dir(&path)), want, "mkdir {len}");
        assert_eq!(errno(std::os::unix::fs::symlink("src", &path)), want, "symlink {len}");
        assert_eq!(errno(fs::hard_link(d.join("src"), &path)), want, "link {len}");
        assert_eq!(errno(fs::rename(d.join("src"), &path)), want, "rename to {len}");
        assert_eq!(errno(fs::symlink_metadata(&path)), want, "lookup {len} (not ENOENT)");
        assert_eq!(errno(fs::remove_file(&path)), want, "unlink {len}");
    }
    // multi-byte characters: the limit is in bytes
    assert_eq!(errno(fs::write(p(&d, "€".repeat(86).as_bytes()), b"")), Some(libc::ENAMETOOLONG), "258 bytes of '€'");
    assert!(d.join("src").exists(), "the refused rename left the source");
    assert_eq!(list(&d).len(), 5 * 5 + 1, "nothing created by refused operations");

    // any byte but '/' and NUL; readdir gives the exact bytes back
    let o = m.join("odd");
    fs::create_dir(&o).unwrap();
    let names = odd_names();
    for n in &names {
        fs::write(p(&o, n), n).unwrap_or_else(|e| panic!("create {:?}: {e}", String::from_utf8_lossy(n)));
    }
    let check = |o: &Path| {
        let got: BTreeSet<Vec<u8>> = list(o).into_iter().collect();
        let want: BTreeSet<Vec<u8>> = names.iter().cloned().collect();
        assert_eq!(got.len(), names.len(), "readdir returned {} names for {} files", got.len(), names.len());
        assert_eq!(got, want, "readdir returns the names' exact bytes");
        for n in &names {
            assert_eq!(&fs::read(p(o, n)).unwrap(), n, "content of {:?}", String::from_utf8_lossy(n));
        }
    };
    check(&o);
    // rename every odd name to another odd name (a rotation through a temp)
    fs::rename(p(&o, &names[0]), o.join("rotate-tmp")).unwrap();
    for i in 1..names.len() {
        fs::rename(p(&o, &names[i]), p(&o, &names[i - 1])).unwrap();
    }
    fs::rename(o.join("rotate-tmp"), p(&o, names.last().unwrap())).unwrap();
    for (i, n) in names.iter().enumerate() {
        assert_eq!(&fs::read(p(&o, n)).unwrap(), &names[(i + 1) % names.len()]);
    }
    // and back
    fs::rename(p(&o, names.last().unwrap()), o.join("rotate-tmp")).unwrap();
    for i in (1..names.len()).rev() {
        fs::rename(p(&o, &names[i - 1]), p(&o, &names[i])).unwrap();
    }
    fs::rename(o.join("rotate-tmp"), p(&o, &names[0])).unwrap();
    check(&o);

    // persisted exactly: after a remount, and fsck agrees
    tc.c.stop(1).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
    tc.c.start(1).unwrap();
    check(&o);
    for n in &names {
        fs::remove_file(p(&o, n)).unwrap();
    }
    assert!(list(&o).is_empty());
}

/// A symlink target of `len` bytes, every byte non-NUL (and some not UTF-8).
fn target(len: usize) -> Vec<u8> {
    (0..len).map(|i| [b'a', b'/', 0xe9, b'.', b'\n', 0xff, b' '][i % 7]).collect()
}

#[test]
fn symlink_targets_up_to_4095_bytes() {
    let tc = nolock_cluster();
    let m = tc.mnt(1);
    let d = m.join("links");
    fs::create_dir(&d).unwrap();
    // 3960 bytes fit in the dinode of a 4 KiB block; 3961 and more take a block
    let ok = [1usize, 100, 3959, 3960, 3961, 4000, 4094, 4095];
    for len in ok {
        std::os::unix::fs::symlink(OsStr::from_bytes(&target(len)), d.join(format!("l{len}"))).unwrap_or_else(|e| panic!("symlink of {len} bytes: {e}"));
        let md = fs::symlink_metadata(d.join(format!("l{len}"))).unwrap();
        assert!(md.file_type().is_symlink());
        assert_eq!(md.len(), len as u64, "st_size of a symlink is its target's length");
    }
    let check = |d: &Path| {
        for len in ok {
            let got = fs::read_link(d.join(format!("l{len}"))).unwrap();
            assert_eq!(got.as_os_str().as_bytes(), &target(len)[..], "readlink of the {len}-byte target");
        }
    };
    check(&d);
    // PATH_MAX (4096, NUL included) is the kernel's limit for a target
    for len in [4096usize, 4097, 5000, 65536] {
        assert_eq!(errno(std::os::unix::fs::symlink(OsStr::from_bytes(&target(len)), d.join(format!("l{len}")))), Some(libc::ENAMETOOLONG), "symlink of {len} bytes");
        assert!(fs::symlink_metadata(d.join(format!("l{len}"))).is_err(), "nothing left by the refused symlink");
    }
    tc.c.stop(1).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
    tc.c.start(1).unwrap();
    check(&d);
    // deleting long symlinks frees their blocks (fsck would see a leak)
    for len in ok {
        fs::remove_file(d.join(format!("l{len}"))).unwrap();
    }
    tc.c.stop(1).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
}

/// Count every name readdir returns; any name seen twice or missing fails.
fn listing(dir: &Path) -> BTreeMap<Vec<u8>, u32> {
    let mut seen = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        *seen.entry(e.unwrap().file_name().as_bytes().to_vec()).or_insert(0) += 1;
    }
    seen
}

fn assert_listing(dir: &Path, want: &BTreeSet<Vec<u8>>, when: &str) {
    let seen = listing(dir);
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(k, n)| (String::from_utf8_lossy(k).into_owned(), *n)).take(5).collect();
    assert!(dups.is_empty(), "{when}: names listed more than once: {dups:?}");
    let got: BTreeSet<Vec<u8>> = seen.into_keys().collect();
    let missing: Vec<_> = want.difference(&got).take(5).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    let extra: Vec<_> = got.difference(want).take(5).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{when}: {} listed, {} expected; missing {missing:?}, extra {extra:?}", got.len(), want.len());
}

#[test]
fn directory_of_20000_entries_lists_completely_once() {
    let n: usize = std::env::var("MCFS_BIGDIR_ENTRIES").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let tc = nolock_cluster();
    let m = tc.mnt(1);
    let d = m.join("big");
    fs::create_dir(&d).unwrap();
    // names of varied lengths (short ones share leaves, long ones fill them)
    let name = |i: usize| -> Vec<u8> {
        let mut v = format!("e{i:06}-").into_bytes();
        v.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, (i * 7919) % 200));
        v
    };
    let t0 = Instant::now();
    let mut want = BTreeSet::new();
    for i in 0..n {
        let nm = name(i);
        fs::File::create(p(&d, &nm)).unwrap_or_else(|e| panic!("create entry {i}: {e}"));
        want.insert(nm);
    }
    let created = t0.elapsed();
    let t1 = Instant::now();
    assert_listing(&d, &want, "after creating");
    let listed = t1.elapsed();
    eprintln!("{n} entries: created in {created:?}, listed in {listed:?}");
    assert!(fs::metadata(&d).unwrap().is_dir());
    // every name is found by lookup too
    for i in (0..n).step_by(97) {
        assert!(fs::symlink_metadata(p(&d, &name(i))).is_ok(), "lookup of entry {i}");
    }
    // remove every third entry: the rest is still listed exactly once
    for i in (0..n).step_by(3) {
        let nm = name(i);
        fs::remove_file(p(&d, &nm)).unwrap();
        want.remove(&nm);
    }
    assert_listing(&d, &want, "after removing a third");
    // entries created while a listing is under way: names that exist from
    // start to end of the listing are returned exactly once (POSIX)
    let stable = want.clone();
    let mut rd = fs::read_dir(&d).unwrap();
    let mut seen: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    for k in 0..n / 3 {
        if let Some(e) = rd.next() {
            *seen.entry(e.unwrap().file_name().as_bytes().to_vec()).or_insert(0) += 1;
        }
        if k % 10 == 0 {
            fs::File::create(d.join(format!("during-{k}"))).unwrap();
        }
    }
    for e in rd {
        *seen.entry(e.unwrap().file_name().as_bytes().to_vec()).or_insert(0) += 1;
    }
    for s in &stable {
        assert_eq!(seen.get(s).copied().unwrap_or(0), 1, "{} seen {:?} times during concurrent creates", String::from_utf8_lossy(s), seen.get(s));
    }
    for k in (0..n / 3).step_by(10) {
        want.insert(format!("during-{k}").into_bytes());
    }
    // persisted: a fresh mount lists the same set
    tc.c.stop(1).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "{out}");
    tc.c.start(1).unwrap();
    assert_listing(&d, &want, "after a remount");
}
