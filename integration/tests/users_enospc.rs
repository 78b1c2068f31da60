//! A full filesystem, as users meet it: writes fail with ENOSPC (never EIO, and
//! the node does not withdraw), a file holds exactly the bytes whose writes
//! were acknowledged, fsck is clean after unmount, and the space comes back
//! after deletes — also when the deleted file was still open on another node at
//! unlink time (deferred deallocation: the last close there frees it).

// Test helpers fail the test on any unexpected error: that is their job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use mcfs_integration::TestCluster;

/// The byte at offset `pos` of a test file `seed`: position-dependent, so a
/// block written at the wrong place or a stale block is seen.
fn pattern_byte(seed: u64, pos: u64) -> u8 {
    let x = (pos ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (x >> 56) as u8
}

fn fill_pattern(seed: u64, off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, off + i as u64);
    }
}

/// Read `path` and check it is exactly `len` bytes of pattern `seed`.
fn verify(path: &Path, seed: u64, len: u64) {
    let mut f = File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), len, "{}: size", path.display());
    let mut buf = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        fill_pattern(seed, off, &mut want[..n]);
        if buf[..n] != want[..n] {
            let i = (0..n).find(|&i| buf[i] != want[i]).unwrap_or(0);
            panic!("{}: byte {} is {:#04x}, expected {:#04x}", path.display(), off + i as u64, buf[i], want[i]);
        }
        off += n as u64;
    }
    assert_eq!(off, len, "{}: read {off} bytes of {len}", path.display());
}

/// Write pattern `seed` to `f` in `chunk`-byte writes until `limit` bytes or
/// the first error; returns (acknowledged bytes, the error if any).
fn write_until_error(f: &mut File, seed: u64, chunk: usize, limit: u64) -> (u64, Option<io::Error>) {
    write_until_error_at(f, seed, chunk, 0, limit)
}

/// The same, for a file whose first `done` bytes are written already (the
/// handle's offset is there).
fn write_until_error_at(f: &mut File, seed: u64, chunk: usize, mut done: u64, limit: u64) -> (u64, Option<io::Error>) {
    let mut buf = vec![0u8; chunk];
    while done < limit {
        let n = chunk.min((limit - done) as usize);
        fill_pattern(seed, done, &mut buf[..n]);
        match f.write(&buf[..n]) {
            Ok(0) => return (done, Some(io::Error::other("write returned 0"))),
            Ok(k) => done += k as u64,
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

/// Fill a file: 1 MiB writes while more than 16 MiB are free, then one block
/// a write, so that the write that meets ENOSPC asks for a single block.
/// (A larger write that runs out of space midway is
/// [`a_write_that_runs_out_of_space_midway_reports_what_it_wrote`]'s business.)
fn fill(f: &mut File, mnt: &Path, seed: u64, limit: u64) -> (u64, Option<io::Error>) {
    let mut done = 0u64;
    while done < limit && statvfs(mnt).f_bavail > 4096 {
        let n = (1u64 << 20).min(limit - done);
        let (k, err) = write_until_error_at(f, seed, 1 << 20, done, done + n);
        done = k;
        if err.is_some() {
            return (done, err);
        }
    }
    write_until_error_at(f, seed, 4096, done, limit)
}

/// Create `path` and [`fill`] it; a create refused for lack of space counts as 0 bytes.
fn create_and_fill(path: &Path, mnt: &Path, seed: u64, limit: u64) -> (u64, Option<io::Error>) {
    match File::create(path) {
        Ok(mut f) => fill(&mut f, mnt, seed, limit),
        Err(e) => (0, Some(e)),
    }
}

#[track_caller]
fn assert_enospc(e: &Option<io::Error>, what: &str) {
    match e {
        Some(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        other => panic!("{what}: expected ENOSPC, got {other:?}"),
    }
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: zeroed plain-data out-struct, valid path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0, "statvfs {}", p.display());
    s
}

fn node_status(tc: &TestCluster, node: u32) -> serde_json::Value {
    let out = std::process::Command::new(mcfs_integration::bin("mcfs")).args(["status", "--json", "--cluster-dir"]).arg(&tc.c.f.dir).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("mcfs status --json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    v["nodes"].as_array().and_then(|a| a.iter().find(|n| n["node"] == node)).map(|n| n["status"].clone()).unwrap_or_else(|| panic!("node {node} not in mcfs status: {v}"))
}

#[track_caller]
fn assert_not_withdrawn(tc: &TestCluster, node: u32) {
    let st = node_status(tc, node);
    assert_eq!(st["withdrawn"], false, "node {node} withdrew: {}", st["withdraw_reason"]);
}

/// fsck's view of the unmounted device (exit code, blocks in use, data blocks).
fn fsck_counts(tc: &TestCluster) -> (i32, u64, u64, String) {
    let out = std::process::Command::new(mcfs_integration::bin("fsck-mcfs")).args(["-n", "--json"]).arg(tc.c.device()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("fsck --json: {e}: {text}"));
    (out.status.code().unwrap_or(-1), v["stats"]["blocks_in_use"].as_u64().unwrap(), v["stats"]["data_blocks"].as_u64().unwrap(), text)
}

/// A file made while filling the filesystem: name, pattern seed, acknowledged length.
struct Made {
    name: String,
    seed: u64,
    len: u64,
}

#[test]
fn enospc_big_file_then_many_small_files() {
    let (dir, mut o) = TestCluster::options(1);
    o.nolock = true;
    o.size = 96 << 20;
    o.journals = Some(1);
    let tc = TestCluster::up(dir, &o).unwrap();
    let m = tc.mnt(1);
    let s0 = statvfs(&m);
    let free0 = s0.f_bavail;
    eprintln!("empty: {} blocks, {} free", s0.f_blocks, free0);

    // --- one big file until the filesystem is full
    let t = Instant::now();
    let mut f = File::create(m.join("big")).unwrap();
    let (big_len, err) = fill(&mut f, &m, 1, 1 << 30);
    assert_enospc(&err, "filling with one big file");
    // nothing more goes in, in any size; what was acknowledged is durable
    for n in [1usize, 4096, 1 << 20] {
        let mut g = fs::OpenOptions::new().append(true).open(m.join("big")).unwrap();
        let before = g.metadata().unwrap().len();
        match g.write(&vec![0xeeu8; n]) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "a further {n}-byte write: {e}"),
            // a last partial block may still take a few bytes: the file grows by exactly that
            Ok(k) => {
                assert!(k < n || n < 4096, "a {n}-byte write succeeded on a full filesystem");
                g.set_len(before).unwrap();
            }
        }
    }
    f.sync_all().unwrap();
    drop(f);
    eprintln!("big file: {big_len} bytes before ENOSPC ({:?})", t.elapsed());
    verify(&m.join("big"), 1, big_len);
    assert!(big_len >= (free0 - 64) * 4096 * 9 / 10, "the big file took most of the space: {big_len} bytes of {} free", free0 * 4096);
    assert!(statvfs(&m).f_bavail < 64, "full: {} blocks left", statvfs(&m).f_bavail);
    // other ways to need a block fail with ENOSPC too (or succeed if a block is left)
    for r in [fs::create_dir(m.join("d-when-full")), std::os::unix::fs::symlink("x".repeat(4000), m.join("l-when-full"))] {
        if let Err(e) = r {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        }
    }
    let _ = fs::remove_dir(m.join("d-when-full"));
    let _ = fs::remove_file(m.join("l-when-full"));
    assert_not_withdrawn(&tc, 1);
    fs::remove_file(m.join("big")).unwrap();
    mcfs_integration::wait_for("space back after deleting the big file", Duration::from_secs(30), || (statvfs(&m).f_bavail >= free0).then_some(())).unwrap();

    // --- many small files (inline, one block, several blocks) until full
    let t = Instant::now();
    fs::create_dir(m.join("small")).unwrap();
    let sizes = [0u64, 100, 3960, 3961, 5000, 12_288, 40_000, 70_001];
    let mut made: Vec<Made> = Vec::new();
    let mut failures = 0;
    let mut first_failure = None;
    let mut i = 0u64;
    while failures < 40 {
        i += 1;
        let name = format!("small/f{i:06}");
        let len = sizes[(i as usize * 7) % sizes.len()];
        let mut f = match File::create(m.join(&name)) {
            Ok(f) => f,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "create {name}: {e}");
                failures += 1;
                first_failure.get_or_insert(i);
                continue;
            }
        };
        let (done, err) = write_until_error(&mut f, 100 + i, 4096, len);
        drop(f);
        if let Some(e) = &err {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "write {name} at {done}: {e}");
            failures += 1;
            first_failure.get_or_insert(i);
        }
        made.push(Made { name, seed: 100 + i, len: done });
        assert!(i < 100_000, "the filesystem never filled up");
    }
    eprintln!("small files: {} made, first ENOSPC at file {:?} ({:?})", made.len(), first_failure, t.elapsed());
    assert!(made.len() > 500, "only {} small files fit", made.len());
    assert_not_withdrawn(&tc, 1);
    for f in &made {
        verify(&m.join(&f.name), f.seed, f.len);
    }
    // persisted, consistent
    tc.c.stop(1).unwrap();
    let (code, out) = mcfs_integration::fsck(&tc.c.device());
    assert_eq!(code, 0, "fsck after filling with small files:\n{out}");
    tc.c.start(1).unwrap();
    for f in &made {
        verify(&m.join(&f.name), f.seed, f.len);
    }
    for f in &made {
        fs::remove_file(m.join(&f.name)).unwrap();
    }
    fs::remove_dir(m.join("small")).unwrap();
    mcfs_integration::wait_for("space back after deleting the small files", Duration::from_secs(30), || (statvfs(&m).f_bavail >= free0).then_some(())).unwrap();
    assert_eq!(statvfs(&m).f_bavail, free0, "every block came back");

    // --- the space is usable again: the same big file fits again
    let (len2, err) = create_and_fill(&m.join("big2"), &m, 2, 1 << 30);
    assert_enospc(&err, "filling again");
    assert!(len2 + (1 << 20) >= big_len, "after deletes the space is usable again: {len2} bytes now, {big_len} before");
    verify(&m.join("big2"), 2, len2);
    let s = statvfs(&m);
    tc.c.stop(1).unwrap();
    let (code, in_use, data_blocks, out) = fsck_counts(&tc);
    assert_eq!(code, 0, "{out}");
    assert_eq!((data_blocks, data_blocks - in_use), (s.f_blocks, s.f_bfree), "statfs (blocks, free) and fsck agree");
}

/// Two nodes: node 1 fills the filesystem; node 2 opens the file; node 1
/// unlinks it and cannot reuse the space while node 2 reads it; after node 2's
/// last close node 1 writes again and succeeds.
#[test]
fn enospc_space_freed_by_deferred_deallocation_on_another_node() {
    let (dir, mut o) = TestCluster::options(2);
    o.size = 160 << 20;
    o.journals = Some(2);
    let tc = TestCluster::up(dir, &o).unwrap();
    let (m1, m2) = (tc.mnt(1), tc.mnt(2));
    let free0 = statvfs(&m1).f_bavail;

    let mut f = File::create(m1.join("victim")).unwrap();
    let (vlen, err) = fill(&mut f, &m1, 7, 1 << 30);
    assert_enospc(&err, "node 1 filling");
    drop(f);
    eprintln!("victim: {vlen} bytes; {} blocks were free", free0);
    assert!(vlen >= (free0 - 64) * 4096 * 9 / 10);

    // node 2 holds it open
    let mut f2 = File::open(m2.join("victim")).unwrap();
    let mut head = vec![0u8; 4096];
    f2.read_exact(&mut head).unwrap();
    fs::remove_file(m1.join("victim")).unwrap();
    assert!(!m2.join("victim").exists(), "the name is gone on node 2 too");

    // the blocks still belong to node 2's open file: node 1 gets a clean ENOSPC
    let (got, err) = create_and_fill(&m1.join("after"), &m1, 8, 8 << 20);
    assert_enospc(&err, "node 1 writing while node 2 holds the unlinked file");
    let _ = fs::remove_file(m1.join("after"));
    assert!(got < 1 << 20, "node 1 wrote {got} bytes into space node 2 still uses");
    // ... and node 2 still reads every byte
    let mut rest = Vec::new();
    f2.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() as u64 + 4096, vlen);
    let mut want = vec![0u8; rest.len()];
    fill_pattern(7, 4096, &mut want);
    assert!(rest == want, "node 2 reads the unlinked file intact after node 1's refused writes");
    let st2 = statvfs(&m2);
    eprintln!("while open on node 2: node 2 sees bfree {} bavail {}", st2.f_bfree, st2.f_bavail);

    // last close on node 2: its deallocation frees the space
    let closed = Instant::now();
    drop(f2);
    let want_len = vlen * 9 / 10;
    let mut attempts = 0;
    let first_ok = loop {
        attempts += 1;
        let (got, err) = create_and_fill(&m1.join("after"), &m1, 9, want_len);
        match err {
            None => break attempts == 1,
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && closed.elapsed() < Duration::from_secs(30) => {
                eprintln!("attempt {attempts}: ENOSPC after {got} bytes, {:?} after the close", closed.elapsed());
                let _ = fs::remove_file(m1.join("after"));
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(e) => panic!("node 1 could not reuse the space {:?} after node 2's last close: {e} (after {got} bytes)", closed.elapsed()),
        }
    };
    eprintln!("node 1 rewrote {want_len} bytes {:?} after node 2's close ({attempts} attempts; first attempt ok: {first_ok})", closed.elapsed());
    verify(&m2.join("after"), 9, want_len);
    assert_not_withdrawn(&tc, 1);
    assert_not_withdrawn(&tc, 2);
    // both nodes count the same free blocks, and fsck agrees after unmount
    let (a, b) = (statvfs(&m1), statvfs(&m2));
    assert_eq!((a.f_blocks, a.f_bfree, a.f_bavail), (b.f_blocks, b.f_bfree, b.f_bavail), "statfs on node 1 and node 2");
    tc.c.stop(1).unwrap();
    tc.c.stop(2).unwrap();
    let (code, in_use, data_blocks, out) = fsck_counts(&tc);
    assert_eq!(code, 0, "{out}");
    assert_eq!((data_blocks, data_blocks - in_use), (a.f_blocks, a.f_bfree), "statfs and fsck agree");
}

/// A write of many blocks that finds space for only some of them must either
/// report the bytes it wrote (a short write) or leave the file as it was.
/// mcfs writes the first part, extends the file, and then answers ENOSPC: the
/// file ends up longer than what the caller was told was written (here: 1 MiB
/// writes, the last one reports ENOSPC after its first ~780 KiB became part of
/// the file).
#[test]
#[ignore = "bug: Fs::write returns ENOSPC after a partial round was committed (reserve fails in a later round, `?` drops `done`)"]
fn a_write_that_runs_out_of_space_midway_reports_what_it_wrote() {
    let (dir, mut o) = TestCluster::options(1);
    o.nolock = true;
    o.size = 96 << 20;
    o.journals = Some(1);
    let tc = TestCluster::up(dir, &o).unwrap();
    let m = tc.mnt(1);
    let mut f = File::create(m.join("big")).unwrap();
    let (acked, err) = write_until_error(&mut f, 1, 1 << 20, 1 << 30);
    assert_enospc(&err, "1 MiB writes until full");
    drop(f);
    let size = fs::metadata(m.join("big")).unwrap().len();
    assert_eq!(size, acked, "file size {size} vs bytes acknowledged {acked}: {} bytes written by a write that reported ENOSPC", size as i64 - acked as i64);
    verify(&m.join("big"), 1, acked);
}
