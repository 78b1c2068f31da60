//! `mkfs.mcfs` (built as `mkfs-mcfs`; `tools/install-names` installs the dotted
//! name that `mkfs -t mcfs` looks for). gfs2-utils conventions:
//!
//! ```text
//! mkfs.mcfs [-b BLOCKSIZE] [-j JOURNALS] [-J JOURNAL_MiB] [-r RGRP_MiB]
//!           [-t CLUSTER:FSNAME] [-p dlm|nolock] [-f] [-q] [--size SIZE] DEVICE_OR_IMAGE
//! ```
//!
//! The order of work is chosen so that a refusal leaves the target untouched:
//! 1. parse and validate every option (lock table, protocol, sizes);
//! 2. look at the target read-only: its sector size, its size, any filesystem
//!    signature (refused without `-f`), and whether the geometry is possible;
//! 3. only then create or resize an image file (`--size`) and format it through
//!    `mcfs_node::mkfs`, which writes metadata only (no zero-filling), superblocks
//!    last, so an interrupted mkfs leaves nothing that looks like a filesystem.
//!
//! Exit codes: 0 formatted, 1 refused or failed (with a message on stderr).

use std::io::IsTerminal;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use mcfs_blockdev::BlockDevice;
use mcfs_format::geometry::{Geometry, MkfsOptions};
use mcfs_format::sb::{self, LockProto};
use mcfs_node::mkfs::{detect_signature, mkfs, MkfsParams};

#[derive(Debug, thiserror::Error)]
enum MkfsError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Device { path: PathBuf, source: mcfs_blockdev::Error },
    #[error("{path}: {what}: {source}")]
    File { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Format(String),
}

#[derive(Debug, Parser)]
#[command(name = "mkfs.mcfs", version, about = "Make an mcfs filesystem on a block device or image file")]
struct Cli {
    /// Block size in bytes (512..64K, a power of two, at least the device's sector)
    #[arg(short = 'b', value_name = "BLOCKSIZE", default_value = "4096")]
    block_size: String,
    /// Number of journals: one per node that will mount the filesystem at once
    #[arg(short = 'j', value_name = "JOURNALS", default_value_t = 1)]
    journals: u32,
    /// Size of each journal, in MiB (or with a K/M/G suffix)
    #[arg(short = 'J', value_name = "JOURNAL_MiB")]
    journal_size: Option<String>,
    /// Size of each resource group, in MiB (or with a K/M/G suffix); default from the device size
    #[arg(short = 'r', value_name = "RGRP_MiB")]
    rgrp_size: Option<String>,
    /// Lock table CLUSTER:FSNAME (required with -p dlm)
    #[arg(short = 't', value_name = "CLUSTER:FSNAME")]
    table: Option<String>,
    /// Lock protocol: dlm (cluster) or nolock (one node)
    #[arg(short = 'p', value_name = "dlm|nolock", default_value = "dlm")]
    proto: String,
    /// Overwrite an existing filesystem without asking
    #[arg(short = 'f')]
    force: bool,
    /// Quiet: print nothing but errors
    #[arg(short = 'q')]
    quiet: bool,
    /// Image size (K/M/G/T suffixes): creates the file sparse if missing, or sets its length
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// Block device or image file
    #[arg(value_name = "DEVICE_OR_IMAGE")]
    device: PathBuf,
}

/// Parse "4096", "4K", "4KiB", "100G", "1.5G" (powers of 1024). `unit` scales a
/// bare number (1 for bytes, 1 MiB for -J/-r).
fn parse_size(s: &str, unit: u64) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suf) = t.split_at(split);
    let mult: u64 = match suf.trim().to_ascii_lowercase().as_str() {
        "" => unit,
        "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("size '{s}': unknown suffix '{other}' (use K, M, G or T)")),
    };
    if num.is_empty() {
        return Err(format!("size '{s}' is not a number"));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| format!("size '{s}' is too large"));
    }
    match num.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 && f * (mult as f64) < u64::MAX as f64 => Ok((f * mult as f64) as u64),
        _ => Err(format!("size '{s}' is not a number")),
    }
}

struct Plan {
    params: MkfsParams,
    size: Option<u64>,
}

fn plan(cli: &Cli) -> Result<Plan, MkfsError> {
    let usage = MkfsError::Usage;
    let block_size = parse_size(&cli.block_size, 1).map_err(usage)?;
    let block_size = u32::try_from(block_size).map_err(|_| MkfsError::Usage(format!("block size {block_size} is too large")))?;
    let lock_proto = LockProto::parse(&cli.proto).ok_or_else(|| MkfsError::Usage(format!("lock protocol '{}' must be dlm or nolock", cli.proto)))?;
    let (cluster, fsname) = match (&cli.table, lock_proto) {
        (Some(t), _) => sb::parse_table(t).map_err(usage)?,
        (None, LockProto::NoLock) => ("local".to_string(), "fs".to_string()),
        (None, LockProto::Dlm) => {
            return Err(MkfsError::Usage("a lock table is required with -p dlm: -t CLUSTER:FSNAME (or use -p nolock for one node)".into()))
        }
    };
    let defaults = MkfsOptions::default();
    let journal_bytes = match &cli.journal_size {
        Some(s) => parse_size(s, 1 << 20).map_err(usage)?,
        None => defaults.journal_bytes,
    };
    let rgrp_bytes = match &cli.rgrp_size {
        Some(s) => Some(parse_size(s, 1 << 20).map_err(usage)?),
        None => None,
    };
    let size = match &cli.size {
        Some(s) => Some(parse_size(s, 1).map_err(usage)?),
        None => None,
    };
    let opts = MkfsOptions { block_size, journals: cli.journals, journal_bytes, rgrp_bytes };
    Ok(Plan { params: MkfsParams { opts, lock_proto, cluster, fsname, uuid: None }, size })
}

fn geometry_check(size: u64, sector: u32, opts: &MkfsOptions) -> Result<Geometry, MkfsError> {
    Geometry::compute(size, sector, opts).map_err(|e| MkfsError::Refused(format!("cannot make a filesystem: {e}")))
}

fn open(path: &Path, read_only: bool) -> Result<mcfs_blockdev::UringDevice, MkfsError> {
    mcfs_blockdev::open_path(path, read_only).map_err(|source| MkfsError::Device { path: path.to_path_buf(), source })
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

fn run(cli: &Cli) -> Result<(), MkfsError> {
    let p = plan(cli)?;
    let path = cli.device.as_path();
    let md = std::fs::metadata(path);
    let exists = md.is_ok();
    let is_blockdev = md.as_ref().is_ok_and(|m| m.file_type().is_block_device());
    if let Ok(m) = &md {
        if !m.is_file() && !is_blockdev {
            return Err(MkfsError::Refused(format!("{}: not a block device or regular file", path.display())));
        }
    }
    if is_blockdev && p.size.is_some() {
        return Err(MkfsError::Usage("--size applies to image files only, not to a block device".into()));
    }
    if !exists && p.size.is_none() {
        return Err(MkfsError::Refused(format!("{}: no such file or device (give --size SIZE to create an image file)", path.display())));
    }

    // Step 2: look before touching anything.
    let mut created = false;
    if exists {
        let dev = open(path, true)?;
        let size = p.size.unwrap_or(dev.size());
        geometry_check(size, dev.sector_size(), &p.params.opts)?;
        let sig = detect_signature(&dev).map_err(|e| MkfsError::Format(format!("{}: reading the device: {e}", path.display())))?;
        if let Some(what) = sig {
            if !cli.force {
                return Err(MkfsError::Refused(format!("{} contains {what}; refusing to overwrite it (use -f to force)", path.display())));
            }
            if !cli.quiet {
                println!("{} contains {what}: overwriting it (-f)", path.display());
            }
        }
    } else {
        // 512 is the smallest sector any device has: what cannot fit with it
        // cannot fit at all, and nothing is created.
        geometry_check(p.size.unwrap_or(0), 512, &p.params.opts)?;
    }

    // Step 3: create or size the image, then format.
    if let Some(size) = p.size {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(!exists)
            .truncate(false)
            .open(path)
            .map_err(|source| MkfsError::File { path: path.to_path_buf(), what: "create", source })?;
        created = !exists;
        f.set_len(size).map_err(|source| MkfsError::File { path: path.to_path_buf(), what: "set length", source })?;
    }
    let result = format(cli, path, &p);
    if result.is_err() && created {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn format(cli: &Cli, path: &Path, p: &Plan) -> Result<(), MkfsError> {
    let dev = open(path, false)?;
    let geo = geometry_check(dev.size(), dev.sector_size(), &p.params.opts)?;
    let bar = (!cli.quiet && std::io::stdout().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(geo.rgrp_count as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} resource groups")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message("Writing");
        b
    });
    let t0 = Instant::now();
    let sb = mkfs(&dev, &p.params, &mut |done, _total| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    })
    .map_err(|e| MkfsError::Format(format!("{}: {e}", path.display())))?;
    let took = t0.elapsed();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if cli.quiet {
        return Ok(());
    }
    let g = sb.geometry;
    let rgrp_min = g.rgrps().map(|r| r.length).min().unwrap_or(0);
    let row = |k: &str, v: String| println!("{:<22}{v}", format!("{k}:"));
    row("Device", path.display().to_string());
    row("Block size", g.block_size.to_string());
    row("Device size", format!("{} ({} blocks)", human(dev.size()), dev.size() / g.block_size as u64));
    row("Filesystem size", format!("{} ({} blocks)", human(g.bytes(g.block_count)), g.block_count));
    row("Data blocks", format!("{} ({})", g.data_blocks(), human(g.bytes(g.data_blocks()))));
    row("Journals", format!("{} x {}", g.journal_count, human(g.bytes(g.journal_blocks as u64))));
    let rg = if rgrp_min < g.rgrp_blocks {
        format!("{} x {} (last {})", g.rgrp_count, human(g.bytes(g.rgrp_blocks as u64)), human(g.bytes(rgrp_min as u64)))
    } else {
        format!("{} x {}", g.rgrp_count, human(g.bytes(g.rgrp_blocks as u64)))
    };
    row("Resource groups", rg);
    row("Locking protocol", format!("\"{}\"", sb.lock_proto.as_str()));
    row("Lock table", format!("\"{}\"", sb.table()));
    row("UUID", sb::uuid_string(&sb.uuid));
    row("Root inode", sb.root_ino.to_string());
    row("Written in", format!("{:.3} s", took.as_secs_f64()));
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mkfs.mcfs: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096", 1), Ok(4096));
        assert_eq!(parse_size("4K", 1), Ok(4096));
        assert_eq!(parse_size("4kib", 1), Ok(4096));
        assert_eq!(parse_size("100G", 1), Ok(100 << 30));
        assert_eq!(parse_size("1.5G", 1), Ok(3 << 29));
        assert_eq!(parse_size("32", 1 << 20), Ok(32 << 20));
        assert_eq!(parse_size("512K", 1 << 20), Ok(512 << 10));
        assert!(parse_size("12X", 1).is_err());
        assert!(parse_size("", 1).is_err());
        assert!(parse_size("K", 1).is_err());
        assert!(parse_size("99999999999999999999T", 1).is_err());
    }
}
