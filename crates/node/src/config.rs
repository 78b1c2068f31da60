//! mcfs-node configuration: command-line flags, an optional TOML file (flags
//! win), and the `mount.fuse.mcfs DEV DIR -o k=v,...` helper convention.
//! docs/CONFIGURATION.md lists every key with its default.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::icache::EvictMode;

#[derive(Parser, Debug, Clone, Default)]
#[command(name = "mcfs-node", version, about = "mcfs node daemon: mounts a shared mcfs device through FUSE")]
pub struct Args {
    /// Shared block device (or image file).
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Where to mount.
    #[arg(long)]
    pub mountpoint: Option<PathBuf>,
    /// This node's id (1..=255), unique in the cluster.
    #[arg(long)]
    pub node_id: Option<u32>,
    /// mcfs-dlm address (host:port).
    #[arg(long)]
    pub dlm: Option<String>,
    /// File with the cluster secret.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// `dlm` (default) or `nolock` (single node, no lock server).
    #[arg(long)]
    pub lock: Option<String>,
    /// Mount a filesystem made for `dlm` without a lock server.
    #[arg(long)]
    pub force_nolock: bool,
    /// Memory budget for caches (e.g. 256M, 1G).
    #[arg(long)]
    pub cache_mem: Option<String>,
    /// Eviction from reclaim: `nonblocking` (default) or `sync` (GFS2-like).
    #[arg(long)]
    pub evict: Option<String>,
    /// Mount options: allow_other, ro, fsname=...
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Listen address of the NodeAdmin service.
    #[arg(long)]
    pub admin: Option<String>,
    /// Write the admin address here once listening.
    #[arg(long)]
    pub admin_addr_file: Option<PathBuf>,
    /// Write this process's pid here (for process fencing).
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// FUSE worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Minimum glock hold time in milliseconds.
    #[arg(long)]
    pub min_hold_ms: Option<u64>,
    /// Inode glocks kept while idle (default: one per 4 KiB of the cache budget).
    #[arg(long)]
    pub max_glocks: Option<usize>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Keep retrying to reach the lock server for this long (seconds).
    #[arg(long)]
    pub join_wait_s: Option<u64>,
    /// Mount helper: where the daemon logs (default: nowhere; mount(8)'s
    /// output must not be held open by the daemon).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The TOML file: the same keys as the flags, with underscores.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub device: Option<PathBuf>,
    pub mountpoint: Option<PathBuf>,
    pub node_id: Option<u32>,
    pub dlm: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub lock: Option<String>,
    pub force_nolock: Option<bool>,
    pub cache_mem: Option<String>,
    pub evict: Option<String>,
    pub options: Option<Vec<String>>,
    pub admin: Option<String>,
    pub admin_addr_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub threads: Option<usize>,
    pub min_hold_ms: Option<u64>,
    pub max_glocks: Option<usize>,
    pub metrics: Option<String>,
    pub join_wait_s: Option<u64>,
    pub log_file: Option<PathBuf>,
    pub log_json: Option<bool>,
}

/// FUSE worker threads. Few is fast: the kernel wakes the longest-idle reader
/// first, so with many threads every request lands on a cold one (measured on
/// 2 cores: create+stat+unlink 3,364/s with 2 threads, 1,920/s with 8). Each
/// thread that waits for a remote lock takes one away from other requests:
/// raise it for many concurrent users.
pub const DEFAULT_THREADS: usize = 2;

/// A complete, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    pub node_id: u32,
    pub dlm: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub nolock: bool,
    pub force_nolock: bool,
    pub cache_mem: Option<u64>,
    pub evict: EvictMode,
    pub allow_other: bool,
    pub read_only: bool,
    /// Let the kernel cache names and attributes while this node holds their
    /// glocks (`-o nokernelcache` turns it off; docs/SEMANTICS.md).
    pub kernel_cache: bool,
    /// Cluster mounts: let the kernel cache names too (`-o namecache`); a
    /// change by another node then invalidates every name, which detaches
    /// mounts stacked inside this one (docs/SEMANTICS.md, "Kernel caches").
    pub name_cache: bool,
    pub admin: String,
    pub admin_addr_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub threads: usize,
    pub min_hold: Duration,
    pub max_glocks: Option<usize>,
    pub metrics: Option<String>,
    pub log_json: bool,
    pub join_wait: Duration,
    pub log_file: Option<PathBuf>,
}

/// Parse "256M", "1G", "4096", "1.5G".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        Some('t' | 'T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 4096, 256M, 2G)"))?;
    if !(v >= 0.0) || v * mult as f64 > u64::MAX as f64 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok((v * mult as f64) as u64)
}

impl Args {
    /// `mount.fuse.mcfs DEV DIR [-o k=v,...]`: mount(8)'s helper convention.
    pub fn from_mount_helper(argv: &[String]) -> Result<Args, String> {
        let mut a = Args::default();
        let mut pos = Vec::new();
        let mut i = 1;
        while i < argv.len() {
            if argv[i] == "-o" {
                let v = argv.get(i + 1).ok_or("-o needs options")?;
                for kv in v.split(',') {
                    let (k, val) = kv.split_once('=').map_or((kv, None), |(k, v)| (k, Some(v.to_string())));
                    let need = |v: Option<String>| v.ok_or(format!("{k}= needs a value"));
                    match k {
                        "node_id" => a.node_id = Some(need(val)?.parse().map_err(|_| "node_id= must be a number")?),
                        "dlm" => a.dlm = val,
                        "secret_file" => a.secret_file = val.map(PathBuf::from),
                        "lock" => a.lock = val,
                        "cache_mem" => a.cache_mem = val,
                        "evict" => a.evict = val,
                        "config" => a.config = val.map(PathBuf::from),
                        "admin" => a.admin = val,
                        "admin_addr_file" => a.admin_addr_file = val.map(PathBuf::from),
                        "pid_file" => a.pid_file = val.map(PathBuf::from),
                        "metrics" => a.metrics = val,
                        "threads" => a.threads = Some(need(val)?.parse().map_err(|_| "threads= must be a number")?),
                        "min_hold_ms" => a.min_hold_ms = Some(need(val)?.parse().map_err(|_| "min_hold_ms= must be a number")?),
                        "max_glocks" => a.max_glocks = Some(need(val)?.parse().map_err(|_| "max_glocks= must be a number")?),
                        "join_wait_s" => a.join_wait_s = Some(need(val)?.parse().map_err(|_| "join_wait_s= must be a number")?),
                        "log_file" => a.log_file = val.map(PathBuf::from),
                        "force_nolock" => a.force_nolock = true,
                        "log_json" => a.log_json = true,
                        // generic mount options mount(8) passes along
                        "rw" | "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser" | "dev" | "suid" | "exec" | "nodev" | "nosuid" | "noexec" | "atime" | "noatime" | "relatime" => {}
                        other => a.options.push(match val {
                            Some(v) => format!("{other}={v}"),
                            None => other.to_string(),
                        }),
                    }
                }
                i += 2;
            } else if matches!(argv[i].as_str(), "-t" | "-N") {
                // -t TYPE, -N NAMESPACE: mount(8) may pass them; the value is not ours
                i += 2;
            } else if argv[i].starts_with('-') {
                // -n (no mtab), -s (sloppy), -v: accepted and ignored
                i += 1;
            } else {
                pos.push(argv[i].clone());
                i += 1;
            }
        }
        if pos.len() != 2 {
            return Err("usage: mount.fuse.mcfs DEVICE MOUNTPOINT -o node_id=N,dlm=ADDR,secret_file=F[,...]".into());
        }
        a.device = Some(PathBuf::from(&pos[0]));
        a.mountpoint = Some(PathBuf::from(&pos[1]));
        Ok(a)
    }

    /// Merge with the TOML file (if any) and check.
    pub fn resolve(self) -> Result<Config, String> {
        let f: FileConfig = match &self.config {
            Some(p) => {
                let s = std::fs::read_to_string(p).map_err(|e| format!("cannot read config {}: {e}", p.display()))?;
                toml::from_str(&s).map_err(|e| format!("config {}: {e}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let device = self.device.or(f.device).ok_or("missing --device (the shared block device or image)")?;
        let mountpoint = self.mountpoint.or(f.mountpoint).ok_or("missing --mountpoint")?;
        let node_id = self.node_id.or(f.node_id).ok_or("missing --node-id (1..=255, unique per node)")?;
        if !(1..=255).contains(&node_id) {
            return Err(format!("node id {node_id} must be between 1 and 255"));
        }
        let lock = self.lock.or(f.lock).unwrap_or_else(|| "dlm".into());
        let nolock = match lock.as_str() {
            "dlm" | "lock_dlm" => false,
            "nolock" | "lock_nolock" => true,
            other => return Err(format!("--lock must be dlm or nolock, not '{other}'")),
        };
        let dlm = self.dlm.or(f.dlm);
        let secret_file = self.secret_file.or(f.secret_file);
        if !nolock && (dlm.is_none() || secret_file.is_none()) {
            return Err("a cluster mount needs --dlm ADDR and --secret-file FILE (or --lock nolock for a single node)".into());
        }
        let cache_mem = match self.cache_mem.or(f.cache_mem) {
            Some(s) => Some(parse_size(&s)?),
            None => None,
        };
        let evict = match self.evict.or(f.evict) {
            Some(s) => EvictMode::parse(&s).ok_or_else(|| format!("--evict must be nonblocking or sync, not '{s}'"))?,
            None => EvictMode::Nonblocking,
        };
        let mut opts = f.options.unwrap_or_default();
        opts.extend(self.options.iter().flat_map(|o| o.split(',').map(str::to_string)));
        let mut allow_other = false;
        let mut read_only = false;
        let mut kernel_cache = true;
        let mut name_cache = false;
        for o in &opts {
            match o.as_str() {
                "allow_other" => allow_other = true,
                "ro" => read_only = true,
                "kernelcache" => kernel_cache = true,
                "nokernelcache" => kernel_cache = false,
                "namecache" => name_cache = true,
                "nonamecache" => name_cache = false,
                "rw" | "default_permissions" | "" => {}
                other => return Err(format!("unknown mount option '{other}' (known: allow_other, ro, rw, kernelcache, nokernelcache, namecache, nonamecache)")),
            }
        }
        Ok(Config {
            device,
            mountpoint,
            node_id,
            dlm,
            secret_file,
            nolock,
            force_nolock: self.force_nolock || f.force_nolock.unwrap_or(false),
            cache_mem,
            evict,
            allow_other,
            read_only,
            kernel_cache,
            name_cache,
            admin: self.admin.or(f.admin).unwrap_or_else(|| "127.0.0.1:0".into()),
            admin_addr_file: self.admin_addr_file.or(f.admin_addr_file),
            pid_file: self.pid_file.or(f.pid_file),
            threads: self.threads.or(f.threads).unwrap_or(DEFAULT_THREADS).clamp(1, 64),
            min_hold: Duration::from_millis(self.min_hold_ms.or(f.min_hold_ms).unwrap_or(10)),
            max_glocks: match self.max_glocks.or(f.max_glocks) {
                Some(0) => return Err("max_glocks must be at least 1".into()),
                m => m,
            },
            metrics: self.metrics.or(f.metrics),
            log_json: self.log_json || f.log_json.unwrap_or(false),
            join_wait: Duration::from_secs(self.join_wait_s.or(f.join_wait_s).unwrap_or(30)),
            log_file: self.log_file.or(f.log_file),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn mount_helper_args() {
        let argv: Vec<String> = ["mount.fuse.mcfs", "/dev/loop3", "/mnt/x", "-o", "rw,node_id=2,dlm=127.0.0.1:7000,secret_file=/etc/mcfs/secret,allow_other"].iter().map(|s| s.to_string()).collect();
        let c = Args::from_mount_helper(&argv).unwrap().resolve().unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.dlm.as_deref(), Some("127.0.0.1:7000"));
        assert!(c.allow_other);
        assert!(c.kernel_cache && !c.name_cache);
        assert!(Args::from_mount_helper(&argv[..2]).is_err());
        let mut off = argv.clone();
        off[4].push_str(",nokernelcache,namecache");
        let c = Args::from_mount_helper(&off).unwrap().resolve().unwrap();
        assert!(!c.kernel_cache && c.name_cache);
    }

    #[test]
    fn missing_and_bad_values_are_clear() {
        let a = Args { device: Some("/d".into()), mountpoint: Some("/m".into()), node_id: Some(1), ..Default::default() };
        assert!(a.clone().resolve().unwrap_err().contains("--dlm"));
        let mut b = a.clone();
        b.lock = Some("nolock".into());
        assert!(b.clone().resolve().is_ok());
        b.node_id = Some(300);
        assert!(b.resolve().unwrap_err().contains("between 1 and 255"));
        let mut c = a;
        c.lock = Some("nolock".into());
        c.options = vec!["bogus".into()];
        assert!(c.resolve().unwrap_err().contains("unknown mount option"));
    }
}
