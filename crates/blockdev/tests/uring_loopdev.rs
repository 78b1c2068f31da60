//! UringDevice on real loop devices (`losetup --direct-io=on`): geometry from the block
//! ioctls, data reaching the backing file, many threads, and the errors a device that
//! changes under us produces. Skipped, loudly, only where losetup does not exist.

#![allow(clippy::unwrap_used)]

mod common;

use common::{have_losetup, pattern, sparse, tempdir, LoopDev};
use mcfs_blockdev::{AlignedBuf, BlockDevice, DeviceKind, Error, IoOp, OpenOptions, UringDevice};
use std::io::{Read, Seek, SeekFrom};

macro_rules! require_losetup {
    () => {
        if !have_losetup() {
            eprintln!("SKIPPED: losetup is not installed (apt-get install mount); loop-device test not run");
            return;
        }
    };
}

#[test]
fn loop_device_geometry_data_and_flush() {
    require_losetup!();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    sparse(&img, 64 << 20);
    let lo = LoopDev::attach(&img, &[]);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).unwrap();
    assert_eq!(dev.kind(), DeviceKind::BlockDevice);
    assert_eq!(dev.size(), 64 << 20, "BLKGETSIZE64");
    assert_eq!(dev.sector_size(), 512, "BLKSSZGET");

    let blocks: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| (i * (1 << 20) + (i % 7) * 4096, pattern(i, 4096 * (1 + i as usize % 4))))
        .collect();
    let reqs: Vec<(u64, &[u8])> = blocks.iter().map(|(o, d)| (*o, &d[..])).collect();
    dev.write_many(&reqs).unwrap();
    dev.flush().unwrap();

    // The bytes are in the backing file, not just somewhere in a cache of ours.
    let mut f = std::fs::File::open(&img).unwrap();
    for (off, data) in &blocks {
        let mut got = vec![0u8; data.len()];
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.read_exact(&mut got).unwrap();
        assert_eq!(&got, data, "backing file at {off}");
    }
    // And a second opener of the device sees them.
    let dev2 = UringDevice::open(
        &lo.path,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    for (off, data) in &blocks {
        let mut got = AlignedBuf::new(data.len());
        dev2.read_at(*off, &mut got).unwrap();
        assert_eq!(&got[..], &data[..]);
    }
    let e = dev
        .read_at(64 << 20, &mut AlignedBuf::new(512))
        .unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}

#[test]
fn loop_device_with_4k_sectors() {
    require_losetup!();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    sparse(&img, 16 << 20);
    let lo = LoopDev::attach(&img, &["--sector-size", "4096"]);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).unwrap();
    assert_eq!(dev.sector_size(), 4096);
    let e = dev.write_at(512, &AlignedBuf::new(4096)).unwrap_err();
    assert!(matches!(e, Error::Unaligned { sector: 4096, .. }), "{e}");
    let e = dev.write_at(0, &AlignedBuf::new(512)).unwrap_err();
    assert!(matches!(e, Error::Unaligned { .. }), "{e}");
    let d = pattern(3, 8192);
    dev.write_at(4096, &d).unwrap();
    let mut b = vec![0u8; 8192];
    dev.read_at(4096, &mut b).unwrap();
    assert_eq!(b, d);
}

#[test]
fn loop_device_many_threads() {
    require_losetup!();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    sparse(&img, 32 << 20);
    let lo = LoopDev::attach(&img, &[]);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).unwrap();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let dev = &dev;
            s.spawn(move || {
                for r in 0..50u64 {
                    let off = (t * 50 + r) * 16384;
                    let d = pattern(t * 1000 + r, 16384);
                    dev.write_at(off, &d).unwrap();
                }
                let mut reqs_data: Vec<Vec<u8>> = (0..50).map(|_| vec![0u8; 16384]).collect();
                let mut reqs: Vec<(u64, &mut [u8])> = reqs_data
                    .iter_mut()
                    .enumerate()
                    .map(|(r, b)| ((t * 50 + r as u64) * 16384, &mut b[..]))
                    .collect();
                dev.read_many(&mut reqs).unwrap();
                for (r, b) in reqs_data.iter().enumerate() {
                    assert_eq!(b, &pattern(t * 1000 + r as u64, 16384));
                }
            });
        }
    });
    dev.flush().unwrap();
    let st = dev.stats();
    assert!(st.max_in_flight > 1, "{st:?}");
}

#[test]
fn device_shrunk_under_us_reports_errors() {
    // A device that loses capacity (a LUN resized, a loop device whose file shrank) is
    // the closest a test can get to a vanished device without device-mapper: the kernel
    // fails writes past the new end with ENOSPC and returns nothing for reads there.
    require_losetup!();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    sparse(&img, 16 << 20);
    let lo = LoopDev::attach(&img, &[]);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).unwrap();
    dev.write_at(12 << 20, &AlignedBuf::from_slice(&pattern(1, 4096)))
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    lo.run("losetup", &["-c"]);
    assert_eq!(dev.size(), 16 << 20, "size is fixed at open");

    let e = dev
        .write_at(12 << 20, &AlignedBuf::from_slice(&pattern(2, 4096)))
        .unwrap_err();
    match &e {
        Error::Io { op: IoOp::Write, offset, source } => {
            assert_eq!(*offset, 12 << 20);
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{e}");
        }
        other => panic!("expected Io(ENOSPC), got {other}"),
    }
    assert!(e.to_string().starts_with(&format!("write at offset {} failed", 12 << 20)));
    let e = dev
        .read_at(12 << 20, &mut AlignedBuf::new(4096))
        .unwrap_err();
    assert!(matches!(e, Error::ShortIo { done: 0, .. }), "{e}");
    // Below the new end everything still works.
    dev.write_at(4 << 20, &AlignedBuf::from_slice(&pattern(3, 4096)))
        .unwrap();
}

#[test]
fn device_made_read_only_fails_writes_with_eperm() {
    require_losetup!();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    sparse(&img, 8 << 20);
    let lo = LoopDev::attach(&img, &[]);
    let dev = UringDevice::open(&lo.path, OpenOptions::default()).unwrap();
    lo.run("blockdev", &["--setro"]);
    let e = dev.write_at(0, &AlignedBuf::new(4096)).unwrap_err();
    assert!(
        matches!(&e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EPERM)),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EPERM);
    dev.read_at(0, &mut AlignedBuf::new(4096)).unwrap();
}
