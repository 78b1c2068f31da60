//! The fencing configuration (TOML) and its start-up validation.
//!
//! ```toml
//! [[node]]
//! id = 1                     # the DLM's node id; 0 is reserved ("all" in History)
//! name = "node1"             # passed to agents as nodename=; default "node<id>"
//!
//!   [[node.level]]           # levels are tried in the order written
//!   method = "process"
//!   pid_file = "/run/mcfs/node1.pid"
//!   expect_cmdline = "mcfs-node"          # substring of /proc/<pid>/cmdline
//!   cgroup = "/sys/fs/cgroup/mcfs/node1"  # every process in it (v1 or v2)
//!   devices = ["/dev/loop0"]              # wait for their in-flight I/O to drain
//!   timeout_ms = 10000
//!
//!   [[node.level]]
//!   method = "agent"
//!   agent = "fence_dummy"                 # absolute path, or looked up in PATH and /usr/sbin
//!   plug = "node1"                        # sent as plug= when given
//!   timeout_ms = 30000                    # one deadline for off + status
//!   unfence = true                        # run action=on for this level on Unfence
//!   options = { status_file = "/run/mcfs/node1.power" }
//!
//!   [[node.level]]
//!   method = "manual"                     # wait for `mcfs fence ack 1`
//!   timeout_ms = 0                        # 0 (default): wait as long as it takes
//!
//! [server]                   # optional: daemon bounds, same names as the flags
//! metrics = "127.0.0.1:9101"               # serve GET /metrics here
//! max_connections = 256
//! handshake_timeout_ms = 5000
//! max_streams_per_connection = 64
//! max_message_bytes = 65536
//! request_timeout_ms = 30000
//! max_pending_ops_per_node = 16
//! ```
//!
//! Everything that can be checked before a failure is checked at load time: TOML
//! syntax, unknown keys (a typo must not silently disable a level), duplicate node
//! ids, agent binaries that are missing or not executable, pid-file directories
//! that cannot be read, cgroups without a readable `cgroup.procs`, devices that are
//! not block devices or whose in-flight counter cannot be read.

use crate::error::{FenceError, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_PROCESS_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_AGENT_TIMEOUT_MS: u64 = 60_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub nodes: BTreeMap<u32, NodeConfig>,
    /// The `[server]` table (flags are laid over it by the daemon).
    pub server: ServerSettings,
}

/// Bounds of the daemon, for bad peers: the `[server]` table of the file, and
/// flags of the same names (flags win). Each getter gives the default.
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Serve Prometheus metrics (GET /metrics) on this address (host:port).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Write the bound metrics address (host:port) here once listening.
    #[arg(long)]
    pub metrics_addr_file: Option<PathBuf>,
    /// Open TCP connections [256].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// A connection must send the HTTP/2 preface within this time [5000].
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// Concurrent calls (HTTP/2 streams) per connection [64].
    #[arg(long)]
    pub max_streams_per_connection: Option<u32>,
    /// Largest request message in bytes [65536].
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Deadline of a call, from its headers to its reply [30000].
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Operations (running or queued) per node; a new request id beyond
    /// this is refused with RESOURCE_EXHAUSTED [16].
    #[arg(long)]
    pub max_pending_ops_per_node: Option<usize>,
}

impl ServerSettings {
    /// `self` with every setting `flags` gives replaced.
    pub fn overlaid(&self, flags: &ServerSettings) -> ServerSettings {
        let mut s = self.clone();
        macro_rules! over {
            ($($f:ident),*) => { $( if flags.$f.is_some() { s.$f = flags.$f.clone(); } )* };
        }
        over!(
            metrics,
            metrics_addr_file,
            max_connections,
            handshake_timeout_ms,
            max_streams_per_connection,
            max_message_bytes,
            request_timeout_ms,
            max_pending_ops_per_node
        );
        s
    }
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(256)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.unwrap_or(5000))
    }
    pub fn max_streams_per_connection(&self) -> u32 {
        self.max_streams_per_connection.unwrap_or(64)
    }
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes.unwrap_or(64 << 10)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.unwrap_or(30_000))
    }
    pub fn max_pending_ops_per_node(&self) -> usize {
        self.max_pending_ops_per_node.unwrap_or(16)
    }

    /// Zero bounds would refuse everything: an error at start-up.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let checks = [
            ("max_connections", self.max_connections() as u64),
            ("handshake_timeout_ms", self.handshake_timeout().as_millis() as u64),
            ("max_streams_per_connection", u64::from(self.max_streams_per_connection())),
            ("max_message_bytes", self.max_message_bytes() as u64),
            ("request_timeout_ms", self.request_timeout().as_millis() as u64),
            ("max_pending_ops_per_node", self.max_pending_ops_per_node() as u64),
        ];
        match checks.iter().find(|(_, v)| *v == 0) {
            Some((k, _)) => Err(format!("[server] {k} must be positive")),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u32,
    pub name: String,
    pub levels: Vec<Level>,
}

#[derive(Debug, Clone)]
pub enum Level {
    Process(ProcessLevel),
    Agent(AgentLevel),
    Manual(ManualLevel),
}

#[derive(Debug, Clone)]
pub struct ProcessLevel {
    pub pid_file: Option<PathBuf>,
    pub expect_cmdline: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub devices: Vec<Device>,
    pub timeout: Duration,
}

/// A shared block device and the sysfs file that counts its in-flight requests.
#[derive(Debug, Clone)]
pub struct Device {
    pub path: PathBuf,
    pub inflight: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AgentLevel {
    /// Resolved absolute path of the `fence_*` executable.
    pub agent: PathBuf,
    pub plug: Option<String>,
    pub options: BTreeMap<String, String>,
    pub timeout: Duration,
    pub unfence: bool,
}

#[derive(Debug, Clone)]
pub struct ManualLevel {
    pub timeout: Option<Duration>,
}

impl Level {
    /// Short name recorded in attempts and replies (`FenceReply.method`).
    pub fn method_name(&self) -> String {
        match self {
            Level::Process(_) => "process".into(),
            Level::Agent(a) => {
                let name = a
                    .agent
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("agent:{name}")
            }
            Level::Manual(_) => "manual".into(),
        }
    }

    /// One-line description for `mcfs fence status`.
    pub fn describe(&self) -> String {
        match self {
            Level::Process(p) => {
                let mut parts = Vec::new();
                if let Some(f) = &p.pid_file {
                    parts.push(format!("pid_file={}", f.display()));
                }
                if let Some(c) = &p.expect_cmdline {
                    parts.push(format!("expect_cmdline={c:?}"));
                }
                if let Some(c) = &p.cgroup {
                    parts.push(format!("cgroup={}", c.display()));
                }
                for d in &p.devices {
                    parts.push(format!("device={}", d.path.display()));
                }
                parts.push(format!("timeout={}ms", p.timeout.as_millis()));
                format!("process({})", parts.join(" "))
            }
            Level::Agent(a) => {
                let mut s = format!("agent({}", a.agent.display());
                if let Some(p) = &a.plug {
                    s.push_str(&format!(" plug={p}"));
                }
                s.push_str(&format!(
                    " timeout={}ms unfence={})",
                    a.timeout.as_millis(),
                    a.unfence
                ));
                s
            }
            Level::Manual(m) => match m.timeout {
                Some(t) => format!("manual(timeout={}ms)", t.as_millis()),
                None => "manual(no timeout)".into(),
            },
        }
    }
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            FenceError::config(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate configuration text; `path` names it in messages and
    /// anchors relative paths inside it.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let where_ = path.display().to_string();
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| FenceError::config(&where_, e.to_string()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut nodes = BTreeMap::new();
        if raw.node.is_empty() {
            return Err(FenceError::config(&where_, "no [[node]] is configured"));
        }
        for rn in raw.node {
            let id = rn.id;
            let ctx = |msg: String| FenceError::config(&where_, format!("node {id}: {msg}"));
            if id == 0 {
                return Err(FenceError::config(
                    &where_,
                    "node id 0 is reserved (it means \"all nodes\" in History)",
                ));
            }
            if nodes.contains_key(&id) {
                return Err(FenceError::config(
                    &where_,
                    format!("node id {id} is configured twice"),
                ));
            }
            let name = rn.name.unwrap_or_else(|| format!("node{id}"));
            check_value(&name).map_err(|m| ctx(format!("name: {m}")))?;
            if rn.level.is_empty() {
                return Err(ctx(
                    "has no fencing level (add at least one [[node.level]])".into(),
                ));
            }
            let mut levels = Vec::new();
            for (i, rl) in rn.level.into_iter().enumerate() {
                let n = i + 1;
                let lvl = validate_level(rl, &base).map_err(|m| ctx(format!("level {n}: {m}")))?;
                levels.push(lvl);
            }
            nodes.insert(id, NodeConfig { id, name, levels });
        }
        raw.server
            .validate()
            .map_err(|m| FenceError::config(&where_, m))?;
        Ok(Config {
            path: path.to_path_buf(),
            nodes,
            server: raw.server,
        })
    }

    pub fn node(&self, id: u32) -> Result<&NodeConfig> {
        self.nodes.get(&id).ok_or_else(|| FenceError::UnknownNode {
            node: id,
            known: self.known_nodes(),
        })
    }

    pub fn known_nodes(&self) -> String {
        let ids: Vec<String> = self.nodes.keys().map(u32::to_string).collect();
        if ids.is_empty() {
            "none".into()
        } else {
            ids.join(", ")
        }
    }

    /// Things that are allowed but weaken the guarantee; logged at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        for n in self.nodes.values() {
            for (i, l) in n.levels.iter().enumerate() {
                if let Level::Process(p) = l {
                    if p.devices.is_empty() {
                        w.push(format!(
                            "node {} level {}: process level without devices: success means the processes exited, \
                             not that their in-flight I/O drained",
                            n.id,
                            i + 1
                        ));
                    }
                    if p.pid_file.is_some() && p.expect_cmdline.is_none() {
                        w.push(format!(
                            "node {} level {}: pid_file without expect_cmdline: a recycled pid would be killed",
                            n.id,
                            i + 1
                        ));
                    }
                }
            }
        }
        w
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    server: ServerSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: u32,
    name: Option<String>,
    #[serde(default)]
    level: Vec<RawLevel>,
}

#[derive(Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
enum RawLevel {
    Process {
        pid_file: Option<PathBuf>,
        expect_cmdline: Option<String>,
        cgroup: Option<PathBuf>,
        #[serde(default)]
        devices: Vec<PathBuf>,
        timeout_ms: Option<u64>,
    },
    Agent {
        agent: String,
        plug: Option<String>,
        #[serde(default)]
        options: BTreeMap<String, toml::Value>,
        timeout_ms: Option<u64>,
        unfence: Option<bool>,
    },
    Manual {
        timeout_ms: Option<u64>,
    },
}

fn absolute(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

fn timeout(ms: Option<u64>, default: u64) -> std::result::Result<Duration, String> {
    match ms {
        Some(0) => Err("timeout_ms must be positive".into()),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(Duration::from_millis(default)),
    }
}

/// Agent options travel as `key=value` lines: a newline would smuggle in another option.
fn check_value(v: &str) -> std::result::Result<(), String> {
    if v.is_empty() {
        return Err("must not be empty".into());
    }
    if v.contains('\n') || v.contains('\r') || v.contains('\0') {
        return Err(format!("{v:?} contains a line break or NUL"));
    }
    Ok(())
}

fn validate_level(rl: RawLevel, base: &Path) -> std::result::Result<Level, String> {
    match rl {
        RawLevel::Process {
            pid_file,
            expect_cmdline,
            cgroup,
            devices,
            timeout_ms,
        } => {
            if pid_file.is_none() && cgroup.is_none() {
                return Err("a process level needs pid_file or cgroup (or both)".into());
            }
            let pid_file = pid_file.map(|p| absolute(base, p));
            if let Some(pf) = &pid_file {
                check_pid_file(pf)?;
            }
            if let Some(c) = &expect_cmdline {
                if c.is_empty() {
                    return Err("expect_cmdline must not be empty".into());
                }
            }
            if let Some(cg) = &cgroup {
                let procs = cg.join("cgroup.procs");
                std::fs::read_to_string(&procs).map_err(|e| {
                    format!(
                        "cgroup {}: cannot read {}: {e}",
                        cg.display(),
                        procs.display()
                    )
                })?;
            }
            let devices = devices
                .into_iter()
                .map(|d| device(absolute(base, d)))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(Level::Process(ProcessLevel {
                pid_file,
                expect_cmdline,
                cgroup,
                devices,
                timeout: timeout(timeout_ms, DEFAULT_PROCESS_TIMEOUT_MS)?,
            }))
        }
        RawLevel::Agent {
            agent,
            plug,
            options,
            timeout_ms,
            unfence,
        } => {
            let agent = resolve_agent(&agent)?;
            if let Some(p) = &plug {
                check_value(p).map_err(|m| format!("plug: {m}"))?;
            }
            let mut opts = BTreeMap::new();
            for (k, v) in options {
                if matches!(
                    k.as_str(),
                    "action" | "option" | "nodename" | "plug" | "port"
                ) {
                    return Err(format!(
                        "option {k:?} is set by mcfs-fenced itself (use `plug =` for the plug)"
                    ));
                }
                if k.is_empty() || k.contains('=') {
                    return Err(format!("option name {k:?} is not valid"));
                }
                let s = match v {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "option {k:?}: {} is not a string, number or boolean",
                            other.type_str()
                        ))
                    }
                };
                check_value(&s).map_err(|m| format!("option {k:?}: {m}"))?;
                check_value(&k).map_err(|m| format!("option name: {m}"))?;
                opts.insert(k, s);
            }
            Ok(Level::Agent(AgentLevel {
                agent,
                plug,
                options: opts,
                timeout: timeout(timeout_ms, DEFAULT_AGENT_TIMEOUT_MS)?,
                unfence: unfence.unwrap_or(true),
            }))
        }
        RawLevel::Manual { timeout_ms } => Ok(Level::Manual(ManualLevel {
            timeout: match timeout_ms {
                None | Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
            },
        })),
    }
}

/// The daemon writes the pid file when it starts, so the file itself may be
/// missing; but its directory must be readable now, and the file if present.
fn check_pid_file(pf: &Path) -> std::result::Result<(), String> {
    let dir = pf
        .parent()
        .ok_or_else(|| format!("pid_file {} has no directory", pf.display()))?;
    std::fs::read_dir(dir)
        .map_err(|e| format!("pid_file directory {} is not readable: {e}", dir.display()))?;
    match std::fs::File::open(pf) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "pid_file {} exists but cannot be read: {e}",
            pf.display()
        )),
    }
}

fn device(path: PathBuf) -> std::result::Result<Device, String> {
    let md = std::fs::metadata(&path).map_err(|e| format!("device {}: {e}", path.display()))?;
    if !md.file_type().is_block_device() {
        return Err(format!("device {} is not a block device", path.display()));
    }
    let rdev = md.rdev();
    // Linux dev_t encoding (glibc's gnu_dev_major/minor).
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let inflight = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/inflight"));
    crate::process::read_inflight(&inflight)
        .map_err(|e| format!("device {}: {e}", path.display()))?;
    Ok(Device { path, inflight })
}

fn resolve_agent(name: &str) -> std::result::Result<PathBuf, String> {
    if name.is_empty() {
        return Err("agent must name an executable".into());
    }
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        for d in ["/usr/sbin", "/sbin", "/usr/local/sbin"] {
            dirs.push(PathBuf::from(d));
        }
        dirs.into_iter().map(|d| d.join(name)).collect()
    };
    for c in &candidates {
        if let Ok(md) = std::fs::metadata(c) {
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
            if name.contains('/') {
                return Err(format!("agent {} is not an executable file", c.display()));
            }
        }
    }
    Err(format!(
        "agent {name:?} not found{}",
        if name.contains('/') {
            String::new()
        } else {
            " in PATH, /usr/sbin, /sbin or /usr/local/sbin".into()
        }
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config> {
        Config::parse(s, Path::new("/tmp/fence-test.toml"))
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn full_config_parses_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            r#"
[[node]]
id = 3
[[node.level]]
method = "agent"
agent = "/bin/true"
plug = "p3"
options = {{ ip = "10.0.0.1", port_n = 7, ssl = true }}
[[node.level]]
method = "process"
pid_file = "{}/n3.pid"
expect_cmdline = "sleep"
timeout_ms = 500
[[node.level]]
method = "manual"
"#,
            dir.path().display()
        );
        let c = parse(&cfg).unwrap();
        let n = c.node(3).unwrap();
        assert_eq!(n.name, "node3");
        let names: Vec<String> = n.levels.iter().map(Level::method_name).collect();
        assert_eq!(names, ["agent:true", "process", "manual"]);
        let Level::Agent(a) = &n.levels[0] else {
            panic!()
        };
        assert_eq!(a.options.get("port_n").unwrap(), "7");
        assert_eq!(a.options.get("ssl").unwrap(), "true");
        assert!(a.unfence);
        let Level::Process(p) = &n.levels[1] else {
            panic!()
        };
        assert_eq!(p.timeout, Duration::from_millis(500));
        assert!(matches!(
            &n.levels[2],
            Level::Manual(ManualLevel { timeout: None })
        ));
        assert!(c.warnings().iter().any(|w| w.contains("without devices")));
    }

    #[test]
    fn server_table_sets_bounds_and_flags_win() {
        let c = parse("[server]\nmax_connections = 9\nrequest_timeout_ms = 100\n[[node]]\nid = 1\n[[node.level]]\nmethod = \"manual\"\n").unwrap();
        assert_eq!(c.server.max_connections(), 9);
        assert_eq!(c.server.max_pending_ops_per_node(), 16, "default");
        let flags = ServerSettings {
            max_connections: Some(3),
            ..Default::default()
        };
        let s = c.server.overlaid(&flags);
        assert_eq!((s.max_connections(), s.request_timeout()), (3, Duration::from_millis(100)));
        assert!(err("[server]\nmax_connections = 0\n[[node]]\nid = 1\n[[node.level]]\nmethod = \"manual\"\n").contains("must be positive"));
        assert!(err("[server]\nmax_conections = 1\n").contains("max_conections"));
    }

    #[test]
    fn malformed_toml_is_an_error() {
        assert!(err("[[node]\nid = 1").contains("/tmp/fence-test.toml"));
    }

    #[test]
    fn duplicate_and_reserved_ids_are_errors() {
        let lvl = "[[node.level]]\nmethod = \"manual\"\n";
        let e = err(&format!("[[node]]\nid = 1\n{lvl}[[node]]\nid = 1\n{lvl}"));
        assert!(e.contains("node id 1 is configured twice"), "{e}");
        assert!(err(&format!("[[node]]\nid = 0\n{lvl}")).contains("reserved"));
        assert!(err("").contains("no [[node]]"));
        assert!(err("[[node]]\nid = 2\n").contains("no fencing level"));
    }

    #[test]
    fn unknown_keys_and_methods_are_errors() {
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"manual\"\ntimeuot_ms = 5\n");
        assert!(e.contains("timeuot_ms"), "{e}");
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"power\"\n");
        assert!(e.contains("power"), "{e}");
    }

    #[test]
    fn missing_agent_is_an_error_at_load() {
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"agent\"\nagent = \"/nonexistent/fence_x\"\n");
        assert!(
            e.contains("node 1: level 1") && e.contains("/nonexistent/fence_x"),
            "{e}"
        );
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"agent\"\nagent = \"fence_surely_not_installed\"\n");
        assert!(e.contains("not found in PATH"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("fence_plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = err(&format!(
            "[[node]]\nid = 1\n[[node.level]]\nmethod = \"agent\"\nagent = \"{}\"\n",
            plain.display()
        ));
        assert!(e.contains("not an executable"), "{e}");
    }

    #[test]
    fn bad_agent_options_are_errors() {
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"agent\"\nagent = \"/bin/true\"\noptions = { action = \"on\" }\n");
        assert!(e.contains("set by mcfs-fenced"), "{e}");
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"agent\"\nagent = \"/bin/true\"\noptions = { x = \"a\\nb\" }\n");
        assert!(e.contains("line break"), "{e}");
    }

    #[test]
    fn unreadable_pid_dir_and_bad_devices_are_errors() {
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"process\"\npid_file = \"/nonexistent-dir/n.pid\"\n");
        assert!(e.contains("not readable"), "{e}");
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"process\"\n");
        assert!(e.contains("needs pid_file or cgroup"), "{e}");
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"process\"\npid_file = \"/tmp/x.pid\"\ndevices = [\"/etc/hostname\"]\n");
        assert!(e.contains("not a block device"), "{e}");
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"process\"\ncgroup = \"/nonexistent/cg\"\n");
        assert!(e.contains("cgroup.procs"), "{e}");
        let e = err("[[node]]\nid = 1\n[[node.level]]\nmethod = \"process\"\npid_file = \"/tmp/x.pid\"\ntimeout_ms = 0\n");
        assert!(e.contains("positive"), "{e}");
    }

    #[test]
    fn unknown_node_lookup_names_the_known_ones() {
        let c = parse("[[node]]\nid = 4\n[[node.level]]\nmethod = \"manual\"\n").unwrap();
        let e = c.node(9).unwrap_err().to_string();
        assert!(
            e.contains("node 9") && e.contains("configured nodes: 4"),
            "{e}"
        );
    }
}
