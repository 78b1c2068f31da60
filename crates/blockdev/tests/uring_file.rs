//! UringDevice on regular files (O_DIRECT on the test machine's filesystem): request
//! checks, bounce buffers, batching, concurrency, async, short I/O.

#![allow(clippy::unwrap_used)]

mod common;

use common::{pattern, sparse, tempdir};
use mcfs_blockdev::{
    AlignedBuf, BlockDevice, DeviceKind, Error, IoOp, OpenOptions, UringDevice,
};
use std::sync::Arc;

fn file_dev(size: u64, opts: OpenOptions) -> (tempfile::TempDir, std::path::PathBuf, UringDevice) {
    let dir = tempdir();
    let path = dir.path().join("img");
    sparse(&path, size);
    let dev = UringDevice::open(&path, opts).unwrap();
    (dir, path, dev)
}

#[test]
fn regular_file_geometry_and_roundtrip() {
    let (_d, _p, dev) = file_dev(4 << 20, OpenOptions::default());
    assert_eq!(dev.kind(), DeviceKind::RegularFile);
    assert_eq!(dev.size(), 4 << 20);
    let s = dev.sector_size();
    assert!(s.is_power_of_two() && (512..=4096).contains(&s), "sector {s}");

    let data = pattern(1, 64 << 10);
    dev.write_at(8192, &AlignedBuf::from_slice(&data)).unwrap();
    let mut back = AlignedBuf::new(64 << 10);
    dev.read_at(8192, &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);
    // Untouched space reads as zeros.
    let mut z = AlignedBuf::new(4096);
    dev.read_at(1 << 20, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    dev.flush().unwrap();
}

#[test]
fn unaligned_and_out_of_range_are_rejected_and_write_nothing() {
    let (_d, _p, dev) = file_dev(1 << 20, OpenOptions::default());
    let s = u64::from(dev.sector_size());
    let buf = AlignedBuf::from_slice(&pattern(2, 4096));

    let e = dev.write_at(100, &buf).unwrap_err();
    assert!(
        matches!(e, Error::Unaligned { op: IoOp::Write, offset: 100, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("multiples of the"), "{e}");
    let e = dev.write_at(0, &buf[..100]).unwrap_err();
    assert!(matches!(e, Error::Unaligned { len: 100, .. }), "{e}");
    let e = dev.write_at((1 << 20) - s, &buf).unwrap_err();
    assert!(
        matches!(e, Error::OutOfRange { size, .. } if size == 1 << 20),
        "{e}"
    );
    let mut rb = AlignedBuf::new(4096);
    let e = dev.read_at(u64::MAX - 4095, &mut rb).unwrap_err();
    assert!(matches!(e, Error::Unaligned { .. } | Error::OutOfRange { .. }), "{e}");

    // One bad request in a batch: nothing of the batch is written.
    let good = AlignedBuf::from_slice(&pattern(3, 4096));
    let e = dev
        .write_many(&[(0, &good[..]), (1 << 20, &good[..])])
        .unwrap_err();
    assert!(matches!(e, Error::OutOfRange { offset, .. } if offset == 1 << 20), "{e}");
    dev.read_at(0, &mut rb).unwrap();
    assert!(rb.iter().all(|&b| b == 0), "first request of a rejected batch was written");
}

#[test]
fn unaligned_memory_goes_through_bounce_buffers() {
    let (_d, _p, dev) = file_dev(1 << 20, OpenOptions::default());
    assert!(dev.mem_align() >= 512);
    let data = pattern(4, 8192 + 1);
    // A slice starting one byte into a Vec is (almost surely) misaligned; make sure.
    let src = &data[1..];
    assert_ne!(src.as_ptr() as usize % dev.mem_align(), 0);
    dev.write_at(4096, src).unwrap();

    let mut raw = vec![0u8; 8192 + 3];
    let dst = &mut raw[3..];
    dev.read_at(4096, dst).unwrap();
    assert_eq!(dst, src);

    // Mixed batch: aligned and misaligned buffers in one submission.
    let a = AlignedBuf::from_slice(&pattern(5, 4096));
    let b_vec = pattern(6, 4096 + 1);
    dev.write_many(&[(0, &a[..]), (65536, &b_vec[1..])]).unwrap();
    let mut ra = vec![0u8; 4097];
    let mut rb = AlignedBuf::new(4096);
    {
        let (_, ra_tail) = ra.split_at_mut(1);
        let mut reqs: Vec<(u64, &mut [u8])> = vec![(0, ra_tail), (65536, &mut rb[..])];
        dev.read_many(&mut reqs).unwrap();
    }
    assert_eq!(&ra[1..], &a[..]);
    assert_eq!(&rb[..], &b_vec[1..]);
}

#[test]
fn batches_larger_than_the_queue_depth() {
    let opts = OpenOptions {
        queue_depth: 4,
        ..OpenOptions::default()
    };
    let (_d, _p, dev) = file_dev(4 << 20, opts);
    let blocks: Vec<Vec<u8>> = (0..500).map(|i| pattern(100 + i, 4096)).collect();
    let reqs: Vec<(u64, &[u8])> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| ((i as u64) * 8192, &b[..]))
        .collect();
    dev.write_many(&reqs).unwrap();
    let mut back: Vec<Vec<u8>> = (0..500).map(|_| vec![0u8; 4096]).collect();
    let mut rreqs: Vec<(u64, &mut [u8])> = back
        .iter_mut()
        .enumerate()
        .map(|(i, b)| ((i as u64) * 8192, &mut b[..]))
        .collect();
    dev.read_many(&mut rreqs).unwrap();
    assert_eq!(back, blocks);
    let st = dev.stats();
    assert!(st.max_in_flight <= 4, "{st:?}");
    assert!(st.max_in_flight >= 2, "a 500-request batch never had 2 in flight: {st:?}");
}

#[test]
fn vectored_io() {
    let (_d, _p, dev) = file_dev(1 << 20, OpenOptions::default());
    let a = AlignedBuf::from_slice(&pattern(7, 4096));
    let b = pattern(8, 8192 + 1);
    let c = AlignedBuf::from_slice(&pattern(9, 512));
    dev.write_vectored_at(16384, &[&a[..], &b[1..], &c[..]]).unwrap();

    let mut whole = AlignedBuf::new(4096 + 8192 + 512);
    dev.read_at(16384, &mut whole).unwrap();
    assert_eq!(&whole[..4096], &a[..]);
    assert_eq!(&whole[4096..4096 + 8192], &b[1..]);
    assert_eq!(&whole[4096 + 8192..], &c[..]);

    let mut x = AlignedBuf::new(512);
    let mut y_raw = vec![0u8; 4096 + 8192 + 1];
    let (_, y) = y_raw.split_at_mut(1);
    dev.read_vectored_at(16384, &mut [&mut x[..], y]).unwrap();
    assert_eq!(&x[..], &whole[..512]);
    assert_eq!(&y_raw[1..], &whole[512..]);

    let e = dev.write_vectored_at(0, &[&a[..100], &a[..412]]).unwrap_err();
    assert!(matches!(e, Error::Unaligned { len: 100, .. }), "{e}");
}

#[test]
fn many_threads_at_once_keep_their_data_and_share_the_ring() {
    let (_d, _p, dev) = file_dev(16 << 20, OpenOptions::default());
    const THREADS: u64 = 16;
    const ROUNDS: u64 = 100;
    const BLOCKS_PER_THREAD: u64 = 64;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let dev = &dev;
            s.spawn(move || {
                let base = t * BLOCKS_PER_THREAD * 4096;
                for r in 0..ROUNDS {
                    let blk = (r * 7 + t) % BLOCKS_PER_THREAD;
                    let off = base + blk * 4096;
                    let data = pattern(t << 32 | r, 4096);
                    if r % 2 == 0 {
                        dev.write_at(off, &AlignedBuf::from_slice(&data)).unwrap();
                    } else {
                        dev.write_at(off, &data).unwrap();
                    }
                    let mut back = vec![0u8; 4096];
                    dev.read_at(off, &mut back).unwrap();
                    assert_eq!(back, data, "thread {t} round {r}");
                }
            });
        }
    });
    let st = dev.stats();
    assert_eq!(st.submitted, THREADS * ROUNDS * 2);
    assert_eq!(st.completed, st.submitted);
    assert!(
        st.max_in_flight > 1,
        "16 threads never had two requests in flight together: {st:?}"
    );
    // Final image: each thread's last write to each block it touched.
    for t in 0..THREADS {
        for blk in 0..BLOCKS_PER_THREAD {
            let last = (0..ROUNDS).rev().find(|r| (r * 7 + t) % BLOCKS_PER_THREAD == blk);
            let mut back = vec![0u8; 4096];
            dev.read_at(t * BLOCKS_PER_THREAD * 4096 + blk * 4096, &mut back)
                .unwrap();
            match last {
                Some(r) => assert_eq!(back, pattern(t << 32 | r, 4096)),
                None => assert!(back.iter().all(|&b| b == 0)),
            }
        }
    }
}

#[test]
fn async_api_from_tokio() {
    let (_d, _p, dev) = file_dev(8 << 20, OpenOptions::default());
    let dev = Arc::new(dev);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let dev = dev.clone();
            tasks.push(tokio::spawn(async move {
                let data = pattern(1000 + i, 8192);
                let buf = dev
                    .write_async(i * 8192, AlignedBuf::from_slice(&data))
                    .await
                    .unwrap();
                assert_eq!(&buf[..], &data[..], "write hands the buffer back intact");
                let back = dev.read_async(i * 8192, 8192).await.unwrap();
                assert_eq!(&back[..], &data[..]);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        dev.flush_async().await.unwrap();
        // Errors come through the future too.
        let (res, _buf) = dev.submit_write(1, AlignedBuf::new(4096)).await;
        assert!(matches!(res, Err(Error::Unaligned { offset: 1, .. })));
        // A misaligned AlignedBuf takes the bounce path in the async API as well.
        let mut odd = AlignedBuf::with_alignment(4096 + 8, 8);
        if (odd.as_ptr() as usize).is_multiple_of(dev.mem_align()) {
            odd = AlignedBuf::new(4096); // happened to be aligned: still exercise the API
        }
        let mut odd4k = odd;
        odd4k.truncate(4096);
        odd4k.copy_from_slice(&pattern(77, 4096));
        let (res, back) = dev.submit_write(4 << 20, odd4k).await;
        res.unwrap();
        let (res, got) = dev.submit_read(4 << 20, AlignedBuf::with_alignment(4096, 8)).await;
        res.unwrap();
        assert_eq!(&got[..], &back[..]);
    });
}

#[test]
fn dropped_futures_still_complete_before_close() {
    let dir = tempdir();
    let path = dir.path().join("img");
    sparse(&path, 4 << 20);
    {
        let dev = UringDevice::open(&path, OpenOptions::default()).unwrap();
        for i in 0..32u64 {
            // Dropped at once: the buffer must live until the kernel is done with it.
            drop(dev.submit_write(i * 4096, AlignedBuf::from_slice(&pattern(i, 4096))));
        }
        // Dropping the device waits for them.
    }
    let dev = UringDevice::open(&path, OpenOptions::default()).unwrap();
    for i in 0..32u64 {
        let mut b = AlignedBuf::new(4096);
        dev.read_at(i * 4096, &mut b).unwrap();
        assert_eq!(&b[..], &pattern(i, 4096)[..], "block {i}");
    }
}

#[test]
fn blocking_wait_on_futures_and_batch_submit() {
    let (_d, _p, dev) = file_dev(4 << 20, OpenOptions::default());
    let reqs: Vec<(u64, AlignedBuf)> = (0..16u64)
        .map(|i| (i * 65536, AlignedBuf::from_slice(&pattern(50 + i, 65536))))
        .collect();
    for f in dev.submit_writes(reqs) {
        let (res, _) = f.wait();
        res.unwrap();
    }
    dev.submit_flush().wait().unwrap();
    let futs = dev.submit_reads((0..16u64).map(|i| (i * 65536, AlignedBuf::new(65536))).collect());
    for (i, f) in futs.into_iter().enumerate() {
        let (res, b) = f.wait();
        res.unwrap();
        assert_eq!(&b[..], &pattern(50 + i as u64, 65536)[..]);
    }
}

#[test]
fn short_read_past_a_truncated_file_is_reported() {
    // The size is read at open; shrinking the file afterwards makes the kernel return
    // fewer bytes than asked, which must surface as ShortIo, not as zeros.
    let (_d, path, dev) = file_dev(1 << 20, OpenOptions::default());
    dev.write_at(0, &AlignedBuf::from_slice(&pattern(11, 1 << 20)))
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(512 << 10)
        .unwrap();
    let mut b = AlignedBuf::new(8192);
    let e = dev.read_at((512 << 10) - 4096, &mut b).unwrap_err();
    assert!(
        matches!(e, Error::ShortIo { op: IoOp::Read, done: 4096, len: 8192, .. }),
        "{e}"
    );
    let e = dev.read_at(768 << 10, &mut b).unwrap_err();
    assert!(matches!(e, Error::ShortIo { done: 0, .. }), "{e}");
    assert_eq!(e.to_string(), format!("short read at offset {}: 0 of 8192 bytes transferred", 768 << 10));
}

#[test]
fn read_only_refuses_writes() {
    let dir = tempdir();
    let path = dir.path().join("img");
    sparse(&path, 1 << 20);
    let dev = UringDevice::open(
        &path,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let e = dev.write_at(0, &AlignedBuf::new(4096)).unwrap_err();
    assert!(matches!(e, Error::ReadOnly { .. }), "{e}");
    let (res, _) = dev.submit_write(0, AlignedBuf::new(4096)).wait();
    assert!(matches!(res, Err(Error::ReadOnly { .. })));
    let mut b = AlignedBuf::new(4096);
    dev.read_at(0, &mut b).unwrap();
}

#[test]
fn open_errors_are_clear() {
    let e = UringDevice::open("/dev/null", OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::NotADevice { .. }), "{e}");
    let e = UringDevice::open("/nonexistent/img", OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Open { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/img"), "{e}");
    let dir = tempdir();
    let path = dir.path().join("img");
    sparse(&path, 1 << 20);
    let e = UringDevice::open(
        &path,
        OpenOptions {
            queue_depth: 0,
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidOption(_)), "{e}");
    let e = UringDevice::open(
        &path,
        OpenOptions {
            sector_size: Some(1000),
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidOption(_)), "{e}");
    // A larger sector than the device's is honoured.
    let dev = UringDevice::open(
        &path,
        OpenOptions {
            sector_size: Some(8192),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(dev.sector_size(), 8192);
    assert!(matches!(
        dev.read_at(4096, &mut AlignedBuf::new(8192)),
        Err(Error::Unaligned { .. })
    ));
}

#[test]
fn buffered_mode_works_too() {
    let (_d, _p, dev) = file_dev(
        1 << 20,
        OpenOptions {
            direct: false,
            ..OpenOptions::default()
        },
    );
    assert_eq!(dev.sector_size(), 512);
    let data = pattern(12, 1536);
    dev.write_at(512, &data).unwrap();
    let mut back = vec![0u8; 1536];
    dev.read_at(512, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn file_device_roundtrip_short_read_and_read_only() {
    use mcfs_blockdev::FileDevice;
    let dir = tempdir();
    let path = dir.path().join("img");
    sparse(&path, 1 << 20);
    let dev = FileDevice::open(&path, false, None).unwrap();
    assert_eq!((dev.size(), dev.sector_size()), (1 << 20, 512));
    let d = pattern(21, 2048);
    dev.write_many(&[(512, &d[..1024]), (4096, &d[1024..])]).unwrap();
    dev.flush().unwrap();
    // The same bytes through io_uring + O_DIRECT: both devices agree on the image.
    let u = UringDevice::open(&path, OpenOptions::default()).unwrap();
    let mut got = AlignedBuf::new(4096);
    u.read_at(0, &mut got).unwrap();
    assert_eq!(&got[512..1536], &d[..1024]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(6144)
        .unwrap();
    let mut b = vec![0u8; 4096];
    let e = dev.read_at(4096, &mut b).unwrap_err();
    assert!(matches!(e, Error::ShortIo { done: 2048, .. }), "{e}");
    let ro = FileDevice::open(&path, true, None).unwrap();
    assert!(matches!(ro.write_at(0, &[0; 512]), Err(Error::ReadOnly { .. })));
}

#[test]
fn completion_callbacks_can_chain_requests_from_the_ring_thread() {
    use std::sync::mpsc;
    let (_d, _p, dev) = file_dev(4 << 20, OpenOptions::default());
    let dev = Arc::new(dev);
    let (tx, rx) = mpsc::channel();

    // Write block i, and from its completion write block i+1, 100 times.
    fn chain(dev: Arc<UringDevice>, i: u64, tx: mpsc::Sender<Result<u64, String>>) {
        let buf = AlignedBuf::from_slice(&pattern(500 + i, 4096));
        let d2 = dev.clone();
        dev.submit_write_with(i * 4096, buf, move |res, buf| {
            if let Err(e) = res {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
            assert_eq!(&buf[..], &pattern(500 + i, 4096)[..], "buffer comes back");
            if i == 99 {
                let _ = tx.send(Ok(i));
            } else {
                chain(d2, i + 1, tx);
            }
        });
    }
    chain(dev.clone(), 0, tx.clone());
    let last = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("chain finished")
        .unwrap();
    assert_eq!(last, 99);
    let mut all = AlignedBuf::new(100 * 4096);
    dev.read_at(0, &mut all).unwrap();
    for i in 0..100u64 {
        let at = (i * 4096) as usize;
        assert_eq!(&all[at..at + 4096], &pattern(500 + i, 4096)[..], "block {i}");
    }

    // A read callback gets the data, through a bounce buffer when misaligned.
    let (rtx, rrx) = mpsc::channel();
    dev.submit_read_with(4096, AlignedBuf::with_alignment(4096, 8), move |res, buf| {
        let _ = rtx.send((res.is_ok(), buf[..].to_vec()));
    });
    let (ok, data) = rrx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    assert!(ok);
    assert_eq!(data, pattern(501, 4096));

    // Rejected requests call back at once, on this thread, with the error.
    let here = std::thread::current().id();
    let (etx, erx) = mpsc::channel();
    dev.submit_write_with(3, AlignedBuf::new(4096), move |res, _| {
        let _ = etx.send((std::thread::current().id(), res.map_err(|e| e.to_string())));
    });
    let (tid, res) = erx.try_recv().expect("called back synchronously");
    assert_eq!(tid, here);
    assert!(res.unwrap_err().contains("unaligned"));
}

#[test]
fn a_panicking_callback_does_not_stop_the_ring() {
    let (_d, _p, dev) = file_dev(1 << 20, OpenOptions::default());
    dev.submit_write_with(0, AlignedBuf::new(4096), |_, _| panic!("callback bug"));
    // The device keeps working afterwards.
    for i in 0..10u64 {
        dev.write_at(i * 4096, &pattern(i, 4096)).unwrap();
    }
    let mut b = vec![0u8; 4096];
    dev.read_at(9 * 4096, &mut b).unwrap();
    assert_eq!(b, pattern(9, 4096));
}

#[test]
fn last_device_handle_dropped_inside_a_callback() {
    let dir = tempdir();
    let path = dir.path().join("img");
    sparse(&path, 1 << 20);
    let dev = Arc::new(UringDevice::open(&path, OpenOptions::default()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let held = dev.clone();
    dev.submit_write_with(0, AlignedBuf::from_slice(&pattern(9, 4096)), move |res, _| {
        // Whichever of this and the test's handle goes last; when it is this one, the
        // device is dropped on the ring thread, which must not wait for itself.
        drop(held);
        let _ = tx.send(res.is_ok());
    });
    drop(dev);
    assert!(rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap());
    // The write completed before the ring shut down.
    let dev = UringDevice::open(&path, OpenOptions::default()).unwrap();
    let mut b = AlignedBuf::new(4096);
    dev.read_at(0, &mut b).unwrap();
    assert_eq!(&b[..], &pattern(9, 4096)[..]);
}

#[test]
fn blocking_calls_from_a_callback_are_refused_not_deadlocked() {
    let (_d, _p, dev) = file_dev(1 << 20, OpenOptions::default());
    let dev = Arc::new(dev);
    let (tx, rx) = std::sync::mpsc::channel();
    let d2 = dev.clone();
    dev.submit_write_with(0, AlignedBuf::new(4096), move |res, _| {
        res.unwrap();
        let w = d2.write_at(4096, &[0u8; 4096]);
        let f = d2.flush();
        let _ = tx.send((w.map_err(|e| e.errno()), f.map_err(|e| e.errno())));
    });
    let (w, f) = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    assert_eq!(w, Err(libc::EDEADLK));
    assert_eq!(f, Err(libc::EDEADLK));
}
