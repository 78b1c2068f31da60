//! The files under packaging/ are what an operator installs, so each one is
//! checked by the program that will read it: the example TOML configurations by
//! the real daemons' loaders (and node.toml by a real mount), the systemd units
//! by `systemd-analyze verify`, the fstab example by its shape (it is mounted
//! for real in mount_helper.rs).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mcfs_integration::ops::{mkfs_image, run};
use mcfs_integration::{bin, is_mounted, secret_file, tempdir, wait_addr_file, wait_for, workspace_root, Daemon, MountGuard};

fn packaging(rel: &str) -> PathBuf {
    workspace_root().join("packaging").join(rel)
}

#[test]
fn fence_toml_example_passes_the_agents_check() {
    let t = tempdir();
    let secret = secret_file(t.path()).unwrap();
    let o = run(Command::new(bin("mcfs-fenced")).arg("--check-config").arg("--config").arg(packaging("etc/fence.toml")).arg("--data-dir").arg(t.path().join("fenced")).arg("--secret-file").arg(&secret)).unwrap();
    assert!(
        o.ok(),
        "packaging/etc/fence.toml refused (its agent is fence_ipmilan from Debian's fence-agents: tools/install-deps installs it):\n{}",
        o.text
    );
    assert!(o.stdout.contains("3 node(s)"), "{}", o.text);
    // the check is real: the same file with a typo is refused, naming it
    let bad = t.path().join("fence.toml");
    fs::write(&bad, fs::read_to_string(packaging("etc/fence.toml")).unwrap().replace("timeout_ms = 60000", "timeout = 60000")).unwrap();
    let o = run(Command::new(bin("mcfs-fenced")).arg("--check-config").arg("--config").arg(&bad).arg("--data-dir").arg(t.path().join("fenced")).arg("--secret-file").arg(&secret)).unwrap();
    assert!(!o.ok() && o.text.contains("timeout"), "{}", o.text);
}

#[test]
fn dlm_toml_example_starts_the_lock_server() {
    let t = tempdir();
    let secret = secret_file(t.path()).unwrap();
    let addr_file = t.path().join("dlm.addr");
    // where it listens, stores and finds its secret are this machine's; every
    // other setting comes from the example
    let mut cmd = Command::new(bin("mcfs-dlm"));
    cmd.arg("--config").arg(packaging("etc/dlm.toml")).args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(t.path().join("dlm")).arg("--secret-file").arg(&secret).arg("--addr-file").arg(&addr_file);
    let mut d = Daemon::spawn("dlm", &mut cmd, t.path().join("dlm.log")).unwrap();
    let addr = wait_addr_file(&addr_file, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}:\n{}", d.log_text()));
    let log = mcfs_integration::ops::strip_ansi(&d.log_text());
    assert!(log.contains("lease_ms=3000") && log.contains("mcfs-fenced at 127.0.0.1:7791"), "the example's settings are in force:\n{log}");
    let o = run(mcfs_integration::ops::mcfs(&["locks", "--dlm", &addr, "--secret-file"]).arg(&secret).args(["--cluster-dir", "/nonexistent"])).unwrap();
    assert!(o.ok(), "the server answers: {}", o.text);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).unwrap().success());
    // a typo in the file stops the server, naming the key
    let bad = t.path().join("dlm.toml");
    fs::write(&bad, fs::read_to_string(packaging("etc/dlm.toml")).unwrap().replace("lease_ms =", "lease_msec =")).unwrap();
    let o = run(Command::new(bin("mcfs-dlm")).arg("--config").arg(&bad).args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(t.path().join("dlm2")).arg("--secret-file").arg(&secret)).unwrap();
    assert!(!o.ok() && o.text.contains("lease_msec"), "{}", o.text);
}

#[test]
fn node_toml_example_checks_and_mounts() {
    let t = tempdir();
    // as written (its device need not exist to be checked)
    let o = run(Command::new(bin("mcfs-node")).arg("--config").arg(packaging("etc/node.toml")).arg("--check-config")).unwrap();
    assert!(o.ok(), "packaging/etc/node.toml: {}", o.text);
    assert!(o.stdout.contains("node 1") && o.stdout.contains("/srv/data"), "{}", o.text);
    // and mounted: this machine's device, mount point, files and addresses, the
    // example's everything else (cache_mem, evict, options, threads, ...)
    let secret = secret_file(t.path()).unwrap();
    let img = t.path().join("disk.img");
    mkfs_image(&img, 128 << 20, &["-p", "nolock", "-J", "8"]).unwrap();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let _m = MountGuard { path: mnt.clone() };
    let pid_file = t.path().join("node.pid");
    let mut cmd = Command::new(bin("mcfs-node"));
    cmd.arg("--config")
        .arg(packaging("etc/node.toml"))
        .arg("--device")
        .arg(&img)
        .arg("--mountpoint")
        .arg(&mnt)
        .args(["--lock", "nolock", "--admin", "127.0.0.1:0", "--secret-file"])
        .arg(&secret)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("--admin-addr-file")
        .arg(t.path().join("node.admin"));
    let mut d = Daemon::spawn("node", &mut cmd, t.path().join("node.log")).unwrap();
    wait_for("the example node mounted", Duration::from_secs(30), || {
        assert!(d.exited().is_none(), "node exited:\n{}", d.log_text());
        is_mounted(&mnt).then_some(())
    })
    .unwrap();
    // cache_mem = "1G", under the documented cap of the cgroup's limit
    let log = mcfs_integration::ops::strip_ansi(&d.log_text());
    let budget: u64 = log.split("budget=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no budget in the log:\n{log}"));
    let cap = cgroup_limit().map(|l| (l - l / 4).max(16 << 20)).unwrap_or(u64::MAX);
    assert_eq!(budget, (1u64 << 30).min(cap), "the example's cache_mem, capped by the cgroup ({:?})", cgroup_limit());
    fs::write(mnt.join("f"), b"example").unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"example");
    assert_eq!(fs::read_to_string(&pid_file).unwrap().trim(), d.pid().to_string());
    // SIGTERM is a clean unmount: exit 0, pid file gone
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(st.success(), "SIGTERM: {st:?}\n{}", d.log_text());
    assert!(!is_mounted(&mnt) && !pid_file.exists());
    let (code, out) = mcfs_integration::fsck(&img);
    assert_eq!(code, 0, "{out}");
}

/// This process's cgroup memory limit, read as docs/CONFIGURATION.md says the
/// node does (v2 memory.high, else memory.max; v1 memory.limit_in_bytes).
fn cgroup_limit() -> Option<u64> {
    let cg = fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cg.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        if ctrls.is_empty() {
            for f in ["memory.high", "memory.max"] {
                if let Some(v) = fs::read_to_string(format!("/sys/fs/cgroup{path}/{f}")).ok().and_then(|s| s.trim().parse().ok()) {
                    return Some(v);
                }
            }
        } else if ctrls.split(',').any(|c| c == "memory") {
            let v: u64 = fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")).ok()?.trim().parse().ok()?;
            return (v < 1 << 60).then_some(v);
        }
    }
    None
}

/// A root for `systemd-analyze verify --root`: the machine's own units, ours in
/// /etc/systemd/system, and stand-ins for the binaries and files they name.
fn systemd_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"].into_iter().map(Path::new).find(|p| p.is_dir()).expect("the machine's systemd units");
    fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let o = run(Command::new("cp").arg("-a").arg(units).arg(root.join("usr/lib/systemd/system"))).unwrap();
    assert!(o.ok(), "{}", o.text);
    let etc = root.join("etc/systemd/system");
    fs::create_dir_all(&etc).unwrap();
    for e in fs::read_dir(packaging("systemd")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), etc.join(e.file_name())).unwrap();
    }
    fs::create_dir_all(root.join("usr/local/sbin")).unwrap();
    for b in ["mcfs-fenced", "mcfs-dlm", "mcfs-node"] {
        let p = root.join("usr/local/sbin").join(b);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    fs::create_dir_all(root.join("etc/mcfs")).unwrap();
    for f in ["fence.toml", "dlm.toml", "node.toml"] {
        fs::copy(packaging("etc").join(f), root.join("etc/mcfs").join(f)).unwrap();
    }
    root
}

fn verify(root: &Path, units: &[&str]) -> String {
    let o = run(Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", root.display())).args(units.iter().map(|u| format!("/etc/systemd/system/{u}")))).unwrap();
    o.text
}

#[test]
fn systemd_units_verify_clean() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        // not an assertion that could pass on a stub: say loudly what was not checked
        eprintln!("SKIPPED: systemd-analyze is not installed; the units in packaging/systemd were not verified");
        return;
    }
    let t = tempdir();
    let root = systemd_root(t.path());
    let etc = root.join("etc/systemd/system");
    // a template is verified through an instance
    fs::copy(etc.join("mcfs-node@.service"), etc.join("mcfs-node@node.service")).unwrap();
    let units = ["mcfs-fenced.service", "mcfs-dlm.service", "mcfs-node@node.service", "srv-data.mount"];
    let out = verify(&root, &units);
    assert!(out.trim().is_empty(), "systemd-analyze verify complains:\n{out}");
    // the check can fail: a bad value is reported
    let unit = etc.join("mcfs-dlm.service");
    fs::write(&unit, fs::read_to_string(&unit).unwrap().replace("Restart=on-failure", "Restart=sometimes")).unwrap();
    let out = verify(&root, &["mcfs-dlm.service"]);
    assert!(out.contains("sometimes"), "a broken unit must be reported:\n{out}");
}

#[test]
fn fstab_example_lines_are_well_formed() {
    let text = fs::read_to_string(packaging("fstab.example")).unwrap();
    // active lines and the commented-out examples of other forms
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter(|l| l.starts_with('/'))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f.len(), 6, "six fields: {l}");
        assert!(f[2] == "fuse.mcfs" || f[2] == "mcfs", "type: {l}");
        assert_eq!(f[5], "0", "a shared device is never fscked at boot: {l}");
        let opts: Vec<&str> = f[3].split(',').collect();
        assert!(opts.contains(&"nofail"), "nofail: {l}");
        let cluster = !opts.contains(&"lock=nolock");
        if cluster {
            assert!(opts.contains(&"_netdev"), "a cluster mount needs the network: {l}");
            assert!(opts.iter().any(|o| o.starts_with("config=")) || (opts.iter().any(|o| o.starts_with("dlm=")) && opts.iter().any(|o| o.starts_with("secret_file=")) && opts.iter().any(|o| o.starts_with("node_id="))), "{l}");
        }
    }
}

#[test]
fn install_names_installs_every_name_and_refuses_bad_use() {
    bin("mcfs-node");
    let t = tempdir();
    let script = workspace_root().join("tools/install-names");
    let o = run(Command::new(&script).arg("--all").arg("--helper-dir").arg(t.path().join("helpers")).arg(t.path().join("bin"))).unwrap();
    assert!(o.ok(), "{}", o.text);
    for (dir, names) in [("bin", &["mkfs.mcfs", "fsck.mcfs", "mcfs-node", "mcfs-dlm", "mcfs-fenced", "mcfs"][..]), ("helpers", &["mount.fuse.mcfs", "mount.mcfs"][..])] {
        for n in names {
            let p = t.path().join(dir).join(n);
            let target = fs::read_link(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(target.is_absolute() && target.exists(), "{} -> {}", p.display(), target.display());
        }
    }
    assert!(o.text.contains("only in /sbin"), "a helper dir mount(8) will not search is pointed out: {}", o.text);
    // the helper names run mcfs-node in helper mode (argv[0])
    let o = run(Command::new(t.path().join("helpers/mount.fuse.mcfs"))).unwrap();
    assert!(!o.ok() && o.text.contains("usage: mount.fuse.mcfs DEVICE MOUNTPOINT"), "{}", o.text);
    let o = run(Command::new(&script).arg("--no-such-flag")).unwrap();
    assert!(!o.ok() && o.text.contains("unknown option --no-such-flag"), "{}", o.text);
    let o = run(Command::new(&script).arg(t.path().join("a")).arg(t.path().join("b"))).unwrap();
    assert!(!o.ok() && o.text.contains("one BINDIR only"), "{}", o.text);
}
