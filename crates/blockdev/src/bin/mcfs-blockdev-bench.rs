//! `mcfs-blockdev-bench`: this crate against fio on the same loop device.

use clap::Parser;
use mcfs_blockdev::bench::{self, BenchOpts};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark mcfs-blockdev against fio (io_uring, O_DIRECT) on the same device",
    long_about = "Runs 4 KiB random I/O at queue depth 64 and 1 MiB sequential I/O at queue \
                  depth 8 with this crate and with `fio --ioengine=io_uring --direct=1`, on the \
                  same device, and prints a table with the ratio to fio. Without DEVICE it \
                  creates a loop device (--direct-io=on) over a sparse file in a temp dir and \
                  detaches it afterwards."
)]
struct Args {
    /// Block device or file to use. ITS CONTENTS ARE DESTROYED (needs --destroy-data).
    device: Option<PathBuf>,
    /// Allow writing over DEVICE.
    #[arg(long)]
    destroy_data: bool,
    /// Seconds per measurement (each side, each workload, each round).
    #[arg(long, default_value_t = 2.0)]
    runtime: f64,
    /// Size of the loop device's sparse image, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Repeat each measurement, alternating which side goes first; report medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Only the write workloads.
    #[arg(long)]
    no_reads: bool,
    /// Do not write the whole device once before measuring.
    #[arg(long)]
    no_precondition: bool,
    /// Threads for the "blocking" rows of the 4 KiB random workloads (0 skips them).
    #[arg(long, default_value_t = 64)]
    sync_threads: usize,
    /// Only these workloads (comma-separated fio names: randwrite,write,randread,read).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip the "fio again" control rows (fio against itself, the noise floor).
    #[arg(long)]
    no_control: bool,
    /// fio binary.
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
    /// Measure this crate only.
    #[arg(long)]
    no_fio: bool,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.device.is_some() && !args.destroy_data {
        eprintln!("error: the bench overwrites DEVICE; pass --destroy-data to confirm");
        return ExitCode::from(2);
    }
    if !(args.runtime > 0.0 && args.runtime.is_finite()) {
        eprintln!("error: --runtime must be a positive number of seconds");
        return ExitCode::from(2);
    }
    let opts = BenchOpts {
        runtime: Duration::from_secs_f64(args.runtime),
        image_size: args.size_mib << 20,
        reads: !args.no_reads,
        rounds: args.rounds,
        precondition: !args.no_precondition,
        fio: (!args.no_fio).then(|| args.fio.clone()),
        sync_threads: args.sync_threads,
        only: args.only.clone(),
        control: !args.no_control,
    };
    let target = match &args.device {
        Some(d) => d.display().to_string(),
        None => format!("a fresh {} MiB loop device (--direct-io=on)", args.size_mib),
    };
    let load_before = bench::load_average();
    match bench::run(args.device.as_deref(), &opts) {
        Ok(rows) => {
            if args.json {
                match serde_json::to_string_pretty(&rows) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("mcfs-blockdev vs fio on {target}; {}", bench::machine_summary());
                println!(
                    "{} s per measurement, {} round(s), medians; ratio = median of per-round \
                     ratios (min–max); load average before {load_before}, after {}",
                    args.runtime,
                    opts.rounds,
                    bench::load_average()
                );
                println!(
                    "mcfs rows: callbacks = submit_*_with, resubmitting on the ring thread; \
                     futures = IoFuture awaited by one thread; blocking = N threads calling \
                     write_at/read_at. CPU = user+system of the whole process (fio: its \
                     process tree)."
                );
                println!();
                print!("{}", bench::format_table(&rows));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
