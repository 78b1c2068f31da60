//! `fsck.mcfs` (built as `fsck-mcfs`; `tools/install-names` installs the dotted
//! name that `fsck -t mcfs` looks for).
//!
//! ```text
//! fsck.mcfs [-n] [-y] [-v] [--json] DEVICE_OR_IMAGE
//! ```
//!
//! Exit codes as e2fsck (bit flags): 0 clean, 1 errors corrected, 4 errors left
//! uncorrected (1+4 = 5 when both), 8 operational error (cannot open or read,
//! not mcfs), 16 usage error. Without -y nothing is written (-n is assumed).
//! Never run it on a mounted filesystem.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use mcfs_fsck::{check, Options, Report, EXIT_OPERATIONAL};

const EXIT_USAGE: u8 = 16;
/// Findings printed without -v.
const BRIEF: usize = 10;

#[derive(Debug, Parser)]
#[command(name = "fsck.mcfs", version, about = "Check and repair an mcfs filesystem (never while it is mounted)")]
struct Cli {
    /// Check only: open read-only, write nothing (the default)
    #[arg(short = 'n')]
    no: bool,
    /// Repair everything that can be repaired, without asking
    #[arg(short = 'y')]
    yes: bool,
    /// Same as -y (what fsck(8) passes for automatic repair)
    #[arg(short = 'p', short_alias = 'a')]
    preen: bool,
    /// Accepted for compatibility: every check is always a full check
    #[arg(short = 'f')]
    _force: bool,
    /// Print every finding
    #[arg(short = 'v')]
    verbose: bool,
    /// Print the report as JSON (and nothing else) on stdout
    #[arg(long)]
    json: bool,
    /// Block device or image file
    #[arg(value_name = "DEVICE_OR_IMAGE")]
    device: PathBuf,
}

fn print_human(path: &str, r: &Report, verbose: bool, assumed_n: bool) {
    if let Some(e) = &r.operational_error {
        eprintln!("fsck.mcfs: {path}: {e}");
        return;
    }
    if assumed_n {
        println!("fsck.mcfs: neither -n nor -y given: checking only (-n); nothing will be written");
    }
    println!("fsck.mcfs: {path}: {} (uuid {})", r.lock_table.as_deref().unwrap_or("?"), r.uuid.as_deref().unwrap_or("?"));
    for j in &r.journals {
        if j.state != "clean" {
            println!("  journal {}: {} (head sequence {})", j.slot, j.state, j.head_seq);
        }
    }
    let shown = if verbose { r.findings.len() } else { BRIEF.min(r.findings.len()) };
    for f in &r.findings[..shown] {
        let tag = if f.fixed { "FIXED" } else if f.fixable { "FOUND" } else { "LEFT" };
        println!("  [{tag}] {:?}: {}", f.kind, f.message);
    }
    if shown < r.findings.len() {
        println!("  ... and {} more (-v shows all)", r.findings.len() - shown);
    }
    let s = &r.stats;
    if !r.findings.is_empty() {
        let kinds: Vec<String> = r.counts().iter().map(|(k, n)| format!("{k:?} {n}")).collect();
        println!("Findings: {} ({} fixed, {} not): {}", r.findings.len(), r.fixed(), r.uncorrected(), kinds.join(", "));
    }
    println!(
        "{} inodes ({} directories, {} files, {} symlinks, {} other); {} of {} data blocks in use",
        s.inodes, s.directories, s.files, s.symlinks, s.other_inodes, s.blocks_in_use, s.data_blocks
    );
    println!(
        "Read {:.1} MiB in {} requests, wrote {} blocks, {:.3} s",
        s.bytes_read as f64 / (1 << 20) as f64,
        s.read_requests,
        s.blocks_written,
        s.elapsed_ms as f64 / 1000.0
    );
    let verdict = match r.exit_code() {
        0 => "clean".to_string(),
        1 => "errors corrected".to_string(),
        4 if r.mode == "check" => "errors found (run with -y to repair)".to_string(),
        4 => "errors left uncorrected".to_string(),
        5 => "errors corrected, some left uncorrected".to_string(),
        c => format!("exit {c}"),
    };
    println!("{path}: {verdict}");
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ => EXIT_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let repair = cli.yes || cli.preen;
    if cli.no && repair {
        eprintln!("fsck.mcfs: -n and -y (or -p) cannot be given together");
        return ExitCode::from(EXIT_USAGE);
    }
    let path = cli.device.display().to_string();
    let dev = match mcfs_blockdev::open_path(&cli.device, !repair) {
        Ok(d) => d,
        Err(e) => {
            if cli.json {
                let r = Report { mode: if repair { "repair" } else { "check" }, operational_error: Some(e.to_string()), ..Default::default() };
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                eprintln!("fsck.mcfs: {e}");
            }
            return ExitCode::from(EXIT_OPERATIONAL as u8);
        }
    };
    let bar = (!cli.json && std::io::stdout().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(indicatif::ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        b
    });
    let progress: Option<mcfs_fsck::ProgressFn> = bar.clone().map(|b| {
        Arc::new(move |phase: &str, done: u64, total: u64| {
            b.set_length(total.max(1));
            b.set_position(done.min(total));
            b.set_message(phase.to_string());
        }) as mcfs_fsck::ProgressFn
    });
    let report = check(&dev, &Options { repair, progress });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print_human(&path, &report, cli.verbose, !cli.no && !repair);
    }
    ExitCode::from(report.exit_code() as u8)
}
