//! Connection settings shared by every subcommand that talks to a daemon: given as
//! flags, or read from a local cluster's `cluster.toml` (written by `mcfs cluster up`).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Address of mcfs-dlm (host:port).
    #[arg(long, env = "MCFS_DLM")]
    pub dlm: Option<String>,
    /// Address of mcfs-fenced (host:port).
    #[arg(long, env = "MCFS_FENCE")]
    pub fence: Option<String>,
    /// File holding the cluster secret.
    #[arg(long, env = "MCFS_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Local cluster directory whose cluster.toml supplies missing settings.
    #[arg(long, env = "MCFS_CLUSTER_DIR", default_value = "./mcfs-cluster")]
    pub cluster_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The part of a local cluster's `cluster.toml` the CLI reads.
#[derive(serde::Deserialize, Debug, Default)]
pub struct ClusterFile {
    pub dlm_addr: Option<String>,
    pub fence_addr: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub lockspace: Option<String>,
}

impl ClusterFile {
    pub fn load(dir: &Path) -> Result<Option<ClusterFile>> {
        let p = dir.join("cluster.toml");
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(toml::from_str(&s).with_context(|| format!("parsing {}", p.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
}

pub struct Resolved {
    pub dlm: Option<String>,
    pub fence: Option<String>,
    pub secret: mcfs_proto::auth::Secret,
    pub lockspace: Option<String>,
}

impl ConnArgs {
    pub fn resolve(&self) -> Result<Resolved> {
        let file = ClusterFile::load(&self.cluster_dir)?.unwrap_or_default();
        let secret_file = self.secret_file.clone().or(file.secret_file).context(
            "no cluster secret: pass --secret-file FILE (or run inside a directory made by `mcfs cluster up`)",
        )?;
        let secret = mcfs_proto::auth::Secret::from_file(&secret_file).map_err(anyhow::Error::msg)?;
        Ok(Resolved {
            dlm: self.dlm.clone().or(file.dlm_addr),
            fence: self.fence.clone().or(file.fence_addr),
            secret,
            lockspace: file.lockspace,
        })
    }
}

pub fn endpoint(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}
