//! Failures to start, as an operator meets them: the real daemons and commands,
//! each refusing with a message that says what is wrong and what to do, and
//! leaving nothing behind. (Issue 8, "errors a user can act on".)
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mcfs_integration::ops::{self, mcfs, mkfs_image, run, Out};
use mcfs_integration::{bin, dlmd, is_mounted, secret_file, tempdir, wait_for, Daemon, MountGuard};

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
