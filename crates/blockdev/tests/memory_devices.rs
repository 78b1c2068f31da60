//! MemDevice and RecordingDevice: the same request checks as the real device, and the
//! crash images RecordingDevice builds.

#![allow(clippy::unwrap_used)]

mod common;

use common::pattern;
use mcfs_blockdev::{BlockDevice, Error, IoOp, MemDevice, RecordingDevice};

fn blk(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(off, &mut b).unwrap();
    b
}

#[test]
fn mem_device_checks_like_the_real_one() {
    let d = MemDevice::new(8192, 512);
    assert_eq!(d.size(), 8192);
    assert!(matches!(
        d.write_at(1, &[0; 512]),
        Err(Error::Unaligned { op: IoOp::Write, offset: 1, .. })
    ));
    assert!(matches!(
        d.read_at(0, &mut [0; 100]),
        Err(Error::Unaligned { len: 100, .. })
    ));
    assert!(matches!(
        d.write_at(7680, &[0; 1024]),
        Err(Error::OutOfRange { size: 8192, .. })
    ));
    // A rejected batch writes nothing.
    assert!(d.write_many(&[(0, &[1; 512]), (8192, &[1; 512])]).is_err());
    assert_eq!(blk(&d, 0, 512), vec![0; 512]);
    d.write_vectored_at(512, &[&[1; 512], &[2; 1024]]).unwrap();
    assert_eq!(blk(&d, 512, 512), vec![1; 512]);
    assert_eq!(blk(&d, 1024, 1024), vec![2; 1024]);
    let v = d.to_vec();
    assert_eq!(v.len(), 8192);
    let d2 = MemDevice::from_vec(v, 512);
    assert_eq!(blk(&d2, 1024, 512), vec![2; 512]);
}

#[test]
fn recording_device_crash_images_at_every_flush() {
    let d = RecordingDevice::new(16 * 512, 512);
    assert_eq!(d.flush_points(), 1);
    d.write_at(0, &[1; 512]).unwrap(); // epoch 0, write 0
    d.write_at(512, &[2; 1024]).unwrap(); // epoch 0, write 1
    d.flush().unwrap(); // point 1
    d.write_at(0, &[3; 512]).unwrap(); // epoch 1, write 0
    d.write_at(2048, &[4; 512]).unwrap(); // epoch 1, write 1
    d.flush().unwrap(); // point 2
    d.write_at(4096, &[5; 1024]).unwrap(); // epoch 2, write 0 (never flushed)

    assert_eq!(d.flush_points(), 3);
    assert_eq!(d.flush_count(), 2);
    assert_eq!(d.writes().len(), 5);
    assert_eq!(d.writes_after(1).len(), 2);
    assert_eq!(d.writes_after(2)[0].offset, 4096);

    // Reads see everything, flushed or not.
    assert_eq!(blk(&d, 4096, 512), vec![5; 512]);

    let p0 = d.image_at_flush(0);
    assert!(p0.to_vec().iter().all(|&b| b == 0), "nothing durable before a flush");
    let p1 = d.image_at_flush(1);
    assert_eq!(blk(&p1, 0, 512), vec![1; 512]);
    assert_eq!(blk(&p1, 512, 1024), vec![2; 1024]);
    assert_eq!(blk(&p1, 2048, 512), vec![0; 512]);
    let p2 = d.image_at_flush(2);
    assert_eq!(blk(&p2, 0, 512), vec![3; 512]);
    assert_eq!(blk(&p2, 2048, 512), vec![4; 512]);
    assert_eq!(blk(&p2, 4096, 1024), vec![0; 1024], "unflushed write is not durable");
    assert_eq!(d.durable_image().to_vec(), p2.to_vec());
    assert_eq!(blk(&d.image_now(), 4096, 1024), vec![5; 1024]);

    // Any subset of the writes after point 1.
    let only_second = d.image_with_partial(1, |j| j == 1);
    assert_eq!(blk(&only_second, 0, 512), vec![1; 512], "write 0 of epoch 1 lost");
    assert_eq!(blk(&only_second, 2048, 512), vec![4; 512], "write 1 of epoch 1 kept");
    let prefix = d.image_with_partial(0, |j| j < 1);
    assert_eq!(blk(&prefix, 0, 512), vec![1; 512]);
    assert_eq!(blk(&prefix, 512, 1024), vec![0; 1024]);

    // A torn two-sector write: first sector landed, second did not.
    let torn = d.image_with_torn(0, |j, s| j == 1 && s == 0);
    assert_eq!(blk(&torn, 512, 512), vec![2; 512]);
    assert_eq!(blk(&torn, 1024, 512), vec![0; 512]);
    assert_eq!(blk(&torn, 0, 512), vec![0; 512]);
}

#[test]
fn recording_device_exhaustive_subsets_cover_all_outcomes() {
    // The way crash tests will use it: every subset of an epoch's writes.
    let d = RecordingDevice::from_image(pattern(1, 4096), 512);
    for i in 0..3u64 {
        d.write_at(i * 512, &pattern(10 + i, 512)).unwrap();
    }
    let n = d.writes_after(0).len();
    assert_eq!(n, 3);
    let mut seen = std::collections::HashSet::new();
    for mask in 0u32..(1 << n) {
        let img = d.image_with_partial(0, |j| mask & (1 << j) != 0);
        for j in 0..n as u64 {
            let expect = if mask & (1 << j) != 0 {
                pattern(10 + j, 512)
            } else {
                pattern(1, 4096)[(j * 512) as usize..((j + 1) * 512) as usize].to_vec()
            };
            assert_eq!(blk(&img, j * 512, 512), expect, "mask {mask:b} write {j}");
        }
        seen.insert(img.to_vec());
    }
    assert_eq!(seen.len(), 8, "each subset gives a distinct image");
}

#[test]
fn recording_device_rejects_what_the_real_one_rejects() {
    let d = RecordingDevice::new(4096, 512);
    assert!(matches!(d.write_at(3, &[0; 512]), Err(Error::Unaligned { .. })));
    assert!(matches!(d.write_at(4096, &[0; 512]), Err(Error::OutOfRange { .. })));
    assert!(d.writes().is_empty(), "rejected writes are not recorded");
    // write_many records each write in order.
    d.write_many(&[(0, &[7; 512]), (1024, &[8; 512])]).unwrap();
    let w = d.writes();
    assert_eq!((w[0].offset, w[1].offset), (0, 1024));
    assert_eq!(&w[1].data[..], &[8; 512][..]);
}
