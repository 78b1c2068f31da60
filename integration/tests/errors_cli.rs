//! Failures to start, as an operator meets them: the real daemons and commands,
//! each refusing with a message that says what is wrong and what to do, and
//! leaving nothing behind. (Issue 8, "errors a user can act on".)
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mcfs_integration::ops::{self, mcfs, mkfs_image, run, Out};
use mcfs_integration::{bin, dlmd, is_mounted, secret_file, tempdir, wait_for, Daemon, LoopDev, MountGuard};

/// `mcfs-node --device DEV --mountpoint MNT --node-id N` plus `args`.
fn node(dev: &Path, mnt: &Path, id: u32, args: &[&str]) -> Command {
    let mut c = Command::new(bin("mcfs-node"));
    c.arg("--device").arg(dev).arg("--mountpoint").arg(mnt).arg("--node-id").arg(id.to_string()).args(args);
    c
}

fn refused(o: &Out, what: &str, want: &[&str]) {
    assert_ne!(o.code, 0, "{what} should fail: {}", o.text);
    for w in want {
        assert!(o.text.contains(w), "{what}: the message should say {w:?}:\n{}", o.text);
    }
}

fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let m = dir.join(name);
    fs::create_dir_all(&m).unwrap();
    m
}

#[test]
fn port_in_use_names_the_address() {
    let t = tempdir();
    let secret = secret_file(t.path()).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = run(Command::new(bin("mcfs-dlm")).args(["--listen", &addr, "--no-fencing", "--secret-file"]).arg(&secret).arg("--data-dir").arg(t.path().join("dlm"))).unwrap();
    refused(&o, "mcfs-dlm on a taken port", &[&addr, "Address already in use"]);
    let fence = dlmd::fence_config(t.path(), &[], &[1]).unwrap();
    let o = run(Command::new(bin("mcfs-fenced")).args(["--listen", &addr, "--config"]).arg(&fence).arg("--secret-file").arg(&secret).arg("--data-dir").arg(t.path().join("fenced"))).unwrap();
    refused(&o, "mcfs-fenced on a taken port", &[&addr, "Address already in use"]);
    // the node's admin service too
    let img = t.path().join("disk.img");
    mkfs_image(&img, 64 << 20, &["-p", "nolock", "-J", "8"]).unwrap();
    let mnt = mountpoint(t.path(), "mnt");
    let _m = MountGuard { path: mnt.clone() };
    let o = run(node(&img, &mnt, 1, &["--lock", "nolock", "--admin", &addr])).unwrap();
    refused(&o, "mcfs-node with its admin address taken", &[&addr, "Address already in use"]);
    assert!(!is_mounted(&mnt));
}

#[test]
fn node_device_and_mountpoint_problems() {
    let t = tempdir();
    let mnt = mountpoint(t.path(), "mnt");
    let _m = MountGuard { path: mnt.clone() };
    let o = run(node(Path::new("/dev/no-such-disk"), &mnt, 1, &["--lock", "nolock"])).unwrap();
    refused(&o, "a missing device", &["/dev/no-such-disk", "No such file or directory"]);
    // a device that holds no mcfs filesystem
    let blank = t.path().join("blank.img");
    mcfs_integration::sparse_file(&blank, 64 << 20).unwrap();
    let o = run(node(&blank, &mnt, 1, &["--lock", "nolock"])).unwrap();
    refused(&o, "an unformatted device", &[&blank.display().to_string(), "not an mcfs filesystem"]);
    // a filesystem made for the cluster, mounted without a lock server
    let img = t.path().join("dlm.img");
    mkfs_image(&img, 64 << 20, &["-p", "dlm", "-t", "errs:fs", "-J", "8"]).unwrap();
    let o = run(node(&img, &mnt, 1, &["--lock", "nolock"])).unwrap();
    refused(&o, "nolock on a dlm filesystem", &["errs:fs", "--dlm", "--force-nolock"]);
    // mount point missing, or already a mount point
    let o = run(node(&img, &t.path().join("no-such-dir"), 1, &["--lock", "nolock", "--force-nolock"])).unwrap();
    refused(&o, "a missing mount point", &["no-such-dir", "create it first"]);
    let o = run(node(&img, Path::new("/proc"), 1, &["--lock", "nolock", "--force-nolock"])).unwrap();
    refused(&o, "a mount point in use", &["/proc", "already a mount point"]);
    // configuration errors exit 2 and name the flag
    let o = run(node(&img, &mnt, 300, &["--lock", "nolock"])).unwrap();
    assert_eq!(o.code, 2, "{}", o.text);
    assert!(o.text.contains("between 1 and 255"), "{}", o.text);
    let o = run(node(&img, &mnt, 1, &[])).unwrap();
    assert_eq!(o.code, 2, "{}", o.text);
    assert!(o.text.contains("--dlm") && o.text.contains("--secret-file") && o.text.contains("nolock"), "{}", o.text);
    assert!(!is_mounted(&mnt));
}

/// A lock server without fencing (no node here ever needs it) and a
/// filesystem made for it with `journals` journals.
struct Lockspace {
    _t: tempfile::TempDir,
    dir: PathBuf,
    dlm: dlmd::Served,
    secret: PathBuf,
    img: PathBuf,
}

impl Lockspace {
    fn new(journals: u32) -> Lockspace {
        let t = tempdir();
        let dir = t.path().to_path_buf();
        let secret = secret_file(&dir).unwrap();
        let dlm = dlmd::start_dlm(&dir, "dlm", &secret, None, &[]).unwrap();
        let img = dir.join("disk.img");
        mkfs_image(&img, 128 << 20, &["-p", "dlm", "-t", "errs:fs", "-j", &journals.to_string(), "-J", "8"]).unwrap();
        Lockspace { _t: t, dir, dlm, secret, img }
    }

    fn node(&self, id: u32, mnt: &Path, secret: &Path) -> Command {
        let mut c = node(&self.img, mnt, id, &["--dlm", &self.dlm.addr, "--secret-file"]);
        c.arg(secret);
        c
    }

    /// Node `id` mounted in the background, as a daemon of the test.
    fn mount(&self, id: u32) -> (Daemon, MountGuard) {
        let mnt = mountpoint(&self.dir, &format!("mnt{id}"));
        let guard = MountGuard { path: mnt.clone() };
        let mut d = Daemon::spawn(&format!("node{id}"), &mut self.node(id, &mnt, &self.secret), self.dir.join(format!("node{id}.log"))).unwrap();
        wait_for(&format!("node {id} mounted"), Duration::from_secs(30), || {
            assert!(d.exited().is_none(), "node {id} exited:\n{}", d.log_text());
            is_mounted(&mnt).then_some(())
        })
        .unwrap();
        (d, guard)
    }

    fn status(&self) -> serde_json::Value {
        let o = run(mcfs(&["status", "--json", "--dlm", &self.dlm.addr, "--secret-file"]).arg(&self.secret).args(["--cluster-dir", "/nonexistent"])).unwrap();
        serde_json::from_str(&o.stdout).unwrap()
    }
}

#[test]
fn wrong_secret_and_node_id_in_use() {
    let ls = Lockspace::new(2);
    let mnt = mountpoint(&ls.dir, "mnt-x");
    let _m = MountGuard { path: mnt.clone() };
    let other = ls.dir.join("other-secret");
    fs::write(&other, "0123456789abcdef0123456789abcdef").unwrap();
    let o = run(&mut ls.node(2, &mnt, &other)).unwrap();
    refused(&o, "a node with another cluster's secret", &["wrong cluster secret"]);
    let o = run(&mut ls.node(2, &mnt, &ls.dir.join("no-such-secret"))).unwrap();
    refused(&o, "a missing secret file", &["no-such-secret", "No such file or directory"]);
    // two nodes with one id
    let (_n1, _g1) = ls.mount(1);
    let o = run(&mut ls.node(1, &mnt, &ls.secret)).unwrap();
    refused(&o, "a second node 1", &["node id 1", "already in use"]);
    assert!(!is_mounted(&mnt));
    // the lock server is not there
    let o = run(node(&ls.img, &mnt, 2, &["--dlm", "127.0.0.1:1", "--secret-file"]).arg(&ls.secret)).unwrap();
    refused(&o, "an unreachable lock server", &["127.0.0.1:1", "is mcfs-dlm running there"]);
}

#[test]
fn journal_slots_exhausted_after_the_wait() {
    let ls = Lockspace::new(1);
    let (_n1, _g1) = ls.mount(1);
    let mnt = mountpoint(&ls.dir, "mnt2");
    let _m = MountGuard { path: mnt.clone() };
    let t0 = std::time::Instant::now();
    let o = run(&mut ls.node(2, &mnt, &ls.secret)).unwrap();
    refused(&o, "a node beyond the journals", &["no free journal slot after 30s", "all 1 journals are in use", "Unmount a node"]);
    assert!(t0.elapsed() >= Duration::from_secs(29), "it waited for a slot first");
    assert!(!is_mounted(&mnt));
}

/// A node that could not mount wrote nothing: it must leave the lockspace
/// cleanly instead of being treated as a failed node (fenced, journal recovery,
/// refused until unfenced). On real hardware that fence is a power-off.
#[test]

fn a_node_that_could_not_mount_is_not_fenced() {
    let ls = Lockspace::new(1);
    let (mut n1, _g1) = ls.mount(1);
    let mnt = mountpoint(&ls.dir, "mnt2");
    let _m = MountGuard { path: mnt.clone() };
    let o = run(&mut ls.node(2, &mnt, &ls.secret)).unwrap();
    refused(&o, "a node beyond the journals", &["no free journal slot"]);
    let v = ls.status();
    let recs = v["lock_server"]["lockspaces"][0]["recoveries"].as_array().cloned().unwrap_or_default();
    assert!(!recs.iter().any(|r| r["node"] == 2), "node 2 never mounted, yet a recovery of it: {v:#}");
    // node 1 leaves; node 2 mounts at once, without an unfence
    n1.signal(libc::SIGTERM);
    n1.wait_exit(Duration::from_secs(60)).unwrap();
    let (_n2, _g2) = ls.mount(2);
}

/// `unshare -m`: a private mount namespace with an empty /dev (no /dev/fuse).
fn without_dev_fuse(program: &Path, args: &[&str]) -> Out {
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /dev && exec \"$0\" \"$@\""])
        .arg(program)
        .args(args))
    .unwrap()
}

#[test]
fn no_dev_fuse_and_not_root() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    mkfs_image(&img, 64 << 20, &["-p", "nolock", "-J", "8"]).unwrap();
    let mnt = mountpoint(t.path(), "mnt");
    let _m = MountGuard { path: mnt.clone() };
    let node_args = ["--device", img.to_str().unwrap(), "--mountpoint", mnt.to_str().unwrap(), "--node-id", "1", "--lock", "nolock"];
    let d = t.path().join("c");
    let up_args = ["cluster", "up", "--nodes", "1", "--dir", d.to_str().unwrap()];

    let o = without_dev_fuse(&bin("mcfs-node"), &node_args);
    refused(&o, "mcfs-node without /dev/fuse", &["/dev/fuse is missing", "modprobe fuse"]);
    let o = without_dev_fuse(&bin("mcfs"), &up_args);
    refused(&o, "cluster up without /dev/fuse", &["/dev/fuse is missing", "modprobe fuse"]);
    assert!(!d.join("cluster.toml").exists());

    // not root: setpriv drops to nobody
    let nobody = |p: &Path, a: &[&str]| run(Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(p).args(a).env("MCFS_SKIP_BUILD", "1")).unwrap();
    let o = nobody(&bin("mcfs-node"), &node_args);
    refused(&o, "mcfs-node as nobody", &["must run as root"]);
    let o = nobody(&bin("mcfs"), &up_args);
    refused(&o, "cluster up as nobody", &["needs root", "sudo"]);
    assert!(!d.join("cluster.toml").exists());
    assert!(!is_mounted(&mnt));
    assert!(ops::leftovers(t.path()).is_empty(), "{:?}", ops::leftovers(t.path()));
}

/// Sum of every sample of `name` (0 when it has none).
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// A second mcfs-dlm (or mcfs-fenced) on a data directory that a running one
/// uses is refused naming the first one's pid, instead of sled's lock error;
/// the first keeps serving, and once it is SIGKILLed the directory is free again.
#[test]
fn data_dir_in_use_names_the_running_daemon() {
    let t = tempdir();
    let secret = secret_file(t.path()).unwrap();
    let mut first = dlmd::start_dlm(t.path(), "dlm", &secret, None, &[]).unwrap();
    let data = t.path().join("dlm.data");
    let o = run(Command::new(bin("mcfs-dlm")).args(["--listen", "127.0.0.1:0", "--no-fencing", "--secret-file"]).arg(&secret).arg("--data-dir").arg(&data)).unwrap();
    let want = format!(
        "data directory {} is in use by another running mcfs-dlm (pid {}); stop it or use another --data-dir",
        data.display(),
        first.daemon.pid()
    );
    refused(&o, "a second mcfs-dlm on one data directory", &[&want]);
    assert!(!o.text.contains("could not acquire lock") && !o.text.contains("storage:"), "{}", o.text);
    assert!(first.daemon.exited().is_none(), "the first one keeps running");
    assert!(first.scrape().is_ok(), "and serving");
    // log files get no colour codes (stderr is not a terminal here)
    let log = first.daemon.log_text();
    assert!(log.contains("mcfs-dlm listening") && !log.contains('\u{1b}'), "{log}");
    // the lock dies with its holder, however it dies
    first.daemon.kill();
    let again = dlmd::start_dlm(t.path(), "dlm", &secret, None, &[]).unwrap();
    assert_eq!(fs::read_to_string(data.join("mcfs-dlm.pid")).unwrap().trim(), again.daemon.pid().to_string());

    let conf = dlmd::fence_config(t.path(), &[], &[1]).unwrap();
    let fenced = dlmd::start_fenced(t.path(), "fenced", &conf, &secret, "127.0.0.1:0", &[]).unwrap();
    let data = t.path().join("fenced.data");
    let o = run(Command::new(bin("mcfs-fenced")).args(["--listen", "127.0.0.1:0", "--config"]).arg(&conf).arg("--secret-file").arg(&secret).arg("--data-dir").arg(&data)).unwrap();
    let want = format!(
        "data directory {} is in use by another running mcfs-fenced (pid {}); stop it or use another --data-dir",
        data.display(),
        fenced.daemon.pid()
    );
    refused(&o, "a second mcfs-fenced on one data directory", &[&want]);
    assert!(!o.text.contains("could not acquire lock") && !o.text.contains("fence store"), "{}", o.text);
    assert!(fenced.scrape().is_ok(), "the first mcfs-fenced keeps serving");
}

/// A taken port (gRPC or metrics) is named, with the likely culprit, and
/// without a misleading "configuration:" prefix.
#[test]
fn taken_ports_name_the_address_and_the_likely_culprit() {
    let t = tempdir();
    let secret = secret_file(t.path()).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dlm = |args: &[&str], dir: &str| run(Command::new(bin("mcfs-dlm")).args(["--no-fencing", "--secret-file"]).arg(&secret).arg("--data-dir").arg(t.path().join(dir)).args(args)).unwrap();
    let o = dlm(&["--listen", &addr], "d1");
    refused(&o, "mcfs-dlm on a taken port", &[&format!("mcfs-dlm: cannot listen on {addr}: Address already in use (another mcfs-dlm running?)")]);
    assert!(!o.text.contains("configuration:"), "{}", o.text);
    let o = dlm(&["--listen", "127.0.0.1:0", "--metrics", &addr], "d2");
    refused(&o, "mcfs-dlm with its metrics port taken", &[&format!("mcfs-dlm: cannot listen on {addr} (--metrics): Address already in use (another mcfs-dlm running?)")]);
    assert!(!o.text.contains("configuration:"), "{}", o.text);

    let conf = dlmd::fence_config(t.path(), &[], &[1]).unwrap();
    let fenced = |args: &[&str], dir: &str| run(Command::new(bin("mcfs-fenced")).arg("--config").arg(&conf).arg("--secret-file").arg(&secret).arg("--data-dir").arg(t.path().join(dir)).args(args)).unwrap();
    let o = fenced(&["--listen", &addr], "f1");
    refused(&o, "mcfs-fenced on a taken port", &[&format!("mcfs-fenced: cannot listen on {addr}: Address already in use (another mcfs-fenced running?)")]);
    let o = fenced(&["--listen", "127.0.0.1:0", "--metrics", &addr], "f2");
    refused(&o, "mcfs-fenced with its metrics port taken", &[&format!("mcfs-fenced: cannot listen on {addr} (--metrics): Address already in use (another mcfs-fenced running?)")]);
}

/// `mcfs-dlm --check-config`: flags over the TOML file, checked and summed up
/// in one line, without creating the data directory or listening anywhere.
#[test]
fn dlm_check_config_checks_without_opening_anything() {
    let t = tempdir();
    let secret = secret_file(t.path()).unwrap();
    // a taken port: checking must not try to listen on it
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = t.path().join("never-created");
    let toml = t.path().join("dlm.toml");
    let body = format!(
        "listen = \"{addr}\"\ndata_dir = \"{}\"\nsecret_file = \"{}\"\nfence = \"127.0.0.1:7791\"\ncluster_name = \"mine\"\nlease_ms = 4000\n",
        data.display(),
        secret.display()
    );
    fs::write(&toml, &body).unwrap();
    let check = |extra: &[&str]| run(Command::new(bin("mcfs-dlm")).arg("--check-config").arg("--config").arg(&toml).args(extra)).unwrap();
    let o = check(&[]);
    assert_eq!(o.code, 0, "{}", o.text);
    assert_eq!(o.stdout.lines().count(), 1, "one line: {}", o.stdout);
    for w in ["configuration OK", &addr, &data.display().to_string(), "mcfs-fenced at 127.0.0.1:7791", "cluster mine", "lease 4000 ms", "heartbeat 1000 ms"] {
        assert!(o.stdout.contains(w), "the summary should say {w:?}: {}", o.stdout);
    }
    assert!(!data.exists(), "--check-config created the data directory");
    // flags win over the file
    let o = check(&["--lease-ms", "5000", "--cluster-name", "other"]);
    assert!(o.ok() && o.stdout.contains("lease 5000 ms") && o.stdout.contains("cluster other"), "{}", o.text);
    // and every error is one exit 1 naming what is wrong
    for (bad, say) in [
        (body.replace("lease_ms = 4000", "lease_ms = 1000"), "lease (1000 ms) must be at least twice the heartbeat"),
        (body.replace("lease_ms", "lease_msec"), "lease_msec"),
        (body.replace("cluster_name = \"mine\"", "cluster_name = \"mi:ne\""), "cluster_name \"mi:ne\""),
        (body.replace(&secret.display().to_string(), "/nonexistent/secret"), "/nonexistent/secret"),
        (body.replace(&format!("listen = \"{addr}\""), "listen = \"no-port-here\""), "no-port-here"),
        (body.replace("fence = \"127.0.0.1:7791\"\n", ""), "refusing to start without fencing"),
    ] {
        fs::write(&toml, &bad).unwrap();
        let o = check(&[]);
        assert_eq!(o.code, 1, "{say}: {}", o.text);
        assert!(o.stdout.is_empty() && o.text.contains(say), "the error should say {say:?}: {}", o.text);
    }
    assert!(!data.exists());
}

/// With `--cluster-name`, a lock server refuses a filesystem made for another
/// cluster at Join: the node says why and exits, it never became a member, and
/// so nothing about it is fenced.
#[test]
fn a_filesystem_of_another_cluster_is_refused_and_nobody_is_fenced() {
    let t = tempdir();
    let dir = t.path();
    let secret = secret_file(dir).unwrap();
    let conf = dlmd::fence_config(dir, &[], &[1]).unwrap();
    let fenced = dlmd::start_fenced(dir, "fenced", &conf, &secret, "127.0.0.1:0", &[]).unwrap();
    let dlm = dlmd::start_dlm(dir, "dlm", &secret, Some(&fenced.addr), &["--cluster-name", "mine", "--heartbeat-ms", "300", "--lease-ms", "1000"]).unwrap();
    let dev = LoopDev::new_image(dir, 128 << 20).unwrap();
    ops::mkfs(&dev.path, &["-p", "dlm", "-t", "other:fs", "-J", "8"]).unwrap();
    let mnt = mountpoint(dir, "mnt");
    let _m = MountGuard { path: mnt.clone() };
    let o = run(node(&dev.path, &mnt, 1, &["--dlm", &dlm.addr, "--secret-file"]).arg(&secret)).unwrap();
    refused(&o, "a filesystem of another cluster", &["filesystem table other:fs belongs to cluster other; this lock server serves cluster mine"]);
    assert!(!is_mounted(&mnt));
    let log = dlm.daemon.log_text();
    assert!(log.contains("join refused") && log.contains("other:fs"), "the lock server logs the refusal:\n{log}");
    // Nothing was created for it: no lockspace, so no member whose lease could
    // expire. Still, look again after a whole lease has passed.
    let check = || {
        let m = dlm.scrape().unwrap();
        assert_eq!(dlmd::metric(&m, "mcfs_dlm_lockspaces", &[]), Some(0.0), "{m}");
        assert_eq!(dlmd::metric(&m, "mcfs_dlm_sessions", &[]), Some(0.0), "{m}");
        assert_eq!(total(&m, "mcfs_dlm_joins_total"), 0.0, "{m}");
        assert_eq!(total(&m, "mcfs_dlm_fence_calls_total"), 0.0, "{m}");
        let f = fenced.scrape().unwrap();
        assert_eq!(dlmd::metric(&f, "mcfs_fenced_operations_in_progress", &[]), Some(0.0), "{f}");
        assert_eq!(total(&f, "mcfs_fenced_operations_total"), 0.0, "{f}");
        let o = run(mcfs(&["locks", "--json", "--dlm", &dlm.addr, "--secret-file"]).arg(&secret).args(["--cluster-dir", "/nonexistent"])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", o.text));
        assert_eq!(v["lockspaces"].as_array().map(Vec::len), Some(0), "{v:#}");
    };
    check();
    // a negative cannot be waited for: let one lease (1 s) and a reaper tick pass
    std::thread::sleep(Duration::from_millis(1500));
    check();
    // and a filesystem of this cluster mounts as usual
    ops::mkfs(&dev.path, &["-f", "-p", "dlm", "-t", "mine:fs", "-J", "8"]).unwrap();
    let mut d = Daemon::spawn("node1", node(&dev.path, &mnt, 1, &["--dlm", &dlm.addr, "--secret-file"]).arg(&secret), dir.join("node1.log")).unwrap();
    wait_for("node 1 mounted mine:fs", Duration::from_secs(30), || {
        assert!(d.exited().is_none(), "node 1 exited:\n{}", d.log_text());
        is_mounted(&mnt).then_some(())
    })
    .unwrap();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(30)).unwrap().success(), "{}", d.log_text());
}
