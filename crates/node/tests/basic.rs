use std::sync::Arc;

use mcfs_blockdev::BlockDevice;
use mcfs_node::ops::Caller;
use mcfs_node::testutil::{mem_fs, mount_nolock};
use mcfs_node::FsError;

#[test]
fn create_write_read_remount() {
    let dev = mem_fs(256 << 20, 2);
    let d: Arc<dyn BlockDevice> = dev.clone();
    let fs = mount_nolock(d.clone());
    let root = fs.root_ino();
    let a = fs.create(root, b"hello.txt", 0o644, Caller::ROOT).unwrap();
    assert_eq!(fs.write(a.ino, 0, b"hello world").unwrap(), 11);
    assert_eq!(fs.read(a.ino, 0, 100).unwrap(), b"hello world");
    // a big file leaves the inline area and grows a pointer tree
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let b = fs.create(root, b"big", 0o644, Caller::ROOT).unwrap();
    let mut off = 0;
    while off < big.len() {
        let n = fs.write(b.ino, off as u64, &big[off..(off + 131072).min(big.len())]).unwrap();
        off += n;
    }
    assert_eq!(fs.read(b.ino, 0, 3_000_000).unwrap(), big);
    assert_eq!(fs.read(b.ino, 1_000_000, 10).unwrap(), &big[1_000_000..1_000_010]);
    let dir = fs.mkdir(root, b"sub", 0o755, Caller::ROOT).unwrap();
    fs.create(dir.ino, b"inner", 0o600, Caller::ROOT).unwrap();
    let names: Vec<Vec<u8>> = fs.readdir(root).unwrap().into_iter().map(|e| e.name).collect();
    assert!(names.contains(&b"hello.txt".to_vec()) && names.contains(&b"big".to_vec()) && names.contains(&b"sub".to_vec()));
    assert!(matches!(fs.rmdir(root, b"sub"), Err(FsError::NotEmpty)));
    fs.rename(dir.ino, b"inner", root, b"moved", 0).unwrap();
    fs.rmdir(root, b"sub").unwrap();
    fs.fsync(a.ino).unwrap();
    fs.unmount().unwrap();
    drop(fs);

    let fs = mount_nolock(d);
    let root = fs.root_ino();
    let a = fs.lookup(root, b"hello.txt").unwrap();
    assert_eq!(fs.read(a.ino, 0, 100).unwrap(), b"hello world");
    let b = fs.lookup(root, b"big").unwrap();
    assert_eq!(b.size, 3_000_000);
    assert_eq!(fs.read(b.ino, 0, 3_000_000).unwrap(), big);
    assert!(fs.lookup(root, b"sub").is_err());
    assert!(fs.lookup(root, b"moved").is_ok());
    fs.unmount().unwrap();
}

#[test]
fn big_directory_hashes_and_lookups_work() {
    let dev = mem_fs(512 << 20, 1);
    let fs = mount_nolock(dev);
    let root = fs.root_ino();
    let d = fs.mkdir(root, b"d", 0o755, Caller::ROOT).unwrap();
    let n = 5000;
    for i in 0..n {
        fs.mknod(d.ino, format!("file-{i:06}").as_bytes(), 0o100644, 0, Caller::ROOT).unwrap();
    }
    for i in (0..n).step_by(7) {
        let a = fs.lookup(d.ino, format!("file-{i:06}").as_bytes()).unwrap();
        assert_eq!(a.mode & 0o170000, 0o100000);
    }
    assert!(matches!(fs.lookup(d.ino, b"nope"), Err(FsError::NotFound)));
    let list = fs.readdir(d.ino).unwrap();
    assert_eq!(list.len(), n + 2);
    for i in (0..n).step_by(2) {
        fs.unlink(d.ino, format!("file-{i:06}").as_bytes()).unwrap();
    }
    assert_eq!(fs.readdir(d.ino).unwrap().len(), n / 2 + 2);
    fs.unmount().unwrap();
}
