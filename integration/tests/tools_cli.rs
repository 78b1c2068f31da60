//! mkfs.mcfs and fsck.mcfs as a user runs them: the real binaries on a real
//! loop device (losetup --direct-io=on), and on image files.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use mcfs_integration::{bin, tempdir, LoopDev};

fn mkfs(args: &[&str]) -> Output {
    Command::new(bin("mkfs-mcfs")).args(args).output().unwrap()
}

fn fsck(args: &[&str]) -> Output {
    Command::new(bin("fsck-mcfs")).args(args).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn loopdev(dir: &Path, size: u64) -> LoopDev {
    LoopDev::new_image(dir, size).expect("losetup (needs root)")
}

#[test]
fn mkfs_then_fsck_on_a_loop_device_is_clean() {
    let t = tempdir();
    let ld = loopdev(t.path(), 256 << 20);
    let dev = ld.path.to_str().unwrap();
    let o = mkfs(&["-j", "2", "-J", "8", "-t", "test:cli", dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = text(&o);
    for want in ["Block size:", "4096", "Journals:", "2 x 8.00 MiB", "Resource groups:", "Lock table:", "\"test:cli\"", "\"dlm\"", "UUID:"] {
        assert!(out.contains(want), "mkfs output lacks {want:?}:\n{out}");
    }
    let o = fsck(&["-n", dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("clean"), "{}", text(&o));
    // neither -n nor -y: checks only, and says so
    let o = fsck(&[dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("checking only"), "{}", text(&o));
    let o = fsck(&["-y", "--json", dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON only");
    assert_eq!(v["mode"], "repair");
    assert_eq!(v["lock_table"], "test:cli");
    assert_eq!(v["findings"].as_array().unwrap().len(), 0);
}

#[test]
fn mkfs_refuses_to_overwrite_without_force() {
    let t = tempdir();
    let ld = loopdev(t.path(), 128 << 20);
    let dev = ld.path.to_str().unwrap();
    assert_eq!(code(&mkfs(&["-p", "nolock", "-J", "8", dev])), 0);
    let before = read_all(&ld.path);
    let o = mkfs(&["-p", "nolock", "-J", "8", dev]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("contains an mcfs filesystem") && text(&o).contains("-f"), "{}", text(&o));
    assert!(read_all(&ld.path) == before, "a refused mkfs must not change the device");
    let o = mkfs(&["-p", "nolock", "-J", "8", "-f", "-q", dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(o.stdout.is_empty(), "-q prints nothing: {}", text(&o));
    assert!(read_all(&ld.path) != before, "-f formats again (new uuid)");
    assert_eq!(code(&fsck(&["-n", dev])), 0);
}

#[test]
fn bad_flags_and_impossible_geometry_are_refused_and_change_nothing() {
    let t = tempdir();
    let ld = loopdev(t.path(), 64 << 20);
    let dev = ld.path.to_str().unwrap();
    let before = read_all(&ld.path);
    let cases: &[(&[&str], &str)] = &[
        (&["--no-such-flag"], "unexpected argument"),
        (&["-b", "1000", "-p", "nolock"], "power of two"),
        (&["-b", "256", "-p", "nolock"], "power of two"),
        (&["-j", "8", "-J", "16", "-p", "nolock"], "too small"),
        (&["-t", "no-colon"], "CLUSTER:FSNAME"),
        (&["-t", "bad name:fs"], "may contain only"),
        (&["-p", "dlm"], "lock table is required"),
        (&["-p", "paxos", "-t", "a:b"], "dlm or nolock"),
        (&["-J", "12Q", "-p", "nolock"], "unknown suffix"),
        (&["--size", "1G", "-p", "nolock"], "image files only"),
    ];
    for (args, msg) in cases {
        let mut a: Vec<&str> = args.to_vec();
        a.push(dev);
        let o = mkfs(&a);
        assert_eq!(code(&o), 1, "mkfs {a:?}: {}", text(&o));
        assert!(text(&o).contains(msg), "mkfs {a:?} should say {msg:?}: {}", text(&o));
    }
    assert!(read_all(&ld.path) == before, "refused mkfs runs must not touch the device");
}

#[test]
fn fsck_of_something_that_is_not_mcfs() {
    let t = tempdir();
    let ld = loopdev(t.path(), 64 << 20);
    let dev = ld.path.to_str().unwrap();
    for mode in ["-n", "-y"] {
        let o = fsck(&[mode, dev]);
        assert_eq!(code(&o), 8, "{}", text(&o));
        assert!(text(&o).contains("no valid mcfs superblock"), "{}", text(&o));
    }
    assert!(read_all(&ld.path).iter().all(|b| *b == 0), "fsck -y on a non-mcfs device writes nothing");
    let o = fsck(&["-n", "/nonexistent/device"]);
    assert_eq!(code(&o), 8, "{}", text(&o));
    let o = fsck(&["-n", "-y", dev]);
    assert_eq!(code(&o), 16, "{}", text(&o));
}

#[test]
fn fsck_repairs_a_damaged_superblock_on_a_loop_device() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let t = tempdir();
    let ld = loopdev(t.path(), 128 << 20);
    let dev = ld.path.to_str().unwrap();
    assert_eq!(code(&mkfs(&["-p", "nolock", "-J", "8", dev])), 0);
    {
        // one flipped byte in the primary superblock (64 KiB), through O_DIRECT
        let mut f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&ld.path).unwrap();
        let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: a zeroed, aligned 4 KiB buffer, freed below.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let buf = unsafe { std::slice::from_raw_parts_mut(p, 4096) };
        f.seek(SeekFrom::Start(65536)).unwrap();
        f.read_exact(buf).unwrap();
        buf[60] ^= 0xff;
        f.seek(SeekFrom::Start(65536)).unwrap();
        f.write_all(buf).unwrap();
        unsafe { std::alloc::dealloc(p, layout) };
    }
    let o = fsck(&["-n", dev]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    assert!(text(&o).contains("primary superblock"), "{}", text(&o));
    let o = fsck(&["-y", "-v", dev]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("FIXED"), "{}", text(&o));
    let o = fsck(&["-n", dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}

#[test]
fn mkfs_creates_and_sizes_image_files() {
    let t = tempdir();
    let img = t.path().join("new.img");
    let o = mkfs(&["-p", "nolock", "--size", "100G", img.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 100 << 30);
    let o = fsck(&["-n", img.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // an impossible geometry creates no file
    let none = t.path().join("none.img");
    let o = mkfs(&["-p", "nolock", "--size", "1M", none.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(!none.exists());
    // a missing file without --size
    let o = mkfs(&["-p", "nolock", none.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("--size"), "{}", text(&o));
}

#[test]
fn block_size_below_the_device_sector_is_refused() {
    let t = tempdir();
    let img = t.path().join("4k.img");
    mcfs_integration::sparse_file(&img, 64 << 20).unwrap();
    let out = Command::new("losetup").args(["-f", "--show", "--direct-io=on", "--sector-size", "4096"]).arg(&img).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    // the guard detaches it however the test ends
    let ld = LoopDev { path: String::from_utf8_lossy(&out.stdout).trim().into() };
    let dev = ld.path.to_str().unwrap();
    let o = mkfs(&["-b", "1024", "-p", "nolock", "-J", "8", dev]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("smaller than the device's logical sector size 4096"), "{}", text(&o));
    let o = mkfs(&["-b", "4K", "-p", "nolock", "-J", "8", dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = fsck(&["-n", dev]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}
