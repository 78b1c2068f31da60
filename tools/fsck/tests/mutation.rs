//! Random damage to metadata: fsck -y never panics, converges in one run (a
//! second -y finds nothing left to fix), and what it leaves clean the node can
//! mount and read end to end. Seeded and reproducible: a failure prints the
//! iteration and the mutations; rerun one with MCFS_MUTATION_ITER=N.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::Arc;

use mcfs_blockdev::MemDevice;
use mcfs_format::header;
use mcfs_node::ops::Caller;
use rand::{Rng, SeedableRng};

/// What happens to one block.
#[derive(Debug, Clone)]
enum Damage {
    /// Bytes overwritten (offset, value), then the CRC re-sealed or not.
    Bytes(Vec<(usize, u8)>, bool),
    /// A misdirected write: another block's contents land here.
    CopyOf(usize),
    /// A lost write to a never-written block: zeros.
    Zero,
    /// Garbage.
    Noise(u64),
}

const SEED: u64 = 0x6d63_6673_6673_636b;

fn iterations() -> u64 {
    std::env::var("MCFS_MUTATION_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

/// Blocks that carry a metadata header (whatever their type).
fn metadata_blocks(img: &[u8]) -> Vec<u64> {
    img.chunks(BS).enumerate().filter(|(_, b)| header::peek(b).is_some_and(|h| h.0 == mcfs_format::MAGIC)).map(|(i, _)| i as u64).collect()
}

/// Walk the tree through the node: every directory listed, every file read.
fn read_everything(dev: Arc<MemDevice>) -> Result<u64, String> {
    let fs = mount(dev);
    let mut n = 0;
    let mut stack = vec![fs.root_ino()];
    while let Some(d) = stack.pop() {
        let list = fs.readdir(d).map_err(|e| format!("readdir {d}: {e}"))?;
        for e in list.into_iter().filter(|e| e.name != b"." && e.name != b"..") {
            let a = fs.lookup(d, &e.name).map_err(|x| format!("lookup {}: {x}", String::from_utf8_lossy(&e.name)))?;
            n += 1;
            match a.mode & 0o170000 {
                0o040000 => stack.push(a.ino),
                0o100000 => {
                    fs.read(a.ino, 0, a.size.min(8 << 20) as u32).map_err(|x| format!("read {}: {x}", a.ino))?;
                }
                0o120000 => {
                    fs.readlink(a.ino).map_err(|x| format!("readlink {}: {x}", a.ino))?;
                }
                _ => {}
            }
        }
    }
    // and it can still allocate
    let t = fs.create(fs.root_ino(), b"written-after-fsck", 0o644, Caller::ROOT).map_err(|e| format!("create: {e}"))?;
    fs.write(t.ino, 0, &vec![1u8; 3 * BS]).map_err(|e| format!("write: {e}"))?;
    fs.unmount().map_err(|e| format!("unmount: {e}"))?;
    Ok(n)
}

/// Run `iters` seeded iterations of `plan` (which picks the damage) on a
/// populated image: -y must not panic, must converge in one run, and a clean
/// result must be usable by the node.
fn damage_test(label: &str, iters: u64, plan: impl Fn(&mut rand::rngs::StdRng, &[u64], &[u64]) -> Vec<(usize, Damage)>) {
    let (dev, _) = populated(64 << 20);
    let img = dev.to_vec();
    let g = sb(dev.as_ref()).geometry;
    let (journal, meta): (Vec<u64>, Vec<u64>) = metadata_blocks(&img).into_iter().partition(|&b| b >= g.journal_start && b < g.rgrp_start);
    assert!(meta.len() > 500 && !journal.is_empty(), "{} metadata blocks, {} journal blocks", meta.len(), journal.len());
    let only: Option<u64> = std::env::var("MCFS_MUTATION_ITER").ok().and_then(|v| v.parse().ok());
    let mut failures = Vec::new();
    let mut exits = [0u32; 16];
    for it in 0..iters {
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ it.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // decided first, applied only to the iterations that run
        let damage = plan(&mut rng, &meta, &journal);
        if only.is_some_and(|o| o != it) {
            continue;
        }
        let mut bytes = img.clone();
        let mut what = Vec::new();
        for (b, d) in &damage {
            let src: Option<Vec<u8>> = match d {
                Damage::CopyOf(o) => Some(img[o * BS..(o + 1) * BS].to_vec()),
                _ => None,
            };
            let blk = &mut bytes[b * BS..(b + 1) * BS];
            match d {
                Damage::Bytes(edits, reseal) => {
                    for (off, v) in edits {
                        blk[*off] = *v;
                    }
                    if *reseal {
                        header::reseal(blk);
                    }
                    what.push(format!("block {b}: {} bytes{}", edits.len(), if *reseal { ", resealed" } else { "" }));
                }
                Damage::CopyOf(o) => {
                    blk.copy_from_slice(&src.unwrap_or_default());
                    what.push(format!("block {b}: copy of {o}"));
                }
                Damage::Zero => {
                    blk.fill(0);
                    what.push(format!("block {b}: zeroed"));
                }
                Damage::Noise(seed) => {
                    let mut r = rand::rngs::StdRng::seed_from_u64(*seed);
                    r.fill(blk);
                    what.push(format!("block {b}: noise"));
                }
            }
        }
        let d = Arc::new(MemDevice::from_vec(bytes, 512));
        let first = std::panic::catch_unwind(|| run(d.as_ref(), true));
        let Ok(first) = first else {
            failures.push(format!("{label} iteration {it} ({}): fsck -y panicked", what.join("; ")));
            continue;
        };
        exits[first.exit_code() as usize & 15] += 1;
        let second = run(d.as_ref(), true);
        let refixed: Vec<_> = second.findings.iter().filter(|f| f.fixed).collect();
        if !refixed.is_empty() || (second.exit_code() & 1) != 0 {
            failures.push(format!("{label} iteration {it} ({}): second -y still fixed things\nfirst:\n{}second:\n{}", what.join("; "), show(&first), show(&second)));
            continue;
        }
        if second.exit_code() == 0 {
            if let Err(e) = read_everything(d.clone()) {
                failures.push(format!("{label} iteration {it} ({}): fsck says clean but the node fails: {e}\nfirst:\n{}", what.join("; "), show(&first)));
            }
        }
    }
    eprintln!("{label}: first-run exit codes over {iters} iterations: 0:{} 1:{} 4:{} 5:{} 8:{}", exits[0], exits[1], exits[4], exits[5], exits[8]);
    assert!(failures.is_empty(), "{} of {iters} iterations failed:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn random_metadata_damage_is_repaired_in_one_run() {
    damage_test("bytes", iterations(), |rng, meta, journal| {
        let mut v = Vec::new();
        for _ in 0..rng.random_range(1..=3) {
            // live metadata mostly; journal blocks (mostly stale) sometimes
            let pool = if rng.random_bool(0.85) { meta } else { journal };
            let b = pool[rng.random_range(0..pool.len())] as usize;
            let n = rng.random_range(1..=8);
            let mut edits = Vec::new();
            for _ in 0..n {
                // mostly the fields at the front, sometimes anywhere
                let off = if rng.random_bool(0.6) { rng.random_range(0..256) } else { rng.random_range(0..BS) };
                edits.push((off, rng.random()));
            }
            v.push((b, Damage::Bytes(edits, rng.random_bool(0.5))));
        }
        v
    });
}

#[test]
fn heavy_block_damage_is_repaired_in_one_run() {
    damage_test("blocks", iterations() / 5, |rng, meta, _| {
        let mut v = Vec::new();
        for _ in 0..rng.random_range(5..=40) {
            let b = meta[rng.random_range(0..meta.len())] as usize;
            let d = match rng.random_range(0..3) {
                0 => Damage::CopyOf(meta[rng.random_range(0..meta.len())] as usize),
                1 => Damage::Zero,
                _ => Damage::Noise(rng.random()),
            };
            v.push((b, d));
        }
        v
    });
}
