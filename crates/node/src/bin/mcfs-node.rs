//! mcfs-node: mount a shared mcfs device through FUSE. Thin: parse the
//! configuration, open the device, join the lockspace, mount, serve, and on
//! unmount or SIGTERM leave cleanly. Everything else lives in the library.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use mcfs_blockdev::BlockDevice;
use mcfs_node::admin::{Admin, DaemonInfo};
use mcfs_node::config::{Args, Config};
use mcfs_node::fs::{read_superblock, Fs, MountOptions};
use mcfs_node::glock::{LockBackend, NoLock};
use mcfs_node::lock_dlm::DlmBackend;
use mcfs_proto::auth::Secret;

fn main() -> ExitCode {
    // Few malloc arenas: memory freed by reclaim on one thread is reused by
    // the others and can be given back, instead of sitting in one arena per
    // thread (the budget is meant to bound the daemon's RSS).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any other thread exists only sets a malloc tunable.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // buffers of 1 MiB and more (read-ahead windows, large requests) are
        // mapped and unmapped, not kept in the heap after use (glibc would
        // otherwise raise this threshold to the largest buffer freed)
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let argv: Vec<String> = std::env::args().collect();
    let helper = argv.first().is_some_and(|a| a.ends_with("mount.fuse.mcfs") || a.ends_with("mount.mcfs"));
    let args = if helper {
        match Args::from_mount_helper(&argv) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("mount.fuse.mcfs: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        <Args as clap::Parser>::parse()
    };
    let log_json = args.log_json;
    let check_only = args.check_config;
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) if helper => {
            // in mount(8)'s terms: options, not flags
            let e = e
                .replace("--node-id", "node_id=")
                .replace("--dlm ADDR", "dlm=ADDR")
                .replace("--secret-file FILE", "secret_file=FILE")
                .replace("--lock nolock", "lock=nolock")
                .replace("--evict", "evict=")
                .replace("--", "");
            eprintln!("mount.fuse.mcfs: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("mcfs-node: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("configuration ok: node {} mounts {} on {} ({})", cfg.node_id, cfg.device.display(), cfg.mountpoint.display(), if cfg.nolock { "nolock" } else { "dlm" });
        return ExitCode::SUCCESS;
    }
    init_logging(log_json);
    if helper {
        // mount(8) waits for its helper: serve from a child, return once mounted.
        return daemonize_and_wait(&cfg);
    }
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // once: through the log (which is stderr)
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Mount helper: fork; the child serves, the parent waits until the mount
/// appears (or the child fails) so that `mount` reports the outcome.
fn daemonize_and_wait(cfg: &Config) -> ExitCode {
    // The child's refusal reaches mount(8) through this pipe.
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 with a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("mount.fuse.mcfs: pipe failed");
        return ExitCode::from(1);
    }
    // SAFETY: fork before any thread was started (logging does not spawn).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("mount.fuse.mcfs: fork failed");
        return ExitCode::from(1);
    }
    if pid == 0 {
        // SAFETY: setsid in the child detaches it from the terminal.
        unsafe { libc::setsid() };
        // mount(8) (and `out=$(mount ...)`) must not wait for the daemon's
        // output: it goes to log_file= or nowhere
        let target = cfg.log_file.clone().unwrap_or_else(|| "/dev/null".into());
        if let Ok(f) = std::fs::OpenOptions::new().create(true).append(true).open(&target) {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 of a valid descriptor onto stdout/stderr.
            unsafe {
                libc::dup2(f.as_raw_fd(), 1);
                libc::dup2(f.as_raw_fd(), 2);
            }
        }
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(fds[0]) };
        return match run(cfg.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                // SAFETY: write to our pipe end; a short write only truncates the message.
                unsafe { libc::write(fds[1], e.as_ptr().cast(), e.len().min(4096)) };
                ExitCode::from(1)
            }
        };
    }
    // SAFETY: the parent keeps only the read end.
    unsafe { libc::close(fds[1]) };
    // Wait as long as the daemon lives: joining may wait for the lock server
    // and a journal slot, and replay takes its time.
    let mp = cfg.mountpoint.to_string_lossy().to_string();
    loop {
        if is_mounted(&mp) {
            return ExitCode::SUCCESS;
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child, non-blocking.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            let mut buf = vec![0u8; 4096];
            // SAFETY: read from our pipe end into a buffer of that size.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            let why = if n > 0 { String::from_utf8_lossy(&buf[..n as usize]).to_string() } else { "see its log (log_file=PATH)".into() };
            eprintln!("mount.fuse.mcfs: the node daemon exited before mounting: {why}");
            return ExitCode::from(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn is_mounted(mp: &str) -> bool {
    std::fs::read_to_string("/proc/mounts").map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(mp))).unwrap_or(false)
}

fn preflight(cfg: &Config) -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing: load the fuse module (modprobe fuse)".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("mcfs-node must run as root (it mounts FUSE without fusermount and opens the device with O_DIRECT)".into());
    }
    match std::fs::metadata(&cfg.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("mount point {} is not a directory", cfg.mountpoint.display())),
        Err(e) => return Err(format!("mount point {}: {e} (create it first)", cfg.mountpoint.display())),
    }
    if is_mounted(&cfg.mountpoint.to_string_lossy()) {
        return Err(format!("{} is already a mount point (a stale mount of a killed node? try: umount -l {})", cfg.mountpoint.display(), cfg.mountpoint.display()));
    }
    Ok(())
}

fn run(cfg: Config) -> Result<(), String> {
    preflight(&cfg)?;
    if let Some(m) = mounted_elsewhere(&cfg.device) {
        return Err(format!("{} is busy: {m}; mounting it here too would corrupt it", cfg.device.display()));
    }
    // the blockdev error already names the path
    let dev = mcfs_blockdev::open_path(&cfg.device, cfg.read_only).map_err(|e| e.to_string())?;
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let sb = read_superblock(dev.as_ref()).map_err(|e| match &e {
        mcfs_node::FsError::Corrupt(fe) if fe.to_string().contains("bad magic") => {
            format!("{} is not an mcfs filesystem (no mcfs superblock at 64 KiB or in the last block)", cfg.device.display())
        }
        _ => format!("{}: not a usable mcfs filesystem: {e}, and no intact backup superblock in the last block either (fsck.mcfs reports what it finds)", cfg.device.display()),
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("mcfs-rt").build().map_err(|e| format!("runtime: {e}"))?;
    let fs_cell: Arc<OnceLock<Arc<Fs>>> = Arc::new(OnceLock::new());
    let secret = match &cfg.secret_file {
        Some(p) => Some(Secret::from_file(p)?),
        None => None,
    };

    // Admin service first: its address goes to the lock server at join.
    let listener = rt.block_on(tokio::net::TcpListener::bind(&cfg.admin)).map_err(|e| format!("admin address {}: {e}", cfg.admin))?;
    let admin_addr = listener.local_addr().map_err(|e| e.to_string())?.to_string();
    let info = DaemonInfo {
        node_id: cfg.node_id,
        device: cfg.device.display().to_string(),
        mountpoint: cfg.mountpoint.display().to_string(),
        pid: std::process::id(),
        lock: if cfg.nolock { "nolock".into() } else { "dlm".into() },
        dlm: cfg.dlm.clone().unwrap_or_default(),
    };
    let admin_secret = secret.clone().unwrap_or_else(|| Secret::new(format!("local-{}", std::process::id())).unwrap_or_else(|_| unreachable_secret()));
    rt.spawn(mcfs_node::admin::serve(listener, Admin { fs: fs_cell.clone(), info }, admin_secret));
    if let Some(p) = &cfg.admin_addr_file {
        std::fs::write(p, &admin_addr).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(p) = &cfg.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| format!("pid file {}: {e}", p.display()))?;
    }

    let mut client = None;
    let backend: Arc<dyn LockBackend> = if cfg.nolock {
        Arc::new(NoLock::default())
    } else {
        let (Some(addr), Some(secret)) = (cfg.dlm.clone(), secret.clone()) else {
            return Err("a cluster mount needs --dlm and --secret-file".into());
        };
        let cc = mcfs_dlm::ClientConfig { addr: addr.clone(), secret, lockspace: sb.table(), node_id: cfg.node_id, admin_addr: admin_addr.clone() };
        let (c, events) = rt.block_on(join(cc, &cfg, &sb.table()))?;
        let ctx = Arc::new(mcfs_node::lock_dlm::RecoveryCtx { dev: dev.clone(), sb: sb.clone(), node_id: cfg.node_id, budget: mcfs_node::icache::budget::Budget::new(64 << 20) });
        rt.spawn(mcfs_node::lock_dlm::run_events(events, fs_cell.clone(), c.clone(), ctx));
        client = Some(c.clone());
        // --evict=sync keeps GFS2's behaviour whole: a try-lock waits for the
        // lock server's answer
        let try_timeout = (cfg.evict == mcfs_node::icache::EvictMode::Nonblocking).then_some(mcfs_node::lock_dlm::TRY_TIMEOUT);
        Arc::new(DlmBackend::new(c, rt.handle().clone(), try_timeout))
    };

    let mut opts = MountOptions { node_id: cfg.node_id, evict: cfg.evict, min_hold: cfg.min_hold, force_nolock: cfg.force_nolock, max_glocks: cfg.max_glocks, ..Default::default() };
    let budget = match (cfg.cache_mem, mcfs_node::icache::budget::cgroup_limit()) {
        (Some(m), Some(cg)) => m.min(cg.saturating_sub(cg / 4).max(16 << 20)),
        (Some(m), None) => m,
        (None, Some(cg)) => cg.saturating_sub(cg / 4).max(16 << 20),
        (None, None) => opts.cache_mem,
    };
    opts.cache_mem = budget;
    let fs = match Fs::mount(dev, backend, opts) {
        Ok(fs) => fs,
        Err(e) => {
            // never mounted, nothing to recover: leave cleanly so the cluster
            // does not fence a node that only failed to start
            if let Some(c) = client.take() {
                let _ = rt.block_on(c.leave());
            }
            return Err(format!("mount failed: {}", mount_error(&e)));
        }
    };
    let _ = fs_cell.set(fs.clone());
    // A panic anywhere (a bug, or damage no check caught) withdraws the
    // filesystem before the thread unwinds: the half-done operation's buffers
    // are never written, and the exit status says withdrawn, not clean.
    let fs_panic = Arc::downgrade(&fs);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if let Some(fs) = fs_panic.upgrade() {
            fs.withdraw(&format!("internal error (panic): {info}"));
        }
    }));
    if let Some(c) = &client {
        if let Err(e) = rt.block_on(c.set_session_info(fs.journal_slot() as i32, &admin_addr)) {
            tracing::warn!("could not register journal slot with the lock server: {e}");
        }
    }
    fs.instantiate_root().map_err(|e| format!("root directory: {e}"))?;
    start_pressure_watch(&fs);
    if let Some(addr) = &cfg.metrics {
        let l = rt.block_on(tokio::net::TcpListener::bind(addr)).map_err(|e| format!("metrics address {addr}: {e}"))?;
        let fsm = fs.clone();
        rt.spawn(mcfs_dlm::net::metrics::serve(l, std::sync::Arc::new(move || fsm.metrics_text())));
    }
    tracing::info!(mountpoint = %cfg.mountpoint.display(), device = %cfg.device.display(), admin = %admin_addr, budget, evict = cfg.evict.as_str(), "serving");
    if mcfs_blockdev::huge_page_mode().as_deref() == Some("never") {
        tracing::warn!("transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled is never): large file reads and writes go to the device in smaller requests and run slower (docs/CONFIGURATION.md, Performance)");
    }
    // READY once the FUSE session is up: a little after this, the mount exists
    let mp_ready = cfg.mountpoint.clone();
    std::thread::spawn(move || {
        for _ in 0..600 {
            if is_mounted(&mp_ready.to_string_lossy()) {
                sd_notify_ready();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });

    // SIGUSR1: drop unused inodes and clean buffers (like drop_caches).
    let fsu = fs.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            return;
        };
        while usr1.recv().await.is_some() {
            let f = fsu.clone();
            let _ = tokio::task::spawn_blocking(move || f.drop_caches()).await;
        }
    });
    // SIGTERM / SIGINT: unmount, which ends the session below cleanly.
    let mp = cfg.mountpoint.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal: unmounting");
        unmount(&mp);
    });

    let mut fc = fuser::Config::default();
    fc.mount_options = vec![
        fuser::MountOption::FSName(cfg.device.display().to_string()),
        fuser::MountOption::Subtype("mcfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    if cfg.read_only {
        fc.mount_options.push(fuser::MountOption::RO);
    }
    if cfg.allow_other {
        fc.acl = fuser::SessionACL::All;
    }
    fc.n_threads = Some(cfg.threads);
    fc.clone_fd = true;
    let res = mcfs_node::fuse::McfsFuse::new(fs.clone(), cfg.kernel_cache, cfg.name_cache).run(&cfg.mountpoint, &fc);
    // destroy() has run: the filesystem is unmounted (or withdrawn).
    let clean = !fs.is_withdrawn();
    if let Err(e) = res {
        tracing::error!("FUSE session: {e}");
    }
    if let Some(c) = client {
        if clean {
            if let Err(e) = rt.block_on(c.leave()) {
                tracing::warn!("leaving the lockspace: {e}");
            }
        } else {
            tracing::error!("withdrawn: not leaving the lockspace cleanly, so the cluster recovers this node's journal");
        }
    }
    if let Some(p) = &cfg.pid_file {
        let _ = std::fs::remove_file(p);
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if clean {
        Ok(())
    } else {
        Err(format!("withdrawn: {}", fs.withdraw_reason().unwrap_or_default()))
    }
}

/// Join the lockspace, retrying while the lock server is unreachable (a node
/// may boot before it), with messages an operator can act on.
async fn join(cc: mcfs_dlm::ClientConfig, cfg: &Config, table: &str) -> Result<(mcfs_dlm::DlmClient, tokio::sync::mpsc::UnboundedReceiver<mcfs_dlm::ClientEvent>), String> {
    let t0 = std::time::Instant::now();
    let mut said = false;
    loop {
        match mcfs_dlm::DlmClient::connect(cc.clone()).await {
            Ok(x) => return Ok(x),
            Err(mcfs_dlm::Error::FailedPrecondition(m)) if m.contains("fenced") => {
                return Err(format!("node {} is fenced: {m}. Once its journal has been replayed, let it back in with `mcfs fence unfence {}`", cfg.node_id, cfg.node_id));
            }
            Err(mcfs_dlm::Error::FailedPrecondition(m)) => return Err(format!("the lock server refused node {}: {m}", cfg.node_id)),
            Err(mcfs_dlm::Error::Unauthenticated(m)) => return Err(format!("the lock server at {} refused our cluster secret ({m}): check --secret-file", cc.addr)),
            Err(mcfs_dlm::Error::Unavailable(m)) if m.contains("already has a session") => {
                return Err(format!(
                    "node id {} is already in use in {table} (another node has it, or this node's previous session has not expired yet: wait for its lease, then retry)",
                    cfg.node_id
                ));
            }
            Err(e) if t0.elapsed() < cfg.join_wait => {
                if !said {
                    tracing::warn!("cannot reach the lock server at {} yet ({e}); retrying for up to {:?}", cc.addr, cfg.join_wait);
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cannot join lockspace {table} at {}: {e} (is mcfs-dlm running there?)", cc.addr)),
        }
    }
}

/// A mount refusal, phrased for the operator.
fn mount_error(e: &mcfs_node::FsError) -> String {
    match e {
        mcfs_node::FsError::Invalid(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Is `dev` mounted by the kernel, or held open exclusively (a holder in
/// sysfs)? Those uses would corrupt each other.
fn mounted_elsewhere(dev: &Path) -> Option<String> {
    let canon = std::fs::canonicalize(dev).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    for l in mounts.lines() {
        let mut f = l.split(' ');
        let (Some(src), Some(mp), Some(ty)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        // our own FUSE mounts name the device as their source: several nodes
        // of one host share it on purpose
        if ty.starts_with("fuse") {
            continue;
        }
        if std::fs::canonicalize(src).ok().as_deref() == Some(canon.as_path()) {
            return Some(format!("it is mounted on {mp} ({ty})"));
        }
    }
    let name = canon.file_name()?.to_string_lossy().to_string();
    let holders = std::fs::read_dir(format!("/sys/block/{name}/holders")).ok()?;
    let h: Vec<String> = holders.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string())).collect();
    (!h.is_empty()).then(|| format!("it is held by {}", h.join(", ")))
}

/// Tell systemd the mount is ready (Type=notify units).
fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let p = std::path::PathBuf::from(path);
    if p.to_string_lossy().starts_with('@') {
        return; // abstract socket: not supported by std; Type=simple still works
    }
    let _ = sock.send_to(b"READY=1", &p);
}

fn unreachable_secret() -> Secret {
    // Secret::new only fails on empty or non-printable input; "local" is neither.
    Secret::new("local").unwrap_or_else(|_| std::process::abort())
}

fn unmount(mp: &Path) {
    let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid C string.
    let r = unsafe { libc::umount2(c.as_ptr(), 0) };
    if r != 0 {
        tracing::warn!("unmount busy; detaching lazily (it completes when the last user leaves)");
        // SAFETY: as above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The cgroup's memory-pressure notifications start reclaim early (v1:
/// memory.pressure_level through cgroup.event_control and an eventfd).
fn start_pressure_watch(fs: &Arc<Fs>) {
    let Some(dir) = mcfs_node::icache::budget::cgroup_v1_dir() else {
        return;
    };
    let budget = fs.budget.clone();
    let _ = std::thread::Builder::new().name("mem-pressure".into()).spawn(move || {
        let pl = dir.join("memory.pressure_level");
        let ctl = dir.join("cgroup.event_control");
        let Ok(plf) = std::fs::File::open(&pl) else {
            return;
        };
        // SAFETY: eventfd with valid flags.
        let efd = unsafe { libc::eventfd(0, 0) };
        if efd < 0 {
            return;
        }
        use std::os::fd::AsRawFd;
        let line = format!("{} {} low", efd, plf.as_raw_fd());
        if std::fs::write(&ctl, line).is_err() {
            return;
        }
        tracing::info!(cgroup = %dir.display(), "watching memory pressure");
        let mut buf = [0u8; 8];
        loop {
            // SAFETY: read 8 bytes from our eventfd.
            let n = unsafe { libc::read(efd, buf.as_mut_ptr().cast(), 8) };
            if n != 8 {
                return;
            }
            budget.pressure();
        }
    });
}
